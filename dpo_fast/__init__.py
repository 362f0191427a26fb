"""dpo_fast: fast, memory-lean Direct Preference Optimization.

Importing this package has no side effects: no Triton import, no compilation, no environment reads.
"""

from .loss.formulas import LOSS_TYPES, DPOOutput, LossConfig, dpo_loss
from .loss.functional import fused_dpo_loss, linear_dpo_loss, linear_sequence_logps, sequence_logps
from .loss.modules import DPOLoss
from .training.config import DPOConfig
from .training.trainer import DPOTrainer

__version__ = "0.1.0"

# Public names imported on first use (PEP 562), so that `import dpo_fast` stays light.
_LAZY = {"pair_logps": "dpo_fast.training.scoring"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dpo_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "LOSS_TYPES",
    "DPOConfig",
    "DPOLoss",
    "DPOOutput",
    "DPOTrainer",
    "LossConfig",
    "dpo_loss",
    "fused_dpo_loss",
    "linear_dpo_loss",
    "linear_sequence_logps",
    "pair_logps",
    "sequence_logps",
]
