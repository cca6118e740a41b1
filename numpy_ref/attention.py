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
        "additive"   : u . tanh(W_query q + b + W_key k)            (Bahdanau, Luong "concat")
                       W_query [A, Hq], W_key [A, Hk], u = params["v"] [A], optional b [A]
    w[b,i,:] = softmax(s[b,i,:] masked to the first lengths[b] keys)         [B, Tq, Tk]
    c[b,i]   = sum_j w[b,i,j] v[b,j]                                         [B, Tq, Hv]

The masked softmax puts a real -inf at keys j >= lengths[b], subtracts the row max (finite: every
row has at least one key), and exponentiates, so masked weights are exactly 0 and logits of any
finite size (1e4 and beyond) give finite weights.

Attention is composed of public pairs, each with its own backward: the additive score's
`additive_scores_forward` (the tanh and u from projected queries and keys, which a decoder
that attends step by step calls with keys projected once), `masked_softmax_forward`, and
`weighted_sum_forward` (the context).

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
    additive    qa = W_query q + b [B, Tq, A], ka = W_key k [B, Tk, A],
                e = tanh(qa + ka) [B, Tq, Tk, A],  s = e u:
                du = sum_b,i,j ds e,   dz = ds u (1 - e^2),
                d_qa = sum_j dz,  d_ka = sum_i dz,  db = sum_b,i d_qa,
                dq = d_qa W_query,   dW_query = sum d_qa^T q,
                dk = d_ka W_key,     dW_key   = sum d_ka^T k
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref import _checks
from numpy_ref.contract import attention as contract
from numpy_ref.contract.attention import SCORES

__all__ = ["SCORES", "AdditiveScoresCache", "AttentionCache", "MaskedSoftmaxCache",
           "WeightedSumCache", "additive_scores_backward", "additive_scores_forward",
           "attention_backward", "attention_forward", "masked_softmax_backward",
           "masked_softmax_forward", "weighted_sum_backward", "weighted_sum_forward"]


