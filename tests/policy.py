"""The numerical policy (README) as one comparison helper; every parity test uses it.

- float64 against torch float64: ``|ours - ref| <= atol + rtol * |ref|`` elementwise with
  `torch.testing.assert_close`'s float64 defaults, rtol = atol = 1e-7.
- float32: measure our error and torch's float32 error against a float64 reference; ours must
  be within ``factor * err_torch + 8 * eps32 * max|ref|``, factor 2 for values and 3 for
  gradients (FlashAttention's rule: it scales with the problem, unlike a fixed atol). A test
  may pass a larger `scale` than max|ref| for a result known to be a cancellation.
- torch CPU against torch CUDA in float32: rtol = atol = 1e-3 (TF32 off, see conftest).
"""

from __future__ import annotations

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _where(err: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(np.argmax(err), err.shape)) if err.ndim else ()


def assert_allclose_named(name: str, ours, ref, *, rtol: float, atol: float) -> float:
    """Elementwise ``|ours - ref| <= atol + rtol * |ref|``; returns the max abs error.

    The failure message names the tensor, the worst entry, both values and the allowed error.
    """
    ours, ref = _np(ours), _np(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    err = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    allowed = atol + rtol * np.abs(ref.astype(np.float64))
    excess = err - allowed
    if err.size and np.max(excess) > 0:
        j = _where(excess)
        raise AssertionError(
            f"{name}: max error {err.max():.3g}; at index {j} got {ours[j]!r}, "
            f"expected {ref[j]!r}, error {err[j]:.3g} > allowed {allowed[j]:.3g} "
            f"(rtol={rtol}, atol={atol})"
        )
    return float(err.max()) if err.size else 0.0


def assert_close_policy(
    name: str, ours, ref64, *, torch32=None, grad: bool = False, scale: float | None = None
) -> float:
    """Check `ours` against the float64 reference under the policy for its dtype.

    Parameters
    ----------
    name : what is compared (``"d_weight_ih_l0"``), for the failure message.
    ours : our result, float64 or float32.
    ref64 : the float64 reference (torch float64 for parity tests).
    torch32 : torch's own float32 result on the same inputs; required when `ours` is float32.
    grad : whether this is a gradient (allowed factor 3 instead of 2 in float32).
    scale : the magnitude the float32 floor is relative to, ``max|ref64|`` when None. A test
        passes a larger one only for a result known to come from cancellation (a sum of terms
        much larger than itself), whose rounding error scales with the terms, not the result;
        torch's own error on a tensor of one or two such entries can be a lucky near-zero.

    Returns our max abs error against `ref64`.
    """
    ours, ref64 = _np(ours), _np(ref64)
    assert ref64.dtype == np.float64, f"{name}: the reference must be float64, got {ref64.dtype}"
    if ours.dtype == np.float64:
        return assert_allclose_named(name, ours, ref64, rtol=1e-7, atol=1e-7)
    assert ours.dtype == np.float32, f"{name}: expected float32 or float64, got {ours.dtype}"
    assert torch32 is not None, f"{name}: a float32 check needs torch's float32 result"
    torch32 = _np(torch32)
    assert ours.shape == ref64.shape == torch32.shape, (
        f"{name}: shapes ours {ours.shape}, torch {torch32.shape}, reference {ref64.shape}"
    )
    if not ours.size:
        return 0.0
    err = np.abs(ours.astype(np.float64) - ref64)
    err_torch = float(np.abs(torch32.astype(np.float64) - ref64).max())
    factor = 3 if grad else 2
    scale = float(np.abs(ref64).max()) if scale is None else scale
    allowed = factor * err_torch + 8 * EPS32 * scale
    if err.max() > allowed:
        j = _where(err)
        raise AssertionError(
            f"{name}: max error {err.max():.3g} at index {j} (got {ours[j]!r}, reference "
            f"{ref64[j]!r}) > allowed {allowed:.3g} = {factor} * torch float32 error "
            f"{err_torch:.3g} + 8 * eps32 * scale {8 * EPS32 * scale:.3g}"
        )
    return float(err.max())
