"""dpo_fast: fast, memory-lean Direct Preference Optimization.

Importing this package has no side effects: no Triton import, no compilation, no environment reads.
"""

from .config import DPOConfig
from .functional import fused_dpo_loss, linear_dpo_loss, linear_sequence_logps, sequence_logps
from .losses import LOSS_TYPES, DPOOutput, LossConfig, dpo_loss
from .modules import DPOLoss
from .trainer import DPOTrainer

__version__ = "0.1.0"

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
    "sequence_logps",
]
