"""Comparison helpers for the test-suite: per-dtype tolerances and an allclose that explains itself."""

from __future__ import annotations

import torch

# (rtol, atol) for a fast path computed from inputs of this dtype, compared with the float64 reference
# evaluated on the same (rounded) inputs. The accumulations are float32 in every path, so the float32
# row is set by float32 round-off; the half-precision rows by the rounding of outputs written in
# that dtype (dlogits, dhidden): two ulps, 2 * 2^-8 for bf16 and 2 * 2^-11 for fp16.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (8e-3, 1e-5),
    torch.float16: (1e-3, 1e-6),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """allclose against a float64 expectation; on failure, report where and by how much.

    The absolute tolerance scales with the tensor's largest magnitude: a gradient entry is a sum of
    terms as large as the largest entries, and float32 round-off is relative to those terms, not to
    the (possibly cancelled) sum.
    """
    rtol, atol = TOLERANCES[dtype]
    a = actual.detach().double()
    e = expected.detach().double()
    if e.numel():
        atol = atol * max(1.0, float(e.abs().max()))
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rows = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} values off (rtol={rtol}, atol={atol}); "
            f"nan={int(torch.isnan(a).sum())}, inf={int(torch.isinf(a).sum())}; "
            f"max abs err {float((a - e).abs().max()):.3g}; first: {rows}"
        )


def assert_within(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor | float) -> None:
    """|actual - expected| <= tol elementwise (tol broadcast; NaN fails), with the worst offenders named."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().double()
    err = (actual - expected).abs()
    tol = torch.as_tensor(tol, dtype=err.dtype, device=err.device)
    bad = ~(err <= tol)
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        lines = [f"{i}: got {actual[tuple(i)].item():.9g} expected {expected[tuple(i)].item():.9g} "
                 f"tol {tol.expand_as(err)[tuple(i)].item():.3g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} of {err.numel()} elements off, max err "
                             f"{err.max().item():.3g}\n" + "\n".join(lines))
