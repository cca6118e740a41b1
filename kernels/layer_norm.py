r"""Numba layer norm: `layer_norm_forward` / `layer_norm_backward`, with the signatures, checks
and results (to rounding) of `numpy_ref.layer_norm`'s pair, both variants (torch's and the
Annotated Transformer's; read its docstring for the math).

One compiled call per direction, over the rows [M, E] of x (every leading axis a row):

- forward, per row, three passes over the row while it sits in L1: the mean, then the sum of
  squares of x - mu (two passes: no cancellation when |mu| >> sigma, which E[x^2] - mu^2 would
  suffer), then x^ = (x - mu) r and y = x^ gamma + beta written in the same sweep. The cache
  keeps x^ (an array of its own, as numpy_ref's) and r (and sigma) per row in float64.
- backward, per row: g = dy gamma and the row sums of g and g x^ in one pass, then
  dx = r g + (b + c x^) in a second (b and c the row's scalars of numpy_ref's formulas);
  d_gamma = sum dy x^ and d_beta = sum dy are accumulated in the first pass into one partial
  row per chunk of `_CHUNK` rows, and the chunks' partials added in chunk order in float64.

So x is read once forward (y and x^ written), x^ and dy once backward (dx written): the traffic
of `benchmarks.layer_norm`'s ceiling, plus the write of x^ forward. The row helpers are inlined
into the loops (``inline="always"``): called as functions they took 190 us against 130 us per
forward at [2048, 256] float32.

Precision: the vector loops and the row sums stay in the data's dtype (reassociated into many
SIMD partial sums, close to pairwise summation); r and the backward's row scalars are formed in
float64 and rounded once. float32 row sums halve the statistics passes against float64
accumulators (38 against 94 us at [2048, 256]) and keep float32 results within the README's
policy of torch's error (y, dx about 1e-7 of max|ref|, as torch's; d_gamma, d_beta 2e-7, where
torch's are 6e-7 to 1e-6). float64, against numpy_ref's and relative to the largest value: y
and dx within 4e-16, d_gamma and d_beta within 6e-15 (sums over 8192 rows, which numpy_ref adds
one row at a time); 1e-12 on rows of mean 100 and std 0.01, whose condition number is 1e4.

Threads
-------
Rows are independent: a call of at least `_PARALLEL_MIN` elements runs ``prange`` over the rows
(forward) or over the chunks of `_CHUNK` rows (backward), when `THREADS` is True; smaller calls
run on the calling thread. The chunks depend on M alone and their partials are added in chunk
order, so the results are bitwise the same run to run and on any thread count. The serial and
the parallel kernels are compiled apart, and LLVM may vectorize a row's sums in another order
in each: the two may differ in the last bit (d_x in about 12% of its elements at [300, 257]);
a given shape always takes the same one.

Measured on 2 cores (AMD EPYC, float32, medians of interleaved runs on an idle machine; torch
2.13's ``F.layer_norm`` on its 2 threads alongside):

- [32, 64, 256] (the Transformer step's activations, 2 MiB): forward 0.158 ms serial, 0.090
  ms parallel (torch 0.107); forward+backward 0.335 serial, 0.178 parallel (torch 0.255).
- [8192, 1024] (32 MiB; the fresh y and x^ cost their page faults, which make these vary from
  run to run): forward 10.7 and 10.2 ms (torch 14.5); forward+backward 23.8 and 12.9 ms
  (torch 28.6). In a default run of the benchmark (`benchmarks.layer_norm`), parallel: 6.3 and
  12.4 ms against torch's 12.2 and 30.7.

Alone, the threads win from a few rows up. Between multi-threaded NumPy products, where a
Transformer calls its norms, they cost more than they save, as the other kernels found
(`kernels.softmax`, `kernels.lstm`): an OpenBLAS worker spins for up to 0.1 s after each
product and takes a core from the parallel region, and the region's OpenMP workers spin after
it and take cores from the next product. A loop of ``(x @ W1) @ W2``, the layer norm,
``(y @ W1) @ W2`` and its backward at [2048, 256], W1 [256, 1024], took 25 ms per iteration
with the serial layer norm (its two calls 1.0 ms) and 44 ms with the parallel one (its calls
6-8 ms, the products 24 -> 38 ms); the kernels' Transformer training step (B32, T64, d256,
2 + 2 layers, F1024, V4000) 678 ms with serial layer norms, 832 ms with parallel ones (medians
of 12 interleaved steps). So a call goes parallel only where its own gain outweighs what the
threads cost beside BLAS (about 3 ms of stalls per call and as much again in the next
products): from `_PARALLEL_MIN` = 2^23 elements (32 MiB of float32), whose forward+backward the
threads bring from 24 to 13 ms.

Weight and bias are optional (an absent weight multiplies by 1, an absent bias adds 0: exact).
Any leading shape, float32 and float64; a non-contiguous x or d_y is copied once into
contiguous rows. NaN and inf in x or d_y propagate as in numpy_ref (no ``nnan``/``ninf``): a
NaN makes its row's y and dx NaN, and d_gamma NaN, as numpy_ref's.

Like numpy_ref's, the backward refuses a weight changed in place since the forward
(`numpy_ref.contract.unchanged`: its fingerprint, taken by the forward); x^ is the kernel's own
array, which no caller holds, and x is not kept. The cache is `KernelLayerNormCache`:
numpy_ref's `LayerNormCache` given to `kernels.layer_norm_backward` (or this one to numpy_ref's)
is a `TypeError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from kernels._config import JIT, PARALLEL_JIT
from kernels._util import as_type_of
from numpy_ref.contract import checks, unchanged
from numpy_ref.contract import layers as layers_contract
from numpy_ref.contract import transformer as contract
from numpy_ref.contract.fields import documented

__all__ = ["KernelLayerNormCache", "layer_norm_backward", "layer_norm_forward"]

_CHUNK = 64  # rows per partial d_gamma / d_beta sum in the backward

THREADS = True
"""Run calls of at least `_PARALLEL_MIN` elements on Numba's threads (Threads in the module
docstring). False runs every call on the calling thread (results to the last bit or so the
same: the module docstring)."""

_PARALLEL_MIN = 1 << 23
"""Elements (M * E) from which a call runs on the threads (Threads in the module docstring).
Alone, the threads would win from 2^15 (64 rows of 256: 4.5 us serial, 4.1 us parallel)."""


# --------------------------------------------------------------------------------------------
# forward


@njit(**JIT, inline="always")
def _forward_row(row, weight, bias, eps, annotated, y, x_hat):
    """One row [E]: writes x^ and y, returns (r, sigma) in float64 (sigma 0 for torch's)."""
    E = row.shape[0]
    zero = as_type_of(0.0, row[0])
    s = zero
    for j in range(E):
        s += row[j]
    mu = s / as_type_of(E, zero)
    q = zero
    for j in range(E):
        c = row[j] - mu
        q += c * c
    squares = np.float64(q)
    if annotated:
        sigma = math.sqrt(squares / (E - 1))
        r = 1.0 / (sigma + eps)
    else:
        sigma = 0.0
        r = 1.0 / math.sqrt(squares / E + eps)
    r_t = as_type_of(r, zero)
    for j in range(E):
        h = (row[j] - mu) * r_t
        x_hat[j] = h
        y[j] = h * weight[j] + bias[j]
    return r, sigma


@njit(**JIT)
def _forward_serial(x, weight, bias, eps, annotated, y, x_hat, r, sigma):
    """Every row of x [M, E] in order: y, x^ [M, E]; r, sigma [M] (float64)."""
    for i in range(x.shape[0]):
        r[i], sigma[i] = _forward_row(x[i], weight, bias, eps, annotated, y[i], x_hat[i])


@njit(**PARALLEL_JIT)
def _forward_parallel(x, weight, bias, eps, annotated, y, x_hat, r, sigma):
    """`_forward_serial` with the rows shared among Numba's threads."""
    for i in prange(x.shape[0]):
        r[i], sigma[i] = _forward_row(x[i], weight, bias, eps, annotated, y[i], x_hat[i])


# --------------------------------------------------------------------------------------------
# backward


@njit(**JIT, inline="always")
def _backward_row(dy, x_hat, weight, r, sigma, annotated, dx, dw, db):
    """One row [E]: writes dx; adds dy x^ into dw and dy into db (the chunk's partials)."""
    E = dy.shape[0]
    zero = as_type_of(0.0, dy[0])
    sg = zero
    sgx = zero
    for j in range(E):
        d = dy[j]
        h = x_hat[j]
        g = d * weight[j]
        sg += g
        sgx += g * h
        dw[j] += d * h
        db[j] += d
    b = -r * np.float64(sg) / E
    if annotated:  # dx = r (g - mean g) - x^ sum(g x^) / ((E - 1) sigma)
        c = -np.float64(sgx) / ((E - 1) * sigma)
    else:  # dx = r (g - mean g - x^ mean(g x^))
        c = -r * np.float64(sgx) / E
    a_t, b_t, c_t = as_type_of(r, zero), as_type_of(b, zero), as_type_of(c, zero)
    for j in range(E):
        dx[j] = a_t * (dy[j] * weight[j]) + (b_t + c_t * x_hat[j])


@njit(**JIT, inline="always")
def _backward_chunk(k, chunk, dy, x_hat, weight, r, sigma, annotated, dx, dw, db):
    """Rows k * chunk .. (k + 1) * chunk - 1 (those that exist), into partials dw[k], db[k]."""
    M = dy.shape[0]
    pw, pb = dw[k], db[k]
    pw[:] = 0
    pb[:] = 0
    for i in range(k * chunk, min(M, (k + 1) * chunk)):
        _backward_row(dy[i], x_hat[i], weight, r[i], sigma[i], annotated, dx[i], pw, pb)


@njit(**JIT)
def _backward_serial(dy, x_hat, weight, r, sigma, annotated, dx, dw, db, chunk):
    """Every chunk of rows in order: dx [M, E]; partials dw, db [K, E] (K chunks)."""
    for k in range(dw.shape[0]):
        _backward_chunk(k, chunk, dy, x_hat, weight, r, sigma, annotated, dx, dw, db)


@njit(**PARALLEL_JIT)
def _backward_parallel(dy, x_hat, weight, r, sigma, annotated, dx, dw, db, chunk):
    """`_backward_serial` with the chunks shared among Numba's threads."""
    for k in prange(dw.shape[0]):
        _backward_chunk(k, chunk, dy, x_hat, weight, r, sigma, annotated, dx, dw, db)


@njit(**JIT)
def _sum_partials(dw, db, out_w, out_b):
    """out_w, out_b [E] = the sums over the chunks' partials dw, db [K, E], in chunk order, in
    float64, rounded once to out's dtype."""
    K, E = dw.shape
    acc_w = np.zeros(E)
    acc_b = np.zeros(E)
    for k in range(K):
        pw, pb = dw[k], db[k]
        for j in range(E):
            acc_w[j] += pw[j]
            acc_b[j] += pb[j]
    for j in range(E):
        out_w[j] = acc_w[j]
        out_b[j] = acc_b[j]


# --------------------------------------------------------------------------------------------
# the public pair


@documented
class KernelLayerNormCache(NamedTuple):
    """What `kernels.layer_norm_backward` needs."""

    x_hat: np.ndarray  # [M, E] contiguous: the normalised input (x - mu) r, the rows of x
    #                    (M = the product of x's leading axes); the kernel's own array; read
    r: np.ndarray  # [M] float64: 1 / sqrt(var + eps) (torch's) or 1 / (sigma + eps); read
    sigma: np.ndarray | None  # [M] float64: the unbiased std (annotated variant; else None);
    #                           read
    weight: np.ndarray | None  # [E] contiguous gamma (the caller's array when it already was),
    #                            or None without one; read
    has_bias: bool  # whether params had a bias (then d_params has one)
    variant: str  # "torch" or "annotated"
    shape: tuple[int, ...]  # x's shape: d_y must have it, d_x comes back in it
    fingerprints: unchanged.Fingerprints | None = None  # the weight as the forward saw it; the
    #   backward checks it first (`numpy_ref.contract.unchanged`)


def _parallel(n: int) -> bool:
    """Whether a call over `n` elements runs its rows on Numba's threads."""
    return THREADS and n >= _PARALLEL_MIN


# Compiled code never warns; run as Python (NUMBA_DISABLE_JIT) the kernels' NumPy scalars would
# warn where NaN or inf in the data make a NaN, which propagates quietly as in numpy_ref.
_quiet = checks.quiet if numba.config.DISABLE_JIT else nullcontext


def layer_norm_forward(
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    eps: float = 1e-5,
    variant: str = "torch",
) -> tuple[np.ndarray, KernelLayerNormCache]:
    """Numba `numpy_ref.layer_norm_forward`: ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight
    + bias`` over the last axis (`torch.nn.LayerNorm`; ``variant="annotated"``: the Annotated
    Transformer's); x [..., E] -> (y [..., E], cache). Same arguments, checks and results."""
    x, weight, bias, eps, variant = contract.layer_norm(x, params, eps, variant)
    E, dtype = x.shape[-1], x.dtype
    rows = np.ascontiguousarray(x.reshape(-1, E))
    M = rows.shape[0]
    w = np.ones(E, dtype) if weight is None else np.ascontiguousarray(weight)
    b = np.zeros(E, dtype) if bias is None else np.ascontiguousarray(bias)
    y = np.empty((M, E), dtype)
    x_hat = np.empty((M, E), dtype)
    r = np.empty(M)
    sigma = np.empty(M)
    annotated = variant == "annotated"
    run = _forward_parallel if _parallel(M * E) else _forward_serial
    with _quiet():
        run(rows, w, b, eps, annotated, y, x_hat, r, sigma)
    fingerprints = unchanged.record("kernels.layer_norm_forward", "kernels.layer_norm_backward",
                                    [("params['weight']", weight)])
    cache = KernelLayerNormCache(x_hat, r, sigma if annotated else None,
                                 None if weight is None else w, bias is not None, variant,
                                 x.shape, fingerprints)
    return y.reshape(x.shape), cache


def layer_norm_backward(d_y: np.ndarray, cache: KernelLayerNormCache
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Numba `numpy_ref.layer_norm_backward`: d_y [..., E] -> (d_x [..., E], d_params with the
    params' keys: ``weight`` and ``bias`` [E] where they were given).

    ``dx = r (g - mean(g) - x^ mean(g x^))`` with ``g = dy * weight`` (torch's variant; the
    annotated one's and the derivation: the `numpy_ref.layer_norm` module docstring).
    """
    x_hat, r, sigma, weight, has_bias, variant, shape, fingerprints = checks.cache_of(
        cache, KernelLayerNormCache, "kernels.layer_norm_forward")
    unchanged.check(fingerprints)
    d_y = layers_contract.cotangent("d_y", d_y, shape, x_hat.dtype, "the layer norm output")
    (M, E), dtype = x_hat.shape, x_hat.dtype
    dy = np.ascontiguousarray(d_y.reshape(M, E))
    w = np.ones(E, dtype) if weight is None else weight
    K = max(1, -(-M // _CHUNK))
    dw = np.empty((K, E), dtype)
    db = np.empty((K, E), dtype)
    dx = np.empty((M, E), dtype)
    run = _backward_parallel if _parallel(M * E) else _backward_serial
    d_weight = np.empty(E, dtype)
    d_bias = np.empty(E, dtype)
    with _quiet():
        run(dy, x_hat, w, r, r if sigma is None else sigma, variant == "annotated", dx, dw, db,
            _CHUNK)
        _sum_partials(dw, db, d_weight, d_bias)
    d_params = {}
    if weight is not None:
        d_params["weight"] = d_weight
    if has_bias:
        d_params["bias"] = d_bias
    return dx.reshape(shape), d_params
