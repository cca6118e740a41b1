r"""Comparing an implementation with the reference: the numerical policy as functions.

Use these to check your own LSTM or attention code (or a golden file's values) against
`numpy_ref`, the way this project's tests check every backend against PyTorch. A failure names
the tensor, the worst entry's index, both values there, the error and the error allowed, so
the message alone says where to look.

The rules
---------
Elementwise tolerance (`compare`, `assert_allclose_named`, `assert_all_close`): a result `got`
passes against `want` when, at every index,

    |got - want| <= atol + rtol * |want|

the rule of `numpy.isclose` and `torch.testing.assert_close`. Against a float64 reference the
policy uses rtol = atol = 1e-7 (torch.testing's float64 defaults); a correct float64
implementation is usually near 1e-14. NaN matches NaN and an infinity matches the same
infinity (padding and propagation tests need that); NaN against a number, or a finite value
against an infinity, always fails.

float32 (`assert_close_policy`, `float32_allowance`): a float32 result cannot be held to a
fixed tolerance (its error grows with the problem), so it is measured against a float64
reference together with a trusted float32 implementation run on the same inputs (torch's, in
this project's tests). Ours must satisfy

    max|ours - ref64| <= factor * max|trusted32 - ref64| + 8 * eps32 * scale

with factor 2 for values and 3 for gradients (FlashAttention's test rule) and scale =
max|ref64|, or a larger scale for a result that is a sum cancelling far below its terms (its
rounding error scales with the terms, not with the result: a small gradient next to large
ones, a gradient through the softmax's VJP, a context).

float16 and bfloat16 (`error_budget`, `judge`, `half_ulp`): a low-precision result is measured
against the truth (the op in float64 on the same low-precision inputs) together with the
same-precision reference (the op itself on those inputs; `numpy_ref.precision`):

    max|ours - truth| <= factor * max|reference - truth| + ulp(scale) / 2

factor 2 for outputs and 3 for gradients again, scale = max|truth| (`numpy_ref.error_budget`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract.fields import documented

EPS32 = float(np.finfo(np.float32).eps)
RTOL64 = ATOL64 = 1e-7  # the float64 rule: torch.testing.assert_close's float64 defaults


def _np(a: Any) -> np.ndarray:
    """An array from a NumPy array, a scalar, a list or a torch tensor (torch not imported)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _index(err: np.ndarray) -> tuple[int, ...]:
    """The index of the largest entry of `err` (NaN-free), as a tuple of ints."""
    return tuple(int(i) for i in np.unravel_index(np.argmax(err), err.shape)) if err.ndim else ()


