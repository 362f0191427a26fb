"""Triton kernels of dpo_fast, installed as `dpo_fast.kernels`.

Only kernels live here; shape checks, grids and autograd live in `dpo_fast.ops`.
Importing a kernel module imports Triton, so `dpo_fast.ops` imports them lazily.
"""
