"""Validation of `multihead_attention_forward` / `_backward` (see `numpy_ref.multihead_attention`),
with `torch.nn.MultiheadAttention`'s shapes, parameter names and mask conventions.

`multihead_attention` checks every forward argument and turns torch's masks into the attention
core's: a bool mask of torch's (True = NOT allowed) becomes the core's `mask` inverted
(True = attend), a float mask becomes (part of) the core's `bias`, both in the heads layout
[N, h, Tq, Tk] (broadcast views where the mask is shared). `is_causal` is resolved as torch does:
it needs an `attn_mask`, and it replaces that mask by the core's own causal mask only where
torch's `multi_head_attention_forward` hands the hint to SDPA (no key_padding_mask and
need_weights False); elsewhere the given attn_mask is used and the hint changes nothing.

`multihead_attention` also finds the rows that are padding, by the core's own rule
(`contract.attention.padding`): the key/value rows no query of any head may see under those
masks, and the query rows that may see no key in any head; the math module zeroes them before
the in-projections read them.

Each message names the argument, what was expected and what was received.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import attention as core
from numpy_ref.contract import checks
from numpy_ref.contract.fields import documented

PACKED = ("in_proj_weight",)
SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
BIASES = ("in_proj_bias", "out_proj.bias")
UNSUPPORTED = ("bias_k", "bias_v")


@documented
class MultiheadAttentionInputs(NamedTuple):
    """The checked arguments of `multihead_attention_forward`."""

    query: np.ndarray  # [N, Tq, E] or [Tq, N, E] (the caller's layout; unbatched: [1, Tq, E])
    key: np.ndarray  # [N, Tk, kdim] or [Tk, N, kdim], likewise
    value: np.ndarray  # [N, Tk, vdim] or [Tk, N, vdim], likewise
    projections: tuple[dict, dict, dict]  # q, k, v in-projections as linear params {weight, bias}
    out_proj: dict  # out_proj as linear params {"weight": [E, E], "bias": [E] (optional)}
    mask: np.ndarray | None  # bool, broadcastable to [N, h, Tq, Tk], True = attend (the core's)
    bias: np.ndarray | None  # float, broadcastable to [N, h, Tq, Tk], added to the scores
    causal: bool  # the core's causal flag (torch's is_causal handed to SDPA)
    num_heads: int  # h
    head_dim: int  # E // num_heads
    batched: bool  # False for unbatched 2-D inputs (a batch axis of 1 was added in front)
    batch_first: bool  # the batched layout: [N, Tq, E] (True) or [Tq, N, E]; True when unbatched
    need_weights: bool  # whether the weights are returned
    average_attn_weights: bool  # whether they are averaged over the heads
    packed: bool  # params held in_proj_weight [3E, E] (else q/k/v_proj_weight)
    keys: tuple[str, ...]  # the params' keys, in order: d_params comes back in it
    sizes: tuple[int, int, int, int]  # (N, Tq, Tk, E)
    real_keys: np.ndarray | None  # bool, broadcastable to key's [N, Tk, 1] or [Tk, N, 1] (its
    #                               layout): True = a key/value row some query of some head may
    #                               see; None when every row is such (no padding)
    real_queries: np.ndarray | None  # bool, broadcastable to query's [N, Tq, 1] or [Tq, N, 1]:
    #                                  True = a query row that may see a key in some head; None
    #                                  when every row may


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def _inputs(query: Any, key: Any, value: Any, batch_first: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batched = ("N", "Tq", "E") if batch_first else ("Tq", "N", "E")
    query = checks.float_array_ranks("query", query, (("Tq", "E"), batched))
    rank = query.ndim
    kv = ("Tk",) if rank == 2 else ("N", "Tk") if batch_first else ("Tk", "N")
    how = "an unbatched (2-D)" if rank == 2 else "a batched (3-D)"
    for name, a, last in (("key", key, "kdim"), ("value", value, "vdim")):
        if isinstance(a, np.ndarray) and a.dtype in checks.FLOAT_DTYPES and a.ndim != rank:
            raise ValueError(f"{name}: {how} query needs a {rank}-D {name} "
                             f"[{', '.join((*kv, last))}] (query {query.shape}), got shape "
                             f"{a.shape}")
        checks.float_array(name, a, (*kv, last))
        checks.same_dtype(name, a, query.dtype, "query")
    return query, key, value


def _params(params: Any, E: int, kdim: int, vdim: int, dtype: np.dtype
            ) -> tuple[tuple[dict, dict, dict], dict, bool, tuple[str, ...]]:
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays (nn.MultiheadAttention's "
                        f"state_dict names), got {type(params).__name__}")
    for name in UNSUPPORTED:
        if name in params:
            raise ValueError(f"params: key {name!r} is not supported (nn.MultiheadAttention's "
                             "add_bias_kv=True); build the module with add_bias_kv=False")
    packed = "in_proj_weight" in params
    separate = [k for k in SEPARATE if k in params]
    if packed and separate:
        raise ValueError(f"params: both 'in_proj_weight' and {separate} given; torch holds "
                         "in_proj_weight [3E, E] when kdim == vdim == E, and q/k/v_proj_weight "
                         "otherwise, never both")
    if not packed and not separate:
        raise ValueError(f"params: missing key 'in_proj_weight' (expected shape [3E, E] = "
                         f"{(3 * E, E)}), or 'q_proj_weight', 'k_proj_weight' and "
                         f"'v_proj_weight' when kdim/vdim differ from E")
    has_bias = [k for k in BIASES if k in params]
    if len(has_bias) == 1:
        missing = next(k for k in BIASES if k not in params)
        raise ValueError(f"params: missing key {missing!r} ({has_bias[0]!r} is given: torch's "
                         "bias=True has both in_proj_bias and out_proj.bias, bias=False "
                         "neither)")
    ref = "query (E from params['out_proj.weight'])"
    if packed:
        if kdim != E or vdim != E:
            raise ValueError(f"key/value: 'in_proj_weight' [3E, E] needs kdim == vdim == E = "
                             f"{E}, got kdim {kdim} and vdim {vdim}; pass q_proj_weight, "
                             "k_proj_weight and v_proj_weight (nn.MultiheadAttention(kdim=, "
                             "vdim=)) for other sizes")
        w = checks.param(params, "in_proj_weight", (3 * E, E), "[3E, E]", dtype, ref)
        weights = (w[:E], w[E:2 * E], w[2 * E:])
    else:
        weights = (checks.param(params, "q_proj_weight", (E, E), "[E, E]", dtype, ref),
                   checks.param(params, "k_proj_weight", (E, kdim), "[E, kdim]", dtype, ref),
                   checks.param(params, "v_proj_weight", (E, vdim), "[E, vdim]", dtype, ref))
    out = {"weight": checks.param(params, "out_proj.weight", (E, E), "[E, E]", dtype, ref)}
    biases: tuple = (None, None, None)
    if has_bias:
        b = checks.param(params, "in_proj_bias", (3 * E,), "[3E]", dtype, ref)
        biases = (b[:E], b[E:2 * E], b[2 * E:])
        out["bias"] = checks.param(params, "out_proj.bias", (E,), "[E]", dtype, ref)
    allowed = set(PACKED if packed else SEPARATE) | {"out_proj.weight"}
    allowed |= set(BIASES) if has_bias else set()
    checks.no_unexpected_keys(params, allowed, "nn.MultiheadAttention's state_dict holds "
                              f"{sorted(allowed)} for these options")
    projections = tuple({"weight": w} if b is None else {"weight": w, "bias": b}
                        for w, b in zip(weights, biases, strict=True))
    return projections, out, packed, tuple(params)


def _mask(name: str, m: Any, expected: tuple[tuple[int, ...], ...], labels: tuple[str, ...],
          dtype: np.dtype) -> np.ndarray:
    """A bool or float (the query's dtype) ndarray of one of the `expected` shapes."""
    accepted = " or ".join(f"{lab} = {shape}" for lab, shape in zip(labels, expected,
                                                                     strict=True))
    checks.not_masked(name, m)
    if not isinstance(m, np.ndarray):
        raise TypeError(f"{name}: expected a bool or float numpy.ndarray {accepted}, got "
                        f"{type(m).__name__}")
    if m.dtype != np.bool_ and m.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype bool (True = not allowed to attend) or a "
                        f"float dtype (added to the scores), got {m.dtype}")
    if m.dtype != np.bool_:
        checks.same_dtype(name, m, dtype, "query")
    if m.shape not in expected:
        raise ValueError(f"{name}: expected shape {accepted}, got {m.shape}")
    return m


