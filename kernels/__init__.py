"""Triton kernels of dpo_fast, installed as `dpo_fast.kernels`.

Only kernels live here; shape checks, grids and autograd live in `dpo_fast.loss.ops`.
Importing a kernel module imports Triton, so `dpo_fast.loss.ops` imports them lazily.
"""
