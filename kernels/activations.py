r"""Numba GELU: `gelu_forward` / `gelu_backward`, exact and ``approximate="tanh"``, with the
signatures, checks, results (to rounding) and cache of `numpy_ref.activations`' pair (read its
docstring for the formulas).

One compiled loop per call over the elements, in the data's dtype:

- float64: libm's ``math.erf``, ``math.exp`` and ``math.tanh`` with numpy_ref's formulas, one
  scalar call per element and no temporary arrays: within 1e-16 (exact) and 5e-15 (tanh's
  gradient, whose 1 + t and 1 - t^2 cancel) of numpy_ref's, relative to the largest value.
- float32, computed in float32 so that the loop vectorizes (16 lanes, no libm call, no
  branch), where numpy_ref computes in float64 and rounds once:
  exact, Phi(x) = 1 - erfc(z) / 2 (x >= 0) or erfc(z) / 2, z = |x| / sqrt 2, with
  erfc(z) = exp(-z^2) t h(t), t = 1 / (1 + 0.45 z), h a degree-9 polynomial fitted to
  scipy.special.erfcx (`_normal_fitted`), and exp(-z^2) from `kernels._util.exp_nonpositive`,
  which is phi's too; tanh, 1 + tanh(u) and 1 - tanh(u)^2 from expm1 and exp of -2|u|
  (`_tanh_terms32`), which do not cancel where numpy_ref's 1 + t does (x < -3).
  Measured against numpy_ref in float64 on the same inputs, relative to the largest value,
  over N(0, s^2) inputs with s from 0.001 to 30: y within 2.5e-7 and d_x within 2.5e-7
  (torch's float32: 2.2e-7 and 7.4e-7), inside the README's float32 policy.

Measured at [32, 64, 1024] float32 (a Transformer's feed-forward activations, 8 MiB), 2 cores,
medians: exact forward 2.4 ms, forward+backward 5.2 ms (numpy_ref 43 and 90 ms; torch 0.6 and
2.5 ms); tanh 2.5 and 5.8 ms (numpy_ref 140 and 300; torch 2.4 and 4.7). Of those, each
direction spends 0.9 ms fingerprinting x (`numpy_ref.contract.unchanged`, below); the loops
themselves take 1.3 ms each way, at 16 lanes on one core (computed in float64 with a degree-12
fit they took twice as long). The loops run on the calling thread: GELU sits between a
Transformer's two feed-forward products, where a parallel region costs more than it saves
(`kernels.layer_norm`, Threads).

The cache is numpy_ref's `GeluCache` (x, referenced, and its fingerprint): a cache of either
backend works with either backward, and x changed in place between the forward and the
backward is refused with the same `numpy_ref.contract.unchanged.InputChanged` as numpy_ref's.
Non-contiguous x or d_y is copied once into a contiguous array. NaN propagates; GELU(-inf) is
NaN, as numpy_ref's (-inf * 0), and its gradient at +-inf too.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numba
import numpy as np
from numba import njit, types
from numba.extending import overload

from kernels._config import JIT
from kernels._util import as_type_of, exp_nonpositive, expm1_nonpositive
from numpy_ref.activations import GeluCache
from numpy_ref.contract import checks, unchanged
from numpy_ref.contract import layers as layers_contract
from numpy_ref.contract import transformer as contract

__all__ = ["GeluCache", "gelu_backward", "gelu_forward"]

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_KAPPA = 0.044715

# erfc(z) = exp(-z^2) t h(t) for z >= 0, t = 1 / (1 + 0.45 z) in (0, 1]: h (= erfcx(z) / t) as a
# degree-9 polynomial in u = 2t - 1, Horner order, float32 coefficients (a least-squares fit at
# 6000 Chebyshev nodes of t against scipy.special.erfcx: 4e-8 relative for every z >= 0, 2e-7
# evaluated in float32).
_ERFCX_A = 0.45
_ERFCX = (-8.060170512180775e-05, 1.6884499927982688e-05, 0.0006995531730353832,
          -0.0001466537214582786, -0.005135183222591877, -0.002857021288946271,
          0.042139001190662384, 0.16278915107250214, 0.33543455600738525, 0.4671402871608734)
_ERFCX32 = tuple(np.float32(c) for c in _ERFCX)


@njit(**JIT)
def _normal_fitted(v):
    """(Phi(v), phi(v)) for a float32 v, in float32, from the fit above and
    `exp_nonpositive`: no libm call, no branch (a loop over it vectorizes)."""
    one, half = np.float32(1.0), np.float32(0.5)
    z = abs(v) * np.float32(_SQRT_HALF)
    t = np.divide(one, one + np.float32(_ERFCX_A) * z)  # np.divide: no zero-divisor branch
    u = t + t - one
    h = _ERFCX32[0]
    for c in _ERFCX32[1:]:
        h = h * u + c
    e = exp_nonpositive(-(z * z))  # exp(-v^2 / 2); 0 for |v| = inf, NaN for NaN
    half_erfc = half * e * t * h
    return (half_erfc if v < 0 else one - half_erfc), e * np.float32(_INV_SQRT_2PI)


@njit(**JIT)
def _normal_libm(v):
    """(Phi(v), phi(v)) for a float64 v with libm's erf and exp."""
    return 0.5 * (1.0 + math.erf(v * _SQRT_HALF)), math.exp(-0.5 * v * v) * _INV_SQRT_2PI


