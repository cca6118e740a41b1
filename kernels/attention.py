r"""Numba attention: the public pair `attention_forward` / `attention_backward` and the choice of
its path.

Same public functions, argument names, validation and results as `numpy_ref.attention` (read
its docstring for the math, shapes and options); only the caches differ, see
`KernelAttentionCache`. `numpy_ref.contract.attention` checks the arguments, brings every
layout to the heads layout [B, h, Tq, ...] and says which keys each query sees; the kernels
read that, never the rows it calls padding. Two paths, each in its own module with the story
of its kernel versions:

- one query per row, a dot-product score (query [B, H], the seed's case): memory-bound, one
  fused pass per row that reads each key/value row once (`kernels.attention_single`);
- everything else, many queries and heads, every score: GEMM-bound, a flash kernel that
  walks blocks of queries against blocks of keys with BLAS products on blocks in cache and
  the softmax between them, forming no [Tq, Tk] array unless the weights are asked for
  (`kernels.attention_flash`; the additive score's block kernels are in
  `kernels.attention_additive`).

``general`` is either path applied to q' = q W (then d_q = d_q' W^T, d_W = q^T d_q'); the
dot-product scale goes into the (Tk times smaller) query on the flash path. The flash kernels
call BLAS from their own threads, so the call holds `kernels._blas.single_threaded_blas`.

Unlike numpy_ref's, this attention does not check that its inputs, params, masks and returned
weights are unchanged between the forward and the backward (`numpy_ref.contract.unchanged`):
the cache references them, and an array changed in place in between makes the gradients wrong,
silently. The check reads every byte of them twice, one pass in the forward and one in the
backward; at the seed's single-query size (B256 T512 H256 float32, keys is values: 128 MiB)
that is 40-43 ms, against 46-72 ms for this forward + backward (the kernels' LSTM checks: 4 ms
on 320 ms). numpy_ref's pair is the one that refuses such a change; here, pass a copy or run
the forward again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numba
import numpy as np

from kernels._blas import single_threaded_blas
from kernels.attention_additive import (
    additive_scores_backward,
    additive_scores_forward,
    weighted_sum_backward,
    weighted_sum_forward,
)
from kernels.attention_flash import _C, _flash_backward, _flash_forward, block_rows, key_splits
from kernels.attention_single import _single_backward, _single_forward
from kernels.softmax import (
    KernelMaskedSoftmaxCache,
    masked_softmax_backward,
    masked_softmax_forward,
)
from numpy_ref.contract import attention as contract
from numpy_ref.contract import checks
from numpy_ref.contract.attention import matmul_rows
from numpy_ref.contract.fields import documented

__all__ = ["KernelAttentionCache", "KernelMaskedSoftmaxCache", "additive_scores_backward",
           "additive_scores_forward", "attention_backward", "attention_forward",
           "masked_softmax_backward", "masked_softmax_forward", "weighted_sum_backward",
           "weighted_sum_forward"]


@documented
class KernelAttentionCache(NamedTuple):
    """What `kernels.attention_backward` needs. The returned weights are referenced, not copied:
    modify them in place and backward is wrong, unchecked (numpy_ref's refuses it; see the
    module docstring). Arrays are in the heads layout, except lse."""

    inputs: contract.AttentionInputs  # the checked arguments (views of the caller's arrays)
    padding: contract.Padding  # which key and query rows are not data
    path: str  # "single" (`kernels.attention_single`) or "flash" (`kernels.attention_flash`)
    query: np.ndarray  # [B, h, Tq, Hq] contiguous, padding rows zeroed; read for d_W
    core_query: np.ndarray  # [B, h, Tq, Hk] what meets the keys: q, q W (general), times the
    #                         scale on the flash path, or q W_query^T + b (additive); read
    keys: np.ndarray  # [B, h_kv, Tk, Hk] contiguous (padding zeroed on the flash path), or
    #                   k W_key^T (additive); read
    values: np.ndarray  # [B, h_kv, Tk, Hv] contiguous (the keys array when keys is values)
    weights: np.ndarray | None  # [B, h, Tq, Tk] with need_weights (read by the flash backward
    #                             and for a bias or d_weights on the single path); None without
    stats: np.ndarray  # [B, h, Tq, 2] float64: each row's max score m and
    #                    l = sum_j exp(s_j - m) (m + log l is the log-sum-exp); read
    context64: np.ndarray  # [B, h, Tq, Hv] float64 context, read for delta = <c, dc> (empty
    #                        on the flash path when every key fits one block: not read)
    lengths: np.ndarray  # [B] int64, Tk where none were given
    masked: bool  # whether `visible` hides any key (else it is all True and not read)
    visible: np.ndarray  # bool [B, h, Tq, Tk] view (broadcast): the mask and bias > -inf, and
    #                      causal on the single path (the flash one takes causal as a prefix)
    bias: np.ndarray  # [B, h, Tq, Tk] view (broadcast zeros when no bias was given)

    @property
    def lse(self) -> np.ndarray:
        """[B], [B, Tq] or [B, h, Tq], the data's dtype: each query's log-sum-exp of its
        visible scaled scores, m + log l from `stats` (-inf when it sees no key), computed on
        first read (the forward does not pay for it)."""
        m, total = self.stats[..., 0], self.stats[..., 1]
        return contract.row_statistic(self.inputs,
                                      contract.log_sum_exp(m, total, self.query.dtype))

    @property
    def logits(self) -> np.ndarray | None:
        """[B, h, Tq, Tk] (the heads layout, whatever the caller's; the data's dtype): the
        scores after scale, softcap and bias, before the masks and the softmax, as
        numpy_ref's ``cache.logits`` (at padding keys and queries, the score of the zeros that
        replace them); None after need_weights=False, where nothing of size Tq x Tk may exist.
        The kernels overwrite their scores with the weights block by block, so these are
        computed again on each read from the cached query and keys (the forward does not pay
        for them): compare them with your pre-softmax scores."""
        a = self.inputs
        if self.weights is None:
            return None
        B, h, Tq, _ = self.query.shape
        h_kv, Tk = self.keys.shape[1], self.keys.shape[2]
        dtype = self.query.dtype
        # what met the keys, its query rows stacked per kv head: [B, h_kv, G Tq, D]
        q = _stacked(np.ascontiguousarray(self.core_query), h_kv)
        k = contract.without_padding(self.keys, self.padding.keys)  # read or not, 0 as numpy_ref
        with checks.quiet():
            if a.score == "additive":  # u . tanh(qa_i + ka_j)
                x = np.tanh(q[..., :, None, :] + k[..., None, :, :]) @ a.params["v"]
            else:
                x = q @ np.swapaxes(k, -1, -2)
                if self.path == "single" and a.scale != 1:  # the flash path scaled q itself
                    x = x * dtype.type(a.scale)
            x = x.reshape(B, h, Tq, Tk)
            if a.softcap is not None:
                x = a.softcap * np.tanh(x / a.softcap)
            if a.bias is not None:
                x = x + a.bias
        return x.astype(dtype, copy=False)


_TRUE = np.ones(1, np.bool_)
_ZERO = {np.dtype(t): np.zeros(1, t) for t in (np.float32, np.float64)}


def _constant(one: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The one-element array `one` seen as a read-only array of `shape` (stride 0): what
    np.broadcast_to gives, 0.3 us instead of 4.6 (a call of 20 us pays for two of them)."""
    view = np.ndarray(shape, one.dtype, one, 0, (0,) * len(shape))
    view.flags.writeable = False
    return view


