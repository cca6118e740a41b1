r"""Numba attention: the fused single-query core, the batched path for many queries and heads,
and the additive score.

Same public functions, argument names, validation and results as `numpy_ref.attention` (read
its docstring for the math, shapes and options); only the caches differ, see
`KernelAttentionCache`. `numpy_ref.contract.attention` checks the arguments, brings every
layout to the heads layout [B, h, Tq, ...] and says which keys each query sees; these kernels
read that, never the rows it calls padding.

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

Only the first lengths[b] keys of a row are read, and of those only the ones the row sees (the
mask row, the bias row and causal are read per key through broadcast views: a mask [Tk] shared
by every row is one row in memory); the work is proportional to the sum of the lengths. The
hidden rows of d_keys/d_values and the hidden weights are written as exact zeros (a streaming
write, no read), so NaN or inf there reaches nothing. With `sum_kv` the backward writes
d_kv_j = d_k_j + d_v_j, one array instead of two: read V once, write d_kv once, the floor.
A NaN score makes its row NaN (the flag `bad` below); a row that sees no key gets zeros.

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
- forward v3's block sum, four keys per sweep (kept, when no key is hidden): the block's
  partial context is loaded and stored once per four keys instead of once per key; 6.0 -> 5.3
  ms min at (256, 512, 256) on a day the stream read took 4.0 ms (alternating in one process).
  Four dot products per sweep in the score pass (q read once for four keys) was slower:
  6.6 ms.
- backward, kept (`_single_backward`): one key at a time, d_v_j = w_j dc in the data's dtype.
  13.6 ms into preallocated outputs at (256, 512, 256) against 8.1 ms for a copy of V. Blocks of
  keys (as the forward) were 10% slower at every block size from 4 to 32: the pass is bound by
  its two writes, not by the exp.
- allocation: np.zeros for the gradient outputs (calloc, 4 KiB page faults) cost 3x more than
  np.empty (numpy asks for huge pages), so the backward zeroes the padding itself.

Many queries and heads (query [B, Tq, H] or [B, h, Tq, D]): GEMM-bound
----------------------------------------------------------------------
The products q k^T, w v, dc v^T, ds k, ds^T q and w^T dc are BLAS calls (batched numpy
matmul); serial kernels fuse what lies between them: ``_softmax_rows`` (scale, bias, mask, max,
exp, normalise, statistics, in place over each row) and ``_softmax_rows_backward``
(ds = w (dw - delta) in place, with delta = sum_j w_j dw_j taken from the weights, which are at
hand). Grouped-query attention stacks the query heads of a group along Tq: q [B, h, Tq, D] is
viewed as [B, h_kv, group * Tq, D], so each kv head is read once per product, and w^T dc and
ds^T q sum the group's contributions to d_values and d_keys inside the GEMM. Padding rows of
keys and values are replaced by zeros before the products (a copy, only when there are some).

``general`` is either path applied to q' = q W (then d_q = d_q' W^T, d_W = q^T d_q').
``additive`` has its own pair, ``_additive_scores`` / ``_additive_backward``: the cost is the
tanh over B x Tq x Tk x A, recomputed in backward instead of stored (B*Tq*Tk*A floats); the
per-row key gradients and the d_v partial sums go to per-batch-row buffers, so rows run in
parallel without sharing a sum and the result is the same bit for bit on every run.

Every core clamps lengths into 1..Tk itself, so that even a direct call with bad lengths cannot
index out of bounds; the public wrappers validate first (the same errors as numpy_ref).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from numba import njit, prange

from kernels._config import JIT, PARALLEL_JIT
from kernels._util import as_type_of, dot, exp_nonpositive, matmul_rows, max_prefix, tanh
from numpy_ref import attention as reference
from numpy_ref.attention import AdditiveScoresCache, WeightedSumCache
from numpy_ref.contract import attention as contract
from numpy_ref.contract import checks
from numpy_ref.contract.fields import documented


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
#
# Which keys row b sees: j < lengths[b] and visible[b, j] (the mask, causal and bias != -inf,
# combined by the contract); visible and bias are [B, T] views, broadcast with stride 0 where
# the caller's arrays were. Hidden keys are skipped: their k_j and v_j are never read.


_BLOCK = 128  # keys per block: its rows of K (and V) stay in L2 between the block's passes


@njit(**PARALLEL_JIT)
def _single_forward(q, k, v, lengths, masked, visible, bias, scale, context64, context, weights,
                    stats):
    """q [B, H], k [B, T, H], v [B, T, Hv] -> context64 [B, Hv] (float64, kept for the
    backward), context [B, Hv], weights [B, T], stats [B, 2] (float64: each row's max score m
    and l = sum_j exp(s_j - m); (-inf, 0) for a row that sees no key, NaN for a NaN row).

    s_j = scale * q . k_j + bias[b, j]. Per row, blocks of `_BLOCK` keys: the block's scores
    (kept in weights[b]; -inf at hidden keys), one rescale of the running sums when the block
    raises the running max, the block's exps in one vectorized loop, then the block's p_j v_j
    over the keys it sees, summed in the data's dtype (in context[b], a scratch row until
    `_single_finish`) and added to the float64 context.
    """
    B, T, _ = k.shape
    Hv = v.shape[2]
    p_rows = np.empty((B, _BLOCK))  # the current block's exp(s_j - m), per batch row
    for b in prange(B):
        n = _clamp_length(lengths[b], T)
        qb, wb, acc, part, pb = q[b], weights[b], context64[b], context[b], p_rows[b]
        zero = as_type_of(0.0, scale)
        for h in range(Hv):
            acc[h] = 0.0
        m = -np.inf  # running max of the scores (float64)
        l = 0.0  # sum_j exp(s_j - m)
        bad = False  # a NaN score: the row is NaN
        for j0 in range(0, n, _BLOCK):
            nb = min(_BLOCK, n - j0)
            sb, kb, vb = wb[j0:j0 + nb], k[b, j0:j0 + nb], v[b, j0:j0 + nb]
            block_max = m
            for u in range(nb):
                s = -np.inf
                if not masked or visible[b, j0 + u]:
                    s = np.float64(dot(qb, kb[u], zero) * scale + bias[b, j0 + u])
                    if s > block_max:
                        block_max = s
                    elif s != s:
                        bad = True
                sb[u] = s  # the raw score for now; normalised in _single_finish
            if block_max == -np.inf or bad:  # every score so far is -inf: their weights are 0
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
            u0 = 0
            while not masked and u0 + 4 <= nb:  # four keys per sweep: part is loaded and
                p0, p1 = as_type_of(pb[u0], zero), as_type_of(pb[u0 + 1], zero)  # stored 4x less
                p2, p3 = as_type_of(pb[u0 + 2], zero), as_type_of(pb[u0 + 3], zero)
                v0, v1, v2, v3 = vb[u0], vb[u0 + 1], vb[u0 + 2], vb[u0 + 3]
                for h in range(Hv):
                    part[h] += (p0 * v0[h] + p1 * v1[h]) + (p2 * v2[h] + p3 * v3[h])
                u0 += 4
            for u in range(u0, nb):
                if not masked or visible[b, j0 + u]:
                    p = as_type_of(pb[u], zero)
                    vj = vb[u]
                    for h in range(Hv):
                        part[h] += p * vj[h]
            for h in range(Hv):
                acc[h] += part[h]
        if bad:
            m = l = np.nan
        _single_finish(acc, context[b], wb, stats[b], n, m, l, zero)


@njit(**JIT)
def _single_finish(acc, cb, wb, stats_b, n, m, l, zero):
    """Normalise one row: context = acc / l, stats_b = (m, l), w_j = exp(s_j - m) / l, 0
    beyond n and at hidden keys (s_j = -inf); a row that sees no key (l = 0) is all zeros."""
    stats_b[0], stats_b[1] = m, l
    if l == 0.0:
        acc[:] = 0.0
        cb[:] = zero
        wb[:] = zero
        return
    inv_l = 1.0 / l
    for h in range(acc.shape[0]):
        acc[h] *= inv_l
        cb[h] = as_type_of(acc[h], zero)
    for j in range(n):
        s = np.float64(wb[j])
        w = exp_nonpositive(s - m) * inv_l
        wb[j] = zero if s == -np.inf else as_type_of(w, zero)
    wb[n:] = zero  # a slice, not range(n, T): a loop from a runtime start compiled to scatters


@njit(**PARALLEL_JIT)
def _single_backward(q, k, v, lengths, masked, visible, bias, scale, stats, context64,
                     d_context64, d_weights, weights, sum_kv, d_q, d_k, d_v, d_bias):
    """One pass per row, writing d_q [B, H], d_k [B, T, H] (d_k + d_v when sum_kv, then d_v is
    not written), d_v [B, T, Hv] and, when d_bias is [B, T], the unscaled ds (every entry: the
    hidden keys get exact zeros, so the outputs may come from np.empty).

    stats [B, 2], context64 and d_context64 [B, Hv] are float64, as the forward wrote them
    (d_context64: dc upcast); d_weights is [B, T], or empty when absent (then `weights` is not
    read). One key at a time (blocks of keys, as in the forward, were 10% slower here: the pass
    is bound by its writes, not by the scalar exp).
    """
    B, T, H = k.shape
    Hv = v.shape[2]
    has_dw = d_weights.shape[0] == B and d_weights.shape[1] == T
    has_db = d_bias.shape[0] == B and d_bias.shape[1] == T
    dc_rows = np.empty((B, Hv), d_q.dtype)  # dc in the data's dtype, for d_v_j = w_j dc
    for b in prange(B):
        n = _clamp_length(lengths[b], T)
        qb, dcb, dqb, dc_low = q[b], d_context64[b], d_q[b], dc_rows[b]
        zero = as_type_of(0.0, scale)
        m, l = stats[b, 0], stats[b, 1]
        for h in range(H):
            dqb[h] = zero
        if l == 0.0:  # the row sees no key: every gradient is 0
            n = 0
        inv_l = 1.0 / l if n else 0.0
        delta = dot(context64[b], dcb, 0.0)  # = sum_j w_j (dc . v_j)
        if has_dw:
            for j in range(n):
                wj = weights[b, j]
                delta += 0.0 if wj == zero else wj * d_weights[b, j]  # a hidden key adds nothing
        for h in range(Hv):
            dc_low[h] = as_type_of(dcb[h], zero)
        for j in range(n):
            dkj, dvj = d_k[b, j], d_v[b, j]
            if masked and not visible[b, j]:
                for h in range(H):
                    dkj[h] = zero
                if not sum_kv:
                    for h in range(Hv):
                        dvj[h] = zero
                if has_db:
                    d_bias[b, j] = zero
                continue
            kj, vj = k[b, j], v[b, j]
            if has_db:  # the forward's own weight: with fast-math, (q.k s + bias) - m could be
                w = np.float64(weights[b, j])  # reassociated and drift from it for a large bias
            else:
                s = np.float64(dot(qb, kj, zero) * scale)
                w = np.exp(s - m) * inv_l  # recomputed
            dw = dot(dcb, vj, 0.0)
            if has_dw:
                dw += d_weights[b, j]
            ds = w * (dw - delta)
            if has_db:
                d_bias[b, j] = as_type_of(ds, zero)
            g = as_type_of(ds * scale, zero)  # ds_j times the score's scale
            w_low = as_type_of(w, zero)
            for h in range(H):
                dqb[h] += g * kj[h]
            if sum_kv:
                for h in range(H):
                    dkj[h] = g * qb[h] + w_low * dc_low[h]
            else:
                for h in range(H):
                    dkj[h] = g * qb[h]
                for h in range(Hv):
                    dvj[h] = w_low * dc_low[h]  # w in the data's dtype times dc, as torch does
        for j in range(n, T):
            dkj = d_k[b, j]
            for h in range(H):
                dkj[h] = zero
            if not sum_kv:
                dvj = d_v[b, j]
                for h in range(Hv):
                    dvj[h] = zero
            if has_db:
                d_bias[b, j] = zero


# --------------------------------------------------------------------------------------------
# many queries and heads: fused softmax between BLAS products
#
# Serial on purpose: these run between two multi-threaded OpenBLAS products, and a parallel
# region's OpenMP workers keep spinning after it and take the cores from OpenBLAS. At
# (B, Tq, Tk, H) = (32, 256, 256, 128) the forward took 19.0 ms with prange here and 9.7 ms
# without (the softmax itself: 2.2 ms parallel, 2.7 ms serial).


@njit(**JIT)
def _softmax_rows(s, lengths, causal, masked, visible, has_bias, bias, scale, stats):
    """In place over s [B, h, Tq, Tk]: w = softmax(scale * s + bias) over the keys each row
    sees (j < lengths[b], j <= i when causal, and visible[b, hh, i, j] when masked), exact 0
    elsewhere; stats [B, h, Tq, 2] (float64) receives each row's max score m and
    l = sum_j exp(s_j - m). visible and bias are [B, h, Tq, Tk] views (broadcast, stride 0
    where the caller's arrays were), read only when masked / has_bias.

    Three vectorized passes over an L1-resident row: the max (through integer keys, see
    `max_prefix`), exp with the sum, the normalisation; with a mask, a bias or a scale other
    than 1, a first pass forms the scores in place. The
    causal prefix is the row's own length, i + 1: the keys above the diagonal are not read. At
    (32, 256, 256) float32: 1.1 ms, against 2.3 ms with a float compare max and separate exp
    and sum passes.
    """
    B, h, Tq, Tk = s.shape
    # scale 1: the scores are used as they are; any other scale is applied in a first pass,
    # so that max and subtraction see the same rounded numbers (exp(s * scale - max * scale)
    # with a fused multiply-add is off by up to ulp(max * scale): exp(+-1024) at |s| ~ 1e10
    # in float32)
    plain = not masked and not has_bias and scale == 1
    for r in range(B * h * Tq):
        b, hh, i = r // (h * Tq), (r // Tq) % h, r % Tq
        n = _clamp_length(lengths[b], Tk)
        if causal:
            n = min(n, i + 1)
        row = s[b, hh, i]
        zero = as_type_of(0.0, scale)
        if plain:
            m = max_prefix(row, n)
        else:
            seen, br = visible[b, hh, i], bias[b, hh, i]
            for j in range(n):
                x = row[j] * scale
                if has_bias:
                    x += br[j]
                if masked and not seen[j]:
                    x = -np.inf
                row[j] = x
            m = max_prefix(row, n)  # NaN if the row holds one
        row[n:] = zero
        if m == -np.inf:  # the row sees no key
            row[:n] = zero
            stats[b, hh, i, 0], stats[b, hh, i, 1] = m, 0.0
            continue
        total = 0.0
        for j in range(n):
            e = exp_nonpositive(row[j] - m)  # vectorizes, unlike np.exp (scalar libm)
            row[j] = e
            total += e
        inv = as_type_of(1.0 / total, zero)
        for j in range(n):
            row[j] *= inv
        if total != total and masked:  # a NaN row: NaN at the keys it sees, 0 at the others
            seen = visible[b, hh, i]
            for j in range(n):
                if not seen[j]:
                    row[j] = zero
        stats[b, hh, i, 0], stats[b, hh, i, 1] = m, total


@njit(**JIT)
def _softmax_rows_backward(dw, w, d_weights, lengths, causal):
    """In place over dw [B, h, Tq, Tk] (= dc v^T on entry): with dw' = dw + dW,
    ds = w (dw' - delta), delta = sum_j w_j dw'_j (float64), exact 0 where w is 0 (and beyond
    each row's prefix: lengths, and i + 1 when causal). The weights are at hand here, so delta
    is taken from them, as torch does, rather than from <c, dc>: it is subtracted from the same
    rounded dw' it was summed from. d_weights is [B, h, Tq, Tk], or empty when absent."""
    B, h, Tq, Tk = dw.shape
    has_dw = d_weights.shape == dw.shape
    for r in range(B * h * Tq):
        b, hh, i = r // (h * Tq), (r // Tq) % h, r % Tq
        n = _clamp_length(lengths[b], Tk)
        if causal:
            n = min(n, i + 1)
        row, wr = dw[b, hh, i], w[b, hh, i]
        zero = as_type_of(0.0, wr[0])
        if has_dw:
            dwr = d_weights[b, hh, i]
            for j in range(n):
                row[j] += dwr[j]
        d = 0.0
        for j in range(n):
            x = wr[j] * row[j]
            d += 0.0 if wr[j] == zero else x  # a hidden key adds nothing, even next to a NaN
        d = as_type_of(d, zero)
        for j in range(n):
            x = wr[j] * (row[j] - d)
            row[j] = zero if wr[j] == zero else x
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
        zero = as_type_of(0.0, qi[0])
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
        zero = as_type_of(0.0, u[0])
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


@documented
class KernelAttentionCache(NamedTuple):
    """What `kernels.attention_backward` needs. The returned weights are referenced, not copied:
    modify them in place and backward is wrong (as with numpy_ref's cache). Arrays are in the
    heads layout."""

    inputs: contract.AttentionInputs  # the checked arguments (views of the caller's arrays)
    padding: contract.Padding  # which key and query rows are not data
    query: np.ndarray  # [B, h, Tq, Hq] contiguous, padding rows zeroed; read for d_W, d_keys
    keys: np.ndarray  # [B, h_kv, Tk, Hk] contiguous, padding zeroed; read
    values: np.ndarray  # [B, h_kv, Tk, Hv] contiguous (the keys array when keys is values)
    core_query: np.ndarray  # [B, h, Tq, Hk] what meets the keys: q, or q W for general, times
    #                         the scale on the batched path (the fused one scales each score)
    weights: np.ndarray  # [B, h, Tq, Tk] read by the batched backward and for the dW term;
    #                      the single-query backward recomputes them from stats
    stats: np.ndarray  # [B, h, Tq, 2] float64: each row's max score m and
    #                    l = sum_j exp(s_j - m) (m + log l is the log-sum-exp); read (single)
    context64: np.ndarray | None  # [B, Hv] float64 context, read for delta = <c, dc> (single
    #                               query); None on the batched path
    lengths: np.ndarray  # [B] int64, Tk where none were given
    masked: bool  # whether `visible` hides any key (else it is all True and not read)
    visible: np.ndarray  # bool [B, h, Tq, Tk] view (broadcast): the mask and bias > -inf, and
    #                      causal on the fused path (the batched one takes causal as a prefix)
    bias: np.ndarray  # [B, h, Tq, Tk] view (broadcast zeros when no bias was given)
    projections: tuple[np.ndarray, np.ndarray] | None  # additive: (q W_query^T + b, k W_key^T)
    fused: bool  # whether the single-query fused kernels ran


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


def attention_forward(
    query: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    *,
    score: str = "dot",
    params: Mapping[str, np.ndarray] | None = None,
    lengths: Any = None,
    mask: np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, KernelAttentionCache]:
    """Numba `numpy_ref.attention_forward`: same arguments, checks, shapes and results.

    query [B, Hq], [B, Tq, Hq] or [B, h, Tq, D]; keys/values [B, Tk, H] or [B, h_kv, Tk, D];
    returns context and weights in the query's layout, and the cache.
    """
    same = values is keys
    a = contract.validate_attention(query, keys, values, score, params, lengths, mask, causal,
                                    scale, bias)
    pad = contract.padding(a, contract.visibility(a))
    B, h, Tq, _ = a.query.shape
    _, h_kv, Tk, _ = a.keys.shape
    Hv = a.values.shape[3]
    dtype = a.query.dtype
    p = a.params
    fused = a.layout == "single" and score != "additive"
    lengths = np.full(B, Tk, np.int64) if a.lengths is None else a.lengths
    shape = (B, h, Tq, Tk)
    # the batched path takes causal as each row's prefix; the fused one has one query per row
    visible = contract.visibility(a, with_lengths=False, with_causal=fused)
    masked = visible is not None  # False: the kernels need not read `visible`
    visible = np.broadcast_to(np.True_ if visible is None else visible, shape)
    bias4 = np.broadcast_to(dtype.type(0) if a.bias is None else a.bias, shape)
    scale = dtype.type(1.0 if a.scale is None else a.scale)
    # a query row that sees no key is zeroed (general's d_W = q^T d_q' would read it)
    q = np.ascontiguousarray(contract.without_padding(a.query, pad.queries))
    if fused:  # hidden key rows are skipped, never read: no copy of K or V needed
        k = np.ascontiguousarray(a.keys)
    else:
        k = np.ascontiguousarray(contract.without_padding(a.keys, pad.keys))
    if same:
        v = k
    elif fused:
        v = np.ascontiguousarray(a.values)
    else:
        v = np.ascontiguousarray(contract.without_padding(a.values, pad.keys))
    core_q = matmul_rows(q, p["W"]) if score == "general" else q
    projections = context64 = None
    stats = np.empty((B, h, Tq, 2), np.float64)
    if fused:
        context, weights = np.empty((B, Hv), dtype), np.empty((B, Tk), dtype)
        context64 = np.empty((B, Hv))
        _single_forward(core_q[:, 0, 0], k[:, 0], v[:, 0], lengths, masked, visible[:, 0, 0],
                        bias4[:, 0, 0], scale, context64, context, weights, stats[:, 0, 0])
        context, weights = context[:, None, None], weights[:, None, None]
    else:
        g = h // h_kv  # query heads per kv head, stacked along Tq (see the module docstring)
        if score == "additive":
            qa = matmul_rows(q, p["W_query"].T)  # [B, h, Tq, A]
            if "b" in p:
                qa += p["b"]
            projections = (qa, matmul_rows(k, p["W_key"].T))
            A = qa.shape[3]
            weights = np.zeros((B * h_kv, g * Tq, Tk), dtype)
            _additive_scores(qa.reshape(B * h_kv, g * Tq, A),
                             projections[1].reshape(B * h_kv, Tk, A), p["v"],
                             np.repeat(lengths, h_kv), weights)
            weights = weights.reshape(shape)
        else:  # the scale goes into the (Tk times smaller) query: the scores come out scaled
            if scale != 1:
                core_q = core_q * scale
            weights = (core_q.reshape(B, h_kv, g * Tq, -1) @ np.swapaxes(k, 2, 3)).reshape(shape)
        _softmax_rows(weights, lengths, a.causal, masked, visible, a.bias is not None, bias4,
                      dtype.type(1.0), stats)
        context = (weights.reshape(B, h_kv, g * Tq, Tk) @ v).reshape(B, h, Tq, Hv)
        context = contract.without_padding(context, pad.queries)
    cache = KernelAttentionCache(a, pad, q, k, v, core_q, weights, stats, context64, lengths,
                                 masked, visible, bias4, projections, fused)
    return a.to_user(context), a.to_user(weights), cache


def attention_backward(
    d_context: np.ndarray,
    cache: KernelAttentionCache,
    *,
    d_weights: np.ndarray | None = None,
    sum_kv: bool = False,
    out: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Numba `numpy_ref.attention_backward`: returns d_query, d_keys, d_values (None with
    sum_kv), d_params; `out` buffers are written by the kernels themselves on the fused
    path."""
    (a, pad, q, k, v, core_q, w, stats, context64, lengths, masked, visible, bias4, projections,
     fused) = checks.cache_of(cache, KernelAttentionCache, "kernels.attention_forward")
    sum_kv, out = contract.gradient_outputs(a, sum_kv, out, d_context, d_weights)
    B, h, Tq, Tk = w.shape
    h_kv, Hv = k.shape[1], v.shape[3]
    dtype = w.dtype
    p, score = a.params, a.score
    scale = dtype.type(1.0 if a.scale is None else a.scale)
    dc, dW = contract.attention_cotangents(a, d_context, d_weights, Hv)
    dc = np.ascontiguousarray(dc)
    # an empty array stands for "no cotangent" (the cores test its shape)
    d_params: dict[str, np.ndarray] = {}
    if fused:
        d_core_q = (out[0] if out[0] is not None and score != "general"
                    else np.empty((B, core_q.shape[3]), dtype))
        # np.empty, not np.zeros: numpy asks for huge pages on large empty arrays, while a
        # large calloc faults in 4 KiB pages, 3x slower to write here; the kernel zeroes padding
        d_keys = out[1] if out[1] is not None else np.empty(k.shape[:1] + k.shape[2:], dtype)
        d_values = (d_keys if sum_kv else out[2] if out[2] is not None
                    else np.empty(v.shape[:1] + v.shape[2:], dtype))
        d_bias = np.empty((B, Tk), dtype) if a.bias is not None else np.empty((0, 0), dtype)
        dw_in = (np.ascontiguousarray(dW[:, 0, 0]) if dW is not None
                 else np.empty((0, 0), dtype))
        _single_backward(core_q[:, 0, 0], k[:, 0], v[:, 0], lengths, masked, visible[:, 0, 0],
                         bias4[:, 0, 0], scale, stats[:, 0, 0], context64,
                         dc[:, 0, 0].astype(np.float64), dw_in, w[:, 0, 0], sum_kv, d_core_q,
                         d_keys, d_values, d_bias)
        d_core_q, d_keys = d_core_q[:, None, None], d_keys[:, None]
        d_values = None if sum_kv else d_values[:, None]
        ds = d_bias[:, None, None] if a.bias is not None else None
    else:
        g = h // h_kv
        wg = w.reshape(B, h_kv, g * Tq, Tk)
        dcg = dc.reshape(B, h_kv, g * Tq, Hv)
        ds = (dcg @ np.swapaxes(v, 2, 3)).reshape(B, h, Tq, Tk)  # dw, made ds in place
        dW = np.empty((0, 0, 0, 0), dtype) if dW is None else np.ascontiguousarray(dW)
        _softmax_rows_backward(ds, w, dW, lengths, a.causal)
        d_values = np.swapaxes(wg, 2, 3) @ dcg  # [B, h_kv, Tk, Hv]: the group summed
        dsg = ds.reshape(B, h_kv, g * Tq, Tk)
        if score == "additive":
            qa, ka = projections
            A = qa.shape[3]
            d_qa, d_ka = np.empty_like(qa), np.empty_like(ka)
            d_u_rows = np.empty((B * h_kv, A), dtype)
            _additive_backward(qa.reshape(B * h_kv, g * Tq, A), ka.reshape(B * h_kv, Tk, A),
                               p["v"], np.repeat(lengths, h_kv), dsg.reshape(B * h_kv, g * Tq, Tk),
                               d_qa.reshape(B * h_kv, g * Tq, A), d_ka.reshape(B * h_kv, Tk, A),
                               d_u_rows)
            d_query = matmul_rows(d_qa, p["W_query"])
            d_keys = matmul_rows(d_ka, p["W_key"])
            d_params["W_query"] = _flat(d_qa).T @ _flat(q)
            d_params["W_key"] = _flat(d_ka).T @ _flat(k)
            d_params["v"] = d_u_rows.sum(axis=0)
            if "b" in p:
                d_params["b"] = _flat(d_qa).sum(axis=0)
            d_params = {key: d_params[key] for key in p}  # the params' own order
            d_core_q = None
        else:
            d_core_q = (dsg @ k).reshape(B, h, Tq, -1) * scale
            d_keys = np.swapaxes(dsg, 2, 3) @ core_q.reshape(B, h_kv, g * Tq, -1)  # q is scaled
    if d_core_q is not None:
        if score == "general":  # core_q = q @ W
            d_params["W"] = _flat(q).T @ _flat(d_core_q)
            d_query = matmul_rows(d_core_q, p["W"].T)
        else:
            d_query = d_core_q
    if a.bias is not None:
        d_params["bias"] = contract.reduce_to(a.to_user(ds), a.bias_shape)
    d_query = contract.without_padding(d_query, pad.queries)
    if not fused:  # padding rows got 0 * (a NaN of a query row, or of dc): 0 by definition
        d_keys = contract.without_padding(d_keys, pad.keys)
        d_values = contract.without_padding(d_values, pad.keys)
    d_query, d_keys, d_values = contract.deliver(a, d_query, d_keys, d_values, sum_kv, out)
    return d_query, d_keys, d_values, d_params


# --------------------------------------------------------------------------------------------
# the additive score from projected queries and keys, and the weighted sum, on their own
#
# A decoder that attends step by step (Bahdanau's) calls these once per step with one query
# per row, between BLAS products: serial kernels (see the many-query note above), numpy_ref's
# cache types, so that either backend's backward takes either backend's cache. Heads layouts
# go to numpy_ref's own code.


@njit(**JIT)
def _additive_energy(qa, ka, v, e, s):
    """qa [B, Tq, A], ka [B, Tk, A], v [A] -> e [B, Tq, Tk, A] = tanh(qa + ka) and
    s [B, Tq, Tk] = e v; the tanh is `kernels._util.tanh`, which vectorizes (np.tanh is a
    scalar libm call here)."""
    B, Tq, A = qa.shape
    Tk = ka.shape[1]
    zero = as_type_of(0.0, v[0])
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
    zero = as_type_of(0.0, v[0])
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
    if qa.ndim == 4:
        return reference.additive_scores_forward(qa, ka, v)
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
    e, v, single = checks.cache_of(cache, AdditiveScoresCache, "additive_scores_forward")
    if e.ndim == 5:
        return reference.additive_scores_backward(d_scores, cache)
    B, Tq, Tk, A = e.shape
    ds = contract.like("d_scores", d_scores, (B, Tk) if single else (B, Tq, Tk), e.dtype,
                       "the scores")
    ds = np.ascontiguousarray(ds[:, None] if single else ds)
    e, v = np.ascontiguousarray(e), np.ascontiguousarray(v)
    d_qa = np.empty((B, Tq, A), e.dtype)
    d_ka = np.empty((B, Tk, A), e.dtype)
    d_v64 = np.empty(A)
    _additive_energy_backward(e, v, ds, d_qa, d_ka, d_v64)
    return (d_qa[:, 0] if single else d_qa), d_ka, d_v64.astype(e.dtype)


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
    w, values, single = checks.cache_of(cache, WeightedSumCache, "weighted_sum_forward")
    if not single:
        return reference.weighted_sum_backward(d_context, cache)
    B, _, Tk = w.shape
    dc = contract.like("d_context", d_context, (B, values.shape[2]), w.dtype, "the context")
    dc = np.ascontiguousarray(dc)
    w, values = np.ascontiguousarray(w[:, 0]), np.ascontiguousarray(values)
    d_w = np.empty((B, Tk), w.dtype)
    d_values = np.empty(values.shape, w.dtype)
    _weighted_sum_single_backward(w, values, dc, d_w, d_values)
    return d_w, d_values


# --------------------------------------------------------------------------------------------
# masked softmax on its own


@documented
class KernelMaskedSoftmaxCache(NamedTuple):
    """What `kernels.masked_softmax_backward` needs."""

    weights: np.ndarray  # [B, h, Tq, Tk] contiguous softmax output (the scores' axes, padded
    #                      with 1s to four); read
    lengths: np.ndarray  # [B] int64
    shape: tuple[int, ...]  # the scores' own shape


def _as4(x: np.ndarray) -> np.ndarray:
    """[B, Tk] -> [B, 1, 1, Tk]; [B, Tq, Tk] -> [B, 1, Tq, Tk]; [B, h, Tq, Tk] as is."""
    return x.reshape(x.shape[:1] + (1,) * (4 - x.ndim) + x.shape[1:])


def masked_softmax_forward(
    scores: np.ndarray, lengths: Any = None, *, mask: np.ndarray | None = None
) -> tuple[np.ndarray, KernelMaskedSoftmaxCache]:
    """Numba `numpy_ref.masked_softmax_forward`: scores [B, Tk], [B, Tq, Tk] or [B, h, Tq, Tk]
    -> weights."""
    scores, lengths, mask = contract.masked_softmax(scores, lengths, mask)
    B, Tk = scores.shape[0], scores.shape[-1]
    lengths = np.full(B, Tk, np.int64) if lengths is None else lengths
    w = np.array(_as4(scores), order="C")  # a copy, softmaxed in place
    seen = np.True_ if mask is None else _as4(np.broadcast_to(mask, scores.shape))
    seen = np.broadcast_to(seen, w.shape)
    zero = np.broadcast_to(scores.dtype.type(0), w.shape)
    _softmax_rows(w, lengths, False, mask is not None, seen, False, zero, scores.dtype.type(1.0),
                  np.empty((*w.shape[:3], 2)))
    return w.reshape(scores.shape), KernelMaskedSoftmaxCache(w, lengths, scores.shape)


def masked_softmax_backward(d_weights: np.ndarray, cache: KernelMaskedSoftmaxCache) -> np.ndarray:
    """Numba `numpy_ref.masked_softmax_backward`: d_scores = w * (dw - sum_j w_j dw_j)."""
    w, lengths, shape = checks.cache_of(cache, KernelMaskedSoftmaxCache,
                                        "kernels.masked_softmax_forward")
    d_weights = contract.like_weights("d_weights", d_weights, w.reshape(shape))
    dw = np.array(_as4(d_weights), order="C")
    _softmax_rows_backward(dw, w, np.empty((0, 0, 0, 0), w.dtype), lengths, False)
    return dw.reshape(shape)
