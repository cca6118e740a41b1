r"""Central finite differences in float64: a gradient check that needs no other library.

For a scalar loss L(x), each entry of the numerical gradient is

    dL/dx_j ~ (L(x + eps e_j) - L(x - eps e_j)) / (2 eps)

with truncation error O(eps^2) and rounding error O(macheps |L| / eps); eps = 1e-6 balances the
two in float64, leaving about 1e-9 relative error for smooth losses. To check a backward pass
against a cotangent g, take L = sum(g * output): then dL/dx is exactly what backward returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np


def numerical_gradient(
    loss: Callable[[], float], x: np.ndarray, *, eps: float = 1e-6
) -> np.ndarray:
    """Central-difference gradient of ``loss()`` with respect to the float64 array `x`:
    ``g_j = (L(x + eps e_j) - L(x - eps e_j)) / (2 eps)`` (the module docstring's error bound).

    `x` is perturbed in place, one entry at a time, and restored; `loss` must read it.
    Returns an array shaped like x.
    """
    if x.dtype != np.float64:
        raise TypeError(f"x: finite differences need float64, got {x.dtype}")
    grad = np.empty_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("x: must be contiguous so that it can be perturbed in place")
    for j in range(flat.size):
        old = flat[j]
        flat[j] = old + eps
        up = loss()
        flat[j] = old - eps
        down = loss()
        flat[j] = old
        gflat[j] = (up - down) / (2 * eps)
    return grad


def gradcheck(
    loss: Callable[[], float],
    inputs: Mapping[str, np.ndarray],
    analytic: Mapping[str, np.ndarray],
    *,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-8,
) -> dict[str, float]:
    """Compare analytic gradients with central differences; raise if any entry is off:
    ``|analytic - numeric| <= atol + rtol * |numeric|`` per entry (NaN fails); the
    `numpy_ref.gradcheck` module docstring has the error bound.

    Parameters
    ----------
    loss : computes the scalar loss from the current contents of `inputs`.
    inputs : name -> float64 array that `loss` reads (perturbed in place, then restored).
    analytic : name -> the gradient backward returned for that input (same shape).

    Returns the largest absolute error per name. Every input is checked, even after one has
    failed; then one `AssertionError` lists every input that fails, one line each, naming the
    input, its worst entry, both values and the allowed error there (a NaN counts as worst).
    A shape mismatch between an analytic gradient and its input is a `ValueError`, raised
    before any finite difference is taken.
    """
    gots = {}
    for name, x in inputs.items():
        got = np.asarray(analytic[name])
        if got.shape != np.shape(x):
            raise ValueError(f"{name}: analytic gradient has shape {got.shape}, "
                             f"input has {np.shape(x)}")
        gots[name] = got
    errors: dict[str, float] = {}
    failures: list[str] = []
    for name, x in inputs.items():
        numeric = numerical_gradient(loss, x, eps=eps)
        got = gots[name]
        err = np.abs(got - numeric)
        allowed = atol + rtol * np.abs(numeric)
        if not np.all(err <= allowed):  # written so that a NaN fails
            j = np.unravel_index(np.argmax(err - allowed), err.shape)  # argmax finds a NaN first
            failures.append(
                f"gradcheck {name}: at index {tuple(int(i) for i in j)} analytic {got[j]:.10g} vs "
                f"numeric {numeric[j]:.10g} (error {err[j]:.3g}, allowed {allowed[j]:.3g})"
            )
        errors[name] = float(np.max(err)) if err.size else 0.0
    if len(failures) == 1:
        raise AssertionError(failures[0])
    if failures:
        raise AssertionError(f"gradcheck: {len(failures)} of {len(inputs)} gradients are wrong\n"
                             + "\n".join(failures))
    return errors
