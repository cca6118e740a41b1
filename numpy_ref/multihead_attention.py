r"""`torch.nn.MultiheadAttention` in NumPy, forward and backward by hand, on the attention core.

Shapes
------
N  batch      Tq  query (target) steps      Tk  key/value (source) steps
E  embed_dim  h  num_heads                 d  = E / h, the head size
kdim, vdim  the key's and value's sizes (E unless the params hold q/k/v_proj_weight)
(torch's documentation calls Tq and Tk L and S; here L is kept for the recurrent layers' count)

Arrays are [N, Tq, E] with batch_first=True, [Tq, N, E] otherwise, or unbatched [Tq, E] (a batch
of one); key [N, Tk, kdim] and value [N, Tk, vdim] likewise. Params are the module's state_dict:
``in_proj_weight`` [3E, E] = [W_q; W_k; W_v] (or ``q_proj_weight`` [E, E], ``k_proj_weight``
[E, kdim], ``v_proj_weight`` [E, vdim]), ``in_proj_bias`` [3E] = [b_q; b_k; b_v],
``out_proj.weight`` W_o [E, E], ``out_proj.bias`` b_o [E] (no biases when bias=False).

Forward
-------
    q = query W_q^T + b_q,   k = key W_k^T + b_k,   v = value W_v^T + b_v       [.., E]
    split heads:  q -> Q [N, h, Tq, d],  k -> K [N, h, Tk, d],  v -> V [N, h, Tk, d]
                  (feature e = head * d + i, as torch's view(..., h, d))
    per row n and head:
        s = Q K^T / sqrt(d) + bias                                             [Tq, Tk]
        w = softmax of s over the keys the query may see                       [Tq, Tk]
        C = w V                                                                [Tq, d]
    merge heads:  C [N, h, Tq, d] -> c [.., E]
    output = c W_o^T + b_o                                                     [.., E]
    weights = mean over heads of w [N, Tq, Tk] (average_attn_weights), or w [N, h, Tq, Tk]

The middle is the attention core's "scaled_dot" score in its heads layout
(`attention_forward(Q, K, V, score="scaled_dot", scale=sqrt(1/d), mask=, bias=, causal=)`);
the projections are `linear_forward` pairs. Masks keep torch's meaning: True in a bool
key_padding_mask [N, Tk] or attn_mask ([Tq, Tk] or [N*h, Tq, Tk]) means NOT allowed, so a bool
mask becomes the core's `mask` inverted; a float mask is added to the scores, the core's `bias`.
`is_causal` is torch's hint that attn_mask is the causal mask: an attn_mask is required, and,
as torch, it is replaced by the causal mask (query i sees keys j <= i) only when there is no
key_padding_mask and need_weights is False (where torch hands the hint to SDPA); otherwise the
attn_mask given is used.

Backward
--------
With dO = dL/d output and an optional cotangent d_weights on the returned weights:

    d_c   = dO W_o,   dW_o = sum dO^T c,   db_o = sum dO                 (out_proj)
    d_C   = d_c split into heads                                          [N, h, Tq, d]
    d_weights per head = d_weights / h when the weights were averaged, else d_weights
    dQ, dK, dV = the core's backward of (d_C, d_weights per head): dV = w^T d_C,
                 ds = w * (dw - delta) with dw = d_C V^T + d_weights per head,
                 dQ = ds K / sqrt(d), dK = ds^T Q / sqrt(d)
    d_q, d_k, d_v = dQ, dK, dV merged back to [.., E]
    d_query = d_q W_q,  dW_q = sum d_q^T query,  db_q = sum d_q   (and k, v likewise)
    d_in_proj_weight = [dW_q; dW_k; dW_v],  d_in_proj_bias = [db_q; db_k; db_v]

d_query, d_key and d_value are returned apiece, also for self-attention (query is key is
value), where torch's one tensor gets their sum.

Difference from torch: a query that may see no key at all
----------------------------------------------------------
torch's MultiheadAttention with need_weights=True takes the softmax of a row of -inf and
returns NaN there (output, weights, and every gradient it reaches, the parameters' included).
Here, as in the attention core, such a query gets weights 0 and attention 0, so its output is
``out_proj.bias`` (0 without biases) and it passes no gradient to the keys, values or in-
projections. This is what torch's need_weights=False path (SDPA) gives. Rows whose query sees
at least one key agree with torch on both paths.

Padding and bad values
----------------------
A key/value row that no query of any head may see (the masks hide it from every query) is
padding, and so is a query row that may see no key in any head: they are replaced by zeros
before anything reads them, the in-projections included (their ``dW_k = sum d_k^T key`` would
turn a NaN there into NaN weight gradients), and their rows of d_query, d_key and d_value are 0.
Whatever they hold changes nothing, bit for bit, against zeros there.
NaN or inf in real data propagates quietly (as NaN, without numpy's RuntimeWarning), as in
torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks, unchanged
from numpy_ref.contract import multihead_attention as contract
from numpy_ref.contract.attention import without_padding
from numpy_ref.contract.backend import op_module
from numpy_ref.contract.fields import documented
from numpy_ref.contract.multihead_attention import MultiheadAttentionInputs
from numpy_ref.precision import same_precision

__all__ = ["MultiheadAttentionCache", "multihead_attention_backward",
           "multihead_attention_forward"]


@documented
class MultiheadAttentionCache(NamedTuple):
    """What `multihead_attention_backward` needs from one forward call."""

    backend: ModuleType  # the op module the forward ran on; the backward runs on it too
    inputs: MultiheadAttentionInputs  # the checked arguments and options (views)
    projections: tuple[Any, Any, Any]  # the q, k, v in-projections' linear caches
    attention: Any  # the core's cache: Q [N, h, Tq, d], K and V [N, h, Tk, d]; read
    out_proj: Any  # out_proj's linear cache (the merged attention c [.., E]); read
    arguments: tuple[tuple[str, np.ndarray, bool], ...]  # the caller's arrays (query, key,
    #   value, params, masks) and the returned weights by name: an array the ops' checks find
    #   changed since the forward is named so (`numpy_ref.contract.unchanged`)


def _split_heads(x: np.ndarray, a: MultiheadAttentionInputs) -> np.ndarray:
    """[N, T, E] or [T, N, E] (a's layout) -> [N, h, T, d], a view."""
    x = x.reshape(*x.shape[:2], a.num_heads, a.head_dim)
    return x.transpose(0, 2, 1, 3) if a.batch_first else x.transpose(1, 2, 0, 3)


def _merge_heads(x: np.ndarray, a: MultiheadAttentionInputs) -> np.ndarray:
    """[N, h, T, d] -> [N, T, E] or [T, N, E] (a's layout), the inverse of `_split_heads`."""
    x = x.transpose(0, 2, 1, 3) if a.batch_first else x.transpose(2, 0, 1, 3)
    return x.reshape(*x.shape[:2], a.num_heads * a.head_dim)


@unchanged.memoized()  # the ops' fingerprints: each array once (one query for q, k and v)
@same_precision()
def multihead_attention_forward(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    num_heads: int,
    key_padding_mask: np.ndarray | None = None,
    attn_mask: np.ndarray | None = None,
    is_causal: bool = False,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    batch_first: bool = True,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, np.ndarray | None, MultiheadAttentionCache]:
    """`torch.nn.MultiheadAttention(E, num_heads, bias=, kdim=, vdim=, batch_first=)` forward
    (no dropout, add_bias_kv or add_zero_attn), with the module's state_dict as params.

    ``Q, K, V = split_heads(query W_q^T + b_q, key W_k^T + b_k, value W_v^T + b_v)``;
    ``C = softmax(Q K^T / sqrt(d) + mask) V`` per head; ``output = merge(C) W_o^T + b_o``. The
    shapes and the masks' meaning: the `numpy_ref.multihead_attention` module docstring.

    Parameters
    ----------
    query : [N, Tq, E] (batch_first), [Tq, N, E], or unbatched [Tq, E]; float32 or float64.
    key : [N, Tk, kdim], [Tk, N, kdim] or [Tk, kdim], the query's layout and dtype.
    value : [N, Tk, vdim], [Tk, N, vdim] or [Tk, vdim] (may be the same array as key or query).
    params : ``in_proj_weight`` [3E, E] (kdim == vdim == E), or ``q_proj_weight`` [E, E],
        ``k_proj_weight`` [E, kdim], ``v_proj_weight`` [E, vdim]; ``out_proj.weight`` [E, E];
        with bias=True also ``in_proj_bias`` [3E] and ``out_proj.bias`` [E].
    num_heads : h, a divisor of E.
    key_padding_mask : [N, Tk] ([Tk] unbatched), bool (True = a padding key, not attended) or
        float (added to the scores), or None.
    attn_mask : [Tq, Tk] or [N*num_heads, Tq, Tk] ([num_heads, Tq, Tk] unbatched), bool (True = not
        allowed to attend) or float (added), or None.
    is_causal : torch's hint that attn_mask is the causal mask (attn_mask required); see the
        module docstring for where it takes effect.
    need_weights : return the weights (else None; the core then forms nothing of size Tq x Tk:
        its flash path, as torch's SDPA).
    average_attn_weights : weights averaged over heads [N, Tq, Tk], else per head [N, h, Tq, Tk].
    batch_first : whether batched arrays are [N, Tq, E] rather than [Tq, N, E] (ignored for
        unbatched inputs).
    backend : the op module the linear layers and the attention core run on (`numpy_ref`, the
        default when None, or `kernels`).

    Returns
    -------
    output : like query, with last size E.
    weights : [N, Tq, Tk] or [N, num_heads, Tq, Tk] (without N when unbatched), whatever
        batch_first is; None when need_weights is False. A query that sees no key gets
        weights 0 and output out_proj.bias, where torch gives NaN (module docstring).
    cache.
    """
    backend = op_module(backend)
    a = contract.multihead_attention(query, key, value, params, num_heads, key_padding_mask,
                                     attn_mask, is_causal, need_weights, average_attn_weights,
                                     batch_first)
    # padding rows are zeros before anything reads them, the projections included (a copy only
    # when there is padding)
    inputs = (without_padding(a.query, a.real_queries), without_padding(a.key, a.real_keys),
              without_padding(a.value, a.real_keys))
    projected, proj_caches = [], []
    for x, p in zip(inputs, a.projections, strict=True):
        with checks.quiet():
            y, c = backend.linear_forward(x, p)  # [.., E]
        projected.append(_split_heads(y, a))  # [N, h, T, d]
        proj_caches.append(c)
    context, weights, att_cache = backend.attention_forward(
        *projected, score="scaled_dot", scale=contract.scale(a.head_dim), mask=a.mask,
        bias=a.bias, causal=a.causal, need_weights=a.need_weights)  # [N, h, Tq, d], [N, h, Tq, Tk]
    with checks.quiet():
        output, out_cache = backend.linear_forward(_merge_heads(context, a), a.out_proj)
    if not a.batched:
        output = output[0]
    if a.need_weights:
        if a.average_attn_weights:
            weights = weights.mean(axis=1)  # [N, Tq, Tk]
        weights = weights if a.batched else weights[0]
    named = unchanged.names({"query": query, "key": key, "value": value, "params": params,
                             "key_padding_mask": key_padding_mask, "attn_mask": attn_mask},
                            {"weights": weights})
    cache = MultiheadAttentionCache(backend, a, tuple(proj_caches), att_cache, out_cache, named)
    return output, weights, cache


@same_precision(backward=True)
def multihead_attention_backward(
    d_output: np.ndarray,
    cache: MultiheadAttentionCache,
    *,
    d_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Backward of `multihead_attention_forward`: out_proj's backward, the heads merged back,
    the core's `attention_backward`, then the three in-projections' (the
    `numpy_ref.multihead_attention` module docstring): ``d_c = d_output W_o``,
    ``dW_o = d_output^T c``, then ``dQ, dK, dV = attention_backward(split(d_c))``.

    Parameters
    ----------
    d_output : like the output.
    d_weights : optional cotangent on the returned weights, like them ([N, Tq, Tk] averaged:
        divided among the heads; [N, num_heads, Tq, Tk] per head); only when need_weights was
        True.

    Returns
    -------
    d_query : like query.  d_key : like key.  d_value : like value (each its own gradient,
    also when the forward got one array for several of them: sum them then).
    d_params : the params' keys, in their order, each shaped like its param.
    """
    backend, a, proj_caches, att_cache, out_cache, named = checks.cache_of(
        cache, MultiheadAttentionCache, "multihead_attention_forward")
    # an input or output changed since the forward: each op's backward checks the arrays it
    # references first; the error names them as the caller passed them
    with unchanged.reported_as("multihead_attention_forward", "multihead_attention_backward",
                               named), unchanged.memoized():
        return _backward(backend, a, proj_caches, att_cache, out_cache, d_output, d_weights)


def _backward(backend, a, proj_caches, att_cache, out_cache, d_output, d_weights):
    """`multihead_attention_backward` on the cache's fields: out_proj's backward, the core's,
    the in-projections'."""
    d_output, d_weights = contract.cotangents(a, d_output, d_weights)  # the core's layout
    with checks.quiet():
        d_c, d_out = backend.linear_backward(d_output, out_cache)  # output = out_proj(c)
    d_heads = backend.attention_backward(_split_heads(d_c, a), att_cache, d_weights=d_weights)[:3]
    d_inputs, d_proj = [], []
    real = (a.real_queries, a.real_keys, a.real_keys)
    for d, c, r in zip(d_heads, proj_caches, real, strict=True):  # Q, K, V = split(x W^T + b)
        with checks.quiet():
            d_x, d_p = backend.linear_backward(_merge_heads(d, a), c)
        d_x = without_padding(d_x, r)  # 0 in padding rows (0 * an inf weight is NaN there)
        d_inputs.append(d_x if a.batched else d_x[0])
        d_proj.append(d_p)
    grads = {"out_proj.weight": d_out["weight"]}
    if "bias" in d_out:
        grads["out_proj.bias"] = d_out["bias"]
        grads["in_proj_bias"] = np.concatenate([d["bias"] for d in d_proj])
    if a.packed:
        grads["in_proj_weight"] = np.concatenate([d["weight"] for d in d_proj])
    else:
        for name, d in zip(contract.SEPARATE, d_proj, strict=True):
            grads[name] = d["weight"]
    return d_inputs[0], d_inputs[1], d_inputs[2], {k: grads[k] for k in a.keys}
