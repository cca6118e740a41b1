r"""The Transformer's activations, forward and backward by hand: ReLU and GELU (exact and its
tanh approximation), with `torch.nn.functional`'s formulas.

Shapes: x, y, d_x, d_y all [...] (elementwise).

ReLU (``F.relu``)
-----------------
    y = max(x, 0)                        dx = dy where y > 0, else 0

As torch's ``threshold_backward``, the gradient is 0 where y <= 0 (x = 0 included) and passes
where y is NaN.

GELU (``F.gelu(x, approximate="none")``), with Phi the standard normal CDF
--------------------------------------------------------------------------
    y = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2
    dx = dy (Phi(x) + x phi(x)),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)

GELU, ``approximate="tanh"``
----------------------------
    u = sqrt(2 / pi) (x + 0.044715 x^3),   t = tanh(u),   y = x (1 + t) / 2
    dx = dy ((1 + t) / 2 + (x / 2) (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 x^2))

erf comes from SciPy when it is installed (``scipy.special.erf``), else from Python's
``math.erf`` one element at a time (slower, the same to the last bit or two): `numpy_ref`
needs NumPy alone. float32 input is computed in float64 and rounded once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from numpy_ref.contract import checks, unchanged
from numpy_ref.contract import layers as layers_contract
from numpy_ref.contract import transformer as contract
from numpy_ref.contract.fields import documented
from numpy_ref.precision import near_kink, same_precision

try:  # a ufunc: vectorised and correctly rounded to an ulp
    from scipy.special import erf as _erf
except ModuleNotFoundError:  # NumPy alone: libm's erf per element
    _erf = np.vectorize(math.erf, otypes=[np.float64])

__all__ = ["GeluCache", "ReluCache", "gelu_backward", "gelu_forward", "relu_backward",
           "relu_forward"]

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_KAPPA = 0.044715


def _data(x: np.ndarray) -> np.ndarray:
    checks.not_masked("x", x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float32 or float64, got {x.dtype}")
    return x


@documented
class ReluCache(NamedTuple):
    """What `relu_backward` needs."""

    y: np.ndarray  # [...] the output max(x, 0); read (the gradient passes where y > 0)
    flip: np.ndarray | None = None  # [...] bool, only in `numpy_ref.precision.kinks_flipped`:
    #   the entries whose x is within rounding of the kink; the backward takes their
    #   derivative the other way (the error budget's alternative truth)


@same_precision()
def relu_forward(x: np.ndarray) -> tuple[np.ndarray, ReluCache]:
    """``y = max(x, 0)`` elementwise (`torch.nn.functional.relu`): x [...] -> y [...] (the
    `numpy_ref.activations` module docstring)."""
    x = _data(x)
    y = np.maximum(x, 0)  # NaN stays NaN
    return y, ReluCache(y, near_kink(x))


@same_precision(backward=True)
def relu_backward(d_y: np.ndarray, cache: ReluCache) -> np.ndarray:
    """Backward of `relu_forward`: ``d_x = d_y`` where ``y > 0`` (or y is NaN, as torch), else
    0; d_y [...] -> d_x [...] (the `numpy_ref.activations` module docstring)."""
    y, flip = checks.cache_of(cache, ReluCache, "relu_forward")
    d_y = layers_contract.cotangent("d_y", d_y, y.shape, y.dtype, "the relu output")
    stopped = y <= 0
    if flip is not None:
        stopped = stopped ^ flip
    with checks.quiet():
        return np.where(stopped, y.dtype.type(0), d_y)


@documented
class GeluCache(NamedTuple):
    """What `gelu_backward` needs."""

    x: np.ndarray  # [...] the input; read (the derivative is recomputed from it)
    approximate: str  # "none" or "tanh"
    fingerprints: unchanged.Fingerprints | None = None  # x as the forward saw it; the backward
    #   checks it first (`numpy_ref.contract.unchanged`)


@same_precision()
def gelu_forward(x: np.ndarray, *, approximate: str = "none") -> tuple[np.ndarray, GeluCache]:
    """``y = x Phi(x)`` elementwise (`torch.nn.functional.gelu`), or its tanh approximation
    with ``approximate="tanh"``: x [...] -> y [...]; the formulas: the `numpy_ref.activations`
    module docstring."""
    x = _data(x)
    approximate = contract.choice("approximate", approximate, contract.GELU_APPROXIMATIONS)
    with checks.quiet():
        x64 = x.astype(np.float64, copy=False)
        if approximate == "none":
            y = 0.5 * x64 * (1 + _erf(x64 / math.sqrt(2)))
        else:
            y = 0.5 * x64 * (1 + np.tanh(_SQRT_2_OVER_PI * (x64 + _KAPPA * x64**3)))
    fingerprints = unchanged.record("gelu_forward", "gelu_backward", [("x", x)])
    return y.astype(x.dtype, copy=False), GeluCache(x, approximate, fingerprints)


@same_precision(backward=True)
def gelu_backward(d_y: np.ndarray, cache: GeluCache) -> np.ndarray:
    """Backward of `gelu_forward`: ``d_x = d_y (Phi(x) + x phi(x))`` (or the tanh
    approximation's derivative; the `numpy_ref.activations` module docstring): d_y [...] ->
    d_x [...]."""
    x, approximate, fingerprints = checks.cache_of(cache, GeluCache, "gelu_forward")
    unchanged.check(fingerprints)
    d_y = layers_contract.cotangent("d_y", d_y, x.shape, x.dtype, "the gelu output")
    with checks.quiet():
        x64 = x.astype(np.float64, copy=False)
        if approximate == "none":
            cdf = 0.5 * (1 + _erf(x64 / math.sqrt(2)))
            slope = cdf + x64 * np.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi)
        else:
            t = np.tanh(_SQRT_2_OVER_PI * (x64 + _KAPPA * x64**3))
            slope = 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * _SQRT_2_OVER_PI * (
                1 + 3 * _KAPPA * x64 * x64)
        return (d_y * slope).astype(x.dtype, copy=False)
