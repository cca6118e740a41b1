"""The host side of the CUDA single-query attention core, the GPU twin of `kernels.attention`'s
fused path: `attention_forward` and `attention_backward` check their arguments with the
contract's own functions (`numpy_ref.contract.attention`: the same checks, the same messages),
move the arrays and launch the kernels of `kernels.cuda.attention_kernels`, where the math,
the precision and the launch layout are.

Arrays: NumPy inputs are copied to the device and results copied back (NumPy in, NumPy
out); device inputs (numba device arrays or any `__cuda_array_interface__` object: torch,
CuPy) are used in place and the results are numba device arrays. Everything runs on numba's
default stream (the legacy stream, torch's default too), with no host synchronisation on the
device path except when `lengths` is a device array (its [B] values are copied to the host to
be checked); host lengths are uploaded with an asynchronous copy. Allocations go through
numba's memory manager (cudaMalloc, and a deferred cudaFree that synchronises when it runs):
a pooling EMM plugin (NUMBA_CUDA_MEMORY_MANAGER) avoids both in a training loop.

Supported: query [B, H] (rank 2), keys [B, Tk, H], values [B, Tk, Hv], float32 or float64 (one
dtype), score "dot" or "scaled_dot", `scale`, `lengths`, `sum_kv`, `out`, `need_weights`
(False returns None for the weights and copies none to the host, but the forward still keeps
each key's raw score in a [B, Tk] device buffer between its two phases: with one query per row
that buffer is the size of one key row per batch row, 1/H of the values). Not implemented
(a ValueError naming the option and pointing at `kernels` or torch): rank-3/4 queries, the
"general" and "additive" scores, `mask`, `bias`, ``causal=True``, `d_weights`, `softcap`
("softcap is not supported by kernels.cuda yet").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from kernels.cuda.attention_kernels import build, plan
from numpy_ref.contract import attention as contract
from numpy_ref.contract import checks
from numpy_ref.contract.fields import documented

_USE = "use kernels.attention_forward (CPU) or torch for it"


# --------------------------------------------------------------------------------------------
# inputs: host or device, their checks, the transfers


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
    softcap: float | None = None,
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
    if contract.softcap_value(softcap) is not None:  # a bad softcap: the contract's error
        raise ValueError(f"softcap: softcap is not supported by kernels.cuda yet; {_USE}")
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
    S, W, CT = plan(B, T, max(H, Hv), _splits, _warps)
    kern = build(dtype.name, W, CT)
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


def _buffer_on(on_device: bool) -> Callable[[str, Any], Any]:
    """The contract's `array` hook for gradient buffers on the inputs' side: a NumPy array as
    it is, a device array as a numba view; a TypeError for anything else or the other side."""
    def array(name: str, buf: Any) -> Any:
        arr, dev = _device_or_host(name, buf)
        if dev != on_device:
            side = "device" if on_device else "host"
            raise TypeError(f"{name}: the forward's inputs were on the {side}, so must the "
                            f"gradient buffers be (got a {'device' if dev else 'host'} array)")
        return arr
    return array


def _in_place(name: str, buf: Any) -> None:
    """The contract's `in_place` hook: a NumPy buffer C-contiguous and writeable (the
    contract's check), a device buffer C-contiguous."""
    if isinstance(buf, np.ndarray):
        contract.writable(name, buf)
    else:
        _contiguous_device(name, buf)


def _extent(x: Any) -> tuple[int, int] | None:
    """[start, end) byte addresses of a device array (None when not known: the simulator)."""
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is None:
        return None
    start = cai["data"][0]
    return start, start + x.nbytes


def _overlap(a: Any, b: Any) -> bool:
    """Whether two arrays (both host or both device) share memory: the contract's `overlap`
    hook (False for a host and a device array)."""
    if isinstance(a, np.ndarray):
        return contract.shares_memory(a, b)
    if isinstance(b, np.ndarray):
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
    sum_kv = contract.sum_kv_flag(sum_kv, tuple(k.shape), tuple(v.shape))
    B, T, H = k.shape
    Hv = v.shape[2]
    dtype = np.dtype(q.dtype)
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
    # the contract's checks of `out`, with hooks for device arrays; bufs: the arrays to write
    # (numba views on the device side), given: the caller's objects, returned
    bufs = contract.gradient_buffers(out, sum_kv, ((B, H), (B, T, H), (B, T, Hv)), dtype, reads,
                                     array=_buffer_on(not host), in_place=_in_place,
                                     overlap=_overlap)
    given = (None, None, None) if out is None else tuple(out)
    if host:
        dc_d = _to_device(dc)
        d_q = cuda.device_array((B, H), dtype)
        d_k = cuda.device_array((B, T, H), dtype)
        d_v = d_k if sum_kv else cuda.device_array((B, T, Hv), dtype)
    else:
        _contiguous_device("d_context", dc)
        dc_d = dc
        d_q = bufs[0] if bufs[0] is not None else cuda.device_array((B, H), dtype)
        d_k = bufs[1] if bufs[1] is not None else cuda.device_array((B, T, H), dtype)
        d_v = d_k if sum_kv else (bufs[2] if bufs[2] is not None
                                  else cuda.device_array((B, T, Hv), dtype))
    S, W, CT = plan(B, T, max(H, Hv), _splits, _warps)
    kern = build(dtype.name, W, CT)
    part_dq = cuda.device_array((B, S, H), np.float64) if S > 1 else context64.reshape(B, 1, Hv)
    kern.backward[(B, S), 32 * W](q, k, v, lens, scale, stats, context64, dc_d, sum_kv, d_k,
                                  d_v, d_q, part_dq)
    if S > 1:
        kern.reduce_dq[B, 32 * W](part_dq, d_q)
    results = []  # the caller's buffers where given, else the new arrays (copied back: host)
    for dev, buf in zip((d_q, d_k, None if sum_kv else d_v), given, strict=True):
        if dev is None:
            results.append(None)
        elif buf is not None:
            if host:
                dev.copy_to_host(buf)
            results.append(buf)
        else:
            results.append(dev if not host else dev.copy_to_host())
    return results[0], results[1], results[2], {}