def _errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in float64, 0 where both are the same NaN or infinity, inf where one is NaN
    or infinite and the other is not."""
    g, w = got.astype(np.float64), want.astype(np.float64)
    with np.errstate(invalid="ignore"):
        err = np.abs(g - w)
    same = (g == w) | (np.isnan(g) & np.isnan(w))
    err = np.where(same, 0.0, err)
    return np.where(np.isnan(err), np.inf, err)


@documented
class Comparison(NamedTuple):
    """One tensor compared with its reference; `str()` of it is a one-line report."""

    name: str  # what was compared, e.g. "d_weight_ih_l0"
    ok: bool  # every entry within its allowed error
    max_error: float  # max |got - want| (inf when a NaN or infinity disagrees)
    index: tuple[int, ...]  # the entry that exceeds its allowance most (the worst error if none)
    got: Any  # the value there (a Python scalar)
    want: Any  # the reference value there
    error: float  # |got - want| there
    allowed: float  # the error allowed there
    rule: str  # the rule applied, e.g. "rtol=1e-07, atol=1e-07"

    def __str__(self) -> str:
        if self.ok:
            return f"{self.name}: ok, max error {self.max_error:.3g} ({self.rule})"
        return (
            f"{self.name}: FAIL, max error {self.max_error:.3g}; at index {self.index} got "
            f"{self.got!r}, expected {self.want!r}, error {self.error:.3g} > allowed "
            f"{self.allowed:.3g} ({self.rule})"
        )


def compare(name: str, got: Any, want: Any, *, rtol: float = RTOL64,
            atol: float = ATOL64) -> Comparison:
    """Compare `got` with `want` elementwise: ``|got - want| <= atol + rtol * |want|``.

    got, want : arrays (or torch tensors) of the same shape; any float dtypes. Returns a
    `Comparison` (never raises for a mismatch of values; a shape mismatch is a ValueError).
    """
    got, want = _np(got), _np(want)
    if got.shape != want.shape:
        raise ValueError(f"{name}: shape {got.shape} != reference {want.shape}")
    rule = f"rtol={rtol:g}, atol={atol:g}"
    if not got.size:
        return Comparison(name, True, 0.0, (), None, None, 0.0, atol, rule)
    err = _errors(got, want)
    w = want.astype(np.float64)
    allowed = np.where(np.isfinite(w), atol + rtol * np.abs(np.nan_to_num(w)), 0.0)
    excess = err - allowed
    ok = bool(np.all(excess <= 0))
    j = _index(excess) if not ok else _index(err)
    return Comparison(name, ok, float(err.max()), j, got[j].item(), want[j].item(),
                      float(err[j]), float(allowed[j]), rule)


def assert_allclose_named(name: str, ours: Any, ref: Any, *, rtol: float, atol: float) -> float:
    """Elementwise ``|ours - ref| <= atol + rtol * |ref|``; returns the max abs error.

    ours, ref : arrays of one shape. Raises AssertionError naming the tensor, the worst entry,
    both values there and the allowed error.
    """
    result = compare(name, ours, ref, rtol=rtol, atol=atol)
    if not result.ok:
        raise AssertionError(str(result))
    return result.max_error


def assert_all_close(got: Mapping[str, Any], want: Mapping[str, Any], *, rtol: float = RTOL64,
                     atol: float = ATOL64) -> dict[str, float]:
    """Compare two dicts of arrays (e.g. a params-gradient dict) key by key.

    got, want : mappings name -> array; the same keys, each pair of one shape. Raises one
    AssertionError listing every missing or extra key, every shape mismatch and every failing
    tensor (one line each); returns {name: max abs error} when all pass.
    """
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    problems = [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in extra]
    errors = {}
    for k in want:
        if k in got:
            try:
                result = compare(k, got[k], want[k], rtol=rtol, atol=atol)
            except ValueError as e:  # a shape mismatch: report it with the rest
                problems.append(str(e))
                continue
            errors[k] = result.max_error
            if not result.ok:
                problems.append(str(result))
    if problems:
        raise AssertionError(f"{len(problems)} of {len(set(want) | set(got))} tensors differ:\n"
                             + "\n".join(problems))
    return errors


def float32_allowance(err32: float, scale: float, *, grad: bool = False) -> float:
    """The error a float32 result may have: ``factor * err32 + 8 * eps32 * scale``.

    err32 : max|trusted32 - ref64|, a trusted float32 implementation's error on the same inputs.
    scale : the magnitude the floor is relative to (max|ref64|, or larger for cancelling sums).
    grad : gradients get factor 3, values 2.
    """
    return (3 if grad else 2) * err32 + 8 * EPS32 * scale


def assert_close_policy(name: str, ours: Any, ref64: Any, *, torch32: Any = None,
                        grad: bool = False, scale: float | None = None) -> float:
    """Check `ours` against the float64 reference under the policy for its dtype.

    Parameters
    ----------
    name : what is compared (``"d_weight_ih_l0"``), for the failure message.
    ours : our result, float64 or float32, any shape.
    ref64 : the float64 reference (torch float64 in the parity tests), `ours`' shape.
    torch32 : a trusted float32 result on the same inputs (torch's float32 in the tests);
        required when `ours` is float32.
    grad : whether this is a gradient (allowed factor 3 instead of 2 in float32).
    scale : the magnitude the float32 floor is relative to, ``max|ref64|`` when None. Pass a
        larger one only for a result known to come from cancellation (a sum of terms much
        larger than itself), whose rounding error scales with the terms, not the result; a
        trusted float32 error on a tensor of one or two such entries can be a lucky near-zero.

    Returns our max abs error against `ref64`; raises AssertionError naming the tensor, the
    worst index, both values and the allowance with its parts (TypeError or ValueError for
    arguments that cannot be compared: a wrong dtype, a missing torch32, unequal shapes).
    """
    ours, ref64 = _np(ours), _np(ref64)
    if ref64.dtype != np.float64:
        raise TypeError(f"{name}: the reference must be float64, got {ref64.dtype}")
    if ours.dtype == np.float64:
        return assert_allclose_named(name, ours, ref64, rtol=RTOL64, atol=ATOL64)
    if ours.dtype != np.float32:
        raise TypeError(f"{name}: expected float32 or float64, got {ours.dtype}")
    if torch32 is None:
        raise TypeError(f"{name}: a float32 check needs a trusted float32 result (torch32=)")
    torch32 = _np(torch32)
    if not ours.shape == ref64.shape == torch32.shape:
        raise ValueError(f"{name}: shapes ours {ours.shape}, trusted float32 {torch32.shape}, "
                         f"reference {ref64.shape}")
    if not ours.size:
        return 0.0
    err = _errors(ours, ref64)
    err_torch = float(_errors(torch32, ref64).max())
    factor = 3 if grad else 2
    scale = float(np.abs(ref64[np.isfinite(ref64)]).max(initial=0.0)) if scale is None else scale
    if not np.isfinite(scale):
        raise ValueError(f"{name}: the float32 floor's scale is {scale} (a max over NaN?)")
    allowed = float32_allowance(err_torch, scale, grad=grad)
    if not err.max() <= allowed:
        j = _index(err)
        raise AssertionError(
            f"{name}: max error {err.max():.3g} at index {j} (got {ours[j].item()!r}, reference "
            f"{ref64[j].item()!r}) > allowed {allowed:.3g} = {factor} * torch float32 error "
            f"{err_torch:.3g} + 8 * eps32 * scale {8 * EPS32 * scale:.3g}"
        )
    return float(err.max())


# float16/bfloat16: the error budget (its own module, re-exported here with the other rules)
from numpy_ref.error_budget import (  # noqa: E402
    RESULT_NAMES,
    Budgeted,
    BudgetReport,
    error_budget,
    half_ulp,
    judge,
)

__all__ = [
    "ATOL64",
    "EPS32",
    "RESULT_NAMES",
    "RTOL64",
    "BudgetReport",
    "Budgeted",
    "Comparison",
    "assert_all_close",
    "assert_allclose_named",
    "assert_close_policy",
    "compare",
    "error_budget",
    "float32_allowance",
    "half_ulp",
    "judge",
]