def _normal(v):
    """(Phi(v), phi(v)) in v's dtype: the fit for float32, libm's erf and exp for float64."""
    return _normal_fitted(v) if isinstance(v, np.float32) else _normal_libm(v)


@overload(_normal, jit_options=JIT)
def _normal_jit(v):
    return (lambda v: _normal_fitted(v)) if v == types.float32 else (lambda v: _normal_libm(v))


@njit(**JIT)
def _tanh_terms32(u):
    """(1 + tanh(u), 1 - tanh(u)^2) for a float32 u, without cancellation: with
    a = |u|, m = expm1(-2a) and e = exp(-2a) = 1 + m (each from the function accurate where the
    other would cancel), tanh(a) = -m / (2 + m), so 1 + tanh(u) is 2 / (2 + m) for u >= 0 and
    2e / (2 + m) for u < 0, and 1 - tanh(u)^2 = 4e / (2 + m)^2."""
    one, two = np.float32(1.0), np.float32(2.0)
    a = abs(u)
    a = np.float32(44.0) if a > 44 else a  # exp(-88) is 0 here (exp_nonpositive's range)
    near = expm1_nonpositive(-(a + a))
    far = exp_nonpositive(-(a + a))
    big = a > np.float32(0.35)  # e < 0.5: e - 1 exact enough; else 1 + m is
    m = far - one if big else near
    e = far if big else one + near
    inv = np.divide(one, two + m)  # np.divide: no zero-divisor branch; 2 + m >= 1
    plus = (two if u >= 0 else e + e) * inv
    return (u if u != u else plus), np.float32(4.0) * e * inv * inv


def _tanh_terms(u):
    """(1 + tanh(u), 1 - tanh(u)^2) in u's dtype: `_tanh_terms32` for float32 (vectorizes),
    libm's tanh for float64 (the same formula as numpy_ref's, to its rounding)."""
    if isinstance(u, np.float32):
        return _tanh_terms32(u)
    t = math.tanh(u)
    return 1.0 + t, 1.0 - t * t


@overload(_tanh_terms, jit_options=JIT)
def _tanh_terms_jit(u):
    if u == types.float32:
        return lambda u: _tanh_terms32(u)

    def libm(u):
        t = math.tanh(u)
        return 1.0 + t, 1.0 - t * t

    return libm


@njit(**JIT)
def _gelu_erf(x, y):
    """y = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 over flat x, y [n], in their dtype."""
    for i in range(x.shape[0]):
        v = x[i]
        cdf, _ = _normal(v)
        y[i] = v * cdf


