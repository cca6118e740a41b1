r"""Numba additive (Bahdanau) score: the block kernels the flash attention path calls, and the
public pairs a decoder that attends step by step calls (`additive_scores_*`, `weighted_sum_*`).

The score s[i, j] = u . tanh(qa_i + ka_j) (qa = W_query q + b, ka = W_key k, u = params["v"])
is no product: its cost is the tanh over every (query, key, a) triple, A times the work of the
softmax that follows. Inside attention it is computed one block of (query rows, keys) at a
time by `additive_block`, where a dot-product score would call BLAS, and recomputed in the
backward by `additive_block_backward` instead of stored (Tq x Tk x A floats):

    e = tanh(qa_i + ka_j),  dz = ds_ij u (1 - e^2),  d_qa_i += dz,  d_ka_j += dz,
    d_u += ds_ij e

The inner loops run over A with `kernels._util.tanh`, which vectorizes (np.tanh is a scalar
libm call here), taken in float64 and rounded (`_tanh_rounded`: half an ulp in float32). A
pair with ds_ij = 0 (a hidden key) is skipped: it adds exactly nothing, and a NaN query row
reaches no key it does not see.

The public pairs: a Bahdanau decoder calls them once per step with one query per row, between
BLAS products, so their kernels are serial (a parallel region's spinning workers would take the
cores from the next OpenBLAS call) and they return numpy_ref's cache types, so that either
backend's backward takes either backend's cache. Heads layouts go to numpy_ref's own code.

Inputs changed in place between a forward and its backward: the fused paths here record no
fingerprints (`numpy_ref.contract.unchanged`), as the kernels' attention records none: two more
passes over the values cost about twice the pair (0.9 ms against 0.5 ms for the weighted sum at
B32, Tk32, Hv512, float32). Their backwards check a cache that numpy_ref's forward recorded,
and the layouts handed to numpy_ref's code are checked there.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels._config import JIT
from kernels._util import as_type_of, tanh
from numpy_ref import attention as reference
from numpy_ref.attention import AdditiveScoresCache, WeightedSumCache
from numpy_ref.contract import attention as contract
from numpy_ref.contract import checks, unchanged


@njit(**JIT)
def additive_block(qa, ka, u, s):
    """s[r, j] = u . tanh(qa[r] + ka[j]) for qa [R, A], ka [C, A], u [A] -> s [R, C]."""
    R, A = qa.shape
    C = ka.shape[0]
    zero = as_type_of(0.0, u[0])
    for r in range(R):
        qr = qa[r]
        for j in range(C):
            kj = ka[j]
            acc = zero
            for a in range(A):
                acc += u[a] * _tanh_rounded(qr[a] + kj[a])
            s[r, j] = acc


@njit(**JIT)
def _tanh_rounded(x):
    """tanh(x) taken in float64 and rounded to x's dtype: within half an ulp in float32, where
    `kernels._util.tanh`'s own 2.5 ulp, amplified by 1 - e^2 near |e| = 1 in the backward,
    put d_W_query outside the float32 policy."""
    return as_type_of(tanh(np.float64(x)), x)


@njit(**JIT)
def additive_block_backward(qa, ka, u, ds, d_qa, d_ka, d_u):
    """Accumulate, from ds [R, C] (the scores' cotangent), into d_qa [R, A], d_ka [C, A] (the
    data's dtype) and d_u [A] (float64); e = tanh(qa[r] + ka[j]) is recomputed."""
    R, A = qa.shape
    C = ka.shape[0]
    one = as_type_of(1.0, u[0])
    zero = as_type_of(0.0, u[0])
    for r in range(R):
        qr, dqr = qa[r], d_qa[r]
        for j in range(C):
            g = ds[r, j]
            if g == zero:
                continue
            kj, dkj = ka[j], d_ka[j]
            for a in range(A):
                e = _tanh_rounded(qr[a] + kj[a])
                dz = g * u[a] * (one - e * e)
                dqr[a] += dz
                dkj[a] += dz
                d_u[a] += g * e



@njit(**JIT)
def _additive_energy(qa, ka, u, e, s):
    """qa [B, Tq, A], ka [B, Tk, A], u [A] -> e [B, Tq, Tk, A] = tanh(qa + ka) and
    s [B, Tq, Tk] = e u; the tanh is `kernels._util.tanh`, which vectorizes (np.tanh is a
    scalar libm call here)."""
    B, Tq, A = qa.shape
    Tk = ka.shape[1]
    zero = as_type_of(0.0, u[0])
    for b in range(B):
        for i in range(Tq):
            qi = qa[b, i]
            for j in range(Tk):
                kj, ej = ka[b, j], e[b, i, j]
                acc = zero
                for a in range(A):
                    t = tanh(qi[a] + kj[a])
                    ej[a] = t
                    acc += t * u[a]
                s[b, i, j] = acc


@njit(**JIT)
def _additive_energy_backward(e, u, ds, d_qa, d_ka, d_u64):
    """From ds [B, Tq, Tk] and the saved e: d_qa [B, Tq, A], d_ka [B, Tk, A] (both zeroed
    here) and d_u64 [A] (float64, zeroed here): dz = ds u (1 - e^2), d_u = sum ds e."""
    B, Tq, Tk, A = e.shape
    zero = as_type_of(0.0, u[0])
    one = as_type_of(1.0, zero)
    d_qa[...] = zero
    d_ka[...] = zero
    d_u64[:] = 0.0
    for b in range(B):
        for i in range(Tq):
            dqi = d_qa[b, i]
            for j in range(Tk):
                g, ej, dkj = ds[b, i, j], e[b, i, j], d_ka[b, j]
                for a in range(A):
                    t = ej[a]
                    dz = g * u[a] * (one - t * t)
                    dqi[a] += dz
                    dkj[a] += dz
                    d_u64[a] += g * t


def additive_scores_forward(
    query_proj: np.ndarray, key_proj: np.ndarray, u: np.ndarray
) -> tuple[np.ndarray, AdditiveScoresCache]:
    """Numba `numpy_ref.additive_scores_forward`: ``s = u . tanh(query_proj + key_proj)``.

    query_proj [B, A] or [B, Tq, A]; key_proj [B, Tk, A]; u [A] -> scores [B, Tk] or
    [B, Tq, Tk], and numpy_ref's `AdditiveScoresCache` (e = the tanh, [B, Tq, Tk, A]).
    """
    qa, ka, u = contract.additive_scores(query_proj, key_proj, u)
    if qa.ndim == 4:
        return reference.additive_scores_forward(qa, ka, u)
    single = qa.ndim == 2
    qa = np.ascontiguousarray(qa[:, None, :] if single else qa)
    ka, u = np.ascontiguousarray(ka), np.ascontiguousarray(u)
    B, Tq, A = qa.shape
    e = np.empty((B, Tq, ka.shape[1], A), qa.dtype)
    s = np.empty((B, Tq, ka.shape[1]), qa.dtype)
    _additive_energy(qa, ka, u, e, s)
    return (s[:, 0] if single else s), AdditiveScoresCache(e, u, single)


def additive_scores_backward(
    d_scores: np.ndarray, cache: AdditiveScoresCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numba `numpy_ref.additive_scores_backward`: -> (d_query_proj, d_key_proj, d_u)."""
    e, u, single, fingerprints = checks.cache_of(cache, AdditiveScoresCache,
                                                 "additive_scores_forward")
    if e.ndim == 5:
        return reference.additive_scores_backward(d_scores, cache)
    unchanged.check(fingerprints)  # None unless numpy_ref's forward made the cache
    B, Tq, Tk, A = e.shape
    ds = contract.like("d_scores", d_scores, (B, Tk) if single else (B, Tq, Tk), e.dtype,
                       "the scores")
    ds = np.ascontiguousarray(ds[:, None] if single else ds)
    e, u = np.ascontiguousarray(e), np.ascontiguousarray(u)
    d_qa = np.empty((B, Tq, A), e.dtype)
    d_ka = np.empty((B, Tk, A), e.dtype)
    d_u64 = np.empty(A)
    _additive_energy_backward(e, u, ds, d_qa, d_ka, d_u64)
    return (d_qa[:, 0] if single else d_qa), d_ka, d_u64.astype(e.dtype)


@njit(**JIT)
def _weighted_sum_single(w, values, c):
    """c[b] = sum_j w[b, j] values[b, j] for w [B, Tk], values [B, Tk, Hv], c [B, Hv]."""
    B, Tk, Hv = values.shape
    zero = as_type_of(0.0, c[0, 0])
    for b in range(B):
        cb = c[b]
        cb[:] = zero
        for j in range(Tk):
            wj, vj = w[b, j], values[b, j]
            for h in range(Hv):
                cb[h] += wj * vj[h]


@njit(**JIT)
def _weighted_sum_single_backward(w, values, dc, d_w, d_values):
    """d_w [B, Tk] = dc . values_j and d_values [B, Tk, Hv] = w_j dc, one pass per row."""
    B, Tk, Hv = values.shape
    zero = as_type_of(0.0, dc[0, 0])
    for b in range(B):
        dcb = dc[b]
        for j in range(Tk):
            vj, dvj, wj = values[b, j], d_values[b, j], w[b, j]
            acc = zero
            for h in range(Hv):
                acc += dcb[h] * vj[h]
                dvj[h] = wj * dcb[h]
            d_w[b, j] = acc


def weighted_sum_forward(
    weights: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, WeightedSumCache]:
    """Numba `numpy_ref.weighted_sum_forward`: context [B, Hv], [B, Tq, Hv] or [B, h, Tq, Hv].

    One query per row (weights [B, Tk]) is a fused loop; many queries are batched BLAS
    products, numpy_ref's own path. Returns numpy_ref's `WeightedSumCache`."""
    w, values = contract.weighted_sum(weights, values)
    if w.ndim > 2:
        return reference.weighted_sum_forward(w, values)
    w, values = np.ascontiguousarray(w), np.ascontiguousarray(values)
    c = np.empty((w.shape[0], values.shape[2]), w.dtype)
    _weighted_sum_single(w, values, c)
    return c, WeightedSumCache(w[:, None, :], values, True)


def weighted_sum_backward(
    d_context: np.ndarray, cache: WeightedSumCache
) -> tuple[np.ndarray, np.ndarray]:
    """Numba `numpy_ref.weighted_sum_backward`: -> (d_weights, d_values)."""
    w, values, single, fingerprints = checks.cache_of(cache, WeightedSumCache,
                                                      "weighted_sum_forward")
    if not single:
        return reference.weighted_sum_backward(d_context, cache)
    unchanged.check(fingerprints)  # None unless numpy_ref's forward made the cache
    B, _, Tk = w.shape
    dc = contract.like("d_context", d_context, (B, values.shape[2]), w.dtype, "the context")
    dc = np.ascontiguousarray(dc)
    w, values = np.ascontiguousarray(w[:, 0]), np.ascontiguousarray(values)
    d_w = np.empty((B, Tk), w.dtype)
    d_values = np.empty(values.shape, w.dtype)
    _weighted_sum_single_backward(w, values, dc, d_w, d_values)
    return d_w, d_values

