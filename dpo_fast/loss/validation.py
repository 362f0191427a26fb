"""Input checks shared by the public functions: each error names the argument and what was expected."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported: it is a Linux-only requirement (no wheels for macOS or Windows)."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA tensors when Triton is installed, 'torch' elsewhere; 'triton' off-GPU
    needs the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not known; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not installed (it exists for Linux "
                         "only): pip install triton, or use backend='torch' or 'auto'")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' got tensors on {device}: Triton runs on CUDA tensors, or on the CPU only under "
            "TRITON_INTERPRET=1 (set it before importing dpo_fast); use backend='torch' or 'auto' on the CPU"
        )
    return backend


def check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_labels(name: str, labels: Tensor, expected_shape: tuple[int, ...], vocab_size: int, ignore_index: int,
                 device: torch.device) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have shape {list(expected_shape)}, got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the logits/hidden states are on {device}")
    # One host sync: an out-of-range id would otherwise read past the row (or give a silent wrong number).
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}{list(idx)} = {int(labels[idx])} is outside [0, {vocab_size}) "
            f"and is not ignore_index={ignore_index}"
        )


def check_segment_ids(segment_ids: Tensor, num_tokens: int, device: torch.device, *, paired: bool = True) -> int:
    """Validates packed-form segment ids and returns the number of sequences.

    paired: the sequences are B chosen then B rejected, so their count must be even.
    """
    if not isinstance(segment_ids, Tensor):
        raise TypeError(f"segment_ids must be a torch.Tensor, got {type(segment_ids).__name__}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    if tuple(segment_ids.shape) != (num_tokens,):
        raise ValueError(
            f"segment_ids must have shape [{num_tokens}] (one id per token), got {list(segment_ids.shape)}")
    if segment_ids.device != device:
        raise ValueError(f"segment_ids is on {segment_ids.device} but the logits/hidden states are on {device}")
    if num_tokens == 0 or int(segment_ids.max()) < 0:
        raise ValueError("segment_ids marks no token as scored (all -1): there is no sequence to score")
    if int(segment_ids.min()) < -1:
        raise ValueError(f"segment_ids must be >= -1 (-1 = not scored), got {int(segment_ids.min())}")
    num_sequences = int(segment_ids.max()) + 1
    if paired and num_sequences % 2:
        raise ValueError(
            f"segment_ids name {num_sequences} sequences (0..{num_sequences - 1}); expected an even count: "
            "sequences 0..B-1 are the chosen ones and B..2B-1 the rejected ones"
        )
    return num_sequences


def check_ref(name: str, t: Tensor | None, num_pairs: int, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (num_pairs,):
        raise ValueError(f"{name} must have shape [{num_pairs}] (one per pair), got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits/hidden states are on {device}")