def _rows(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``x @ W`` for x [..., n] and W [n, m] as one GEMM over all leading axes (a stacked
    [B, T, n] @ [n, m] runs as B small products, about half as fast)."""
    return (x.reshape(-1, x.shape[-1]) @ W).reshape(*x.shape[:-1], W.shape[1])


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
    scores, lengths = contract.masked_softmax(scores, lengths)
    valid = None if lengths is None else _key_mask(lengths, scores.ndim, scores.shape[-1])
    w = _masked_softmax(scores, valid)
    return w, MaskedSoftmaxCache(w)


def masked_softmax_backward(d_weights: np.ndarray, cache: MaskedSoftmaxCache) -> np.ndarray:
    """Backward of `masked_softmax_forward`: ``d_scores = w * (dw - sum_j w_j dw_j)``.

    d_weights : like the weights. Returns d_scores, like the scores (0 at masked keys).
    """
    w = _checks.cache_of(cache, MaskedSoftmaxCache, "masked_softmax_forward").weights
    d_weights = contract.like_weights("d_weights", d_weights, w)
    return w * (d_weights - np.sum(w * d_weights, axis=-1, keepdims=True))


# --------------------------------------------------------------------------------------------
# the additive score from projected queries and keys


class AdditiveScoresCache(NamedTuple):
    """What `additive_scores_backward` needs."""

    energy: np.ndarray  # [B, Tq, Tk, A]  e = tanh(qa + ka); read
    v: np.ndarray  # [A]  read
    single_query: bool  # whether query_proj was [B, A]


def additive_scores_forward(
    query_proj: np.ndarray, key_proj: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, AdditiveScoresCache]:
    """``s[b,i,j] = v . tanh(query_proj[b,i] + key_proj[b,j])``: the additive score's second
    half, for queries and keys already projected (``W_query q + b`` and ``W_key k``).

    query_proj : [B, A] or [B, Tq, A].  key_proj : [B, Tk, A].  v : [A].
    Returns scores [B, Tk] or [B, Tq, Tk], and the cache.
    """
    qa, ka, v = contract.additive_scores(query_proj, key_proj, v)
    single = qa.ndim == 2
    qa = qa[:, None, :] if single else qa  # [B, Tq, A]
    e = np.tanh(qa[:, :, None, :] + ka[:, None, :, :])  # [B, Tq, Tk, A]
    s = e @ v  # [B, Tq, Tk]
    return (s[:, 0] if single else s), AdditiveScoresCache(e, v, single)


def additive_scores_backward(
    d_scores: np.ndarray, cache: AdditiveScoresCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of `additive_scores_forward`: d_scores like the scores ->
    (d_query_proj like query_proj, d_key_proj [B, Tk, A], d_v [A])."""
    e, v, single = _checks.cache_of(cache, AdditiveScoresCache, "additive_scores_forward")
    ds = contract.like_scores("d_scores", d_scores, e, single)  # [B, Tq, Tk]
    d_z = ds[..., None] * v * (1 - e * e)  # s = tanh(z) @ v, z = qa + ka
    d_qa, d_ka = d_z.sum(axis=2), d_z.sum(axis=1)  # [B, Tq, A], [B, Tk, A]
    d_v = np.einsum("bij,bija->a", ds, e)
    return (d_qa[:, 0] if single else d_qa), d_ka, d_v


# --------------------------------------------------------------------------------------------
# the context: a weighted sum of values


class WeightedSumCache(NamedTuple):
    """What `weighted_sum_backward` needs."""

    weights: np.ndarray  # [B, Tq, Tk]  read for d_values
    values: np.ndarray  # [B, Tk, Hv]  read for d_weights
    single_query: bool  # whether weights were [B, Tk]


def weighted_sum_forward(
    weights: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, WeightedSumCache]:
    """``c[b,i] = sum_j w[b,i,j] v[b,j]``: weights [B, Tk] or [B, Tq, Tk], values
    [B, Tk, Hv] -> context [B, Hv] or [B, Tq, Hv], and the cache."""
    w, values = contract.weighted_sum(weights, values)
    single = w.ndim == 2
    w = w[:, None, :] if single else w  # [B, Tq, Tk]
    c = w @ values
    return (c[:, 0] if single else c), WeightedSumCache(w, values, single)


def weighted_sum_backward(
    d_context: np.ndarray, cache: WeightedSumCache
) -> tuple[np.ndarray, np.ndarray]:
    """Backward of `weighted_sum_forward`: d_context like the context ->
    (d_weights like the weights, d_values [B, Tk, Hv])."""
    w, values, single = _checks.cache_of(cache, WeightedSumCache, "weighted_sum_forward")
    B, Tq, Tk = w.shape
    dc, _ = contract.validate_cotangents(d_context, None, (B, Tq, Tk, values.shape[2]), single,
                                         w.dtype)
    d_w = dc @ values.transpose(0, 2, 1)  # c = w @ v
    d_values = w.transpose(0, 2, 1) @ dc
    return (d_w[:, 0] if single else d_w), d_values


# --------------------------------------------------------------------------------------------
# attention: score -> masked softmax -> weighted sum


class AttentionCache(NamedTuple):
    """Everything `attention_backward` needs from one `attention_forward` call."""

    query: np.ndarray  # [B, Tq, Hq]  the query (Tq = 1 when single); read for dW / dk
    keys: np.ndarray  # [B, Tk, Hk]  read for dq
    softmax: MaskedSoftmaxCache  # the weights [B, Tq, Tk]; read
    context: WeightedSumCache  # the weights and values; read
    score: str  # one of SCORES
    params: dict[str, np.ndarray]  # the validated score params ({} for dot, scaled_dot); read
    projected: np.ndarray | None  # general: q W [B, Tq, Hk]; None otherwise
    energy: AdditiveScoresCache | None  # additive: the tanh layer; None otherwise
    single_query: bool  # whether query was [B, Hq] (outputs squeezed to match)


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
        and optionally "b": [A] for additive; None for dot and scaled_dot.
    lengths : integer [B], each in 1..Tk, or None. Keys at j >= lengths[b] get weight 0.

    Returns
    -------
    context : [B, Hv] or [B, Tq, Hv].  weights : [B, Tk] or [B, Tq, Tk].  cache.
    """
    query, keys, values, p, lengths = contract.validate_attention(query, keys, values, score,
                                                                  params, lengths)
    single = query.ndim == 2
    q = query[:, None, :] if single else query  # [B, Tq, Hq]
    projected = energy = None
    if score == "dot":
        s = q @ keys.transpose(0, 2, 1)  # [B, Tq, Tk]
    elif score == "scaled_dot":
        s = (q @ keys.transpose(0, 2, 1)) * (1.0 / math.sqrt(keys.shape[2]))  # float32 stays
    elif score == "general":
        projected = _rows(q, p["W"])  # q W [B, Tq, Hk]
        s = projected @ keys.transpose(0, 2, 1)
    else:
        qa = _rows(q, p["W_query"].T)  # [B, Tq, A]
        if "b" in p:
            qa = qa + p["b"]
        s, energy = additive_scores_forward(qa, _rows(keys, p["W_key"].T), p["v"])  # [B, Tq, Tk]
    w, softmax = masked_softmax_forward(s, lengths)  # [B, Tq, Tk]
    context, weighted = weighted_sum_forward(w, values)  # [B, Tq, Hv]
    cache = AttentionCache(q, keys, softmax, weighted, score, p, projected, energy, single)
    if single:
        return context[:, 0], w[:, 0], cache
    return context, w, cache


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
    q, k, softmax, weighted, score, p, projected, energy, single = _checks.cache_of(
        cache, AttentionCache, "attention_forward")
    B, Tq, Tk = softmax.weights.shape
    dc, d_weights = contract.validate_cotangents(d_context, d_weights,
                                                 (B, Tq, Tk, weighted.values.shape[2]), single,
                                                 q.dtype)
    dw, d_values = weighted_sum_backward(dc, weighted)  # context = w @ values
    if d_weights is not None:
        dw = dw + d_weights
    ds = masked_softmax_backward(dw, softmax)  # 0 at masked keys

    d_params: dict[str, np.ndarray] = {}
    if score in ("dot", "scaled_dot"):  # s = q @ k^T (* 1/sqrt(Hk))
        if score == "scaled_dot":
            ds = ds * (1.0 / math.sqrt(k.shape[2]))
        d_q = ds @ k
        d_k = ds.transpose(0, 2, 1) @ q
    elif score == "general":  # s = (q @ W) @ k^T
        d_proj = ds @ k  # [B, Tq, Hk]
        d_q = _rows(d_proj, p["W"].T)
        d_params["W"] = q.reshape(B * Tq, -1).T @ d_proj.reshape(B * Tq, -1)
        d_k = ds.transpose(0, 2, 1) @ projected
    else:  # s = additive_scores(q @ W_query^T + b, k @ W_key^T)
        d_qa, d_ka, d_params["v"] = additive_scores_backward(ds, energy)
        d_q = _rows(d_qa, p["W_query"])
        d_k = _rows(d_ka, p["W_key"])
        d_params["W_query"] = d_qa.reshape(B * Tq, -1).T @ q.reshape(B * Tq, -1)
        d_params["W_key"] = d_ka.reshape(B * Tk, -1).T @ k.reshape(B * Tk, -1)
        if "b" in p:
            d_params["b"] = d_qa.sum(axis=(0, 1))
        d_params = {key: d_params[key] for key in p}  # the params' own order
    return (d_q[:, 0] if single else d_q), d_k, d_values, d_params