@njit(**JIT)
def _gelu_erf_backward(x, dy, dx):
    """dx = dy (Phi(x) + x phi(x)) over flat arrays [n], in their dtype."""
    for i in range(x.shape[0]):
        v = x[i]
        cdf, pdf = _normal(v)
        dx[i] = dy[i] * (cdf + v * pdf)


@njit(**JIT)
def _gelu_tanh(x, y):
    """y = x (1 + tanh(u)) / 2, u = sqrt(2 / pi) (x + 0.044715 x^3), over flat x, y [n]."""
    for i in range(x.shape[0]):
        v = x[i]
        plus, _ = _tanh_terms(as_type_of(_SQRT_2_OVER_PI, v) * (
            v + as_type_of(_KAPPA, v) * v * v * v))
        y[i] = as_type_of(0.5, v) * v * plus


@njit(**JIT)
def _gelu_tanh_backward(x, dy, dx):
    """dx = dy ((1 + t) / 2 + (x / 2) (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 x^2)); the
    second term in float64 (x^2 of a float32 x cannot overflow there, as in numpy_ref)."""
    for i in range(x.shape[0]):
        v = x[i]
        plus, sech2 = _tanh_terms(as_type_of(_SQRT_2_OVER_PI, v) * (
            v + as_type_of(_KAPPA, v) * v * v * v))
        w = np.float64(v)
        tail = 0.5 * w * np.float64(sech2) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _KAPPA * w * w)
        dx[i] = dy[i] * (as_type_of(0.5, v) * plus + as_type_of(tail, v))


# Compiled code never warns; run as Python (NUMBA_DISABLE_JIT) the kernels' NumPy scalars would
# warn where NaN or inf in the data make a NaN, which propagates quietly as in numpy_ref.
_quiet = checks.quiet if numba.config.DISABLE_JIT else nullcontext


def _data(x: np.ndarray) -> np.ndarray:
    checks.not_masked("x", x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float32 or float64, got {x.dtype}")
    return x


def gelu_forward(x: np.ndarray, *, approximate: str = "none") -> tuple[np.ndarray, GeluCache]:
    """Numba `numpy_ref.gelu_forward`: ``y = x Phi(x)`` elementwise
    (`torch.nn.functional.gelu`), or its tanh approximation with ``approximate="tanh"``:
    x [...] -> y [...]; the formulas: the `numpy_ref.activations` module docstring."""
    x = _data(x)
    approximate = contract.choice("approximate", approximate, contract.GELU_APPROXIMATIONS)
    flat = np.ascontiguousarray(x).reshape(-1)
    y = np.empty(flat.shape, x.dtype)
    if flat.size:
        with _quiet():
            (_gelu_erf if approximate == "none" else _gelu_tanh)(flat, y)
    fingerprints = unchanged.record("gelu_forward", "gelu_backward", [("x", x)])
    return y.reshape(x.shape), GeluCache(x, approximate, fingerprints)


def gelu_backward(d_y: np.ndarray, cache: GeluCache) -> np.ndarray:
    """Numba `numpy_ref.gelu_backward`: ``d_x = d_y (Phi(x) + x phi(x))`` (or the tanh
    approximation's derivative; the `numpy_ref.activations` module docstring): d_y [...] ->
    d_x [...]."""
    x, approximate, fingerprints = checks.cache_of(cache, GeluCache, "gelu_forward")
    unchanged.check(fingerprints)
    d_y = layers_contract.cotangent("d_y", d_y, x.shape, x.dtype, "the gelu output")
    flat = np.ascontiguousarray(x).reshape(-1)
    dy = np.ascontiguousarray(d_y).reshape(-1)
    dx = np.empty(flat.shape, x.dtype)
    if flat.size:
        with _quiet():
            (_gelu_erf_backward if approximate == "none" else _gelu_tanh_backward)(flat, dy,
                                                                                    dx)
    return dx.reshape(x.shape)