def _read_padding(a: contract.AttentionInputs, pad: contract.Padding,
                  path: str) -> np.ndarray | None:
    """The padding key rows the kernels read (to be replaced by zeros, and their gradient rows
    after): none on the single-query path, which skips every hidden key, nor on the flash path
    when only lengths and causal hide keys (it never reads past either); else `pad.keys` (the
    additive score's key projection reads every row)."""
    if path == "single" or (a.mask is None and a.bias is None and a.score != "additive"):
        return None
    return pad.keys


def _stacked(x: np.ndarray, h_kv: int) -> np.ndarray:
    """[B, h, Tq, X] -> [B, h_kv, G Tq, X], the query rows of each kv head's group stacked (a
    view of a C-contiguous array)."""
    B, h, Tq, X = x.shape
    return x.reshape(B, h_kv, (h // h_kv) * Tq, X)


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
    need_weights: bool = True,
    softcap: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None, KernelAttentionCache]:
    """Numba `numpy_ref.attention_forward`: same arguments, checks, shapes and results.

    ``s = cap(scale * score(q, k)) + bias`` with ``cap(x) = softcap * tanh(x / softcap)`` when
    softcap (a finite c > 0) is given, else x (ONNX Attention's order: after the scale, before
    the bias and the masks; every score); ``w = softmax(s)`` over the keys each query sees;
    ``c = w v``. query [B, Hq], [B, Tq, Hq] or [B, h, Tq, D]; keys/values [B, Tk, H] or
    [B, h_kv, Tk, D]; returns context and weights (None with ``need_weights=False``: then
    nothing of size Tq x Tk is formed) in the query's layout, and the cache (``cache.lse``:
    each query's log-sum-exp; ``cache.logits`` [B, h, Tq, Tk]: the scores s before the masks,
    None without the weights).
    """
    same = values is keys
    a = contract.validate_attention(query, keys, values, score, params, lengths, mask, causal,
                                    scale, bias, need_weights, softcap)
    B, h, Tq, _ = a.query.shape
    _, h_kv, Tk, _ = a.keys.shape
    Hv = a.values.shape[3]
    dtype = a.query.dtype
    p = a.params
    path = "single" if a.layout == "single" and score != "additive" else "flash"
    pad = (contract.padding(a, contract.visibility(a)) if a.need_weights
           else contract.padding_by_blocks(a))
    lengths = np.full(B, Tk, np.int64) if a.lengths is None else a.lengths
    shape = (B, h, Tq, Tk)
    # the flash path takes causal as each row's prefix; the single one has one query per row
    visible = contract.visibility(a, with_lengths=False, with_causal=path == "single")
    masked = visible is not None  # False: the kernels need not read `visible`
    visible = _constant(_TRUE, shape) if visible is None else np.broadcast_to(visible, shape)
    bias4 = _constant(_ZERO[dtype], shape) if a.bias is None else a.bias
    scale = dtype.type(1.0 if a.scale is None else a.scale)
    softcap = dtype.type(0.0 if a.softcap is None else a.softcap)  # 0: the kernels skip it
    # a query row that sees no key is zeroed (general's d_W = q^T d_q' would read it)
    q = np.ascontiguousarray(contract.without_padding(a.query, pad.queries))
    kv_real = _read_padding(a, pad, path)
    k = np.ascontiguousarray(contract.without_padding(a.keys, kv_real))
    v = k if same else np.ascontiguousarray(contract.without_padding(a.values, kv_real))
    stats = np.empty((B, h, Tq, 2), np.float64)
    # the float64 context: read for the backward's delta when a row's keys span several
    # blocks (the single-query path always: its delta is <c, dc>)
    context64 = (np.empty((B, h, Tq, Hv)) if path == "single" or Tk > _C
                 else np.empty((0, 0, 0, 0)))
    context = np.empty((B, h, Tq, Hv), dtype)
    weights = np.empty(shape, dtype) if a.need_weights else None
    with checks.quiet():  # NaN and inf in real data propagate quietly, as numpy_ref's
        if score == "general":
            core_q = matmul_rows(q, p["W"])
        elif score == "additive":
            core_q = matmul_rows(q, p["W_query"].T)  # [B, h, Tq, A]
            if "b" in p:
                core_q += p["b"]
            k = matmul_rows(k, p["W_key"].T)  # [B, h_kv, Tk, A]: what meets the queries
        else:
            core_q = q
    if path == "single":
        w_rows = weights[:, 0, 0] if a.need_weights else np.empty((B, 0), dtype)
        _single_forward(core_q[:, 0, 0], k[:, 0], v[:, 0], lengths, masked, visible[:, 0, 0],
                        bias4[:, 0, 0], scale, softcap, context64[:, 0, 0], context[:, 0, 0],
                        w_rows, stats[:, 0, 0], a.need_weights)
    else:
        if scale != 1:  # scaled once here: the scores come out of the product scaled
            with checks.quiet():
                core_q = core_q * scale
        u = p["v"] if score == "additive" else np.empty(0, dtype)
        rows = (h // h_kv) * Tq
        R = block_rows(Tq if a.causal else rows, a.causal, B * h_kv, numba.get_num_threads())
        none = np.empty((0, 0, 0, 0), dtype)
        args = (_stacked(core_q, h_kv), k, v, Tq, lengths, a.causal, masked, visible,
                a.bias is not None, bias4, softcap, score == "additive", u, R, _C,
                a.need_weights,
                _stacked(context, h_kv),
                _stacked(context64, h_kv) if context64.size else context64,
                none if weights is None else _stacked(weights, h_kv), _stacked(stats, h_kv))
        with single_threaded_blas():
            _flash_forward(*args)
    cache = KernelAttentionCache(a, pad, path, q, core_q, k, v, weights, stats, context64,
                                 lengths, masked, visible, bias4)
    return a.to_user(context), None if weights is None else a.to_user(weights), cache


def attention_backward(
    d_context: np.ndarray,
    cache: KernelAttentionCache,
    *,
    d_weights: np.ndarray | None = None,
    sum_kv: bool = False,
    out: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Numba `numpy_ref.attention_backward`: returns d_query, d_keys, d_values (None with
    sum_kv), d_params; `out` buffers are written by the kernels themselves on the single-query
    path."""
    (a, pad, path, q, core_q, k, v, w, stats, context64, lengths, masked, visible,
     bias4) = checks.cache_of(cache, KernelAttentionCache, "kernels.attention_forward")
    sum_kv, out = contract.gradient_outputs(a, sum_kv, out, d_context, d_weights)
    B, h, Tq, _ = q.shape
    h_kv, Tk, Hv = k.shape[1], k.shape[2], v.shape[3]
    dtype = q.dtype
    p, score = a.params, a.score
    scale = dtype.type(1.0 if a.scale is None else a.scale)
    softcap = dtype.type(0.0 if a.softcap is None else a.softcap)
    dc, d_weights = contract.attention_cotangents(a, d_context, d_weights, Hv)
    dc = np.ascontiguousarray(dc)
    # an empty array stands for "no cotangent" (the cores test its shape)
    d_params: dict[str, np.ndarray] = {}
    if path == "single":
        # the kernel writes every entry of d_bias (a full [B, Tk] row per query)
        d_bias = np.empty((B, Tk) if a.bias is not None else (0, 0), dtype)
        d_core_q = (out[0] if out[0] is not None and score != "general"
                    else np.empty((B, core_q.shape[3]), dtype))
        # np.empty, not np.zeros: numpy asks for huge pages on large empty arrays, while a
        # large calloc faults in 4 KiB pages, 3x slower to write here; the kernel zeroes padding
        d_keys = out[1] if out[1] is not None else np.empty(k.shape[:1] + k.shape[2:], dtype)
        d_values = (d_keys if sum_kv else out[2] if out[2] is not None
                    else np.empty(v.shape[:1] + v.shape[2:], dtype))
        dw_in = (np.ascontiguousarray(d_weights[:, 0, 0]) if d_weights is not None
                 else np.empty((0, 0), dtype))
        w_rows = w[:, 0, 0] if w is not None else np.empty((0, 0), dtype)
        _single_backward(core_q[:, 0, 0], k[:, 0], v[:, 0], lengths, masked, visible[:, 0, 0],
                         bias4[:, 0, 0], scale, softcap, stats[:, 0, 0], context64[:, 0, 0],
                         dc[:, 0, 0].astype(np.float64), dw_in, w_rows, w is not None, sum_kv,
                         d_core_q, d_keys, d_values, d_bias)
        d_bias = d_bias[:, None, None]
        d_core_q, d_keys = d_core_q[:, None, None], d_keys[:, None]
        d_values = None if sum_kv else d_values[:, None]
    else:
        additive = score == "additive"
        rows = (h // h_kv) * Tq
        R = block_rows(Tq if a.causal else rows, a.causal, B * h_kv, numba.get_num_threads())
        splits = key_splits(B * h_kv, Tk, w is not None)
        D = core_q.shape[3]
        d_core_q = np.empty((B, h, Tq, D), dtype)
        d_q_parts = (np.empty((splits, B, h_kv, rows, D), dtype) if splits > 1
                     else np.empty((0, 0, 0, 0, 0), dtype))
        d_k = np.empty((B, h_kv, Tk, D), dtype)
        d_values = np.empty((B, h_kv, Tk, Hv), dtype)
        d_u_parts = np.empty((B * h_kv * splits, D) if additive else (0, 0))
        d_bias = np.zeros((B, h, Tq, Tk) if a.bias is not None else (0, 0, 0, 0), dtype)
        # <c, dc> per row, float64, for rows whose keys span several blocks (else the
        # kernel sums delta from the block)
        delta = (np.einsum("bhix,bhix->bhi", context64, dc.astype(np.float64)).reshape(
            B, h_kv, rows) if context64.size and w is None else np.empty((0, 0, 0)))
        none = np.empty((0, 0, 0, 0), dtype)
        args = (_stacked(core_q, h_kv), k, v, Tq, lengths, a.causal, masked, visible,
                a.bias is not None, bias4, softcap, additive,
                p["v"] if additive else np.empty(0, dtype),
                R, _C, splits, w is not None, none if w is None else _stacked(w, h_kv),
                none if d_weights is None else _stacked(np.ascontiguousarray(d_weights), h_kv),
                _stacked(stats, h_kv), delta, _stacked(dc, h_kv), _stacked(d_core_q, h_kv),
                d_q_parts, d_k, d_values, d_u_parts, d_bias)
        with single_threaded_blas():
            _flash_backward(*args)
        if splits > 1:  # summed in split order: the same bits whatever the thread count
            _stacked(d_core_q, h_kv)[...] = d_q_parts.sum(axis=0)
        if additive:
            with checks.quiet():
                d_query = matmul_rows(d_core_q, p["W_query"])
                d_keys = matmul_rows(d_k, p["W_key"])
                d_params["W_query"] = contract.flat(d_core_q).T @ contract.flat(q)
                d_params["W_key"] = contract.flat(d_k).T @ contract.flat(
                    a.keys if pad.keys is None else contract.without_padding(a.keys, pad.keys))
            d_params["v"] = d_u_parts.sum(axis=0).astype(dtype)
            if "b" in p:
                d_params["b"] = contract.flat(d_core_q).sum(axis=0)
            d_params = {key: d_params[key] for key in p}  # the params' own order
            d_core_q = None
        else:
            d_keys = d_k
            if scale != 1:
                d_core_q *= scale  # s = (scale q') . k
    if d_core_q is not None:
        if score == "general":  # core_q = q @ W
            with checks.quiet():
                d_params["W"] = contract.flat(q).T @ contract.flat(d_core_q)
                d_query = matmul_rows(d_core_q, p["W"].T)
        else:
            d_query = d_core_q
    if a.bias is not None:
        d_params["bias"] = contract.reduce_to(a.to_user(d_bias), a.bias_shape)
    d_query = contract.without_padding(d_query, pad.queries)
    kv_real = _read_padding(a, pad, path)  # rows the kernels read: they got 0 * (a NaN of a
    d_keys = contract.without_padding(d_keys, kv_real)  # query row, or of dc), 0 by definition
    d_values = contract.without_padding(d_values, kv_real)
    d_query, d_keys, d_values = contract.deliver(a, d_query, d_keys, d_values, sum_kv, out)
    return d_query, d_keys, d_values, d_params
