r"""Attention in NumPy, forward and backward by hand: four scores, one query, many, or heads.

Shapes
------
B   batch          h, h_kv  query heads, key/value heads (h_kv divides h)
Tq  query steps    Tk  key steps        Hq, Hk, Hv  query, key, value sizes (D with heads)
A   width of the additive (Bahdanau) score

Three layouts, chosen by the query's rank: query [B, Hq] (one query per row, the seed's case)
with keys [B, Tk, Hk] and values [B, Tk, Hv]; query [B, Tq, Hq] (all decoder steps at once)
with the same keys and values; query [B, h, Tq, D] with keys/values [B, h_kv, Tk, D]
(`F.scaled_dot_product_attention`'s layout). Every layout is computed as the last one, with
h = h_kv = 1 (and Tq = 1) for the first two; query head i reads kv head i // (h / h_kv)
(grouped-query attention).

Forward, per row b and head, for query i and key j
--------------------------------------------------
    s[i,j] = cap(scale * score(q_i, k_j)) + bias[i,j]                           [Tq, Tk]
        cap(x) = x, or with softcap=c: c tanh(x / c) in (-c, c)   (Gemma 2's logit softcapping;
                 ONNX Attention's softcap: after the scale, before the bias and the masks)
        "dot"        : q . k                      scale 1 by default         (Hq == Hk)
        "scaled_dot" : q . k                      scale 1/sqrt(Hk) by default
        "general"    : q^T W k = (q W) . k        W [Hq, Hk], scale 1 by default   (Luong)
        "additive"   : u . tanh(W_query q + b + W_key k)   (Bahdanau, Luong "concat"; no scale)
                       W_query [A, Hq], W_key [A, Hk], u = params["v"] [A], optional b [A]
    w[i,:] = softmax of s[i,:] over the keys query i sees                       [Tq, Tk]
    c[i]   = sum_j w[i,j] v_j                                                   [Tq, Hv]

Query i sees key j when j < lengths[b], mask[i,j] is True, j <= i (causal) and
bias[i,j] > -inf, whichever of them are given. The masked softmax puts a real -inf at the keys
a query does not see and subtracts the row max before exponentiating, so hidden keys weigh
exactly 0 and scores of any finite size give finite weights; a query that sees no key at all
gets weights 0 and context 0 (as torch's SDPA). A NaN among the visible scores makes its row
NaN. Rows that are not data (keys no query sees, queries that see no key) are replaced by
zeros before anything reads them, so NaN or inf there changes nothing (`numpy_ref.contract`).
NaN or inf in real data propagates quietly, as in torch: the arithmetic runs under
``np.errstate(invalid="ignore")`` (`checks.quiet`), so inf - inf and 0 * inf give NaN without
numpy's RuntimeWarning.

Attention is composed of public pairs, each with its own backward: the score
(`attention_scores_*`, whose additive half `additive_scores_*` takes queries and keys already
projected, for a decoder that attends step by step), `masked_softmax_*` and `weighted_sum_*`.

Backward
--------
With dc = dL/dc and an optional cotangent d_weights on the weights:

    dv    = w^T dc                                     d_values
    dw    = dc v^T + d_weights
    ds    = w * (dw - delta),   delta[i] = sum_j w[i,j] dw[i,j]        d_bias = ds (summed over
                                                                       the axes bias broadcast)
    dx    = ds * (1 - tanh(x / c)^2)   with softcap, x = scale * score (else dx = ds)
The softmax vector-Jacobian product: dw_j/ds_l = w_j (1[j=l] - w_l). Hidden keys have w = 0,
so ds = 0 there and nothing flows into them. When only the context has a cotangent (d_weights = 0),

    delta = sum_j w_j (dc . v_j) = dc . sum_j w_j v_j = <dc, c>,

FlashAttention-2's identity: delta needs the context, not the weights, which is what lets a
fused kernel recompute w from a saved log-sum-exp instead of storing it. The softcap's
derivative, d/dx c tanh(x / c) = 1 - tanh(x / c)^2, turns ds into dx (it goes to 0 where the
cap saturates, |x| >> c). The score's chain rule then gives the query and key gradients
(g = scale * dx):

    dot, scaled_dot   dq = g k                dk = g^T q
    general           with q' = q W:  dq' = g k,  dq = dq' W^T,  dW = sum q^T dq',  dk = g^T q'
    additive          qa = W_query q + b, ka = W_key k, e = tanh(qa + ka) [Tq, Tk, A], s = e u:
                      du = sum_ij ds e,   dz = ds u (1 - e^2),
                      d_qa = sum_j dz,  d_ka = sum_i dz,  db = sum d_qa,
                      dq = d_qa W_query,  dW_query = sum d_qa^T q,
                      dk = d_ka W_key,    dW_key = sum d_ka^T k

With grouped heads, a kv head's gradients are the sums over the query heads that read it.

Without the weights (need_weights=False)
----------------------------------------
The same function, computed block by block as FlashAttention does, so that nothing of size
Tq x Tk exists. Forward, for each block of query rows and then each block of keys:

    m' = max(m, max_j s_j),   p_j = exp(s_j - m'),   alpha = exp(m - m')
    l  = alpha l + sum_j p_j,   acc = alpha acc + sum_j p_j v_j,   m = m'

and c = acc / l after the last block (the online softmax). The cache keeps m and l per query;
the backward recomputes each block's weights w_j = exp(s_j - m) / l and uses
delta = <dc, c> above, so it needs no row of weights at once (with every key in one block it
sums delta from the block instead, as the softmax's own backward does: in float32 that delta
cancels the rounding of the dw it is subtracted from). Every forward, with weights or
without, reports each query's log-sum-exp m + log l as ``cache.lse``: the statistic a flash
kernel saves, to check yours against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import attention as contract
from numpy_ref.contract import checks, unchanged
from numpy_ref.contract.attention import SCORES
from numpy_ref.contract.fields import documented
from numpy_ref.precision import rounded, same_precision

__all__ = ["SCORES", "AdditiveScoresCache", "AttentionCache", "AttentionScoresCache",
           "MaskedSoftmaxCache", "WeightedSumCache", "additive_scores_backward",
           "additive_scores_forward", "attention_backward", "attention_forward",
           "attention_scores_backward", "attention_scores_forward", "masked_softmax_backward",
           "masked_softmax_forward", "weighted_sum_backward", "weighted_sum_forward"]


def _t(x: np.ndarray) -> np.ndarray:
    """Swap the last two axes."""
    return np.swapaxes(x, -1, -2)


# --------------------------------------------------------------------------------------------
# the additive score from projected queries and keys


@documented
class AdditiveScoresCache(NamedTuple):
    """What `additive_scores_backward` needs."""

    energy: np.ndarray  # [..., Tq, Tk, A]  e = tanh(qa + ka); read
    u: np.ndarray  # [A]  read: the score vector, params["v"] of attention_forward
    single_query: bool  # whether query_proj was [B, A]
    fingerprints: unchanged.Fingerprints | None = None  # u as the forward saw it; the backward
    #   checks it first (`numpy_ref.contract.unchanged`)


@same_precision()
def additive_scores_forward(
    query_proj: np.ndarray, key_proj: np.ndarray, u: np.ndarray
) -> tuple[np.ndarray, AdditiveScoresCache]:
    """``s[..., i, j] = u . tanh(query_proj[..., i, :] + key_proj[..., j, :])``: the additive
    score's second half, for queries and keys already projected (``W_query q + b``, ``W_key k``).

    query_proj : [B, A], [B, Tq, A] or [B, h, Tq, A].  key_proj : [B, Tk, A] ([B, h, Tk, A] with
    heads).  u : [A], the score vector (``params["v"]`` of `attention_forward`).  Returns
    scores [B, Tk], [B, Tq, Tk] or [B, h, Tq, Tk], and the cache.
    Derivation: the `numpy_ref.attention` module docstring.
    """
    qa, ka, u = contract.additive_scores(query_proj, key_proj, u)
    single = qa.ndim == 2
    qa = qa[:, None, :] if single else qa  # [..., Tq, A]
    with checks.quiet():
        e = np.tanh(qa[..., :, None, :] + ka[..., None, :, :])  # [..., Tq, Tk, A]
        s = e @ u  # [..., Tq, Tk]
    fingerprints = unchanged.record("additive_scores_forward", "additive_scores_backward",
                                    [("u", u)])
    return (s[:, 0] if single else s), AdditiveScoresCache(e, u, single, fingerprints)


@same_precision(backward=True)
def additive_scores_backward(
    d_scores: np.ndarray, cache: AdditiveScoresCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of `additive_scores_forward`: d_scores like the scores ->
    (d_query_proj like query_proj, d_key_proj like key_proj, d_u [A]).

    ``dz = ds u (1 - e^2)`` with ``e = tanh(qa + ka)``; ``d_qa = sum_j dz``,
    ``d_ka = sum_i dz``, ``d_u = sum_ij ds e``.
    Derivation: the `numpy_ref.attention` module docstring.
    """
    e, u, single, fingerprints = checks.cache_of(cache, AdditiveScoresCache,
                                                 "additive_scores_forward")
    unchanged.check(fingerprints)
    shape = e.shape[:-1]
    ds = contract.like("d_scores", d_scores, (shape[0], shape[2]) if single else shape,
                       e.dtype, "the scores")
    ds = ds[:, None] if single else ds  # [..., Tq, Tk]
    with checks.quiet():
        d_z = ds[..., None] * u * (1 - e * e)  # s = tanh(z) @ u, z = qa + ka
        d_qa, d_ka = d_z.sum(axis=-2), d_z.sum(axis=-3)  # [..., Tq, A], [..., Tk, A]
        d_u = contract.flat(e).T @ ds.reshape(-1)  # sum over every (row, i, j) of ds e
    return (d_qa[:, 0] if single else d_qa), d_ka, d_u


