"""Drop-ins for the trainers users already have.

- `dpo_fast.integrations.trl`: TRL's DPOTrainer with dpo_fast's loss (needs `pip install 'dpo-fast[trl]'`).
- `dpo_fast.integrations.hf`: a `compute_loss` for a DPO written on transformers' `Trainer`.

Submodules are imported explicitly; importing this package imports neither TRL nor transformers' Trainer.
"""