def multihead_attention(query: Any, key: Any, value: Any, params: Any, num_heads: Any,
                        key_padding_mask: Any, attn_mask: Any, is_causal: Any, need_weights: Any,
                        average_attn_weights: Any, batch_first: Any
                        ) -> MultiheadAttentionInputs:
    """Check every `multihead_attention_forward` argument; return them ready for the core."""
    batch_first = _flag("batch_first", batch_first)
    query, key, value = _inputs(query, key, value, batch_first)
    is_causal = _flag("is_causal", is_causal)
    need_weights = _flag("need_weights", need_weights)
    average = _flag("average_attn_weights", average_attn_weights)
    batched = query.ndim == 3
    if not batched:  # torch adds the batch axis (batch_first does not apply)
        query, key, value = query[None], key[None], value[None]
    layout = "[N, Tq, E]" if batch_first or not batched else "[Tq, N, E]"
    nl = (0, 1) if batch_first or not batched else (1, 0)
    N, Tq = query.shape[nl[0]], query.shape[nl[1]]
    Tk = key.shape[nl[1]]
    if key.shape[nl[0]] != N or value.shape[nl[0]] != N:
        raise ValueError(f"key/value: batch N = {N} of query {layout} = {query.shape} must be "
                         f"theirs, got key {key.shape} and value {value.shape}"
                         f"{'' if batch_first else ' (batch_first=False: [Tk, N, kdim])'}")
    if value.shape[nl[1]] != Tk:
        raise ValueError(f"value: expected the key's Tk = {Tk} steps (key {key.shape}), got "
                         f"shape {value.shape}")
    if 0 in query.shape or 0 in key.shape or 0 in value.shape:
        raise ValueError(f"query/key/value: every axis must be non-empty, got query "
                         f"{query.shape}, key {key.shape}, value {value.shape}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays (nn.MultiheadAttention's "
                        f"state_dict names), got {type(params).__name__}")
    E = checks.leading_dim(params, "out_proj.weight", 2, "[E, E]")
    if query.shape[2] != E:
        raise ValueError(f"query: expected the embedding size E = {E} of "
                         f"params['out_proj.weight'] [E, E] as its last axis, got shape "
                         f"{query.shape[1:] if not batched else query.shape}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)):
        raise TypeError(f"num_heads: expected an int, got {type(num_heads).__name__}")
    if num_heads < 1 or E % num_heads:
        raise ValueError(f"num_heads: must be a positive divisor of the embedding size "
                         f"E = {E}, got {num_heads}")
    h = int(num_heads)
    projections, out, packed, keys = _params(params, E, key.shape[2], value.shape[2],
                                             query.dtype)
    dtype = query.dtype
    kpm = am = None
    if key_padding_mask is not None:
        kpm = _mask("key_padding_mask", key_padding_mask, ((N, Tk),) if batched else ((Tk,),),
                    ("[N, Tk]",) if batched else ("[Tk]",), dtype).reshape(N, 1, 1, Tk)
    if attn_mask is not None:
        am = _mask("attn_mask", attn_mask, ((Tq, Tk), ((N if batched else 1) * h, Tq, Tk)),
                   ("[Tq, Tk]", "[N*num_heads, Tq, Tk]" if batched else "[num_heads, Tq, Tk]"),
                   dtype)
        am = am if am.ndim == 2 else am.reshape(N, h, Tq, Tk)
    if is_causal and am is None:
        raise ValueError("is_causal: torch needs attn_mask with the is_causal hint (its "
                         "RuntimeError: 'Need attn_mask if specifying the is_causal hint'); "
                         "pass the causal mask, e.g. np.triu(np.ones((Tq, Tk), bool), 1)")
    causal = is_causal and kpm is None and not need_weights
    if causal:  # torch hands is_causal to SDPA and drops attn_mask
        am = None
    mask = bias = None
    for m in (kpm, am):
        if m is None:
            continue
        if m.dtype == np.bool_:
            mask = ~m if mask is None else mask & ~m
        else:
            bias = m if bias is None else bias + m
    real = _real_rows(mask, bias, causal, need_weights, (N, Tq, Tk), h, dtype)
    if not (batch_first or not batched):  # [N?, T?, 1] -> [T?, N?, 1]
        real = [None if r is None else r.swapaxes(0, 1) for r in real]
    return MultiheadAttentionInputs(query, key, value, projections, out, mask, bias, causal, h,
                                    E // h, batched, batch_first or not batched, need_weights,
                                    average, packed, keys, (N, Tq, Tk, E), *real)


def _real_rows(mask: np.ndarray | None, bias: np.ndarray | None, causal: bool,
               need_weights: bool, sizes: tuple[int, int, int], h: int, dtype: np.dtype
               ) -> list[np.ndarray | None]:
    """[keys, queries]: bool [N?, Tk?, 1] (True = key row s of batch row n is data: some query
    of some head may see it) and [N?, Tq?, 1] (True = query row l may see a key in some head),
    each None when every row is data. The core decides (`core.padding`, or
    `core.padding_by_blocks` without the weights, as `attention_forward` does) from the
    arguments the core gets, with stand-ins [N, h, T, 1] for Q, K and V (only their shapes are
    read), and a row is padding when it is padding in every head."""
    if mask is None and bias is None and not causal:
        return [None, None]
    N, Tq, Tk = sizes
    keys = np.zeros((N, h, Tk, 1), dtype)
    a = core.validate_attention(np.zeros((N, h, Tq, 1), dtype), keys, keys, "scaled_dot", None,
                                mask=mask, causal=causal, bias=bias, need_weights=need_weights)
    pad = core.padding(a, core.visibility(a)) if need_weights else core.padding_by_blocks(a)
    real = [None if r is None else r.any(axis=1) for r in pad]  # [N?, h?, T?, 1] -> [N?, T?, 1]
    return [None if r is None or r.all() else r for r in real]


def cotangents(a: MultiheadAttentionInputs, d_output: Any, d_weights: Any
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Check `multihead_attention_backward`'s cotangents against the forward; return d_output
    in the batched layout [N, Tq, E] / [Tq, N, E] and d_weights per head [N, h, Tq, Tk] (an
    averaged one divided among the heads) or None."""
    N, Tq, Tk, E = a.sizes
    h = a.num_heads
    dtype = a.query.dtype
    out_axes = ("N", "Tq", "E") if a.batch_first else ("Tq", "N", "E")
    out_shape = (N, Tq, E) if a.batch_first else (Tq, N, E)
    if not a.batched:
        out_axes, out_shape = ("Tq", "E"), (Tq, E)
    d_output = checks.float_array("d_output", d_output, out_axes)
    checks.same_dtype("d_output", d_output, dtype, "query")
    checks.shape_is("d_output", d_output, out_shape, f"like the output [{', '.join(out_axes)}]")
    d_output = d_output if a.batched else d_output[None]
    if d_weights is None:
        return d_output, None
    if not a.need_weights:
        raise ValueError("d_weights: the forward ran with need_weights=False and returned no "
                         "weights; pass d_weights=None")
    w_axes = ("N", "Tq", "Tk") if a.average_attn_weights else ("N", "num_heads", "Tq", "Tk")
    w_shape = (N, Tq, Tk) if a.average_attn_weights else (N, h, Tq, Tk)
    if not a.batched:
        w_axes, w_shape = w_axes[1:], w_shape[1:]
    d_weights = checks.float_array("d_weights", d_weights, w_axes)
    checks.same_dtype("d_weights", d_weights, dtype, "query")
    checks.shape_is("d_weights", d_weights, w_shape, f"like the weights [{', '.join(w_axes)}]")
    d_weights = d_weights if a.batched else d_weights[None]
    if a.average_attn_weights:  # w = mean over heads: each head gets dW / h
        d_weights = np.broadcast_to((d_weights / dtype.type(h))[:, None], (N, h, Tq, Tk))
    return d_output, d_weights


def scale(head_dim: int) -> float:
    """torch's score multiplier: ``q * math.sqrt(1.0 / head_dim)`` before ``q k^T``."""
    return math.sqrt(1.0 / float(head_dim))
