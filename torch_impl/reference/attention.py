"""Attention in torch ops, every layout and option of `numpy_ref.attention_forward`.

Layouts (the query's rank decides, as in numpy_ref): one query per row ``query [B, Hq]``,
``keys/values [B, Tk, H]``; many queries ``query [B, Tq, Hq]``; heads ``query [B, h, Tq, D]``,
``keys/values [B, h_kv, Tk, D]`` (grouped-query when h_kv < h). Internally every layout is the
heads one, [B, h, Tq, X], with h = h_kv = 1 for the first two.

    s = scale * score(q, k) + bias          [B, h, Tq, Tk]
    s = -inf where the query does not see the key (lengths AND mask AND causal)
    w = softmax(s), and 0 in a row that sees no key (as SDPA gives it)
    c = w v

``path="explicit"`` computes exactly that and returns ``(context, weights)``;
``path="sdpa"`` hands the dot-product scores (dot, scaled_dot, and general as SDPA on ``q W``)
to ``F.scaled_dot_product_attention`` and returns ``(context, None)``: ``mask`` is its bool
``attn_mask`` (in the heads layout in its own broadcast shape when it is the only condition),
``bias`` its float ``attn_mask``, ``causal`` alone its ``is_causal``, and ``lengths`` (which has
no SDPA argument) a bool mask; SDPA refuses ``is_causal`` beside ``attn_mask``, so causal with
another condition becomes one combined mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

PATHS = ("explicit", "sdpa")


def to_heads(x: Any, layout: str) -> Any:
    """A tensor or array in the caller's layout -> [B, h, Tq, X] (a view).

    layout: "single" ([B, X]), "steps" ([B, Tq, X]) or "heads" (as it is)."""
    if layout == "single":
        return x[:, None, None]
    return x[:, None] if layout == "steps" else x


def from_heads(x: Any, layout: str) -> Any:
    """The inverse of `to_heads`: [B, h, Tq, X] -> the caller's layout (h = Tq = 1 for
    single, h = 1 for steps)."""
    if layout == "single":
        return x[:, 0, 0]
    return x[:, 0] if layout == "steps" else x


def _layout(query: torch.Tensor) -> str:
    try:
        return {2: "single", 3: "steps", 4: "heads"}[query.dim()]
    except KeyError:
        raise ValueError(f"query: expected rank 2, 3 or 4, got shape {tuple(query.shape)}"
                         ) from None


def attention_scores(query: torch.Tensor, keys: torch.Tensor, *, score: str = "dot",
                     params: Mapping[str, torch.Tensor] | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """torch's answer for `numpy_ref.attention_scores_forward`: ``scale * score(q, k)``.

    query [..., Tq, Hq], keys [..., Tk, Hk] with the same leading axes ([B] or [B, h]);
    params as for `attention`; scale None: 1/sqrt(Hk) for scaled_dot, 1 otherwise (not with
    additive). Returns s [..., Tq, Tk].
    """
    params = {} if params is None else params
    if score == "additive":  # v . tanh(W_query q + b + W_key k)
        qa = F.linear(query, params["W_query"], params.get("b"))  # [..., Tq, A]
        ka = F.linear(keys, params["W_key"])  # [..., Tk, A]
        return torch.tanh(qa.unsqueeze(-2) + ka.unsqueeze(-3)) @ params["v"]
    if scale is None:
        scale = 1.0 / math.sqrt(keys.shape[-1]) if score == "scaled_dot" else 1.0
    core = query @ params["W"] if score == "general" else query
    s = core @ keys.transpose(-1, -2)
    return s if scale == 1.0 else s * scale


def attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    score: str = "dot",
    params: Mapping[str, torch.Tensor] | None = None,
    lengths: Any = None,
    mask: Any = None,
    causal: bool = False,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    path: str = "explicit",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's answer for `numpy_ref.attention_forward` with the same arguments.

    query [B, Hq] / [B, Tq, Hq] / [B, h, Tq, D]; keys, values [B, Tk, H] / [B, h_kv, Tk, D]
    (values may be keys itself: one leaf, whose gradient is then d_keys + d_values);
    params {"W": [Hq, Hk]} (general) or {"W_query": [A, Hq], "W_key": [A, Hk], "v": [A],
    "b": [A] optional} (additive); lengths int [B]; mask bool and bias float, each
    broadcastable to the weights' shape; all tensors on one device, in one float dtype.
    Returns context [B, Hv] / [B, Tq, Hv] / [B, h, Tq, Dv] and the weights [B, Tk] /
    [B, Tq, Tk] / [B, h, Tq, Tk] (None with ``path="sdpa"``). Operations are only added for
    the options given, so that a benchmark row of torch times what a torch user would write.
    """
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if path == "sdpa" and score == "additive":
        raise ValueError("path='sdpa': the additive score has no SDPA form")
    params = {} if params is None else params
    layout = _layout(query)
    device = query.device
    q = to_heads(query, layout)  # [B, h, Tq, Hq]
    k, v = (keys, values) if layout == "heads" else (keys[:, None], values[:, None])
    B, h, Tq, _ = q.shape
    h_kv, Tk = k.shape[1], k.shape[2]
    group = h // h_kv
    weights_shape = {"single": (B, Tk), "steps": (B, Tq, Tk), "heads": (B, h, Tq, Tk)}[layout]
    if scale is None:
        scale = 1.0 / math.sqrt(k.shape[-1]) if score == "scaled_dot" else 1.0

    # which keys each query sees: lengths AND mask AND causal, broadcastable to [B, h, Tq, Tk]
    visible = None
    parts = []
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=device)
        parts.append((torch.arange(Tk, device=device) < lengths[:, None])[:, None, None])
    if mask is not None:
        mask = torch.as_tensor(mask, device=device)
        parts.append(to_heads(mask.expand(weights_shape), layout))
    if causal:
        parts.append(torch.arange(Tk, device=device) <= torch.arange(Tq, device=device)[:, None])
    for part in parts:
        visible = part if visible is None else visible & part
    bias4 = None if bias is None else to_heads(bias.expand(weights_shape), layout)

    if path == "explicit":
        k_rep, v_rep = ((k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))
                        if group > 1 else (k, v))
        s = attention_scores(q, k_rep, score=score, params=params, scale=scale)
        if bias4 is not None:
            s = s + bias4
        if visible is not None:
            s = s.masked_fill(~visible, float("-inf"))
        w = torch.softmax(s, dim=-1)
        if mask is not None or bias is not None:  # a query may see no key: weights 0, not NaN
            sees = torch.ones((), dtype=torch.bool, device=device) if visible is None else visible
            if bias4 is not None:
                sees = sees & (bias4 != float("-inf"))
            w = torch.where(sees.expand(s.shape).any(dim=-1, keepdim=True), w, 0.0)
        return from_heads(w @ v_rep, layout), from_heads(w, layout)

    core = q @ params["W"] if score == "general" else q
    kw: dict[str, Any] = {"scale": scale, "enable_gqa": group > 1}
    if causal and lengths is None and mask is None and bias is None:
        kw["is_causal"] = True
    elif bias is None:
        if layout == "heads" and mask is not None and lengths is None and not causal:
            kw["attn_mask"] = mask[None] if mask.dim() == 1 else mask  # SDPA refuses 1-D masks
        elif visible is not None:
            kw["attn_mask"] = visible
    elif visible is None:
        kw["attn_mask"] = (bias[None] if bias.dim() == 1 else bias) if layout == "heads" \
            else bias4
    else:
        kw["attn_mask"] = bias4 + torch.where(visible, 0.0, float("-inf")).to(bias.dtype)
    context = F.scaled_dot_product_attention(core, k, v, **kw)
    return from_heads(context, layout), None
