r"""CUDA kernels of the single-query attention core: forward, backward and the summed kv
gradient, the GPU twin of `kernels.attention`'s fused path (same math, same statistics).

Math, per batch row b (query q [H], keys k_j [H] and values v_j [Hv] for j < n = lengths[b])
---------------------------------------------------------------------------------------------
    s_j = scale * q . k_j                       (dot: scale 1; scaled_dot: 1/sqrt(H))
    m   = max_j s_j,    l = sum_j exp(s_j - m)  (float64, saved: m + log l is the log-sum-exp)
    w_j = exp(s_j - m) / l,    c = sum_j w_j v_j

    backward, from dc = dL/dc and the saved m, l and c (FlashAttention-2's identity
    delta = sum_j w_j (dc . v_j) = <c, dc>, so the weights are recomputed, not stored):
    delta = <c, dc>,   ds_j = w_j (dc . v_j - delta)
    d_v_j = w_j dc,    d_k_j = scale ds_j q,    d_q = scale sum_j ds_j k_j
    sum_kv: d_kv_j = d_k_j + d_v_j (one array written; keys and values of one shape)

Keys j >= lengths[b] are padding: never read, so NaN or inf there changes nothing, bit for bit;
their weights and d_keys/d_values rows are written as exact zeros. A NaN score makes its row
NaN (context, weights at the keys it sees, gradients), as in `kernels` and numpy_ref.

Precision. Every product and sum runs in float64 (the dot products, the softmax statistics m
and l, the unnormalised context, delta, d_q), and each result is rounded once to the data's
dtype when stored. The score s_j itself is rounded to the data's dtype first (as the CPU kernel
computes it), so the raw score kept in the weights buffer between the forward's two phases is
exact, and the backward recomputes the very same bits.

Layout (written for memory bandwidth: (B, T, H) = (256, 512, 256) float32 reads 128 MiB of V)
-------------------------------------------------------------------------------------------
One block of `32 W` threads per (row, split); a row's real keys are cut into S contiguous
splits (Flash-Decoding, when B alone gives too few blocks for the device's SMs). A block walks
its keys in tiles of ``TK = R W`` keys:

1. scores, warp layout: warp w takes R keys of the tile, its 32 lanes stride across H
   (coalesced rows of K) with the R keys innermost, so that each lane has R independent loads
   in flight per h and reads q[h] once (a key past the tile re-reads the split's last real
   key instead of branching, and its sum is dropped); each lane's partial dot goes to shared
   memory; thread u < TK sums key u's 32 partials in a fixed order. Warp shuffles are not
   used: the simulator (where the tests run) has none, and a fixed-order shared-memory sum is
   deterministic anyway.
2. online softmax, per tile (Milakov & Gimelshein): the tile max raises the running max m, the
   running sum l and the per-thread accumulators are rescaled by exp(m_old - m_new), thread u
   writes p_u = exp(s_u - m_new).
3. context, block layout: thread t owns the columns h = t + 32 W i (a register array of
   `CT` floats) and adds sum_u p_u v_u[h] over the tile, coalesced across threads. When keys
   is values, step 1 has just read the same rows: they come from L1/L2, V leaves DRAM once.

With S = 1 the block then finishes its row (context = acc / l, the weights normalised from
the raw scores it left in the weights buffer, the stats); with S > 1 it writes its split's
(m, l, acc) and `merge` combines the splits of a row by the log-sum-exp rule
M = max_s m_s, l = sum_s l_s exp(m_s - M), acc = sum_s acc_s exp(m_s - M).

The backward has the same grid: per tile, step 1 takes both q . k_j and dc . v_j (V read
once), thread u forms w_u and g_u = scale ds_u, and the block layout writes d_k_j and d_v_j
(or d_kv_j) and accumulates d_q in float64 registers. Each split writes its d_q partial; with
S > 1 `reduce_dq` sums them in split order. Nothing uses float atomics: every sum has a fixed
order, so two runs give the same bits; splits change the order of the softmax sums, so a split
and an unsplit run agree to rounding, not bit for bit.

Registers (ptxas -v for sm_90, CUDA 13.0, at the (256, 512, 256) float32 layout W = 8,
CT = 1): forward 64 per thread (4 blocks of 256 threads per SM), backward 126 (2 blocks), no
spills. Step 1's loop order keeps them there: with the keys outside the lanes' h loop (the
same sums, the same bits) they were 70 and 162, 3 blocks and 1 block per SM.

Kernels are built once per (dtype, warps, columns per thread) and cached (`build`); numba's
dispatcher compiles each once per argument types. `plan` chooses the launch layout (splits,
warps, columns per thread) for a shape. The host side (checks, transfers, launches):
`kernels.cuda.attention`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numba
from numba import cuda, float64

R = 4  # keys per warp per tile
MAX_WARPS = 8  # threads per block: 32 * warps, at most 256
MIN_KEYS_PER_SPLIT = 64  # a split shorter than this costs more in partials than it gains
_INF = math.inf


# --------------------------------------------------------------------------------------------
# device helpers


@cuda.jit(device=True)
def _length(lengths, b, T):
    """Row b's number of real keys, clamped into 1..T (an empty `lengths` means T), so that
    even a bad length cannot index out of bounds."""
    n = T
    if lengths.shape[0] > 0:
        n = lengths[b]
    return min(max(n, 1), T)


@cuda.jit(device=True)
def _split_range(s, S, n):
    """[lo, hi): split s of S contiguous, near-equal chunks of range(n)."""
    chunk = (n + S - 1) // S
    lo = min(s * chunk, n)
    return lo, min(lo + chunk, n)


@cuda.jit(device=True)
def _normalize_weights(b, t, nt, n, m, l, weights, stats):
    """weights[b, j] holds the raw score s_j for j < n: make it w_j = exp(s_j - m) / l (0 for
    s_j = -inf), 0 for j >= n; all 0 when l = 0; stats[b] = (m, l). Threads t, t + nt, ..."""
    T = weights.shape[1]
    if t == 0:
        stats[b, 0] = m
        stats[b, 1] = l
    for j in range(t, T, nt):
        w = 0.0
        if j < n and l != 0.0:
            x = float64(weights[b, j])
            if x != -_INF:
                w = math.exp(x - m) / l
        weights[b, j] = w


# --------------------------------------------------------------------------------------------
# kernels, built per (dtype, warps W, columns per thread CT)


class Kernels(NamedTuple):
    """The four kernels of one (dtype, W, CT), as `build` returns them."""

    forward: Any  # grid (B, S): scores, online softmax, context (S = 1) or split partials
    merge: Any  # grid (B,): a row's S > 1 split partials -> context, stats, weights
    backward: Any  # grid (B, S): d_keys, d_values (or their sum), d_query or its partials
    reduce_dq: Any  # grid (B,): the sum of a row's S > 1 d_query partials, in split order


@functools.cache
def build(dtype_name: str, W: int, CT: int) -> Kernels:
    """The four kernels for blocks of 32 W threads, each owning CT columns of H / Hv."""
    DT = numba.float32 if dtype_name == "float32" else numba.float64  # the data's scalar type
    NT = 32 * W  # threads per block
    TK = R * W  # keys per tile

    @cuda.jit
    def forward(q, k, v, lengths, scale, weights, context, context64, stats, part_m, part_l,
                part_acc):
        """grid (B, S), block NT. q [B, H], k [B, T, H], v [B, T, Hv] -> S = 1: context
        [B, Hv], context64 [B, Hv] (float64), weights [B, T], stats [B, 2] (float64 m, l);
        S > 1: the split partials part_m, part_l [B, S], part_acc [B, S, Hv] (float64), and
        the raw scores in weights, both finished by `merge`."""
        b = cuda.blockIdx.x
        split = cuda.blockIdx.y
        S = cuda.gridDim.y
        t = cuda.threadIdx.x
        lane = t % 32
        warp = t // 32
        T = k.shape[1]
        H = k.shape[2]
        Hv = v.shape[2]
        n = _length(lengths, b, T)
        lo, hi = _split_range(split, S, n)
        red = cuda.shared.array((TK, 33), float64)  # per-lane partial dots (33: no conflicts)
        s_tile = cuda.shared.array(TK, float64)  # the tile's scores s_u
        p_tile = cuda.shared.array(TK, float64)  # exp(s_u - m)
        acc = cuda.local.array(CT, float64)  # sum_j exp(s_j - m) v_j[h], h = t + NT i
        part = cuda.local.array(R, float64)  # this lane's partial dots of its warp's R keys
        for i in range(CT):
            acc[i] = 0.0
        m = -_INF  # running max (every thread holds the same value)
        l = 0.0  # running sum_j exp(s_j - m)
        bad = False  # a NaN score: the row is NaN
        for t0 in range(lo, hi, TK):
            nk = min(TK, hi - t0)
            # 1. partial dots, warp layout: lane sums q[h] k_j[h] over h = lane + 32 i for the
            # warp's R keys together (R independent loads in flight per h, q[h] read once)
            u0 = warp * R
            if u0 < nk:
                for r in range(R):
                    part[r] = 0.0
                for h in range(lane, H, 32):
                    qh = float64(q[b, h])
                    for r in range(R):  # no branch: a key past the tile re-reads key hi - 1
                        part[r] += qh * float64(k[b, min(t0 + u0 + r, hi - 1), h])
                for r in range(R):
                    if u0 + r < nk:
                        red[u0 + r, lane] = part[r]
            cuda.syncthreads()
            # thread u: s_u = scale * q . k_u, rounded to the data's dtype and kept as the raw
            # weight (normalised once m and l are known)
            if t < nk:
                x = 0.0
                for i in range(32):
                    x += red[t, i]
                x = DT(x * scale)
                weights[b, t0 + t] = x
                s_tile[t] = x
            cuda.syncthreads()
            # 2. online softmax: every thread reads the tile's scores (a broadcast) and takes
            # the same decisions, so the block never diverges around a barrier
            tile_max = -_INF
            for u in range(nk):
                x = s_tile[u]
                if x > tile_max:
                    tile_max = x
                elif x != x:
                    bad = True
            skip = bad or tile_max == -_INF  # nothing to add (or a NaN row)
            m_new = m if m >= tile_max else tile_max
            if not skip and t < nk:
                p_tile[t] = math.exp(s_tile[t] - m_new)
            cuda.syncthreads()
            if not skip:
                alpha = math.exp(m - m_new)  # rescales what was summed under the old max
                total = 0.0
                for u in range(nk):
                    total += p_tile[u]
                l = l * alpha + total
                # 3. context, block layout: acc[h] = alpha acc[h] + sum_u p_u v_u[h]
                for i in range(CT):
                    h = t + NT * i
                    if h < Hv:
                        a = acc[i] * alpha
                        for u in range(nk):
                            a += p_tile[u] * float64(v[b, t0 + u, h])
                        acc[i] = a
                m = m_new
        if bad:
            m = math.nan
            l = math.nan
        if S == 1:  # finish the row here: the raw scores were written by this block
            cuda.syncthreads()
            for i in range(CT):
                h = t + NT * i
                if h < Hv:
                    c = 0.0 if l == 0.0 else acc[i] / l
                    context64[b, h] = c
                    context[b, h] = c
            _normalize_weights(b, t, NT, n, m, l, weights, stats)
        else:
            if t == 0:
                part_m[b, split] = m
                part_l[b, split] = l
            for i in range(CT):
                h = t + NT * i
                if h < Hv:
                    part_acc[b, split, h] = acc[i]

    @cuda.jit
    def merge(lengths, part_m, part_l, part_acc, weights, context, context64, stats):
        """grid (B,), block NT: combine row b's S split partials (log-sum-exp rule, splits in
        order) into context, context64, stats, and normalise the row's weights."""
        b = cuda.blockIdx.x
        t = cuda.threadIdx.x
        S = part_m.shape[1]
        Hv = part_acc.shape[2]
        n = _length(lengths, b, weights.shape[1])
        m = -_INF
        bad = False
        for s in range(S):
            x = part_m[b, s]
            if x > m:
                m = x
            elif x != x:
                bad = True
        l = 0.0
        if not bad:
            for s in range(S):
                if part_m[b, s] != -_INF:  # an empty split: l_s = 0, acc_s = 0
                    l += part_l[b, s] * math.exp(part_m[b, s] - m)
        else:
            m = math.nan
            l = math.nan
        for h in range(t, Hv, NT):
            a = 0.0
            for s in range(S):
                if part_m[b, s] != -_INF:
                    a += part_acc[b, s, h] * math.exp(part_m[b, s] - m)
            c = 0.0 if l == 0.0 else a / l
            context64[b, h] = c
            context[b, h] = c
        _normalize_weights(b, t, NT, n, m, l, weights, stats)

    @cuda.jit
    def backward(q, k, v, lengths, scale, stats, context64, dc, sum_kv, d_k, d_v, d_q,
                 part_dq):
        """grid (B, S), block NT. From stats [B, 2] and context64 [B, Hv] (float64, the
        forward's) and dc [B, Hv]: d_k [B, T, H] (d_k + d_v when sum_kv; then d_v is d_k and
        not written separately), d_v [B, T, Hv], and d_q [B, H] (S = 1) or its split
        partials part_dq [B, S, H] (float64, S > 1). Rows j >= lengths[b] get exact zeros."""
        b = cuda.blockIdx.x
        split = cuda.blockIdx.y
        S = cuda.gridDim.y
        t = cuda.threadIdx.x
        lane = t % 32
        warp = t // 32
        T = k.shape[1]
        H = k.shape[2]
        Hv = v.shape[2]
        n = _length(lengths, b, T)
        m = stats[b, 0]
        l = stats[b, 1]
        if l == 0.0:  # the row saw no key: every gradient is 0 (all its rows are padding)
            n = 0
        red_q = cuda.shared.array((TK, 33), float64)  # partials of q . k_u
        red_v = cuda.shared.array((TK, 33), float64)  # partials of dc . v_u
        g_tile = cuda.shared.array(TK, float64)  # scale * ds_u
        w_tile = cuda.shared.array(TK, float64)  # w_u
        d_sum = cuda.shared.array(NT, float64)  # delta's partials
        dq = cuda.local.array(CT, float64)  # d_q[h], h = t + NT i
        pq = cuda.local.array(R, float64)  # this lane's partials of q . k_u, its warp's R keys
        pv = cuda.local.array(R, float64)  # and of dc . v_u
        for i in range(CT):
            dq[i] = 0.0
        # delta = <c, dc>: per-thread partials, then every thread sums them in the same order
        # (every block of the row computes the same bits)
        x = 0.0
        for h in range(t, Hv, NT):
            x += context64[b, h] * float64(dc[b, h])
        d_sum[t] = x
        cuda.syncthreads()
        delta = 0.0
        for i in range(NT):
            delta += d_sum[i]
        lo, hi = _split_range(split, S, n)
        for t0 in range(lo, hi, TK):
            nk = min(TK, hi - t0)
            # 1. warp layout: both dot products of the warp's R keys (K and V read once, R
            # independent loads in flight per h; the forward's order of the q . k sums)
            u0 = warp * R
            if u0 < nk:
                for r in range(R):
                    pq[r] = 0.0
                    pv[r] = 0.0
                for h in range(lane, H, 32):
                    qh = float64(q[b, h])
                    for r in range(R):  # no branch: a key past the tile re-reads key hi - 1
                        pq[r] += qh * float64(k[b, min(t0 + u0 + r, hi - 1), h])
                for h in range(lane, Hv, 32):
                    dch = float64(dc[b, h])
                    for r in range(R):
                        pv[r] += dch * float64(v[b, min(t0 + u0 + r, hi - 1), h])
                for r in range(R):
                    if u0 + r < nk:
                        red_q[u0 + r, lane] = pq[r]
                        red_v[u0 + r, lane] = pv[r]
            cuda.syncthreads()
            # 2. thread u: the forward's score bit for bit, w_u, ds_u = w_u (dc . v_u - delta)
            if t < nk:
                x = 0.0
                y = 0.0
                for i in range(32):
                    x += red_q[t, i]
                    y += red_v[t, i]
                s = float64(DT(x * scale))
                w = math.exp(s - m) / l
                w_tile[t] = w
                g_tile[t] = scale * (w * (y - delta))
            cuda.syncthreads()
            # 3. block layout: write the tile's d_k / d_v rows, accumulate d_q
            for i in range(CT):
                h = t + NT * i
                if h < H:
                    qh = float64(q[b, h])
                    dch = float64(dc[b, h]) if sum_kv else 0.0
                    a = dq[i]
                    for u in range(nk):
                        j = t0 + u
                        g = g_tile[u]
                        a += g * float64(k[b, j, h])
                        d_k[b, j, h] = g * qh + w_tile[u] * dch
                    dq[i] = a
                if h < Hv and not sum_kv:
                    dch = float64(dc[b, h])
                    for u in range(nk):
                        d_v[b, t0 + u, h] = w_tile[u] * dch
            # the next tile's step 1 rewrites red_*; its barrier orders that after step 2's
            # reads, and step 2's barrier orders the next g/w writes after step 3's reads
        # padding rows n..T-1: exact zeros, shared out among the splits
        plo, phi = _split_range(split, S, T - n)
        for j in range(n + plo, n + phi):
            for h in range(t, H, NT):
                d_k[b, j, h] = 0.0
            if not sum_kv:
                for h in range(t, Hv, NT):
                    d_v[b, j, h] = 0.0
        for i in range(CT):
            h = t + NT * i
            if h < H:
                if S == 1:
                    d_q[b, h] = dq[i]
                else:
                    part_dq[b, split, h] = dq[i]

    @cuda.jit
    def reduce_dq(part_dq, d_q):
        """grid (B,), block NT: d_q[b, h] = sum_s part_dq[b, s, h], splits in order."""
        b = cuda.blockIdx.x
        for h in range(cuda.threadIdx.x, d_q.shape[1], NT):
            a = 0.0
            for s in range(part_dq.shape[1]):
                a += part_dq[b, s, h]
            d_q[b, h] = a

    return Kernels(forward, merge, backward, reduce_dq)


# --------------------------------------------------------------------------------------------
# launch configuration


@functools.cache
def _sm_count() -> int:
    """The device's multiprocessor count (the simulator has none: 4, a small GPU's share)."""
    return int(getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 4))


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def plan(B: int, T: int, width: int, splits: int | None,
         warps: int | None) -> tuple[int, int, int]:
    """(S, W, CT): splits per row, warps per block, columns per thread for width = max(H, Hv).

    S: 1 when B rows fill the device (B >= 4 blocks per SM), else enough splits for about 4
    blocks per SM, with at least MIN_KEYS_PER_SPLIT keys each. W: enough warps for R keys
    each per tile of a split's keys, at most MAX_WARPS.
    """
    if splits is None:
        target = 4 * _sm_count()
        splits = min(_ceil_div(target, B), max(1, T // MIN_KEYS_PER_SPLIT)) if B < target else 1
    S = max(1, min(int(splits), T))
    if warps is None:
        warps = min(MAX_WARPS, _next_pow2(_ceil_div(_ceil_div(T, S), R)))
    W = max(1, min(int(warps), MAX_WARPS))
    CT = _next_pow2(_ceil_div(width, 32 * W))
    return S, W, CT
