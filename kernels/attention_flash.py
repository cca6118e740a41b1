r"""Numba attention for many queries and heads: a flash kernel that forms no [Tq, Tk] weights
unless they are asked for.

The products are GEMM-bound. What lies between them (scale, bias, mask, max, exp, sum) is cheap
per element but touches Tq x Tk elements: a path that forms the whole [B, h, Tq, Tk] weights
writes and reads them through memory several times, and batched GEMMs over 64 heads of
[512, 64] @ [64, 512] run at a fraction of the BLAS rate one such product reaches alone. So
the kernels here work as torch's CPU flash kernel (``FlashAttentionKernel.cpp``) and
FlashAttention do: each thread takes a block of query rows, walks blocks of keys with BLAS
products on blocks that stay in cache, and does the softmax between them while the block is
in L1/L2.

Layout and work items
---------------------
The caller brings every layout to [B, h_kv, M, D] with M = G * Tq: the query rows of the G
query heads that read kv head g are stacked (a reshape of the C-contiguous [B, h, Tq, D] query,
no copy), so each key block is read once per group (grouped-query attention) and d_keys,
d_values sum the group inside the products. Row r of the stack is query head g * G + r // Tq at
step r % Tq.

- forward: one item per (b, g, block of R stacked rows); with ``causal`` a block stays inside
  one head's Tq rows, so that its keys end at the block's last step + 1 and the blocks above
  the diagonal are never computed.
- backward: one item per (b, g, key split): the item walks every block of rows against the
  keys of its split and owns d_keys and d_values of those keys. With fewer than `_MIN_ITEMS`
  (b, g) pairs the keys are split so that both cores have work; each split then writes its
  own partial d_query, summed afterwards in split order (so the result does not depend on the
  thread count or the schedule).

Every product is ``np.dot`` on contiguous blocks (Numba calls SciPy's BLAS), inside a
``prange``: each call runs on its thread alone, so the public wrapper holds
`kernels._blas.single_threaded_blas` around the kernel call.

Forward, for one item (FlashAttention's online softmax, per row)::

    S    = Q_blk K_j^T                      [R, C]   np.dot; q arrives scaled
    s    = S + bias, -inf at hidden keys    (lengths, causal, mask, bias -inf)
    m'   = max(m, max_j s_j),  alpha = exp(m - m'),  p_j = exp(s_j - m')   in place over S
    l    = alpha l + sum_j p_j
    acc  = alpha acc + P V_j                [R, Dv]  np.dot, then the rescaled sum (float64)

    context = acc / l; stats = (m, l) per row (lse = m + log l)

When a block of rows sees all its keys in one block (Tk <= C, or the weights asked for: then
the block is the whole row), the product with V writes the context directly, divided by l
after (or p is normalised first when it is written to the weights): no rescale, no float64
sum, no context64 (the backward takes delta from that block then).

Backward, for one (row block, key block)::

    P    = exp(S - m) / l  (recomputed from S = Q K^T)   or the weights rows (with weights)
    dV  += P^T dO_blk                      np.dot
    dP   = dO_blk V_j^T (+ d_weights)             np.dot
    dS   = P (dP - delta), 0 where P = 0   delta = sum_j P dP over the row when its keys are
                                           one block (always with weights), else <c, dc>
                                           (float64, from the forward's float64 context)
    dQ  += dS K_j,   dK += dS^T Q_blk       np.dot (Q scaled: dK is scale dS^T q)

Precision: the products and the vector loops run in the data's dtype (float32 on float32
SIMD lanes, as torch's flash kernel); the statistics m and l, the across-block sum of the
context and delta are float64 (as the single-query kernel; see its docstring for why delta
needs it).

Padding is not data: keys past lengths[b] are never read; key rows no query sees and query
rows that see no key arrive zeroed (the wrapper copies only when there are some) and their
gradient rows are zeroed after. A NaN score makes its row NaN (the max is NaN); hidden keys
keep an exact zero weight.

Kernel versions (float32, 2 threads, heads B8,h8,T512,D64 against torch's SDPA, alternating
calls in one process on an AMD EPYC, AVX-512)
- v1: the design above, the context always summed in float64 and divided at the end.
- v2, kept: a block of rows whose keys fit one block (here every row: T <= 512) writes P V
  straight into the context and divides by l after. Its forward, 28.1 ms, is 24.1 ms of
  products (the softmax loop removed, same run) and 4 ms of softmax: the BLAS rate at these
  block shapes (90-96 GFLOP/s per core for [R, 64] @ [64, 512] and [R, 512] @ [512, 64]) is
  the limit; SDPA took 29.5 ms in the benchmark's run.
- block sizes: R = 32, 64, 128, 256 with C = 512 gave 37.3, 31.7, 29.0, 27.7 ms (plain) and
  17.6, 18.5, 19.3, 22.3 ms (causal: a tall block computes more of the diagonal blocks'
  hidden half); C = 128 and 256 were slower at every R. Kept: R = 256 (plain), 64 (causal),
  C = 512, smaller R when there are too few items for the threads.
- products in Numba loops instead of BLAS (four rows at a time, broadcast FMAs over the keys):
  44 GFLOP/s per core against BLAS's 87-96 at [64, 64] @ [64, 512]. Not kept.
- the items on Python threads (the GIL released, as the LSTM's directions) instead of a
  prange: no better right after a multi-threaded NumPy product (58 against 57 ms), 14% slower
  otherwise. Not kept. What costs there is OpenBLAS's: its idle workers spin for up to 0.1 s
  after a product (OPENBLAS_THREAD_TIMEOUT), on the core this kernel needs: 57 ms right after
  a [1024, 512] @ [512, 4000] matmul, 30.6 ms after 0.2 s of sleep, 28.9 ms with
  OPENBLAS_THREAD_TIMEOUT=4 in the environment (a process-wide setting, the caller's to make).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels._config import JIT, PARALLEL_JIT
from kernels._util import as_type_of, exp_nonpositive, max_prefix, tanh
from kernels.attention_additive import additive_block, additive_block_backward

_C = 512  # keys per block (torch's kvSplitSize): S [R, C] float32 is 512 KiB at R = 256
_R_PLAIN = 256  # query rows per block without causal
_R_CAUSAL = 64  # with causal: the diagonal block's hidden half is computed and discarded
_MIN_ITEMS = 8  # the backward splits the keys when there are fewer (b, kv head) pairs


def block_rows(rows: int, causal: bool, pairs: int, threads: int) -> int:
    """R, the query rows per forward block: `_R_CAUSAL` or `_R_PLAIN`, halved (down to 16)
    while the items (pairs x blocks) would leave a thread idle for long."""
    R = _R_CAUSAL if causal else _R_PLAIN
    while R > 16 and pairs * -(-rows // R) < 4 * threads:
        R //= 2
    return R


def key_splits(pairs: int, Tk: int, with_weights: bool) -> int:
    """How many key ranges the backward splits each (b, kv head) pair into: enough for
    `_MIN_ITEMS` items, at most one per block of `_C` keys; 1 with weights (delta is a sum over
    the whole row). Independent of the thread count, so the result is too."""
    if with_weights or pairs >= _MIN_ITEMS:
        return 1
    return max(1, min(-(-_MIN_ITEMS // pairs), -(-Tk // _C)))


@njit(**JIT)
def _clamp(n, low, high):
    return min(max(n, low), high)


@njit(**JIT)
def _row_limit(length, causal, step):
    """How many keys (a prefix) query `step` may see: its length, and step + 1 when causal."""
    return min(length, step + 1) if causal else length


@njit(**JIT)
def _mask_row(row, j0, lim, masked, visible_row, has_bias, bias_row, softcap):
    """In place over a block's scores row [cc] (keys j0 ..): the softcap x -> c tanh(x / c)
    when softcap = c > 0 (0: none), + bias, -inf at the keys the query does not see
    (j0 + j >= lim, or hidden by the mask or a -inf bias)."""
    cc = row.shape[0]
    n = _clamp(lim - j0, 0, cc)
    if softcap > 0:
        for j in range(n):
            row[j] = softcap * tanh(row[j] / softcap)
    if has_bias:
        for j in range(n):
            row[j] += bias_row[j0 + j]
    if masked:
        for j in range(n):
            if not visible_row[j0 + j]:
                row[j] = -np.inf
    for j in range(n, cc):
        row[j] = -np.inf


@njit(**PARALLEL_JIT)
def _flash_forward(q, k, v, Tq, lengths, causal, masked, visible, has_bias, bias, softcap,
                   additive, u, R, C, with_weights, context, context64, weights, stats):
    """q [B, h_kv, M, D] (scaled, stacked rows: M = G Tq), k [B, h_kv, Tk, D],
    v [B, h_kv, Tk, Dv] -> context [B, h_kv, M, Dv] (data dtype), stats [B, h_kv, M, 2]
    (float64 m and l; (-inf, 0) for a row that sees no key), context64 (float64, when Tk > C:
    the backward reads it for delta; with Tk <= C an empty array, not written) and, when
    with_weights, weights [B, h_kv, M, Tk] (C is then ignored: one
    block per row).

    lengths [B]; visible (bool) and bias: [B, h, Tq, Tk] views, read when masked / has_bias.
    softcap (the data's dtype): c > 0 caps each score to c tanh(s / c) before the bias; 0: none.
    With `additive`, q and k are the projections qa [.., M, A] and ka [.., Tk, A] and the
    scores are u . tanh(qa_i + ka_j) (u [A]; `kernels.attention_additive`) instead of q . k.
    """
    B, h_kv, M, _ = q.shape
    seg = Tq if causal else M
    for item in prange(B * h_kv * (M // seg) * ((seg + R - 1) // R)):
        _forward_item(item, q, k, v, Tq, lengths, causal, masked, visible, has_bias, bias,
                      softcap, additive, u, R, C, with_weights, context, context64, weights,
                      stats)


@njit(**JIT)
def _forward_item(item, q, k, v, Tq, lengths, causal, masked, visible, has_bias, bias, softcap,
                  additive, u, R, C, with_weights, context, context64, weights, stats):
    """One item of the forward: the block of stacked rows `item` numbers (b, kv head g, the
    block), over all its keys; the arguments are `_flash_forward`'s."""
    _, h_kv, M, _ = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    G = M // Tq
    seg = Tq if causal else M  # a block stays inside one segment of rows
    n_seg = M // seg
    per_seg = (seg + R - 1) // R
    zero = as_type_of(0.0, q[0, 0, 0, 0])
    b = item // (h_kv * n_seg * per_seg)
    g = (item // (n_seg * per_seg)) % h_kv
    i0 = ((item // per_seg) % n_seg) * seg + (item % per_seg) * R
    rr = min(R, (i0 // seg + 1) * seg - i0)
    length = _clamp(lengths[b], 1, Tk)
    kend = _row_limit(length, causal, (i0 + rr - 1) % Tq)
    # one block of keys (all of them with weights): p is normalised before the product,
    # which then writes the context itself; else the rescaled float64 sum acc
    one_block = with_weights or kend <= C
    width = kend if one_block else C
    s_buf = np.empty(rr * width, q.dtype)
    acc = np.zeros((0 if one_block else rr, Dv))
    part = np.empty((0 if one_block else rr, Dv), q.dtype)
    m = np.full(rr, -np.inf)
    l = np.zeros(rr)
    alpha = np.empty(rr)
    qb = q[b, g, i0:i0 + rr]
    for j0 in range(0, kend, width):
        cc = min(width, kend - j0)
        s = s_buf[:rr * cc].reshape((rr, cc))
        if additive:
            additive_block(qb, k[b, g, j0:j0 + cc], u, s)
        else:
            np.dot(qb, k[b, g, j0:j0 + cc].T, s)
        for r in range(rr):
            hh, i = g * G + (i0 + r) // Tq, (i0 + r) % Tq
            row = s[r]
            _mask_row(row, j0, _row_limit(length, causal, i), masked, visible[b, hh, i],
                      has_bias, bias[b, hh, i], softcap)
            m_block = np.float64(max_prefix(row, cc))  # NaN if the row holds one
            m_new = np.nan if m_block != m_block or m[r] != m[r] else max(m[r], m_block)
            if m_new == -np.inf:  # every key so far hidden: p = 0
                row[:] = zero
                alpha[r] = 1.0
                continue
            mn = as_type_of(m_new, zero)
            total = 0.0
            for j in range(cc):
                e = exp_nonpositive(row[j] - mn)  # 0 at -inf; vectorizes
                row[j] = e
                total += e
            alpha[r] = np.exp(m[r] - m_new)  # 0 on the first block that sees a key
            l[r] = l[r] * alpha[r] + total
            m[r] = m_new
            if with_weights:  # normalise now: these are the weights, and context = w v
                inv = as_type_of(1.0 / l[r], zero)
                for j in range(cc):
                    row[j] *= inv
        if one_block:
            np.dot(s, v[b, g, j0:j0 + cc], context[b, g, i0:i0 + rr])
            if with_weights:
                _write_weights(s, weights[b, g, i0:i0 + rr], i0, Tq, G, g, b, length,
                               causal, masked, visible, l)
            continue
        np.dot(s, v[b, g, j0:j0 + cc], part)
        for r in range(rr):
            ar = alpha[r]
            for x in range(Dv):
                acc[r, x] = acc[r, x] * ar + part[r, x]
    keep64 = context64.shape[0] > 0  # Tk > C: the backward may read any row of it
    for r in range(rr):
        c = context[b, g, i0 + r]
        if l[r] == 0.0:  # sees no key: 0, also where 0 * a NaN value reached the sum
            c[:] = zero
        elif not one_block:
            inv = 1.0 / l[r]
            for x in range(Dv):
                c[x] = as_type_of(acc[r, x] * inv, zero)
        elif not with_weights:  # (p v) / l: Dv divisions instead of a pass over p
            inv_low = as_type_of(1.0 / l[r], zero)
            for x in range(Dv):
                c[x] *= inv_low
        if keep64:
            c64 = context64[b, g, i0 + r]
            for x in range(Dv):
                c64[x] = acc[r, x] / l[r] if not one_block and l[r] != 0.0 else c[x]
        stats[b, g, i0 + r, 0] = m[r]
        stats[b, g, i0 + r, 1] = l[r]


@njit(**JIT)
def _write_weights(p, w, i0, Tq, G, g, b, length, causal, masked, visible, l):
    """Copy the normalised block p [rr, cc] into the weights rows w [rr, Tk], zeros beyond cc;
    in a NaN row (l NaN) the hidden keys get exact zeros, the others NaN."""
    rr, cc = p.shape
    zero = as_type_of(0.0, p[0, 0])
    for r in range(rr):
        wr = w[r]
        wr[:cc] = p[r]
        wr[cc:] = zero
        if l[r] != l[r]:
            hh, i = g * G + (i0 + r) // Tq, (i0 + r) % Tq
            lim = _row_limit(length, causal, i)
            for j in range(wr.shape[0]):
                if j >= lim or (masked and not visible[b, hh, i, j]):
                    wr[j] = zero


@njit(**PARALLEL_JIT)
def _flash_backward(q, k, v, Tq, lengths, causal, masked, visible, has_bias, bias, softcap,
                    additive, u, R, C, splits, with_weights, weights, d_weights, stats, delta,
                    dc, d_q, d_q_parts, d_k, d_v, d_u_parts, d_bias):
    """From dc [B, h_kv, M, Dv] (stacked rows, as q): d_q [B, h_kv, M, D] (the gradient of the
    scaled query: the caller multiplies by the scale), d_k [B, h_kv, Tk, D], d_v [B, h_kv, Tk,
    Dv] and, when has_bias, d_bias [B, h, Tq, Tk] (ds; the caller zeroes it first).

    stats [B, h_kv, M, 2] float64 (m, l) and delta [B, h_kv, M] float64 (<c, dc>) come from
    the forward; with weights, the weights [B, h_kv, M, Tk] replace the recomputation and
    d_weights [B, h_kv, M, Tk] (or an empty array) adds to dP. When a block of rows sees its
    keys in one block (always with weights), delta is sum_j P_j dP_j over it instead, so that
    it cancels the rounding of the dP it is subtracted from (one dominant key: ds ~ 0). With
    splits > 1 each split writes d_q_parts[split] [.., M, D] instead of d_q. With `additive`
    (q, k the projections, as in the forward) d_q and d_k are d_qa and d_ka, and each item
    adds its d_u into d_u_parts[item] [A] (float64; the caller sums them). With a softcap
    c > 0, d_bias is dS on the capped scores and the products take dS (1 - tanh(x / c)^2), x
    the block's raw (scaled) scores, recomputed (with weights: one more product per block).
    """
    for item in prange(q.shape[0] * q.shape[1] * splits):
        _backward_item(item, q, k, v, Tq, lengths, causal, masked, visible, has_bias, bias,
                       softcap, additive, u, R, C, splits, with_weights, weights, d_weights,
                       stats, delta, dc, d_q, d_q_parts, d_k, d_v, d_u_parts, d_bias)


@njit(**JIT)
def _backward_item(item, q, k, v, Tq, lengths, causal, masked, visible, has_bias, bias, softcap,
                   additive, u, R, C, splits, with_weights, weights, d_weights, stats, delta, dc,
                   d_q, d_q_parts, d_k, d_v, d_u_parts, d_bias):
    """One item of the backward: (b, kv head g, key split) that `item` numbers, every block
    of rows against the split's keys; the arguments are `_flash_backward`'s."""
    B, h_kv, M, D = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    G = M // Tq
    has_dw = d_weights.shape == weights.shape and weights.shape[0] == B
    zero = as_type_of(0.0, q[0, 0, 0, 0])
    keys_per_split = ((Tk + splits - 1) // splits + C - 1) // C * C
    b, g, split = item // (h_kv * splits), (item // splits) % h_kv, item % splits
    k_lo, k_hi = split * keys_per_split, min(Tk, (split + 1) * keys_per_split)
    dkb, dvb = d_k[b, g], d_v[b, g]
    for j in range(k_lo, k_hi):
        dkb[j, :] = zero
        dvb[j, :] = zero
    dqb = d_q[b, g] if splits == 1 else d_q_parts[split, b, g]
    dqb[:, :] = zero
    if additive:
        d_u_parts[item, :] = 0.0
    if k_lo >= k_hi:
        return
    length = _clamp(lengths[b], 1, Tk)
    width = Tk if with_weights else C
    p_buf = np.empty(R * width, q.dtype)
    dp_buf = np.empty(R * width, q.dtype)
    part_v = np.empty((width, Dv), q.dtype)
    part_k = np.empty((width, D), q.dtype)
    part_q = np.empty((R, D), q.dtype)
    capped = softcap > 0
    slope_buf = np.empty(R * width if capped else 0, q.dtype)  # 1 - tanh^2 per block entry
    i0 = 0
    while i0 < M:
        rr = min(R, M - i0)
        if causal:  # rows of one head at a time: a block ends at its head's last row
            rr = min(rr, (i0 // Tq + 1) * Tq - i0)
        kend = min(k_hi, _row_limit(length, causal, (i0 + rr - 1) % Tq))
        # the rows' keys in one block: delta is summed from the rounded dP it is taken from
        one_block = splits == 1 and kend <= width
        qb, dob = q[b, g, i0:i0 + rr], dc[b, g, i0:i0 + rr]
        for j0 in range(k_lo, kend, width):
            cc = min(width, kend - j0)
            p = p_buf[:rr * cc].reshape((rr, cc))
            dp = dp_buf[:rr * cc].reshape((rr, cc))
            slope = slope_buf[:rr * cc].reshape((rr, cc)) if capped else slope_buf.reshape((0, 0))
            if with_weights:
                for r in range(rr):
                    p[r] = weights[b, g, i0 + r, j0:j0 + cc]
                if capped:  # the raw scores, for the softcap's derivative
                    if additive:
                        additive_block(qb, k[b, g, j0:j0 + cc], u, slope)
                    else:
                        np.dot(qb, k[b, g, j0:j0 + cc].T, slope)
                    _softcap_slope(slope, softcap)
            else:
                if additive:
                    additive_block(qb, k[b, g, j0:j0 + cc], u, p)
                else:
                    np.dot(qb, k[b, g, j0:j0 + cc].T, p)
                if capped:  # from the raw scores, before they become the weights
                    slope[:, :] = p
                    _softcap_slope(slope, softcap)
                for r in range(rr):
                    hh, i = g * G + (i0 + r) // Tq, (i0 + r) % Tq
                    _recompute_weights(p[r], j0, _row_limit(length, causal, i), masked,
                                       visible[b, hh, i], has_bias, bias[b, hh, i], softcap,
                                       stats[b, g, i0 + r, 0], stats[b, g, i0 + r, 1])
            pv = part_v[:cc]
            np.dot(p.T, dob, pv)  # dV += P^T dO
            for j in range(cc):
                dvj, pj = dvb[j0 + j], pv[j]
                for x in range(Dv):
                    dvj[x] += pj[x]
            np.dot(dob, v[b, g, j0:j0 + cc].T, dp)  # dP = dO V^T
            for r in range(rr):
                pr, dpr = p[r], dp[r]
                if has_dw:
                    dwr = d_weights[b, g, i0 + r, j0:j0 + cc]
                    for j in range(cc):
                        dpr[j] += dwr[j]
                if one_block:  # delta from the row at hand (torch's explicit path)
                    d = 0.0
                    for j in range(cc):
                        d += 0.0 if pr[j] == zero else np.float64(pr[j]) * dpr[j]
                else:
                    d = delta[b, g, i0 + r]
                dl = as_type_of(d, zero)
                for j in range(cc):  # dS = P (dP - delta), exactly 0 where P is
                    x = pr[j] * (dpr[j] - dl)
                    dpr[j] = zero if pr[j] == zero else x
                if has_bias:
                    hh, i = g * G + (i0 + r) // Tq, (i0 + r) % Tq
                    d_bias[b, hh, i, j0:j0 + cc] = dpr
                if capped:  # dS on the raw scores: times 1 - tanh^2, still 0 where P is
                    sr = slope[r]
                    for j in range(cc):
                        dpr[j] = zero if pr[j] == zero else dpr[j] * sr[j]
            if additive:  # the score's own backward, e recomputed
                additive_block_backward(qb, k[b, g, j0:j0 + cc], u, dp, dqb[i0:i0 + rr],
                                        dkb[j0:j0 + cc], d_u_parts[item])
                continue
            pq = part_q[:rr]
            np.dot(dp, k[b, g, j0:j0 + cc], pq)  # dQ += dS K
            for r in range(rr):
                dqr, pr = dqb[i0 + r], pq[r]
                for x in range(D):
                    dqr[x] += pr[x]
            pk = part_k[:cc]
            np.dot(dp.T, qb, pk)  # dK += dS^T Q
            for j in range(cc):
                dkj, pj = dkb[j0 + j], pk[j]
                for x in range(D):
                    dkj[x] += pj[x]
        i0 += rr


@njit(**JIT)
def _softcap_slope(x, softcap):
    """In place over a block of raw scores x [rr, cc]: 1 - tanh(x / c)^2 with c = softcap, the
    derivative of x -> c tanh(x / c)."""
    one = as_type_of(1.0, softcap)
    for r in range(x.shape[0]):
        xr = x[r]
        for j in range(x.shape[1]):
            t = tanh(xr[j] / softcap)
            xr[j] = one - t * t


@njit(**JIT)
def _recompute_weights(row, j0, lim, masked, visible_row, has_bias, bias_row, softcap, m, l):
    """In place over a block row of scores [cc]: the forward's weights p_j = exp(s_j - m) / l,
    exactly 0 at hidden keys and in a row that sees no key (l = 0). A NaN row (l NaN: a NaN
    score, or +inf next to another visible score) is NaN at every key it sees, a score of
    -inf from the data included, as the weights are."""
    zero = as_type_of(0.0, row[0])
    if l == 0.0:
        row[:] = zero
        return
    if l != l:
        cc = row.shape[0]
        n = _clamp(lim - j0, 0, cc)
        for j in range(cc):
            seen = j < n and (not masked or visible_row[j0 + j])
            row[j] = np.nan if seen else zero
        return
    _mask_row(row, j0, lim, masked, visible_row, has_bias, bias_row, softcap)
    mn = as_type_of(m, zero)
    inv = as_type_of(1.0 / l, zero)
    for j in range(row.shape[0]):  # exp, then / l in a second pass: the forward's roundings
        x = row[j]
        row[j] = zero if x == -np.inf else exp_nonpositive(x - mn)  # (finite l: exp(-inf) = 0)
    for j in range(row.shape[0]):
        row[j] *= inv
