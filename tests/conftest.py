"""Test configuration shared by the whole suite."""

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter. It must be chosen before any kernel
# module is imported (triton.jit reads it at decoration time), hence here rather than in a fixture.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite's tensors are tiny: one intra-op thread avoids thread start-up and contention costs that
# dominate at these sizes (measured: a trainer resume test 17 s with default threads, 2.6 s with one).
torch.set_num_threads(1)
