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

Host side: NumPy inputs are copied to the device and results copied back (NumPy in, NumPy
out); device inputs (numba device arrays or any `__cuda_array_interface__` object: torch,
CuPy) are used in place and the results are numba device arrays. Everything runs on numba's
default stream (the legacy stream, torch's default too), with no host synchronisation on the
device path except when `lengths` is a device array (its [B] values are copied to the host to
be checked); host lengths are uploaded with an asynchronous copy. Allocations go through
numba's memory manager (cudaMalloc, and a deferred cudaFree that synchronises when it runs):
a pooling EMM plugin (NUMBA_CUDA_MEMORY_MANAGER) avoids both in a training loop.
Kernels are built once per (dtype, warps, columns per thread) and cached; numba's dispatcher
compiles each once per argument types.

Supported: query [B, H] (rank 2), keys [B, Tk, H], values [B, Tk, Hv], float32 or float64 (one
dtype), score "dot" or "scaled_dot", `scale`, `lengths`, `sum_kv`, `out`, `need_weights`
(False returns None for the weights and copies none to the host, but the forward still keeps
each key's raw score in a [B, Tk] device buffer between its two phases: with one query per row
that buffer is the size of one key row per batch row, 1/H of the values). Not implemented
(a ValueError naming the option and pointing at `kernels` or torch): rank-3/4 queries, the
"general" and "additive" scores, `mask`, `bias`, ``causal=True``, `d_weights`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numba
import numpy as np
from numba import cuda, float64

from numpy_ref.contract import attention as contract
from numpy_ref.contract import checks
from numpy_ref.contract.fields import documented

R = 4  # keys per warp per tile
MAX_WARPS = 8  # threads per block: 32 * warps, at most 256
MIN_KEYS_PER_SPLIT = 64  # a split shorter than this costs more in partials than it gains
_INF = math.inf
_USE = "use kernels.attention_forward (CPU) or torch for it"


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


class _Kernels(NamedTuple):
    forward: Any
    merge: Any
    backward: Any
    reduce_dq: Any


@functools.cache
def _kernels(dtype_name: str, W: int, CT: int) -> _Kernels:
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

    return _Kernels(forward, merge, backward, reduce_dq)


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


def _plan(B: int, T: int, width: int, splits: int | None,
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


# --------------------------------------------------------------------------------------------
# host side: inputs, validation, dispatch


def _device_or_host(name: str, x: Any) -> tuple[Any, bool]:
    """(array, on_device): a NumPy array as it is, or a numba device array viewing `x` (numba's
    own, or any `__cuda_array_interface__` object, wrapped without a copy)."""
    if isinstance(x, np.ndarray):
        return x, False
    if cuda.devicearray.is_cuda_ndarray(x):  # numba's device arrays (the simulator's too)
        return x, True
    if getattr(x, "__cuda_array_interface__", None) is not None:
        # sync=False: no host wait on the producer's stream; we launch on the legacy default
        # stream, which is ordered after the work of every blocking stream (torch's default)
        return cuda.as_cuda_array(x, sync=False), True
    raise TypeError(f"{name}: expected a numpy.ndarray or a CUDA array (an object with "
                    f"__cuda_array_interface__), got {type(x).__name__}")


def _shape_of(x: Any) -> np.ndarray:
    """A zero-copy stand-in with x's shape and dtype, for the contract's checks (which read
    only shapes and dtypes)."""
    return np.broadcast_to(np.zeros((), np.dtype(x.dtype)), tuple(x.shape))


def _same_place(arrays: dict[str, tuple[Any, bool]]) -> bool:
    """Whether every array lives on the device (True) or every one on the host (False)."""
    places = {on for _, on in arrays.values()}
    if len(places) > 1:
        where = ", ".join(f"{k} on the {'device' if on else 'host'}"
                          for k, (_, on) in arrays.items())
        raise TypeError(f"mixed host and device inputs ({where}): pass NumPy arrays (copied "
                        "in and out) or device arrays (used in place), not both")
    return places.pop()


def _contiguous_device(name: str, x: Any) -> None:
    if not x.is_c_contiguous():
        raise ValueError(f"{name}: expected a C-contiguous device array, got strides "
                         f"{x.strides} for shape {x.shape} (torch: call .contiguous())")


def _to_device(x: np.ndarray) -> Any:
    return cuda.to_device(np.ascontiguousarray(x))


@functools.cache
def _empty_lengths() -> Any:
    """A [0] int64 device array: the kernels' "every key is real"."""
    return cuda.device_array(0, np.int64)


def _lengths(lengths: Any, B: int, T: int) -> Any:
    """`lengths` checked (each in 1..T) as a device int array [B] ([0] when None)."""
    if lengths is None:
        return _empty_lengths()
    if isinstance(lengths, np.ndarray) or not (
            cuda.devicearray.is_cuda_ndarray(lengths)
            or getattr(lengths, "__cuda_array_interface__", None) is not None):
        # an asynchronous upload: the host does not wait for the work queued before it
        return cuda.to_device(checks.lengths_array(lengths, B, T), stream=cuda.default_stream())
    dev, _ = _device_or_host("lengths", lengths)
    # The one host synchronisation: the [B] lengths are copied to the host to be checked
    # (a bad length would index out of bounds, and the kernels' clamp would hide it).
    host = checks.lengths_array(dev.copy_to_host(), B, T)
    if dev.dtype == np.int64 and dev.is_c_contiguous():
        return dev
    return cuda.to_device(host)


def _unsupported(option: str, why: str) -> ValueError:
    return ValueError(f"{option}: {why} is not implemented in kernels.cuda; {_USE}")


@documented
class CudaAttentionCache(NamedTuple):
    """What `kernels.cuda.attention_backward` needs: device arrays (the forward's inputs as
    used, the softmax statistics) and where the caller's arrays lived."""

    query: Any  # [B, H] device array (the caller's, or its upload); read
    keys: Any  # [B, Tk, H] device array; read
    values: Any  # [B, Tk, Hv] device array (the keys array itself when keys is values); read
    lengths: Any  # [B] device int array of real keys per row, or [0] when all Tk are real
    scale: float  # the score's multiplier (1 for dot, 1/sqrt(H) for scaled_dot by default)
    stats: Any  # [B, 2] float64 device array: each row's max score m and
    #             l = sum_j exp(s_j - m); read to recompute the weights
    context64: Any  # [B, Hv] float64 device array: the context, read for delta = <c, dc>
    host: bool  # whether the forward's inputs were NumPy arrays (then so are the gradients)

    @property
    def lse(self) -> np.ndarray:
        """[B] NumPy array in the query's dtype: each row's log-sum-exp m + log l (-inf for a
        row that sees no key), computed from the statistics copied to the host."""
        stats = self.stats.copy_to_host()
        return contract.log_sum_exp(stats[:, 0], stats[:, 1], np.dtype(self.query.dtype))


def attention_forward(
    query: Any,
    keys: Any,
    values: Any,
    *,
    score: str = "dot",
    params: Any = None,
    lengths: Any = None,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    bias: Any = None,
    need_weights: bool = True,
    _splits: int | None = None,
    _warps: int | None = None,
) -> tuple[Any, Any, CudaAttentionCache]:
    """CUDA `kernels.attention_forward` for one query per row.

    query [B, H], keys [B, Tk, H], values [B, Tk, Hv] (float32 or float64, one dtype; NumPy
    arrays, or device arrays used in place); score "dot" or "scaled_dot"; `scale`; lengths [B]
    (each in 1..Tk; host or device). Returns context [B, Hv], weights [B, Tk] (None with
    ``need_weights=False``; NumPy for NumPy inputs, numba device arrays for device inputs) and
    the cache (``cache.lse``: each row's log-sum-exp, on the host). `_splits` / `_warps` force
    the number of key splits per row and of warps per block (tests; None: chosen from the
    shape and the device).
    """
    same = values is keys
    arrays = {"query": _device_or_host("query", query), "keys": _device_or_host("keys", keys),
              "values": _device_or_host("values", values)}
    on_device = _same_place(arrays)
    (q, _), (k, _), (v, _) = arrays.values()
    if len(q.shape) in (3, 4):  # valid layouts of kernels.attention_forward, not of this one
        raise _unsupported("query", f"a rank-{len(q.shape)} query (many queries per row or "
                                    "heads)")
    if score in contract.SCORES and score not in ("dot", "scaled_dot"):
        raise _unsupported("score", f"the {score!r} score")
    # the contract's own checks, on zero-copy stand-ins (they read only shapes and dtypes)
    fq, fk, fv, _, _, scale = contract.check_arrays(_shape_of(q), _shape_of(k), _shape_of(v),
                                                    score, params, scale)
    dtype = fq.dtype
    if mask is not None:
        raise _unsupported("mask", "a boolean mask (use lengths for padding)")
    if bias is not None:
        raise _unsupported("bias", "an additive bias")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if causal:
        raise _unsupported("causal", "causal=True (one query sees only key 0)")
    if not isinstance(need_weights, (bool, np.bool_)):
        raise TypeError(f"need_weights: expected a bool, got {type(need_weights).__name__}")
    B, T, H = fk.shape
    Hv = fv.shape[2]
    lens = _lengths(lengths, B, T)
    if on_device:
        for name, x in (("query", q), ("keys", k), ("values", v)):
            _contiguous_device(name, x)
    else:
        q, k = _to_device(q), _to_device(k)
        v = k if same else _to_device(v)
    S, W, CT = _plan(B, T, max(H, Hv), _splits, _warps)
    kern = _kernels(dtype.name, W, CT)
    weights = cuda.device_array((B, T), dtype)
    context = cuda.device_array((B, Hv), dtype)
    context64 = cuda.device_array((B, Hv), np.float64)
    stats = cuda.device_array((B, 2), np.float64)
    if S > 1:
        part_m = cuda.device_array((B, S), np.float64)
        part_l = cuda.device_array((B, S), np.float64)
        part_acc = cuda.device_array((B, S, Hv), np.float64)
    else:  # unused by the kernel when S = 1
        part_m = part_l = stats
        part_acc = context64.reshape(B, 1, Hv)
    kern.forward[(B, S), 32 * W](q, k, v, lens, float(scale), weights, context, context64,
                                 stats, part_m, part_l, part_acc)
    if S > 1:
        kern.merge[B, 32 * W](lens, part_m, part_l, part_acc, weights, context, context64,
                              stats)
    cache = CudaAttentionCache(q, k, v, lens, float(scale), stats, context64, not on_device)
    if not need_weights:
        weights = None
    if on_device:
        return context, weights, cache
    return context.copy_to_host(), None if weights is None else weights.copy_to_host(), cache


def _out_buffers(out: Any, sum_kv: bool, shapes: tuple, dtype: np.dtype, on_device: bool,
                 reads: list[tuple[str, Any]]) -> list[Any]:
    """Check `out` (None or (d_query, d_keys, d_values), entries None or buffers shaped and
    typed like the gradients, C-contiguous, on the inputs' side, sharing no memory with each
    other or with what the kernels read); return the three entries as (array, caller's
    object) pairs, the array being a numba view on the device side, or None."""
    if out is None:
        return [None, None, None]
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError("out: expected a tuple (d_query, d_keys, d_values) of arrays or None")
    if sum_kv and out[2] is not None:
        raise ValueError("out[2]: with sum_kv=True the sum goes to out[1] and out[2] must be "
                         "None")
    names = ("out[0] (d_query)", "out[1] (d_keys + d_values)" if sum_kv else "out[1] (d_keys)",
             "out[2] (d_values)")
    bufs: list[Any] = []
    for name, buf, shape in zip(names, out, shapes, strict=True):
        if buf is None:
            bufs.append(None)
            continue
        arr, dev = _device_or_host(name, buf)
        if dev != on_device:
            side = "device" if on_device else "host"
            raise TypeError(f"{name}: the forward's inputs were on the {side}, so must the "
                            f"gradient buffers be (got a {'device' if dev else 'host'} array)")
        fake = _shape_of(arr)
        checks.same_dtype(name, fake, dtype, "query")
        checks.shape_is(name, fake, shape, "like the gradient")
        if dev:
            _contiguous_device(name, arr)
        elif not (arr.flags.c_contiguous and arr.flags.writeable):
            raise ValueError(f"{name}: expected a C-contiguous, writeable array")
        bufs.append((arr, buf))
    given = [(name, b[0]) for name, b in zip(names, bufs, strict=True) if b is not None]
    for i, (name, buf) in enumerate(given):
        for other, x in [*reads, *given[i + 1:]]:
            if x is not None and _overlap(buf, x):
                raise ValueError(f"{name}: overlaps the memory of {other}; gradient buffers "
                                 "must be separate arrays")
    return bufs


def _extent(x: Any) -> tuple[int, int] | None:
    """[start, end) byte addresses of a device array (None when not known: the simulator)."""
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is None:
        return None
    start = cai["data"][0]
    return start, start + x.nbytes


def _overlap(a: Any, b: Any) -> bool:
    """Whether two arrays (both host or both device) share memory."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.may_share_memory(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    if a is b:
        return True
    ea, eb = _extent(a), _extent(b)
    if ea is None or eb is None:  # the simulator's arrays: compare their host buffers
        ha, hb = getattr(a, "_ary", None), getattr(b, "_ary", None)
        return ha is not None and hb is not None and bool(np.may_share_memory(ha, hb))
    return ea[0] < eb[1] and eb[0] < ea[1] and a.nbytes > 0 and b.nbytes > 0


def attention_backward(
    d_context: Any,
    cache: CudaAttentionCache,
    *,
    d_weights: Any = None,
    sum_kv: bool = False,
    out: Any = None,
    _splits: int | None = None,
    _warps: int | None = None,
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """CUDA `kernels.attention_backward` for `kernels.cuda.attention_forward`'s cache.

    d_context [B, Hv] (on the forward inputs' side) -> d_query [B, H], d_keys [B, Tk, H]
    (d_keys + d_values when sum_kv), d_values [B, Tk, Hv] (None with sum_kv), d_params {}.
    `out` = (d_query, d_keys, d_values) buffers (each None or an array on the inputs' side;
    with sum_kv the sum goes to out[1] and out[2] must be None) are written and returned.
    NumPy in, NumPy out; device in, device arrays out.
    """
    q, k, v, lens, scale, stats, context64, host = checks.cache_of(
        cache, CudaAttentionCache, "kernels.cuda.attention_forward")
    if d_weights is not None:
        raise _unsupported("d_weights", "a cotangent on the weights")
    if not isinstance(sum_kv, (bool, np.bool_)):
        raise TypeError(f"sum_kv: expected a bool, got {type(sum_kv).__name__}")
    sum_kv = bool(sum_kv)
    B, T, H = k.shape
    Hv = v.shape[2]
    dtype = np.dtype(q.dtype)
    if sum_kv and H != Hv:
        raise ValueError(f"sum_kv: d_keys + d_values needs keys and values of one shape, got "
                         f"keys {tuple(k.shape)} and values {tuple(v.shape)}")
    dc, dc_dev = _device_or_host("d_context", d_context)
    if dc_dev == host:
        side = "host" if host else "device"
        raise TypeError(f"d_context: the forward's inputs were on the {side}, so must "
                        f"d_context be (got a {'device' if dc_dev else 'host'} array)")
    fdc = checks.float_array("d_context", _shape_of(dc), ("B", "Hv"))
    checks.same_dtype("d_context", fdc, dtype, "query")
    checks.shape_is("d_context", fdc, (B, Hv), "[B, Hv]")
    reads = [("d_context", dc)] if host else [("query", q), ("keys", k), ("values", v),
                                              ("d_context", dc)]
    bufs = _out_buffers(out, sum_kv, ((B, H), (B, T, H), (B, T, Hv)), dtype, not host, reads)
    if host:
        dc_d = _to_device(dc)
        d_q = cuda.device_array((B, H), dtype)
        d_k = cuda.device_array((B, T, H), dtype)
        d_v = d_k if sum_kv else cuda.device_array((B, T, Hv), dtype)
    else:
        _contiguous_device("d_context", dc)
        dc_d = dc
        d_q = bufs[0][0] if bufs[0] is not None else cuda.device_array((B, H), dtype)
        d_k = bufs[1][0] if bufs[1] is not None else cuda.device_array((B, T, H), dtype)
        d_v = d_k if sum_kv else (bufs[2][0] if bufs[2] is not None
                                  else cuda.device_array((B, T, Hv), dtype))
    S, W, CT = _plan(B, T, max(H, Hv), _splits, _warps)
    kern = _kernels(dtype.name, W, CT)
    part_dq = cuda.device_array((B, S, H), np.float64) if S > 1 else context64.reshape(B, 1, Hv)
    kern.backward[(B, S), 32 * W](q, k, v, lens, scale, stats, context64, dc_d, sum_kv, d_k,
                                  d_v, d_q, part_dq)
    if S > 1:
        kern.reduce_dq[B, 32 * W](part_dq, d_q)
    results = []  # the caller's buffers where given, else the new arrays (copied back: host)
    for dev, buf in zip((d_q, d_k, None if sum_kv else d_v), bufs, strict=True):
        if dev is None:
            results.append(None)
        elif buf is not None:
            if host:
                dev.copy_to_host(buf[1])
            results.append(buf[1])
        else:
            results.append(dev if not host else dev.copy_to_host())
    return results[0], results[1], results[2], {}
