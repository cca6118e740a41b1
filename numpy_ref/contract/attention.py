"""Validation of the attention family's arguments (see `numpy_ref.attention`); `kernels`
calls the same functions, so both backends reject the same inputs with the same messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from numpy_ref import _checks

SCORES = ("dot", "scaled_dot", "general", "additive")

_WEIGHT_RANKS = (("B", "Tk"), ("B", "Tq", "Tk"))


def validate_attention(query, keys, values, score, params, lengths):
    """Check every `attention_forward` argument; return (query, keys, values, params,
    lengths or None), params holding only the score's own keys."""
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
        if "b" in params:
            p["b"] = _checks.param(params, "b", (A,), "[A]", dtype, "query")
    hint = {"dot": "no params", "scaled_dot": "no params", "general": "['W']",
            "additive": "['W_query', 'W_key', 'v'] and optionally 'b'"}[score]
    _checks.no_unexpected_keys(params, set(p), f"the {score!r} score takes {hint}")
    if lengths is not None:
        lengths = _checks.lengths_array(lengths, B, Tk)
    return query, keys, values, p, lengths


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


def masked_softmax(scores: Any, lengths: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Check `masked_softmax_forward`'s arguments; return (scores, lengths as int64 or
    None)."""
    scores = _checks.float_array_ranks("scores", scores, _WEIGHT_RANKS)
    if scores.shape[-1] == 0:
        raise ValueError(f"scores: expected at least one key (Tk >= 1), got shape {scores.shape}")
    if lengths is not None:
        lengths = _checks.lengths_array(lengths, scores.shape[0], scores.shape[-1])
    return scores, lengths


def like_weights(name: str, d: Any, weights: np.ndarray) -> np.ndarray:
    """A cotangent shaped and typed like the softmax weights it belongs to."""
    d = _checks.float_array_ranks(name, d, _WEIGHT_RANKS)
    _checks.same_dtype(name, d, weights.dtype, "scores")
    _checks.shape_is(name, d, weights.shape, "like the weights")
    return d


def like_scores(name: str, d: Any, energy: np.ndarray, single: bool) -> np.ndarray:
    """The additive scores' cotangent: [B, Tk] (single) or [B, Tq, Tk], returned as
    [B, Tq, Tk]; `energy` is the forward's [B, Tq, Tk, A]."""
    B, Tq, Tk, _ = energy.shape
    shape = (B, Tk) if single else (B, Tq, Tk)
    d = _checks.float_array(name, d, _WEIGHT_RANKS[0] if single else _WEIGHT_RANKS[1])
    _checks.same_dtype(name, d, energy.dtype, "query_proj")
    _checks.shape_is(name, d, shape, "like the scores")
    return d[:, None, :] if single else d


def additive_scores(query_proj: Any, key_proj: Any, v: Any):
    """Check `additive_scores_forward`'s arguments; return them."""
    qa = _checks.float_array_ranks("query_proj", query_proj, (("B", "A"), ("B", "Tq", "A")))
    ka = _checks.float_array("key_proj", key_proj, ("B", "Tk", "A"))
    v = _checks.float_array("v", v, ("A",))
    _checks.same_dtype("key_proj", ka, qa.dtype, "query_proj")
    _checks.same_dtype("v", v, qa.dtype, "query_proj")
    B, Tk, A = ka.shape
    if B == 0 or Tk == 0 or A == 0:
        raise ValueError(f"key_proj: expected at least one row, key and feature, got shape "
                         f"{ka.shape}")
    if qa.shape[0] != B or qa.shape[-1] != A:
        raise ValueError(f"query_proj: expected [B, A] or [B, Tq, A] with (B, A) = {(B, A)} "
                         f"from key_proj, got {qa.shape}")
    _checks.shape_is("v", v, (A,), "[A]")
    return qa, ka, v


def weighted_sum(weights: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check `weighted_sum_forward`'s arguments; return them."""
    w = _checks.float_array_ranks("weights", weights, _WEIGHT_RANKS)
    values = _checks.float_array("values", values, ("B", "Tk", "Hv"))
    _checks.same_dtype("values", values, w.dtype, "weights")
    if values.shape[:2] != (w.shape[0], w.shape[-1]):
        raise ValueError(f"values: expected shape [B, Tk, Hv] with (B, Tk) = "
                         f"{(w.shape[0], w.shape[-1])} from weights, got {values.shape}")
    return w, values