# --------------------------------------------------------------------------------------------
# the four scores


@documented
class AttentionScoresCache(NamedTuple):
    """What `attention_scores_backward` needs."""

    query: np.ndarray  # [..., Tq, Hq]  read for dW (general, additive) and dk
    keys: np.ndarray  # [..., Tk, Hk]  read for dq
    score: str  # one of SCORES
    params: dict[str, np.ndarray]  # the checked score params; read
    scale: float | None  # the dot-product scores' multiplier (None for additive)
    projected: np.ndarray | None  # general: q W [..., Tq, Hk]; None otherwise
    energy: AdditiveScoresCache | None  # additive: the tanh layer; None otherwise
    fingerprints: unchanged.Fingerprints | None = None  # query, keys and the params read, as
    #   the forward saw them; the backward checks them first (`numpy_ref.contract.unchanged`)


@same_precision()
def attention_scores_forward(
    query: np.ndarray,
    keys: np.ndarray,
    *,
    score: str = "dot",
    params: Mapping[str, np.ndarray] | None = None,
    scale: float | None = None,
) -> tuple[np.ndarray, AttentionScoresCache]:
    """The scores ``s[..., i, j] = scale * score(q_i, k_j)``: ``q . k`` (dot, scaled_dot),
    ``(q W) . k`` (general), ``v . tanh(W_query q + b + W_key k)`` (additive, no scale); the
    `numpy_ref.attention` module docstring has the table and the derivation.

    query : [B, Tq, Hq] or [B, h, Tq, Hq].  keys : [B, Tk, Hk] or [B, h, Tk, Hk] (the query's
    leading axes).  params, scale : as `attention_forward`.
    Returns scores [B, Tq, Tk] or [B, h, Tq, Tk], and the cache.
    """
    q, k, p, scale = contract.scores(query, keys, score, params, scale)
    projected = energy = None
    with checks.quiet(), unchanged.untracked():  # v: recorded below, with the others
        if score in ("dot", "scaled_dot"):
            s = (q @ _t(k)) * scale  # a Python float: float32 stays float32
        elif score == "general":
            projected = contract.matmul_rows(q, p["W"])  # q W
            s = (projected @ _t(k)) * scale
        else:
            qa = contract.matmul_rows(q, p["W_query"].T)  # [..., Tq, A]
            if "b" in p:
                qa = qa + p["b"]
            s, energy = additive_scores_forward(qa, contract.matmul_rows(k, p["W_key"].T), p["v"])
    fingerprints = unchanged.record("attention_scores_forward", "attention_scores_backward",
                                    [("query", q), ("keys", k), *contract.params_read(p)])
    return s, AttentionScoresCache(q, k, score, p, scale, projected, energy, fingerprints)


