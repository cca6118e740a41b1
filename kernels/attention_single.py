r"""Numba attention with one query per batch row (query [B, H], the seed's case): one fused
pass per row.

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
  ms min at (256, 512, 256) against a 4.0 ms streaming read of V in the same process.
  Four dot products per sweep in the score pass (q read once for four keys) was slower:
  6.6 ms.
- backward, kept (`_single_backward`): one key at a time, d_v_j = w_j dc in the data's dtype.
  13.6 ms into preallocated outputs at (256, 512, 256) against 8.1 ms for a copy of V. Blocks of
  keys (as the forward) were 10% slower at every block size from 4 to 32: the pass is bound by
  its two writes, not by the exp.
- allocation: np.zeros for the gradient outputs (calloc, 4 KiB page faults) cost 3x more than
  np.empty (numpy asks for huge pages), so the backward zeroes the padding itself.

Without the weights (``need_weights=False``) the forward keeps each block's scores in a
per-row scratch of `_BLOCK` entries instead of the weights row, and the backward recomputes
every weight from the scores and the saved statistics (with weights, it reads the forward's
own weight wherever a bias or a cotangent on the weights is given).

Every core clamps lengths into 1..Tk itself, so that even a direct call with bad lengths cannot
index out of bounds; the public wrappers (`kernels.attention`) validate first.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels._config import JIT, PARALLEL_JIT
from kernels._util import as_type_of, dot, exp_nonpositive, tanh


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
def _single_forward(q, k, v, lengths, masked, visible, bias, scale, softcap, context64, context,
                    weights, stats, with_weights):
    """q [B, H], k [B, T, H], v [B, T, Hv] -> context64 [B, Hv] (float64, kept for the
    backward), context [B, Hv], weights [B, T] (when with_weights; else any [B, x] array,
    not read), stats [B, 2] (float64: each row's max score m and l = sum_j exp(s_j - m);
    (-inf, 0) for a row that sees no key, NaN for a NaN row).

    s_j = cap(scale * q . k_j) + bias[b, j], cap(x) = softcap tanh(x / softcap) when
    softcap > 0 (the data's dtype; 0: no cap, x itself). Per row, blocks of `_BLOCK` keys: the
    block's scores
    (kept in weights[b], or in a scratch of one block without weights; -inf at hidden keys),
    one rescale of the running sums when the block raises the running max, the block's exps in
    one vectorized loop, then the block's p_j v_j over the keys it sees, summed in the data's
    dtype (in context[b], a scratch row until `_single_finish`) and added to the float64
    context.
    """
    B, T, _ = k.shape
    Hv = v.shape[2]
    p_rows = np.empty((B, _BLOCK))  # the current block's exp(s_j - m), per batch row
    s_rows = np.empty((B, 0 if with_weights else _BLOCK), q.dtype)  # its scores, no weights
    for b in prange(B):
        n = _clamp_length(lengths[b], T)
        qb, acc, part, pb = q[b], context64[b], context[b], p_rows[b]
        zero = as_type_of(0.0, scale)
        for h in range(Hv):
            acc[h] = 0.0
        m = -np.inf  # running max of the scores (float64)
        l = 0.0  # sum_j exp(s_j - m)
        bad = False  # a NaN score: the row is NaN
        for j0 in range(0, n, _BLOCK):
            nb = min(_BLOCK, n - j0)
            sb = weights[b, j0:j0 + nb] if with_weights else s_rows[b, :nb]
            kb, vb = k[b, j0:j0 + nb], v[b, j0:j0 + nb]
            block_max = m
            for u in range(nb):
                s = -np.inf
                if not masked or visible[b, j0 + u]:
                    if softcap > 0:  # s = c tanh(x / c) + bias
                        x = dot(qb, kb[u], zero) * scale
                        s = np.float64(softcap * tanh(x / softcap) + bias[b, j0 + u])
                    else:  # no cap: one expression, as before the cap existed (same bits)
                        s = np.float64(dot(qb, kb[u], zero) * scale + bias[b, j0 + u])
                    if s > block_max:
                        block_max = s
                    elif s != s:
                        bad = True
                sb[u] = s  # the raw score for now; with weights, normalised in _single_finish
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
        _single_finish(acc, context[b], weights[b], stats[b], n, m, l, zero, with_weights)


@njit(**JIT)
def _single_finish(acc, cb, wb, stats_b, n, m, l, zero, with_weights):
    """Normalise one row: context = acc / l, stats_b = (m, l) and, with weights,
    w_j = exp(s_j - m) / l, 0 beyond n and at hidden keys (s_j = -inf); a row that sees no key
    (l = 0) is all zeros."""
    stats_b[0], stats_b[1] = m, l
    if l == 0.0:
        acc[:] = 0.0
        cb[:] = zero
        if with_weights:
            wb[:] = zero
        return
    inv_l = 1.0 / l
    for h in range(acc.shape[0]):
        acc[h] *= inv_l
        cb[h] = as_type_of(acc[h], zero)
    if not with_weights:
        return
    for j in range(n):
        s = np.float64(wb[j])
        w = exp_nonpositive(s - m) * inv_l
        wb[j] = zero if s == -np.inf else as_type_of(w, zero)
    wb[n:] = zero  # a slice, not range(n, T): a loop from a runtime start compiled to scatters


@njit(**PARALLEL_JIT)
def _single_backward(q, k, v, lengths, masked, visible, bias, scale, softcap, stats, context64,
                     d_context64, d_weights, weights, with_weights, sum_kv, d_q, d_k, d_v,
                     d_bias):
    """One pass per row, writing d_q [B, H], d_k [B, T, H] (d_k + d_v when sum_kv, then d_v is
    not written), d_v [B, T, Hv] and, when d_bias is [B, T], the unscaled ds (every entry: the
    hidden keys get exact zeros, so the outputs may come from np.empty).

    stats [B, 2], context64 and d_context64 [B, Hv] are float64, as the forward wrote them
    (d_context64: dc upcast); d_weights is [B, T], or empty when absent; `weights` [B, T] is
    read only with_weights, for d_weights and (the forward's own weight) a bias. One key at a
    time (blocks of keys, as in the forward, were 10% slower here: the pass is bound by its
    writes, not by the scalar exp). With softcap > 0, ds on the capped score goes to d_bias
    and ds (1 - tanh(x / softcap)^2), x = scale q . k_j, to the products.
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
            slope, t = 1.0, zero  # d cap(x) / dx = 1 - tanh(x / c)^2 (with a softcap)
            if softcap > 0:
                t = tanh(dot(qb, kj, zero) * scale / softcap)
                slope = 1.0 - np.float64(t) * t
            if has_db and with_weights:  # the forward's own weight: with fast-math,
                w = np.float64(weights[b, j])  # (q.k s + bias) - m could be reassociated and
            elif softcap > 0:  # drift from it for a large bias
                s = softcap * as_type_of(t, zero)
                if has_db:
                    s += bias[b, j]
                w = np.exp(np.float64(s) - m) * inv_l  # recomputed
            else:
                s = dot(qb, kj, zero) * scale
                if has_db:
                    s += bias[b, j]
                w = np.exp(np.float64(s) - m) * inv_l
            dw = dot(dcb, vj, 0.0)
            if has_dw:
                dw += d_weights[b, j]
            ds = w * (dw - delta)
            if has_db:
                d_bias[b, j] = as_type_of(ds, zero)
            if softcap > 0:  # ds_j times the cap's derivative and the score's scale
                g = as_type_of(ds * slope * scale, zero)
            else:
                g = as_type_of(ds * scale, zero)
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
