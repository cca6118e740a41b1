r"""Attention in NumPy, forward and backward by hand: four scores, one query or many, masks.

Shapes
------
B   batch                     Tq  query steps (1 in the single-query case)
Tk  key steps                 Hq, Hk, Hv  query, key, value sizes
A   width of the additive (Bahdanau) score

query  q [B, Hq] (one query per row, the seed's case) or [B, Tq, Hq] (all decoder steps at
once); keys k [B, Tk, Hk]; values v [B, Tk, Hv]. The single-query case is computed as Tq = 1.

Forward
-------
    s[b,i,j] = score(q[b,i], k[b,j])                                         [B, Tq, Tk]
        "dot"        : q . k                       (needs Hq == Hk)
        "scaled_dot" : q . k / sqrt(Hk)            (needs Hq == Hk)
        "general"    : q^T W k = (q W) . k         W [Hq, Hk]                     (Luong)
        "additive"   : u . tanh(W_query q + W_key k)                     (Bahdanau, Luong "concat")
                       W_query [A, Hq], W_key [A, Hk], u = params["v"] [A]
    w[b,i,:] = softmax(s[b,i,:] masked to the first lengths[b] keys)         [B, Tq, Tk]
    c[b,i]   = sum_j w[b,i,j] v[b,j]                                         [B, Tq, Hv]

The masked softmax puts a real -inf at keys j >= lengths[b], subtracts the row max (finite: every
row has at least one key), and exponentiates, so masked weights are exactly 0 and logits of any
finite size (1e4 and beyond) give finite weights.

Backward
--------
With dc = dL/dc and an optional cotangent dW on the weights:

    dv       = w^T dc                                      d_values [B, Tk, Hv]
    dw       = dc v^T + dW                                 [B, Tq, Tk]
    ds       = w * (dw - delta),   delta[b,i] = sum_j w[b,i,j] dw[b,i,j]

The last line is the softmax vector-Jacobian product: dw_j/ds_l = w_j (1[j=l] - w_l). Masked
keys have w = 0, so ds = 0 there and nothing flows into them. When only the context has a
cotangent (dW = 0),

    delta = sum_j w_j (dc . v_j) = dc . sum_j w_j v_j = <dc, c>,

FlashAttention-2's identity: delta needs the context, not the weights, which is what lets a
fused kernel recompute w from a saved log-sum-exp instead of storing it. The score's own chain
rule then gives the query and key gradients:

    dot         dq = ds k                 dk = ds^T q
    scaled_dot  dq = ds k / sqrt(Hk)      dk = ds^T q / sqrt(Hk)
    general     with q' = q W:  dq' = ds k,  dq = dq' W^T,  dW = sum_b,i q^T dq',  dk = ds^T q'
    additive    e = tanh(W_query q + W_key k) [B, Tq, Tk, A],  s = e u:
                du = sum_b,i,j ds e,   dz = ds u (1 - e^2),
                dq = (sum_j dz) W_query,   dW_query = sum (sum_j dz)^T q,
                dk = (sum_i dz) W_key,     dW_key   = sum (sum_i dz)^T k
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref import _checks

SCORES = ("dot", "scaled_dot", "general", "additive")


# --------------------------------------------------------------------------------------------
# masked softmax over the last axis


class MaskedSoftmaxCache(NamedTuple):
    """What `masked_softmax_backward` needs."""

    weights: np.ndarray  # [B, Tk] or [B, Tq, Tk]  the softmax output; read


def _key_mask(lengths: np.ndarray, ndim: int, Tk: int) -> np.ndarray:
    """Boolean [B, 1, Tk] (ndim 3) or [B, Tk] (ndim 2): True where key j < lengths[b]."""
    valid = np.arange(Tk)[None, :] < lengths[:, None]  # [B, Tk]
    return valid[:, None, :] if ndim == 3 else valid


def _masked_softmax(s: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    if valid is not None:
        s = np.where(valid, s, -np.inf)  # a real -inf: exp gives exactly 0
    e = np.exp(s - s.max(axis=-1, keepdims=True))  # the max is finite: >= 1 valid key per row
    return e / e.sum(axis=-1, keepdims=True)


def masked_softmax_forward(
    scores: np.ndarray, lengths: Any = None
) -> tuple[np.ndarray, MaskedSoftmaxCache]:
    """Softmax over the last axis, keys at positions >= lengths[b] weighted exactly 0.

    Parameters
    ----------
    scores : [B, Tk] or [B, Tq, Tk], float32 or float64.
    lengths : integer [B], each in 1..Tk, or None (every key valid).

    Returns
    -------
    weights : like scores; each row sums to 1 over its valid keys.  cache.
    """
    scores = _checks.float_array_ranks("scores", scores, (("B", "Tk"), ("B", "Tq", "Tk")))
    if scores.shape[-1] == 0:
        raise ValueError(f"scores: expected at least one key (Tk >= 1), got shape {scores.shape}")
    valid = None
    if lengths is not None:
        lengths = _checks.lengths_array(lengths, scores.shape[0], scores.shape[-1])
        valid = _key_mask(lengths, scores.ndim, scores.shape[-1])
    w = _masked_softmax(scores, valid)
    return w, MaskedSoftmaxCache(w)


def masked_softmax_backward(d_weights: np.ndarray, cache: MaskedSoftmaxCache) -> np.ndarray:
    """Backward of `masked_softmax_forward`: ``d_scores = w * (dw - sum_j w_j dw_j)``.

    d_weights : like the weights. Returns d_scores, like the scores (0 at masked keys).
    """
    w = cache.weights
    d_weights = _checks.float_array_ranks("d_weights", d_weights,
                                          (("B", "Tk"), ("B", "Tq", "Tk")))
    _checks.same_dtype("d_weights", d_weights, w.dtype, "scores")
    _checks.shape_is("d_weights", d_weights, w.shape, "like the weights")
    return w * (d_weights - np.sum(w * d_weights, axis=-1, keepdims=True))


# --------------------------------------------------------------------------------------------
# attention


class AttentionCache(NamedTuple):
    """Everything `attention_backward` needs from one `attention_forward` call."""

    query: np.ndarray  # [B, Tq, Hq]  the query (Tq = 1 when single); read for dW / dk
    keys: np.ndarray  # [B, Tk, Hk]  read for dq
    values: np.ndarray  # [B, Tk, Hv]  read for dw = dc v^T
    weights: np.ndarray  # [B, Tq, Tk]  the attention weights; read
    score: str  # one of SCORES
    params: dict[str, np.ndarray]  # the validated score params ({} for dot, scaled_dot); read
    projected: np.ndarray | None  # general: q W [B, Tq, Hk]; additive: tanh(...) [B, Tq, Tk, A]
    single_query: bool  # whether query was [B, Hq] (outputs squeezed to match)


def validate_attention(query, keys, values, score, params, lengths):
    """Check every forward argument; return (query, keys, values, params, lengths or None)."""
    query = _checks.float_array_ranks("query", query, (("B", "Hq"), ("B", "Tq", "Hq")))
    keys = _checks.float_array("keys", keys, ("B", "Tk", "Hk"))
    values = _checks.float_array("values", values, ("B", "Tk", "Hv"))
    dtype = query.dtype
    _checks.same_dtype("keys", keys, dtype, "query")
    _checks.same_dtype("values", values, dtype, "query")
    B, Tk, Hk = keys.shape
    Hq = query.shape[-1]
    if query.shape[0] != B:
        raise ValueError(f"query: batch {query.shape[0]} does not match keys' batch {B} "
                         f"(query {query.shape}, keys {keys.shape})")
    if values.shape[:2] != (B, Tk):
        raise ValueError(f"values: expected shape [B, Tk, Hv] with (B, Tk) = {(B, Tk)} from "
                         f"keys, got {values.shape}")
    if Tk == 0 or B == 0:
        raise ValueError(f"keys: expected at least one key and one row, got shape {keys.shape}")
    if query.ndim == 3 and query.shape[1] == 0:
        raise ValueError(f"query: expected at least one query step, got shape {query.shape}")
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    p: dict[str, np.ndarray] = {}
    if score in ("dot", "scaled_dot"):
        if Hq != Hk:
            raise ValueError(f"query: the {score!r} score needs Hq == Hk, got query "
                             f"{query.shape} and keys {keys.shape}")
    elif score == "general":
        p["W"] = _checks.param(params, "W", (Hq, Hk), "[Hq, Hk]", dtype, "query")
    else:
        A = _checks.leading_dim(params, "W_query", 2, "[A, Hq]")
        p["W_query"] = _checks.param(params, "W_query", (A, Hq), "[A, Hq]", dtype, "query")
        p["W_key"] = _checks.param(params, "W_key", (A, Hk), "[A, Hk]", dtype, "query")
        p["v"] = _checks.param(params, "v", (A,), "[A]", dtype, "query")
    _checks.no_unexpected_keys(params, set(p), f"the {score!r} score takes "
                               f"{sorted(p) if p else 'no params'}")
    if lengths is not None:
        lengths = _checks.lengths_array(lengths, B, Tk)
    return query, keys, values, p, lengths


def attention_forward(
    query: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    *,
    score: str = "dot",
    params: Mapping[str, np.ndarray] | None = None,
    lengths: Any = None,
) -> tuple[np.ndarray, np.ndarray, AttentionCache]:
    """Attention: scores -> masked softmax over keys -> weighted sum of values.

    Parameters
    ----------
    query : [B, Hq] (one query per row) or [B, Tq, Hq].
    keys : [B, Tk, Hk].  values : [B, Tk, Hv] (may be the same array as keys).
    score : "dot", "scaled_dot", "general" or "additive" (see the module docstring).
    params : {"W": [Hq, Hk]} for general; {"W_query": [A, Hq], "W_key": [A, Hk], "v": [A]}
        for additive; None for dot and scaled_dot.
    lengths : integer [B], each in 1..Tk, or None. Keys at j >= lengths[b] get weight 0.

    Returns
    -------
    context : [B, Hv] or [B, Tq, Hv].  weights : [B, Tk] or [B, Tq, Tk].  cache.
    """
    query, keys, values, p, lengths = validate_attention(query, keys, values, score, params,
                                                          lengths)
    single = query.ndim == 2
    q = query[:, None, :] if single else query  # [B, Tq, Hq]
    projected = None
    if score == "dot":
        s = q @ keys.transpose(0, 2, 1)  # [B, Tq, Tk]
    elif score == "scaled_dot":
        s = (q @ keys.transpose(0, 2, 1)) * (1.0 / math.sqrt(keys.shape[2]))  # float32 stays
    elif score == "general":
        projected = q @ p["W"]  # q W [B, Tq, Hk]
        s = projected @ keys.transpose(0, 2, 1)
    else:
        qa = q @ p["W_query"].T  # [B, Tq, A]
        ka = keys @ p["W_key"].T  # [B, Tk, A]
        projected = np.tanh(qa[:, :, None, :] + ka[:, None, :, :])  # [B, Tq, Tk, A]
        s = projected @ p["v"]  # [B, Tq, Tk]
    valid = None if lengths is None else _key_mask(lengths, 3, keys.shape[1])
    w = _masked_softmax(s, valid)  # [B, Tq, Tk]
    context = w @ values  # [B, Tq, Hv]
    cache = AttentionCache(q, keys, values, w, score, p, projected, single)
    if single:
        return context[:, 0], w[:, 0], cache
    return context, w, cache


def validate_cotangents(
    d_context: Any, d_weights: Any, sizes: tuple[int, int, int, int], single: bool,
    dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Check d_context (and d_weights when given) against the forward's (B, Tq, Tk, Hv).

    Returns them as [B, Tq, Hv] and [B, Tq, Tk] views (Tq = 1 for a single query).
    """
    B, Tq, Tk, Hv = sizes
    labels = ("B", "Hv") if single else ("B", "Tq", "Hv")
    d_context = _checks.float_array("d_context", d_context, labels)
    _checks.same_dtype("d_context", d_context, dtype, "query")
    _checks.shape_is("d_context", d_context, (B, Hv) if single else (B, Tq, Hv),
                     f"[{', '.join(labels)}]")
    if d_weights is not None:
        labels = ("B", "Tk") if single else ("B", "Tq", "Tk")
        d_weights = _checks.float_array("d_weights", d_weights, labels)
        _checks.same_dtype("d_weights", d_weights, dtype, "query")
        _checks.shape_is("d_weights", d_weights, (B, Tk) if single else (B, Tq, Tk),
                         f"[{', '.join(labels)}]")
        d_weights = d_weights[:, None, :] if single else d_weights
    return (d_context[:, None, :] if single else d_context), d_weights


