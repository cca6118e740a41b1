r"""Numba attention: the fused single-query core, the multi-query path, and the additive score.

Same public functions, argument names, validation and results as `numpy_ref.attention` (read
its docstring for the math and shapes); only the cache differs, see `KernelAttentionCache`.

Single query (query [B, H]): memory-bound, one fused pass per batch row
---------------------------------------------------------------------------
The values array dominates: the floor is reading it once (forward) and reading it once plus
writing d_values once (backward). The kernels reach it by touching each key/value row once:

- forward, online softmax (Milakov & Gimelshein 2018) over blocks of keys: keep a running
  max m, a running sum l = sum_j exp(s_j - m) and an unnormalised context
  acc = sum_j exp(s_j - m) v_j; when a block's largest score exceeds m, rescale l and acc by
  exp(m_old - m_new). At the end context = acc / l, and m and l are saved (m + log l is the
  log-sum-exp), so w_j = exp(s_j - m) / l. Not exp(s_j - lse): next to a huge m (scores of
  1e16 and more) m + log l rounds to m, and the fast-math flags may reassociate
  (s_j - m) - log l into that same sum. When keys is values, the
  block's rows k_j that the scores just read are still in cache (L2) when they are used as
  v_j: one read from DRAM.
- backward, one pass: recompute s_j = q . k_j and w_j = exp(s_j - m) / l from the saved
  statistics, take delta = <context, d_context> (FlashAttention-2; plus sum_j w_j dW_j when a
  cotangent on the weights is given), and in the same sweep write d_v_j = w_j dc,
  d_k_j = ds_j q and accumulate d_q += ds_j k_j, with ds_j = w_j (dc . v_j + dW_j - delta).

Only the first lengths[b] keys of a row are read, so the work is proportional to the sum of
the lengths; the padded rows of d_keys/d_values and the padded weights are written as exact
zeros (a streaming write, no read).

Precision: the vector loops stay in the data's dtype, but the softmax sum, the unnormalised
context (summed per block in the data's dtype, across blocks in float64), the log-sum-exp, delta
and each dc . v_j are float64 (see the comment above the cores). With float32 sums the delta
identity costs accuracy: ds_j = w_j (dc . v_j - delta) subtracts near-equal numbers when one key
dominates, and torch, which sums delta from the same rounded dc . v_j, was up to 8x more
accurate on d_keys; with float64 sums we match it.

Kernel versions, float32, 2 threads, min of 30 calls alternating old and new in one process:
- forward v1, removed: one key at a time, with a scalar libm exp per key. 4.5 ms at (B, T, H) =
  (256, 512, 256) against a 4.1 ms streaming read of V; 54 us at (32, 64, 128), where the exp
  calls are half the time.
- forward v3, kept (`_single_forward`): blocks of `_BLOCK` keys (FlashAttention's tiling, on one
  query): the block's scores, one rescale per block instead of one test per key, the block's
  exps in one vectorized loop, its p_j v_j summed in the data's dtype and then added to the
  float64 context. With 16-key blocks: 4.5 ms at (256, 512, 256) (memory-bound: unchanged),
  30 us at (32, 64, 128). With 128-key blocks (kept): 4.2 ms and 23 us; alternating 16 and
  128 in one process, 128 was 11% faster at (256, 512, 256) and 8% at (32, 64, 128) (fewer
  rescales and partial-sum flushes, longer streams for the prefetcher; the block's second pass
  reads V from L2: 128 KiB at H = 256). 256 was no faster than 128.
- forward v2, removed: four keys per step (four dot-product chains). Slower once the context
  accumulated in float64: 11.5 ms forward; the four-term mixed update did not vectorize.
- backward, kept (`_single_backward`): one key at a time, d_v_j = w_j dc in the data's dtype.
  13.6 ms into preallocated outputs at (256, 512, 256) against 8.1 ms for a copy of V. Blocks of
  keys (as the forward) were 10% slower at every block size from 4 to 32: the pass is bound by
  its two writes, not by the exp.
- allocation: np.zeros for the gradient outputs (calloc, 4 KiB page faults) cost 3x more than
  np.empty (numpy asks for huge pages), so the backward zeroes the padding itself.

Many queries (query [B, Tq, H]): GEMM-bound
-------------------------------------------
The products q k^T, w v, dc v^T, ds k, ds^T q and w^T dc are BLAS calls (batched numpy
matmul); serial kernels fuse what lies between them: ``_softmax_rows`` (scale, mask, max, exp,
normalise, statistics, in place over each row) and ``_softmax_rows_backward`` (ds = w (dw - delta)
* scale in place, with delta = sum_j w_j dw_j taken from the weights, which are at hand).

``general`` is either path applied to q' = q W (then d_q = d_q' W^T, d_W = q^T d_q').
``additive`` has its own pair, ``_additive_scores`` / ``_additive_backward``: the cost is the
tanh over B x Tq x Tk x A, recomputed in backward instead of stored (B*Tq*Tk*A floats); the
per-row key gradients and the d_v partial sums go to per-batch-row buffers, so rows run in
parallel without sharing a sum and the result is the same bit for bit on every run.

Every core clamps lengths into 1..Tk itself, so that even a direct call with bad lengths cannot
index out of bounds; the public wrappers validate first (the same errors as numpy_ref).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from numba import njit, prange

from kernels._config import JIT, PARALLEL_JIT
from kernels._util import as_type_of, dot, exp_nonpositive, matmul_rows, max_prefix, tanh
from numpy_ref import _checks
from numpy_ref import attention as reference
from numpy_ref.attention import AdditiveScoresCache, WeightedSumCache
from numpy_ref.contract import attention as contract
from numpy_ref.contract.attention import validate_attention, validate_cotangents


@njit(**JIT)
def _clamp_length(length, T):
    return min(max(length, 1), T)


# --------------------------------------------------------------------------------------------
# single query: one fused pass per batch row
#
# Types: q, k, v and the vector loops over H are in the data's dtype (`zero` carries it), and
# so is each block's partial context. The running max m, the running sum l, the unnormalised
# context (context64), the log-sum-exp, delta and every dc . v_j are float64: the backward's
# ds_j = w_j (dc . v_j - delta) subtracts near-equal numbers when one key dominates, and only
# float64 sums keep it as accurate as torch's float32 (which computes delta from the same
# rounded dc . v_j it subtracts it from). `as_type_of` casts back where a value meets a
# float32 vector loop.


_BLOCK = 128  # keys per block: its rows of K (and V) stay in L2 between the block's passes


@njit(**PARALLEL_JIT)
def _single_forward(q, k, v, lengths, scale, context64, context, weights, stats):
    """q [B, H], k [B, T, H], v [B, T, Hv] -> context64 [B, Hv] (float64, kept for the
    backward), context [B, Hv], weights [B, T], stats [B, 2] (float64: each row's max scaled
    score m and l = sum_j exp(s_j - m)).

    Per row, blocks of `_BLOCK` keys: the block's scores (one dot product per key, kept in
    weights[b]), one rescale of the running sums when the block raises the running max, the
    block's exps in one vectorized loop, then the block's p_j v_j summed in the data's dtype
    (in context[b], a scratch row until `_single_finish`) and added to the float64 context.
    """
    B, T, _ = k.shape
    Hv = v.shape[2]
    p_rows = np.empty((B, _BLOCK))  # the current block's exp(s_j - m), per batch row
    for b in prange(B):
        n = _clamp_length(lengths[b], T)
        qb, wb, acc, part, pb = q[b], weights[b], context64[b], context[b], p_rows[b]
        zero = scale - scale
        for h in range(Hv):
            acc[h] = 0.0
        m = -np.inf  # running max of the scores (float64)
        l = 0.0  # sum_j exp(s_j - m)
        for j0 in range(0, n, _BLOCK):
            nb = min(_BLOCK, n - j0)
            sb, kb, vb = wb[j0:j0 + nb], k[b, j0:j0 + nb], v[b, j0:j0 + nb]
            block_max = m
            for u in range(nb):
                s = dot(qb, kb[u], zero) * scale
                sb[u] = s  # the raw score for now; normalised in _single_finish
                block_max = max(block_max, np.float64(s))
            if block_max == -np.inf:  # every score so far is -inf: their weights are 0
                continue
            if block_max > m:  # rescale what was summed under the old max (0 at the start)
                alpha = np.exp(m - block_max)
                l *= alpha
                for h in range(Hv):
                    acc[h] *= alpha
                m = block_max
            for u in range(nb):
                p = exp_nonpositive(np.float64(sb[u]) - m)  # vectorized over the block
                pb[u] = p
                l += p
            for h in range(Hv):
                part[h] = zero
            for u in range(nb):
                p = as_type_of(pb[u], zero)
                vj = vb[u]
                for h in range(Hv):
                    part[h] += p * vj[h]
            for h in range(Hv):
                acc[h] += part[h]
        _single_finish(acc, context[b], wb, stats[b], n, m, l, zero)


@njit(**JIT)
def _single_finish(acc, cb, wb, stats_b, n, m, l, zero):
    """Normalise one row: context = acc / l, stats_b = (m, l), w_j = exp(s_j - m) / l, 0
    beyond."""
    inv_l = 1.0 / l
    for h in range(acc.shape[0]):
        acc[h] *= inv_l
        cb[h] = as_type_of(acc[h], zero)
    stats_b[0], stats_b[1] = m, l
    for j in range(n):
        wb[j] = as_type_of(exp_nonpositive(np.float64(wb[j]) - m) * inv_l, zero)
    wb[n:] = zero  # a slice, not range(n, T): a loop from a runtime start compiled to scatters


@njit(**PARALLEL_JIT)
def _single_backward(q, k, v, lengths, scale, stats, context64, d_context64, d_weights,
                     weights, d_q, d_k, d_v):
    """One pass per row, writing d_q [B, H], d_k [B, T, H], d_v [B, T, Hv] (every entry:
    the padded keys get exact zeros, so the outputs may come from np.empty).

    stats [B, 2], context64 and d_context64 [B, Hv] are float64, as the forward wrote them
    (d_context64: dc upcast); d_weights is [B, T], or empty when absent
    (then `weights` is not read). One key at a time (blocks of keys, as in the forward, were
    10% slower here: the pass is bound by its writes, not by the scalar exp).
    """
    B, T, H = k.shape
    Hv = v.shape[2]
    has_dw = d_weights.shape[0] == B and d_weights.shape[1] == T
    dc_rows = np.empty((B, Hv), d_q.dtype)  # dc in the data's dtype, for d_v_j = w_j dc
    for b in prange(B):
        n = _clamp_length(lengths[b], T)
        qb, dcb, dqb, dc_low = q[b], d_context64[b], d_q[b], dc_rows[b]
        zero = scale - scale
        m, inv_l = stats[b, 0], 1.0 / stats[b, 1]
        delta = dot(context64[b], dcb, 0.0)  # = sum_j w_j (dc . v_j)
        if has_dw:
            for j in range(n):
                delta += weights[b, j] * d_weights[b, j]
        for h in range(H):
            dqb[h] = zero
        for h in range(Hv):
            dc_low[h] = as_type_of(dcb[h], zero)
        for j in range(n):
            kj, vj = k[b, j], v[b, j]
            w = np.exp(np.float64(dot(qb, kj, zero) * scale) - m) * inv_l  # recomputed
            dw = dot(dcb, vj, 0.0)
            if has_dw:
                dw += d_weights[b, j]
            g = as_type_of(w * (dw - delta) * scale, zero)  # ds_j times the score's scale
            w_low = as_type_of(w, zero)
            dkj, dvj = d_k[b, j], d_v[b, j]
            for h in range(H):
                dqb[h] += g * kj[h]
                dkj[h] = g * qb[h]
            for h in range(Hv):
                dvj[h] = w_low * dc_low[h]  # w in the data's dtype times dc, as torch forms it
        for j in range(n, T):
            dkj, dvj = d_k[b, j], d_v[b, j]
            for h in range(H):
                dkj[h] = zero
            for h in range(Hv):
                dvj[h] = zero


# --------------------------------------------------------------------------------------------
# many queries: fused softmax between BLAS products
#
# Serial on purpose: these run between two multi-threaded OpenBLAS products, and a parallel
# region's OpenMP workers keep spinning after it and take the cores from OpenBLAS. At
# (B, Tq, Tk, H) = (32, 256, 256, 128) the forward took 19.0 ms with prange here and 9.7 ms
# without (the softmax itself: 2.2 ms parallel, 2.7 ms serial).


@njit(**JIT)
def _softmax_rows(s, lengths, scale, stats):
    """In place over s [B, Tq, Tk]: w = softmax(scale * s) over the first lengths[b] keys,
    exact 0 beyond; stats [B, Tq, 2] (float64) receives each row's max scaled score m and
    l = sum_j exp(s_j - m), as the single-query forward saves them.

    Three vectorized passes over an L1-resident row: the max (through integer keys, see
    `max_prefix`), exp with the sum, the normalisation. The scale is applied inside the exp
    (scale > 0, so max(scale s) = scale max(s)). At (32, 256, 256) float32: 1.1 ms, against
    2.3 ms with a float compare max and separate exp and sum passes.
    """
    B, Tq, Tk = s.shape
    for r in range(B * Tq):
        b, i = r // Tq, r % Tq
        n = _clamp_length(lengths[b], Tk)
        row = s[b, i]
        zero = scale - scale
        m = max_prefix(row, n) * scale
        total = 0.0
        for j in range(n):
            e = exp_nonpositive(row[j] * scale - m)  # vectorizes, unlike np.exp (scalar libm)
            row[j] = e
            total += e
        inv = as_type_of(1.0 / total, zero)
        for j in range(n):
            row[j] *= inv
        row[n:] = zero
        stats[b, i, 0], stats[b, i, 1] = m, total


@njit(**JIT)
def _softmax_rows_backward(dw, w, d_weights, lengths, scale):
    """In place over dw [B, Tq, Tk] (= dc v^T on entry): with dw' = dw + dW,
    ds = w (dw' - delta) * scale, delta = sum_j w_j dw'_j (float64). The weights are at hand
    here, so delta is taken from them, as torch does, rather than from <c, dc>: it is
    subtracted from the same rounded dw' it was summed from. d_weights is [B, Tq, Tk], or empty
    when absent."""
    B, Tq, Tk = dw.shape
    has_dw = d_weights.shape == dw.shape
    for r in range(B * Tq):
        b, i = r // Tq, r % Tq
        n = _clamp_length(lengths[b], Tk)
        row, wr = dw[b, i], w[b, i]
        zero = scale - scale
        if has_dw:
            dwr = d_weights[b, i]
            for j in range(n):
                row[j] += dwr[j]
        d = as_type_of(dot(wr[:n], row[:n], 0.0), zero)
        for j in range(n):
            row[j] = wr[j] * (row[j] - d) * scale
        row[n:] = zero


# --------------------------------------------------------------------------------------------
# additive score


@njit(**PARALLEL_JIT)
def _additive_scores(qa, ka, u, lengths, s):
    """s[b, i, j] = u . tanh(qa[b, i] + ka[b, j]) for j < lengths[b] (qa [B, Tq, A],
    ka [B, Tk, A], u [A]); entries beyond a row's length are left alone (masked later)."""
    B, Tq, A = qa.shape
    Tk = ka.shape[1]
    for r in prange(B * Tq):
        b, i = r // Tq, r % Tq
        n = _clamp_length(lengths[b], Tk)
        qi = qa[b, i]
        zero = qi[0] - qi[0]
        for j in range(n):
            kj = ka[b, j]
            acc = zero
            for a in range(A):
                acc += u[a] * np.tanh(qi[a] + kj[a])
            s[b, i, j] = acc


@njit(**PARALLEL_JIT)
def _additive_backward(qa, ka, u, lengths, ds, d_qa, d_ka, d_u_rows):
    """From ds [B, Tq, Tk]: d_qa [B, Tq, A], d_ka [B, Tk, A], d_u_rows [B, A] (per batch row,
    summed by the caller). e = tanh(qa + ka) is recomputed; dz = ds u (1 - e^2)."""
    B, Tq, A = qa.shape
    Tk = ka.shape[1]
    for b in prange(B):  # one batch row per iteration: d_ka[b] and d_u_rows[b] are its own
        n = _clamp_length(lengths[b], Tk)
        zero = u[0] - u[0]
        one = as_type_of(1.0, zero)
        dkb, dub = d_ka[b], d_u_rows[b]
        for j in range(Tk):
            for a in range(A):
                dkb[j, a] = zero
        for a in range(A):
            dub[a] = zero
        for i in range(Tq):
            qi, dqi = qa[b, i], d_qa[b, i]
            for a in range(A):
                dqi[a] = zero
            for j in range(n):
                g = ds[b, i, j]
                kj, dkj = ka[b, j], dkb[j]
                for a in range(A):
                    e = np.tanh(qi[a] + kj[a])
                    dub[a] += g * e
                    dz = g * u[a] * (one - e * e)
                    dqi[a] += dz
                    dkj[a] += dz


# --------------------------------------------------------------------------------------------
# public wrappers: validate (as numpy_ref), make contiguous, allocate, dispatch


class KernelAttentionCache(NamedTuple):
    """What `kernels.attention_backward` needs. The returned weights are referenced, not copied:
    modify them in place and backward is wrong (as with numpy_ref's cache)."""

    query: np.ndarray  # [B, Tq, Hq] contiguous; read for d_W (general) and d_keys
    keys: np.ndarray  # [B, Tk, Hk] contiguous; read
    values: np.ndarray  # [B, Tk, Hv] contiguous (the keys array itself when keys is values)
    core_query: np.ndarray  # [B, Tq, Hk] what meets the keys: q, or q W for general; read
    weights: np.ndarray  # [B, Tq, Tk] read by the multi-query backward and for the dW term;
    #                      the single-query backward recomputes them from stats
    stats: np.ndarray  # [B, Tq, 2] float64: each row's max scaled score m and
    #                    l = sum_j exp(s_j - m) (m + log l is the log-sum-exp); read (single)
    context64: np.ndarray | None  # [B, Hv] float64 context, read for delta = <c, dc> (single
    #                               query); None on the multi-query path
    lengths: np.ndarray  # [B] int64, Tk where none were given
    score: str
    params: dict[str, np.ndarray]  # validated score params; read
    projections: tuple[np.ndarray, np.ndarray] | None  # additive: (q W_query^T, k W_key^T)
    scale: np.floating  # 1/sqrt(Hk) for scaled_dot, else 1, in the data's dtype
    single_query: bool


def attention_forward(
    query: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    *,
    score: str = "dot",
    params: Mapping[str, np.ndarray] | None = None,
    lengths: Any = None,
) -> tuple[np.ndarray, np.ndarray, KernelAttentionCache]:
    """Numba `numpy_ref.attention_forward`: same arguments, checks, shapes and results.

    query [B, Hq] or [B, Tq, Hq]; keys [B, Tk, Hk]; values [B, Tk, Hv]; returns
    context [B, Hv] or [B, Tq, Hv], weights [B, Tk] or [B, Tq, Tk], cache.
    """
    same = values is keys
    query, keys, values, p, lengths = validate_attention(query, keys, values, score, params,
                                                         lengths)
    single = query.ndim == 2
    dtype = query.dtype
    q = np.ascontiguousarray(query[:, None, :] if single else query)  # [B, Tq, Hq]
    k = np.ascontiguousarray(keys)
    v = k if same else np.ascontiguousarray(values)
    B, Tq, _ = q.shape
    Tk, Hv = k.shape[1], v.shape[2]
    lengths = np.full(B, Tk, np.int64) if lengths is None else lengths
    scale = dtype.type(1.0 / math.sqrt(k.shape[2]) if score == "scaled_dot" else 1.0)
    core_q = matmul_rows(q, p["W"]) if score == "general" else q
    projections = None
    if single and score != "additive":
        context, weights, stats = (np.empty((B, Hv), dtype), np.empty((B, Tk), dtype),
                                   np.empty((B, 2), np.float64))
        context64 = np.empty((B, Hv))
        _single_forward(core_q[:, 0], k, v, lengths, scale, context64, context, weights, stats)
        context, weights, stats = context[:, None], weights[:, None], stats[:, None]
    else:
        context64 = None
        stats = np.empty((B, Tq, 2), np.float64)
        if score == "additive":
            qa = matmul_rows(q, p["W_query"].T)  # [B, Tq, A]
            if "b" in p:
                qa += p["b"]
            projections = (qa, matmul_rows(k, p["W_key"].T))
            weights = np.zeros((B, Tq, Tk), dtype)
            _additive_scores(*projections, p["v"], lengths, weights)
        else:
            weights = core_q @ k.transpose(0, 2, 1)  # [B, Tq, Tk] scores, softmaxed in place
        _softmax_rows(weights, lengths, scale, stats)
        context = weights @ v
    cache = KernelAttentionCache(q, k, v, core_q, weights, stats, context64, lengths, score, p,
                                 projections, scale, single)
    if single:
        return context[:, 0], weights[:, 0], cache
    return context, weights, cache


def attention_backward(
    d_context: np.ndarray, cache: KernelAttentionCache, *, d_weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Numba `numpy_ref.attention_backward`: returns d_query, d_keys, d_values, d_params."""
    (q, k, v, core_q, w, stats, context64, lengths, score, p, projections, scale,
     single) = _checks.cache_of(cache, KernelAttentionCache, "kernels.attention_forward")
    B, Tq, Tk = w.shape
    dtype = w.dtype
    dc, dW = validate_cotangents(d_context, d_weights, (B, Tq, Tk, v.shape[2]), single, dtype)
    dc = np.ascontiguousarray(dc)
    # an empty array stands for "no cotangent on the weights" (the cores test its shape)
    dW = np.zeros((1, 0, 0), dtype) if dW is None else np.ascontiguousarray(dW)
    d_params: dict[str, np.ndarray] = {}
    if single and score != "additive":
        d_core_q = np.empty((B, core_q.shape[2]), dtype)
        # np.empty, not np.zeros: numpy asks for huge pages on large empty arrays, while a
        # large calloc faults in 4 KiB pages, 3x slower to write here; the kernel zeroes padding
        d_keys = np.empty(k.shape, dtype)
        d_values = np.empty(v.shape, dtype)
        _single_backward(core_q[:, 0], k, v, lengths, scale, stats[:, 0], context64,
                            dc[:, 0].astype(np.float64), dW[:, 0] if dW.size else dW[0, :0],
                            w[:, 0], d_core_q, d_keys, d_values)
        d_core_q = d_core_q[:, None]
    else:
        ds = dc @ v.transpose(0, 2, 1)  # dw, turned into ds in place
        _softmax_rows_backward(ds, w, dW, lengths, scale)
        d_values = w.transpose(0, 2, 1) @ dc
        if score == "additive":
            qa, ka = projections
            A = qa.shape[2]
            d_qa, d_ka = np.empty_like(qa), np.empty_like(ka)
            d_u_rows = np.empty((B, A), dtype)
            _additive_backward(qa, ka, p["v"], lengths, ds, d_qa, d_ka, d_u_rows)
            d_query3 = matmul_rows(d_qa, p["W_query"])
            d_keys = matmul_rows(d_ka, p["W_key"])
            d_params["W_query"] = d_qa.reshape(B * Tq, A).T @ q.reshape(B * Tq, -1)
            d_params["W_key"] = d_ka.reshape(B * Tk, A).T @ k.reshape(B * Tk, -1)
            d_params["v"] = d_u_rows.sum(axis=0)
            if "b" in p:
                d_params["b"] = d_qa.sum(axis=(0, 1))
            d_params = {key: d_params[key] for key in p}  # the params' own order
            return (d_query3[:, 0] if single else d_query3), d_keys, d_values, d_params
        d_core_q = ds @ k
        d_keys = ds.transpose(0, 2, 1) @ core_q
    if score == "general":  # core_q = q @ W
        d_params["W"] = q.reshape(B * Tq, -1).T @ d_core_q.reshape(B * Tq, -1)
        d_query3 = matmul_rows(d_core_q, p["W"].T)
    else:
        d_query3 = d_core_q
    return (d_query3[:, 0] if single else d_query3), d_keys, d_values, d_params


# --------------------------------------------------------------------------------------------
# the additive score from projected queries and keys, and the weighted sum, on their own
#
# A decoder that attends step by step (Bahdanau's) calls these once per step with one query
# per row, between BLAS products: serial kernels (see the many-query note above), numpy_ref's
# cache types, so that either backend's backward takes either backend's cache.


@njit(**JIT)
def _additive_energy(qa, ka, v, e, s):
    """qa [B, Tq, A], ka [B, Tk, A], v [A] -> e [B, Tq, Tk, A] = tanh(qa + ka) and
    s [B, Tq, Tk] = e v; the tanh is `kernels._util.tanh`, which vectorizes (np.tanh is a
    scalar libm call here)."""
    B, Tq, A = qa.shape
    Tk = ka.shape[1]
    zero = v[0] - v[0]
    for b in range(B):
        for i in range(Tq):
            qi = qa[b, i]
            for j in range(Tk):
                kj, ej = ka[b, j], e[b, i, j]
                acc = zero
                for a in range(A):
                    t = tanh(qi[a] + kj[a])
                    ej[a] = t
                    acc += t * v[a]
                s[b, i, j] = acc


@njit(**JIT)
def _additive_energy_backward(e, v, ds, d_qa, d_ka, d_v64):
    """From ds [B, Tq, Tk] and the saved e: d_qa [B, Tq, A], d_ka [B, Tk, A] (both zeroed
    here) and d_v64 [A] (float64, zeroed here): dz = ds v (1 - e^2), d_v = sum ds e."""
    B, Tq, Tk, A = e.shape
    zero = v[0] - v[0]
    one = as_type_of(1.0, zero)
    d_qa[...] = zero
    d_ka[...] = zero
    d_v64[:] = 0.0
    for b in range(B):
        for i in range(Tq):
            dqi = d_qa[b, i]
            for j in range(Tk):
                g, ej, dkj = ds[b, i, j], e[b, i, j], d_ka[b, j]
                for a in range(A):
                    t = ej[a]
                    dz = g * v[a] * (one - t * t)
                    dqi[a] += dz
                    dkj[a] += dz
                    d_v64[a] += g * t


def additive_scores_forward(
    query_proj: np.ndarray, key_proj: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, AdditiveScoresCache]:
    """Numba `numpy_ref.additive_scores_forward`: ``s = v . tanh(query_proj + key_proj)``.

    query_proj [B, A] or [B, Tq, A]; key_proj [B, Tk, A]; v [A] -> scores [B, Tk] or
    [B, Tq, Tk], and numpy_ref's `AdditiveScoresCache` (e = the tanh, [B, Tq, Tk, A]).
    """
    qa, ka, v = contract.additive_scores(query_proj, key_proj, v)
    single = qa.ndim == 2
    qa = np.ascontiguousarray(qa[:, None, :] if single else qa)
    ka, v = np.ascontiguousarray(ka), np.ascontiguousarray(v)
    B, Tq, A = qa.shape
    e = np.empty((B, Tq, ka.shape[1], A), qa.dtype)
    s = np.empty((B, Tq, ka.shape[1]), qa.dtype)
    _additive_energy(qa, ka, v, e, s)
    return (s[:, 0] if single else s), AdditiveScoresCache(e, v, single)


def additive_scores_backward(
    d_scores: np.ndarray, cache: AdditiveScoresCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numba `numpy_ref.additive_scores_backward`: -> (d_query_proj, d_key_proj, d_v)."""
    e, v, single = _checks.cache_of(cache, AdditiveScoresCache, "additive_scores_forward")
    ds = np.ascontiguousarray(contract.like_scores("d_scores", d_scores, e, single))
    e, v = np.ascontiguousarray(e), np.ascontiguousarray(v)
    B, Tq, Tk, A = e.shape
    d_qa = np.empty((B, Tq, A), e.dtype)
    d_ka = np.empty((B, Tk, A), e.dtype)
    d_v64 = np.empty(A)
    _additive_energy_backward(e, v, ds, d_qa, d_ka, d_v64)
    return (d_qa[:, 0] if single else d_qa), d_ka, d_v64.astype(e.dtype)


@njit(**JIT)
def _weighted_sum_single(w, values, c):
    """c[b] = sum_j w[b, j] values[b, j] for w [B, Tk], values [B, Tk, Hv], c [B, Hv]."""
    B, Tk, Hv = values.shape
    zero = c[0, 0] - c[0, 0]
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
    zero = dc[0, 0] - dc[0, 0]
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
    """Numba `numpy_ref.weighted_sum_forward`: context [B, Hv] or [B, Tq, Hv].

    One query per row (weights [B, Tk]) is a fused loop; many queries are batched BLAS
    products, numpy_ref's own path. Returns numpy_ref's `WeightedSumCache`."""
    w, values = contract.weighted_sum(weights, values)
    if w.ndim == 3:
        return reference.weighted_sum_forward(w, values)
    w, values = np.ascontiguousarray(w), np.ascontiguousarray(values)
    c = np.empty((w.shape[0], values.shape[2]), w.dtype)
    _weighted_sum_single(w, values, c)
    return c, WeightedSumCache(w[:, None, :], values, True)


def weighted_sum_backward(
    d_context: np.ndarray, cache: WeightedSumCache
) -> tuple[np.ndarray, np.ndarray]:
    """Numba `numpy_ref.weighted_sum_backward`: -> (d_weights, d_values)."""
    w, values, single = _checks.cache_of(cache, WeightedSumCache, "weighted_sum_forward")
    if not single:
        return reference.weighted_sum_backward(d_context, cache)
    B, Tq, Tk = w.shape
    dc, _ = validate_cotangents(d_context, None, (B, Tq, Tk, values.shape[2]), True, w.dtype)
    dc = np.ascontiguousarray(dc[:, 0])
    w, values = np.ascontiguousarray(w[:, 0]), np.ascontiguousarray(values)
    d_w = np.empty((B, Tk), w.dtype)
    d_values = np.empty(values.shape, w.dtype)
    _weighted_sum_single_backward(w, values, dc, d_w, d_values)
    return d_w, d_values


# --------------------------------------------------------------------------------------------
# masked softmax on its own


class KernelMaskedSoftmaxCache(NamedTuple):
    """What `kernels.masked_softmax_backward` needs."""

    weights: np.ndarray  # [B, Tq, Tk] contiguous softmax output; read
    lengths: np.ndarray  # [B] int64
    squeeze: bool  # whether the scores were [B, Tk]


def masked_softmax_forward(
    scores: np.ndarray, lengths: Any = None
) -> tuple[np.ndarray, KernelMaskedSoftmaxCache]:
    """Numba `numpy_ref.masked_softmax_forward`: scores [B, Tk] or [B, Tq, Tk] -> weights."""
    scores, lengths = contract.masked_softmax(scores, lengths)
    B, Tk = scores.shape[0], scores.shape[-1]
    lengths = np.full(B, Tk, np.int64) if lengths is None else lengths
    squeeze = scores.ndim == 2
    w = np.array(scores[:, None, :] if squeeze else scores, order="C")  # a copy, in place below
    _softmax_rows(w, lengths, scores.dtype.type(1.0), np.empty((*w.shape[:2], 2)))
    return (w[:, 0] if squeeze else w), KernelMaskedSoftmaxCache(w, lengths, squeeze)


def masked_softmax_backward(d_weights: np.ndarray, cache: KernelMaskedSoftmaxCache) -> np.ndarray:
    """Numba `numpy_ref.masked_softmax_backward`: d_scores = w * (dw - sum_j w_j dw_j)."""
    w = _checks.cache_of(cache, KernelMaskedSoftmaxCache, "kernels.masked_softmax_forward").weights
    d_weights = contract.like_weights("d_weights", d_weights, w[:, 0] if cache.squeeze else w)
    dw = np.array(d_weights[:, None, :] if cache.squeeze else d_weights, order="C")
    _softmax_rows_backward(dw, w, np.zeros((1, 0, 0), w.dtype), cache.lengths,
                           w.dtype.type(1.0))
    return dw[:, 0] if cache.squeeze else dw
