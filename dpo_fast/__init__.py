"""dpo_fast: fast, memory-lean Direct Preference Optimization.

Importing this package has no side effects: no Triton import, no compilation, no environment reads.
"""

from ._lazy import lazy_exports as _lazy_exports
from .loss.formulas import LOSS_TYPES, DPOOutput, LossConfig, dpo_loss
from .loss.functional import fused_dpo_loss, linear_dpo_loss, linear_sequence_logps, sequence_logps
from .loss.modules import DPOLoss
from .training.config import DPOConfig
from .training.trainer import DPOTrainer

__version__ = "0.1.0"

# Public names imported on first use, so that `import dpo_fast` stays light.
__getattr__, __dir__ = _lazy_exports(__name__, {"pair_logps": "dpo_fast.training.scoring"})

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