def attention_backward(
    d_context: np.ndarray, cache: AttentionCache, *, d_weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Backward of `attention_forward`.

    Parameters
    ----------
    d_context : like the context ([B, Hv] or [B, Tq, Hv]).
    d_weights : optional cotangent on the returned weights ([B, Tk] or [B, Tq, Tk]), for a
        loss on the alignment itself; it adds to the gradient.

    Returns
    -------
    d_query : like query.  d_keys : [B, Tk, Hk].  d_values : [B, Tk, Hv].
    d_params : same keys as params ({} for dot and scaled_dot).
    d_keys and d_values come back separately even when keys is values: the caller adds them.
    """
    q, k, v, w, score, p, projected, single = cache
    B, Tq, Tk = w.shape
    dc, d_weights = validate_cotangents(d_context, d_weights, (B, Tq, Tk, v.shape[2]), single,
                                        w.dtype)
    d_values = w.transpose(0, 2, 1) @ dc  # context = w @ values
    dw = dc @ v.transpose(0, 2, 1)  # [B, Tq, Tk]
    if d_weights is not None:
        dw = dw + d_weights
    ds = w * (dw - np.sum(w * dw, axis=-1, keepdims=True))  # softmax VJP; 0 at masked keys

    d_params: dict[str, np.ndarray] = {}
    if score in ("dot", "scaled_dot"):  # s = q @ k^T (* 1/sqrt(Hk))
        if score == "scaled_dot":
            ds = ds * (1.0 / math.sqrt(k.shape[2]))
        d_q = ds @ k
        d_k = ds.transpose(0, 2, 1) @ q
    elif score == "general":  # s = (q @ W) @ k^T
        d_proj = ds @ k  # [B, Tq, Hk]
        d_q = d_proj @ p["W"].T
        d_params["W"] = q.reshape(B * Tq, -1).T @ d_proj.reshape(B * Tq, -1)
        d_k = ds.transpose(0, 2, 1) @ projected
    else:  # s = tanh(qa[:, :, None] + ka[:, None]) @ u
        e = projected
        d_z = ds[..., None] * p["v"] * (1 - e * e)  # [B, Tq, Tk, A]
        d_qa, d_ka = d_z.sum(axis=2), d_z.sum(axis=1)  # [B, Tq, A], [B, Tk, A]
        d_q = d_qa @ p["W_query"]
        d_k = d_ka @ p["W_key"]
        d_params["W_query"] = d_qa.reshape(B * Tq, -1).T @ q.reshape(B * Tq, -1)
        d_params["W_key"] = d_ka.reshape(B * Tk, -1).T @ k.reshape(B * Tk, -1)
        d_params["v"] = np.einsum("bij,bija->a", ds, e)
    return (d_q[:, 0] if single else d_q), d_k, d_values, d_params