@same_precision(backward=True)
def attention_scores_backward(
    d_scores: np.ndarray, cache: AttentionScoresCache
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Backward of `attention_scores_forward`: d_scores like the scores ->
    (d_query like query, d_keys like keys, d_params with the params' keys).

    With ``g = scale * ds``: dot products ``dq = g k``, ``dk = g^T q``; general ``dq = g k W^T``,
    ``dk = g^T (q W)``, ``dW = q^T g k``; additive through
    `additive_scores_backward`. Derivation: the `numpy_ref.attention` module docstring.
    """
    q, k, score, p, scale, projected, energy, fingerprints = checks.cache_of(
        cache, AttentionScoresCache, "attention_scores_forward")
    unchanged.check(fingerprints)
    ds = contract.like("d_scores", d_scores, q.shape[:-1] + k.shape[-2:-1], q.dtype,
                       "the scores")
    d_params: dict[str, np.ndarray] = {}
    with checks.quiet():
        if score in ("dot", "scaled_dot"):  # s = scale q k^T
            g = ds * scale
            return g @ k, _t(g) @ q, d_params
        if score == "general":  # s = scale (q W) k^T
            g = ds * scale
            d_proj = g @ k
            d_params["W"] = contract.flat(q).T @ contract.flat(d_proj)
            return contract.matmul_rows(d_proj, p["W"].T), _t(g) @ projected, d_params
        d_qa, d_ka, d_params["v"] = additive_scores_backward(ds, energy)  # s(q W_q^T + b, ..)
        d_params["W_query"] = contract.flat(d_qa).T @ contract.flat(q)
        d_params["W_key"] = contract.flat(d_ka).T @ contract.flat(k)
        if "b" in p:
            d_params["b"] = contract.flat(d_qa).sum(axis=0)
        d_query = contract.matmul_rows(d_qa, p["W_query"])
        d_keys = contract.matmul_rows(d_ka, p["W_key"])
    return d_query, d_keys, {key: d_params[key] for key in p}


# --------------------------------------------------------------------------------------------
# masked softmax over the last axis


@documented
class MaskedSoftmaxCache(NamedTuple):
    """What `masked_softmax_backward` needs."""

    weights: np.ndarray  # like the scores: the softmax output; read
    lse: np.ndarray  # the scores' shape without the last axis: each row's log-sum-exp
    #                  m + log sum_j exp(s_j - m) over the keys it sees (-inf for a row that
    #                  sees none, NaN for a NaN row); not read
    fingerprints: unchanged.Fingerprints | None = None  # the returned weights as the forward
    #   made them; the backward checks them first (`numpy_ref.contract.unchanged`)


@same_precision()
def masked_softmax_forward(
    scores: np.ndarray, lengths: Any = None, *, mask: np.ndarray | None = None
) -> tuple[np.ndarray, MaskedSoftmaxCache]:
    """Softmax over the last axis of the keys each row sees: weight exactly 0 elsewhere.

    ``w_j = exp(s_j - m) / sum_l exp(s_l - m)`` over the visible keys l, with m their max (so
    no overflow); hidden keys get a real -inf before the max and exactly 0 after. Derivation:
    the `numpy_ref.attention` module docstring.

    Parameters
    ----------
    scores : [B, Tk], [B, Tq, Tk] or [B, h, Tq, Tk], float32 or float64 (may hold -inf).
    lengths : integer [B], each in 1..Tk, or None: row b sees keys j < lengths[b].
    mask : bool, broadcastable to scores (True = sees), or None.

    Returns
    -------
    weights : like scores. A row that sees no key, or whose visible scores are all -inf, is 0.
    cache.
    """
    s, lengths, mask = contract.masked_softmax(scores, lengths, mask)
    if lengths is not None:
        seen = np.arange(s.shape[-1]) < lengths.reshape((-1,) + (1,) * (s.ndim - 1))
        mask = seen if mask is None else mask & seen
    if mask is not None:
        s = np.where(mask, s, -np.inf)  # a real -inf: exp gives exactly 0
    m = s.max(axis=-1, keepdims=True)  # NaN if the row holds one: the row becomes NaN
    with checks.quiet():  # a visible +inf: inf - inf is NaN, the row's answer
        e = np.exp(s - np.where(m == -np.inf, 0, m))  # a row of -inf only: every e is 0
        total = e.sum(axis=-1, keepdims=True)
        w = e / np.where(total == 0, 1, total)
    if mask is not None:
        w = np.where(mask, w, 0)  # already 0, except in a row made NaN by a visible NaN
    w = rounded(w)  # float16/bfloat16: torch's softmax saves its output, in the dtype
    fingerprints = unchanged.record("masked_softmax_forward", "masked_softmax_backward", [],
                                    outputs=[("weights", w)])
    return w, MaskedSoftmaxCache(w, contract.log_sum_exp(m, total, w.dtype)[..., 0],
                                 fingerprints)


@same_precision(backward=True)
def masked_softmax_backward(d_weights: np.ndarray, cache: MaskedSoftmaxCache) -> np.ndarray:
    """Backward of `masked_softmax_forward`: ``d_scores = w * (dw - sum_j w_j dw_j)``.

    The softmax's vector-Jacobian product, from ``dw_j/ds_l = w_j (1[j=l] - w_l)``; dropping the
    ``sum_j w_j dw_j`` (delta) term is the classic bug. Derivation: the `numpy_ref.attention`
    module docstring.

    d_weights : like the weights. Returns d_scores, like the scores (0 where w is 0).
    """
    w = checks.cache_of(cache, MaskedSoftmaxCache, "masked_softmax_forward").weights
    unchanged.check(cache.fingerprints)
    d_weights = contract.like_weights("d_weights", d_weights, w)
    with checks.quiet():
        delta = np.sum(np.where(w == 0, 0, w * d_weights), axis=-1, keepdims=True)
        ds = w * (d_weights - delta)
    return np.where(w == 0, 0, ds)  # a hidden key (w = 0) takes and gives nothing, even NaN


# --------------------------------------------------------------------------------------------
# the context: a weighted sum of values


@documented
class WeightedSumCache(NamedTuple):
    """What `weighted_sum_backward` needs."""

    weights: np.ndarray  # [..., Tq, Tk]  read for d_values
    values: np.ndarray  # [..., Tk, Hv]  read for d_weights
    single_query: bool  # whether weights were [B, Tk]
    fingerprints: unchanged.Fingerprints | None = None  # weights and values as the forward saw
    #   them; the backward checks them first (`numpy_ref.contract.unchanged`)


@same_precision()
def weighted_sum_forward(
    weights: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, WeightedSumCache]:
    """``c[..., i, :] = sum_j w[..., i, j] v[..., j, :]``: weights [B, Tk], [B, Tq, Tk] or
    [B, h, Tq, Tk], values [B, Tk, Hv] ([B, h, Tk, Hv] with heads) -> context [B, Hv],
    [B, Tq, Hv] or [B, h, Tq, Hv], and the cache (the `numpy_ref.attention` module docstring)."""
    w, values = contract.weighted_sum(weights, values)
    single = w.ndim == 2
    w = w[:, None, :] if single else w  # [..., Tq, Tk]
    with checks.quiet():  # 0 * inf: a hidden infinite value
        c = w @ values
    fingerprints = unchanged.record("weighted_sum_forward", "weighted_sum_backward",
                                    [("weights", weights), ("values", values)])
    return (c[:, 0] if single else c), WeightedSumCache(w, values, single, fingerprints)


@same_precision(backward=True)
def weighted_sum_backward(
    d_context: np.ndarray, cache: WeightedSumCache
) -> tuple[np.ndarray, np.ndarray]:
    """Backward of `weighted_sum_forward`: d_context like the context ->
    (d_weights like the weights, d_values like the values).

    ``d_weights = dc v^T``, ``d_values = w^T dc``. Derivation: the `numpy_ref.attention`
    module docstring.
    """
    w, values, single, fingerprints = checks.cache_of(cache, WeightedSumCache,
                                                      "weighted_sum_forward")
    unchanged.check(fingerprints)
    shape = w.shape[:-1] + values.shape[-1:]
    dc = contract.like("d_context", d_context, (shape[0], shape[2]) if single else shape,
                       w.dtype, "the context")
    dc = dc[:, None] if single else dc
    with checks.quiet():
        d_w = dc @ _t(values)  # c = w @ v
        d_values = _t(w) @ dc
    return (d_w[:, 0] if single else d_w), d_values


# --------------------------------------------------------------------------------------------
# attention: score -> masked softmax -> weighted sum


@documented
class BlockwiseCache(NamedTuple):
    """What the blockwise backward (``need_weights=False``) reads: the inputs and each query
    row's softmax statistics, from which it recomputes the weights one block at a time."""

    query: np.ndarray  # [B, h, Tq, Hq]  padding rows zeroed; read
    keys: np.ndarray  # [B, h, Tk, Hk]  kv heads repeated per query head, padding zeroed; read
    values: np.ndarray  # [B, h, Tk, Hv]  likewise; read
    context: np.ndarray  # [B, h, Tq, Hv]  the output c; read for delta = <c, dc>
    row_max: np.ndarray  # [B, h, Tq]  m, each row's largest visible score; read
    row_sum: np.ndarray  # [B, h, Tq]  l = sum_j exp(s_j - m) over the visible keys; read


@documented
class AttentionCache(NamedTuple):
    """Everything `attention_backward` needs from one `attention_forward` call. Arrays are in
    the heads layout [B, h, Tq, ...] whatever the caller's (see `inputs.layout`), except lse."""

    inputs: contract.AttentionInputs  # the checked arguments (views; padding not removed)
    padding: contract.Padding  # which key and query rows are not data
    scores: AttentionScoresCache | None  # q and k (kv heads repeated per query head); read.
    #                                      None without the weights, as the next three
    softmax: MaskedSoftmaxCache | None  # the weights [B, h, Tq, Tk]; read
    context: WeightedSumCache | None  # the weights and values; read
    logits: np.ndarray | None  # [B, h, Tq, Tk] the scores after scale, softcap and bias,
    #                            before the mask and the softmax (at padding keys, the score
    #                            of the zeros that replaced them); not read by backward:
    #                            compare it with your pre-softmax scores. None without weights
    lse: np.ndarray  # [B], [B, Tq] or [B, h, Tq] (the weights' shape without Tk), the data's
    #                  dtype: each query's log-sum-exp of its visible scaled (capped, biased)
    #                  scores,
    #                  m + log sum_j exp(s_j - m) (-inf for a query that sees no key, NaN for a
    #                  NaN row); not read: compare a flash kernel's saved statistic with it
    blocks: BlockwiseCache | None  # need_weights=False: what its backward reads; else None
    fingerprints: unchanged.Fingerprints | None = None  # the caller's arrays the backward
    #   reads (query, keys, values unless copied, the params read; mask and bias without the
    #   weights) and the returned weights (the context without them), as the forward saw
    #   them; the backward checks them first (`numpy_ref.contract.unchanged`)
    softcap_tanh: np.ndarray | None = None  # [B, h, Tq, Tk] tanh(x / softcap) of the scaled
    #   scores x, with a softcap and the weights; read for dx = ds (1 - tanh^2). Else None


def _softcap(x: np.ndarray, softcap: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The scores' softcap: x -> (c tanh(x / c), tanh(x / c)) with c = softcap (the tanh is
    what the backward's derivative 1 - tanh^2 needs); (x, None) when softcap is None."""
    if softcap is None:
        return x, None
    with checks.quiet():
        t = np.tanh(x / softcap)
        return softcap * t, t


def _softcap_backward(ds: np.ndarray, t: np.ndarray | None) -> np.ndarray:
    """d/dx of c tanh(x / c) is 1 - tanh(x / c)^2: ds on the capped scores -> dx on the
    scaled ones (ds itself without a softcap, t None). ds = 0 stays exactly 0 (a hidden key,
    even where t is NaN)."""
    if t is None:
        return ds
    with checks.quiet():
        return np.where(ds == 0, ds, ds * (1 - t * t))


def _per_query_head(x: np.ndarray, group: int) -> np.ndarray:
    """[B, h_kv, T, H] -> [B, h, T, H]: kv head g serves query heads g*group .. g*group+group-1."""
    return x if group == 1 else np.repeat(x, group, axis=1)


def _per_kv_head(d: np.ndarray, group: int) -> np.ndarray:
    """The adjoint of `_per_query_head`: [B, h, T, H] -> [B, h_kv, T, H], summed per group."""
    B, h, T, H = d.shape
    if group == 1:
        return d
    with checks.quiet():  # +inf from one head, -inf from another
        return d.reshape(B, h // group, group, T, H).sum(axis=2)


@same_precision()
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
) -> tuple[np.ndarray, np.ndarray | None, AttentionCache]:
    """Attention: scores -> masked softmax over keys -> weighted sum of values.

    ``s = cap(scale * score(q, k)) + bias`` with ``cap(x) = softcap * tanh(x / softcap)`` (or
    ``x`` when softcap is None); ``w = softmax(s)`` over the keys each query sees;
    ``c = w v``. Composed of `attention_scores_forward`, `masked_softmax_forward` and
    `weighted_sum_forward`; the `numpy_ref.attention` module docstring has the math. With
    ``need_weights=False`` the same is computed block by block (FlashAttention's online
    softmax, module docstring) and no array of size Tq x Tk is formed.

    Parameters
    ----------
    query : [B, Hq] (one query per row), [B, Tq, Hq], or [B, h, Tq, D] (heads).
    keys : [B, Tk, Hk], or [B, h_kv, Tk, D] with heads (h_kv divides h).
    values : like keys with its own last size Hv (may be the same array as keys).
    score : "dot", "scaled_dot", "general" or "additive" (see the module docstring).
    params : {"W": [Hq, Hk]} for general; {"W_query": [A, Hq], "W_key": [A, Hk], "v": [A]}
        and optionally "b": [A] for additive; None for dot and scaled_dot.
    lengths : integer [B], each in 1..Tk, or None: keys j >= lengths[b] are not input.
    mask : bool, broadcastable to the weights' shape, True = attend (SDPA's bool attn_mask).
    causal : query i sees keys j <= i (SDPA's is_causal).
    scale : multiplies the dot-product scores instead of the default (1/sqrt(Hk) for
        scaled_dot, 1 otherwise); not with additive.
    bias : float, broadcastable to the weights' shape, added to the scaled scores (SDPA's float
        attn_mask; -inf hides a key); its gradient is d_params["bias"].
    need_weights : return the weights; with False, weights is None and nothing of size
        Tq x Tk exists, not in the result, the cache or a temporary of the whole problem.
    softcap : None, or c > 0 (finite): the scaled scores x become ``c * tanh(x / c)``, in
        (-c, c), before the bias and the masks (ONNX Attention's order; Gemma 2's logit
        softcapping). Every score, the additive one included (its scale is 1); the backward
        multiplies by ``1 - tanh(x / c)^2``.

    Returns
    -------
    context : [B, Hv], [B, Tq, Hv] or [B, h, Tq, Dv].  weights : [B, Tk], [B, Tq, Tk] or
    [B, h, Tq, Tk] (0 at hidden keys; a query that sees no key has weights and context 0), or
    None.  cache : its ``lse`` holds each query's log-sum-exp, whatever need_weights is, and
    ``logits`` [B, h, Tq, Tk] (the heads layout, whatever the caller's) the scores after
    scale, softcap and bias, before the masks (None without the weights).
    """
    a = contract.validate_attention(query, keys, values, score, params, lengths, mask, causal,
                                    scale, bias, need_weights, softcap)
    if not a.need_weights:
        pad = contract.padding_by_blocks(a)
        with unchanged.untracked():  # the blocks' scores: recorded below, once
            c, blocks = _forward_by_blocks(a, pad)
        lse = contract.log_sum_exp(blocks.row_max, blocks.row_sum, blocks.query.dtype)
        context = a.to_user(c)
        fingerprints = unchanged.record("attention_forward", "attention_backward", [
            ("query", unchanged.shared(query, blocks.query)),
            ("keys", unchanged.shared(keys, blocks.keys)),
            ("values", unchanged.shared(values, blocks.values)),
            ("mask", unchanged.shared(mask, a.mask)), ("bias", unchanged.shared(bias, a.bias)),
            *contract.params_read(a.params)], outputs=[("context", context)])
        cache = AttentionCache(a, pad, None, None, None, None, contract.row_statistic(a, lse),
                               blocks, fingerprints)
        return context, None, cache
    visible = contract.visibility(a)
    pad = contract.padding(a, visible)
    q = contract.without_padding(a.query, pad.queries)  # [B, h, Tq, Hq]
    k = _per_query_head(contract.without_padding(a.keys, pad.keys), a.group)  # [B, h, Tk, Hk]
    v = _per_query_head(contract.without_padding(a.values, pad.keys), a.group)
    with unchanged.untracked():  # the three pairs' arrays: recorded below, once
        s, scores = attention_scores_forward(q, k, score=score, params=a.params, scale=a.scale)
        s, tanh = _softcap(s, a.softcap)  # s = c tanh(s / c)
        if a.bias is not None:
            with checks.quiet():  # an infinite score plus the opposite infinite bias
                s = s + a.bias
        w, softmax = masked_softmax_forward(s, mask=visible)
        c, weighted = weighted_sum_forward(w, v)  # [B, h, Tq, Hv]
    c = contract.without_padding(c, pad.queries)  # 0 * (a value another query sees) may be NaN
    weights = a.to_user(w)
    fingerprints = unchanged.record("attention_forward", "attention_backward", [
        ("query", unchanged.shared(query, q)), ("keys", unchanged.shared(keys, k)),
        ("values", unchanged.shared(values, v)), *contract.params_read(a.params)],
        outputs=[("weights", weights)])
    cache = AttentionCache(a, pad, scores, softmax, weighted, s,
                           contract.row_statistic(a, softmax.lse), None, fingerprints, tanh)
    return a.to_user(c), weights, cache


@same_precision(backward=True)
def attention_backward(
    d_context: np.ndarray,
    cache: AttentionCache,
    *,
    d_weights: np.ndarray | None = None,
    sum_kv: bool = False,
    out: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Backward of `attention_forward`.

    ``dv = w^T dc``; ``dw = dc v^T + d_weights``; ``ds = w (dw - delta)`` with
    ``delta_i = sum_j w_ij dw_ij``; with a softcap ``dx = ds (1 - tanh(x / c)^2)``; then the
    score's chain rule for dq, dk from dx (and ``d_bias = ds``
    summed over bias's broadcast axes). Derivation: the `numpy_ref.attention` module docstring.
    After a forward with ``need_weights=False`` the same gradients are computed block by block,
    the weights recomputed from each row's saved max and sum, with ``delta_i = <c_i, dc_i>``.

    Parameters
    ----------
    d_context : like the context.
    d_weights : optional cotangent on the returned weights (like them), for a loss on the
        alignment itself; it adds to the gradient. Not after need_weights=False.
    sum_kv : return d_keys + d_values as d_keys and None as d_values (keys and values of one
        shape, e.g. the seed's keys-is-values): one array instead of two.
    out : optional (d_query, d_keys, d_values) buffers, each a C-contiguous array shaped like
        the gradient or None; gradients are written there and the buffers returned. With
        sum_kv the sum goes to out[1] and out[2] must be None.

    Returns
    -------
    d_query : like query.  d_keys : like keys.  d_values : like values, or None with sum_kv.
    d_params : the score params' keys ({} for dot and scaled_dot), and "bias" (bias's shape)
    when a bias was given.
    """
    a, pad, scores, softmax, weighted, _, _, blocks, fingerprints, tanh = checks.cache_of(
        cache, AttentionCache, "attention_forward")
    unchanged.check(fingerprints)
    sum_kv, out = contract.gradient_outputs(a, sum_kv, out, d_context, d_weights)
    # in the core's layout; d_weights is None when only the context has a cotangent
    dc, d_weights = contract.attention_cotangents(a, d_context, d_weights, a.values.shape[3])
    if blocks is not None:
        with unchanged.untracked():  # the blocks' scores, computed again
            d_query, d_keys, d_values, d_params = _backward_by_blocks(a, blocks, dc)
    else:
        d_w, d_values = weighted_sum_backward(dc, weighted)  # c = w @ v
        if d_weights is not None:
            with checks.quiet():
                d_w = d_w + d_weights  # dw = dc v^T + d_weights
        ds = masked_softmax_backward(d_w, softmax)  # 0 at hidden keys
        d_query, d_keys, d_params = attention_scores_backward(_softcap_backward(ds, tanh),
                                                              scores)
        if a.bias is not None:  # s = scores + bias
            with checks.quiet():
                d_params["bias"] = contract.reduce_to(a.to_user(ds), a.bias_shape)
    d_query = contract.without_padding(d_query, pad.queries)
    d_keys, d_values = _per_kv_head(d_keys, a.group), _per_kv_head(d_values, a.group)
    # padding rows got 0 * (a NaN of a query row, or of dc): they are 0 by definition
    d_keys = contract.without_padding(d_keys, pad.keys)
    d_values = contract.without_padding(d_values, pad.keys)
    d_query, d_keys, d_values = contract.deliver(a, d_query, d_keys, d_values, sum_kv, out)
    return d_query, d_keys, d_values, d_params


# --------------------------------------------------------------------------------------------
# attention without the weights: block by block
#
# The same function of the inputs, computed as FlashAttention does, so that nothing of size
# Tq x Tk is ever formed: for each block of query rows, a pass over blocks of keys keeps each
# row's running max m, running sum l and unnormalised context acc, rescaled whenever a block
# raises the max (the online softmax of Milakov and Gimelshein); the backward recomputes each
# block's weights from the saved m and l, and takes delta from the context (module docstring).
# Each block's scores come from the public score pair, so every score works and its chain
# rule is the one above. The block sizes change only the order in which sums are rounded.

BLOCK_QUERIES = 128  # query rows per block
BLOCK_KEYS = 256  # keys per block


def _block_scores(a: contract.AttentionInputs, q: np.ndarray, k: np.ndarray, rows: slice,
                  cols: slice, visible: np.ndarray | None
                  ) -> tuple[np.ndarray, AttentionScoresCache, np.ndarray | None]:
    """The scaled, capped, biased scores of one block [B, h, rows, cols], -inf at the keys a
    query does not see; `visible` is `contract.visibility(a, rows=rows)` (None: all seen).
    Also the score's cache and the softcap's tanh(x / c) of the block (None without one)."""
    s, scores = attention_scores_forward(q[:, :, rows], k[:, :, cols], score=a.score,
                                         params=a.params, scale=a.scale)
    s, tanh = _softcap(s, a.softcap)
    if a.bias is not None:
        s = s + a.bias[:, :, rows, cols]
    if visible is not None:
        s = np.where(visible if visible.shape[3] == 1 else visible[..., cols], s, -np.inf)
    return s, scores, tanh


@checks.quiet()  # arithmetic only: NaN and inf in real data propagate quietly
def _forward_by_blocks(a: contract.AttentionInputs, pad: contract.Padding
                       ) -> tuple[np.ndarray, BlockwiseCache]:
    """The context [B, h, Tq, Hv] and the blockwise cache. Per block of keys, for each row::

        s     = the block's scores (-inf where hidden)
        m'    = max(m, max_j s_j);   alpha = exp(m - m');   p_j = exp(s_j - m')
        l     = alpha l + sum_j p_j;   acc = alpha acc + sum_j p_j v_j;   m = m'

    and at the end c = acc / l (0 for a row that sees no key, l = 0)."""
    q = contract.without_padding(a.query, pad.queries)
    k = _per_query_head(contract.without_padding(a.keys, pad.keys), a.group)
    v = _per_query_head(contract.without_padding(a.values, pad.keys), a.group)
    B, h, Tq, _ = q.shape
    Tk, Hv = k.shape[2], v.shape[3]
    dtype = q.dtype
    context = np.empty((B, h, Tq, Hv), dtype)
    row_max, row_sum = np.empty((B, h, Tq), dtype), np.empty((B, h, Tq), dtype)
    for i0 in range(0, Tq, BLOCK_QUERIES):
        rows = slice(i0, min(i0 + BLOCK_QUERIES, Tq))
        visible = contract.visibility(a, rows=rows)
        n = rows.stop - i0
        m = np.full((B, h, n, 1), -np.inf, dtype)
        l = np.zeros((B, h, n, 1), dtype)
        acc = np.zeros((B, h, n, Hv), dtype)
        for j0 in range(0, Tk, BLOCK_KEYS):
            cols = slice(j0, min(j0 + BLOCK_KEYS, Tk))
            s, _, _ = _block_scores(a, q, k, rows, cols, visible)
            m_new = np.maximum(m, s.max(axis=-1, keepdims=True))  # NaN stays NaN
            shift = np.where(m_new == -np.inf, 0, m_new)  # a row that has seen no key yet
            alpha = np.exp(m - shift)
            p = np.exp(s - shift)  # exactly 0 at hidden keys
            l = alpha * l + p.sum(axis=-1, keepdims=True)
            acc = alpha * acc + rounded(p) @ v[:, :, cols]  # float16/bf16: p in the dtype
            m = m_new
        context[:, :, rows] = acc / np.where(l == 0, 1, l)
        row_max[:, :, rows], row_sum[:, :, rows] = m[..., 0], l[..., 0]
    context = contract.without_padding(context, pad.queries)
    return context, BlockwiseCache(q, k, v, context, row_max, row_sum)


@checks.quiet()  # arithmetic only: NaN and inf in real data propagate quietly
def _backward_by_blocks(a: contract.AttentionInputs, blocks: BlockwiseCache, dc: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """d_query [B, h, Tq, Hq], d_keys, d_values [B, h, Tk, ...] (per query head) and d_params,
    block by block: the block's weights p_j = exp(s_j - m) / l, then the weighted sum's and
    the score's own backward, with the softmax's delta_i = <c_i, dc_i> (FlashAttention-2), or
    sum_j p_j dp_j when every key is in one block; with a softcap, ds times 1 - tanh^2."""
    q, k, v, c, m, l = blocks
    Tq, Tk = q.shape[2], k.shape[2]
    one_block = Tk <= BLOCK_KEYS
    delta = np.sum(c * dc, axis=-1, keepdims=True)  # [B, h, Tq, 1]
    seen = l != 0  # rows that see a key; the others have p = 0 everywhere
    m = np.where(seen, m, 0)[..., None]
    l = np.where(seen, l, 1)[..., None]
    d_query, d_keys, d_values = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    d_params: dict[str, np.ndarray] = {}
    bias_grad = None if a.bias is None else np.zeros(contract.compact(a.bias).shape, q.dtype)
    for i0 in range(0, Tq, BLOCK_QUERIES):
        rows = slice(i0, min(i0 + BLOCK_QUERIES, Tq))
        visible = contract.visibility(a, rows=rows)
        for j0 in range(0, Tk, BLOCK_KEYS):
            cols = slice(j0, min(j0 + BLOCK_KEYS, Tk))
            s, scores, tanh = _block_scores(a, q, k, rows, cols, visible)
            p = np.exp(s - m[:, :, rows]) / l[:, :, rows]  # the forward's weights
            if visible is not None:  # exactly 0 at hidden keys, also in a row made NaN
                p = np.where(visible if visible.shape[3] == 1 else visible[..., cols], p, 0)
            dp, dv = weighted_sum_backward(dc[:, :, rows], WeightedSumCache(p, v[:, :, cols],
                                                                             False))
            d_values[:, :, cols] += dv
            # the softmax's VJP; with one block of keys, delta is summed from the dp it is
            # taken from (masked_softmax_backward's way), which cancels dp's rounding when one
            # key dominates (ds ~ 0): <c, dc> would leave float32's rounding of c in ds
            d = np.sum(np.where(p == 0, 0, p * dp), axis=-1, keepdims=True) if one_block \
                else delta[:, :, rows]
            ds = np.where(p == 0, 0, p * (dp - d))
            # float16/bfloat16: ds rounded before its products, as torch's flash backward
            dq, dk, dpar = attention_scores_backward(rounded(_softcap_backward(ds, tanh)),
                                                     scores)
            d_query[:, :, rows] += dq
            d_keys[:, :, cols] += dk
            for key, g in dpar.items():
                d_params[key] = d_params[key] + g if key in d_params else g
            if bias_grad is not None:  # s = scores + bias: ds summed where bias broadcast
                axes = tuple(i for i, n in enumerate(bias_grad.shape) if n == 1)
                target = (slice(None), slice(None), rows if bias_grad.shape[2] > 1 else
                          slice(None), cols if bias_grad.shape[3] > 1 else slice(None))
                bias_grad[target] += ds.sum(axis=axes, keepdims=True)
    if bias_grad is not None:
        d_params["bias"] = contract.reduce_to(a.to_user(bias_grad), a.bias_shape)
    return d_query, d_keys, d_values, d_params
