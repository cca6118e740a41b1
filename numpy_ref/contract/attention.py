"""Checking and layout plumbing for the attention family (the math is in `numpy_ref.attention`).

`kernels` calls the same functions, so both backends reject the same inputs with the same
messages and agree on what is padding.

Layouts. `validate_attention` turns the three public layouts into one, the heads layout
[B, h, Tq, H] of `F.scaled_dot_product_attention`, as views (no copy):

    query [B, Hq]        -> [B, 1, 1, Hq]    keys/values [B, Tk, H] -> [B, 1, Tk, H]
    query [B, Tq, Hq]    -> [B, 1, Tq, Hq]   keys/values [B, Tk, H] -> [B, 1, Tk, H]
    query [B, h, Tq, D]  -> itself           keys/values [B, h_kv, Tk, D] -> themselves

`AttentionInputs.to_user` / `from_user` convert a [B, h, Tq, X] array of the common layout
back to the caller's, and the reverse.

Visibility. Query i of head hh in row b sees key j when every given condition holds:
j < lengths[b]; mask[..., i, j] (True = attend); j <= i when causal; bias[..., i, j] != -inf.
`visibility` combines them into one boolean array broadcastable to [B, h, Tq, Tk] (None when
every key is visible), materialising only the axes some condition varies along.

Padding. A key/value row that no query of any head in its group may see is padding, and so is a
query row that sees no key: whatever they hold (NaN and inf included) must not reach a result.
`padding` finds them and `without_padding` replaces them by zeros, so a backend computes
exactly what it computes for zero padding.

Without the weights (``need_weights=False``) nothing of size Tq x Tk may be formed, not even a
boolean one: `visibility` takes a block of query rows, `padding_by_blocks` finds the padding
one such block at a time, and `row_statistic` puts a per-query-row array (the log-sum-exp) in
the caller's layout.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks
from numpy_ref.contract.fields import documented

SCORES = ("dot", "scaled_dot", "general", "additive")

_SCORE_RANKS = (("B", "Tk"), ("B", "Tq", "Tk"), ("B", "h", "Tq", "Tk"))
_LAYOUTS = {2: "single", 3: "steps", 4: "heads"}


@documented
class AttentionInputs(NamedTuple):
    """`attention_forward`'s arguments, checked and viewed in the heads layout."""

    query: np.ndarray  # [B, h, Tq, Hq]  a view of the caller's query
    keys: np.ndarray  # [B, h_kv, Tk, Hk]
    values: np.ndarray  # [B, h_kv, Tk, Hv]
    params: dict[str, np.ndarray]  # the score's own params, checked
    lengths: np.ndarray | None  # [B] int64, each in 1..Tk
    mask: np.ndarray | None  # bool, broadcastable to [B, h, Tq, Tk] (a view of the caller's)
    causal: bool  # query i sees keys j <= i
    scale: float | None  # the dot-product scores' multiplier; None for the additive score
    bias: np.ndarray | None  # float, broadcastable to [B, h, Tq, Tk] (a view)
    bias_shape: tuple[int, ...] | None  # the caller's bias shape, for d_params["bias"]
    score: str  # one of SCORES
    layout: str  # "single", "steps" or "heads": the query's rank
    group: int  # h // h_kv: query head hh reads kv head hh // group
    need_weights: bool  # whether the forward returns the weights (else nothing Tq x Tk exists)
    softcap: float | None = None  # c of the scores' softcap s -> c tanh(s / c), or None

    def to_user(self, x: np.ndarray) -> np.ndarray:
        """[B, h, Tq, X] (common layout) -> the caller's layout: [B, X], [B, Tq, X] or as is."""
        if self.layout == "single":
            return x[:, 0, 0]
        return x[:, 0] if self.layout == "steps" else x

    def from_user(self, x: np.ndarray) -> np.ndarray:
        """The caller's layout -> [B, h, Tq, X] (a view)."""
        if self.layout == "single":
            return x[:, None, None]
        return x[:, None] if self.layout == "steps" else x




def flat(x: np.ndarray) -> np.ndarray:
    """[..., n] -> [N, n]: every leading axis as rows (a view when it can be)."""
    return x.reshape(-1, x.shape[-1])


def matmul_rows(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``x @ W`` for x [..., n] and W [n, m] as one GEMM over all leading axes (a stacked
    [B, T, n] @ [n, m] runs as B small products, about half as fast); C-contiguous."""
    return (flat(x) @ W).reshape(*x.shape[:-1], W.shape[1])

def score_params(score: Any, params: Any, Hq: int, Hk: int, dtype: np.dtype,
                 reference: str = "query", shapes: str = "") -> dict[str, np.ndarray]:
    """Check the params of `score` for query size Hq and key size Hk; return only its keys."""
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    p: dict[str, np.ndarray] = {}
    if score in ("dot", "scaled_dot"):
        if Hq != Hk:
            raise ValueError(f"{reference}: the {score!r} score needs Hq == Hk, got "
                             f"{shapes or f'Hq = {Hq} and Hk = {Hk}'}")
    elif score == "general":
        p["W"] = checks.param(params, "W", (Hq, Hk), "[Hq, Hk]", dtype, reference)
    else:
        A = checks.leading_dim(params, "W_query", 2, "[A, Hq]")
        p["W_query"] = checks.param(params, "W_query", (A, Hq), "[A, Hq]", dtype, reference)
        p["W_key"] = checks.param(params, "W_key", (A, Hk), "[A, Hk]", dtype, reference)
        p["v"] = checks.param(params, "v", (A,), "[A]", dtype, reference)
        if "b" in params:
            p["b"] = checks.param(params, "b", (A,), "[A]", dtype, reference)
    hint = {"dot": "no params", "scaled_dot": "no params", "general": "['W']",
            "additive": "['W_query', 'W_key', 'v'] and optionally 'b'"}[score]
    checks.no_unexpected_keys(params, set(p), f"the {score!r} score takes {hint}")
    return p


def params_read(p: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """The checked score params a backward reads, named as the caller's (``params['W']``): all
    but the additive score's bias b, which the forward only added."""
    return [(f"params[{k!r}]", a) for k, a in p.items() if k != "b"]


def score_scale(score: str, scale: Any, Hk: int) -> float | None:
    """The multiplier of the dot-product scores: `scale` when given, else 1/sqrt(Hk) for
    scaled_dot and 1 for dot and general; None for additive (which takes no scale)."""
    if score == "additive":
        if scale is not None:
            raise ValueError("scale: the 'additive' score takes no scale (it has its own "
                             "weights); pass scale=None")
        return None
    if scale is None:
        return 1.0 / math.sqrt(Hk) if score == "scaled_dot" else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(
            scale):
        raise TypeError(f"scale: expected a finite real number or None, got {scale!r}")
    return float(scale)


def softcap_value(softcap: Any) -> float | None:
    """Check `attention_forward`'s softcap: None, or a real number c > 0 and finite (the scores
    become c tanh(s / c)). Return it as a float (or None)."""
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a positive finite real number or None, got "
                        f"{type(softcap).__name__} {softcap!r}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected a positive finite real number or None (the scores "
                         f"become softcap * tanh(s / softcap)), got {softcap!r}")
    return float(softcap)


def _broadcastable(name: str, a: np.ndarray, shape: tuple[int, ...], labels: str) -> np.ndarray:
    """`a` as a view broadcast to `shape`, or a ValueError naming both shapes."""
    try:
        return np.broadcast_to(a, shape)
    except ValueError:
        raise ValueError(f"{name}: shape {a.shape} does not broadcast to the weights' shape "
                         f"{labels} = {shape}") from None


def bool_mask(name: str, mask: Any, shape: tuple[int, ...], labels: str) -> np.ndarray:
    """A boolean array broadcastable to `shape` (True = attend), checked."""
    checks.not_masked(name, mask)
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name}: expected a bool numpy.ndarray broadcastable to {labels}, got "
                        f"{type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"{name}: expected dtype bool (True = attend), got {mask.dtype}; a "
                        "float mask is passed as bias=")
    _broadcastable(name, mask, shape, labels)
    return mask


def check_arrays(query: Any, keys: Any, values: Any, score: Any, params: Any, scale: Any
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, dict, float | None]:
    """The checks of `attention_forward`'s query, keys, values, score params and scale, which
    read only shapes and dtypes (so a backend whose arrays live elsewhere can pass zero-copy
    stand-ins) -> (query, keys, values, layout, params, scale)."""
    query = checks.float_array_ranks("query", query,
                                     (("B", "Hq"), ("B", "Tq", "Hq"), ("B", "h", "Tq", "D")))
    layout = _LAYOUTS[query.ndim]
    heads = layout == "heads"
    kv = ("B", "h_kv", "Tk") if heads else ("B", "Tk")
    keys = checks.float_array("keys", keys, (*kv, "D" if heads else "Hk"))
    values = checks.float_array("values", values, (*kv, "Dv" if heads else "Hv"))
    dtype = query.dtype
    checks.same_dtype("keys", keys, dtype, "query")
    checks.same_dtype("values", values, dtype, "query")
    if query.shape[0] != keys.shape[0]:
        raise ValueError(f"query: batch {query.shape[0]} does not match keys' batch "
                         f"{keys.shape[0]} (query {query.shape}, keys {keys.shape})")
    if values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(f"values: expected shape [{', '.join(kv)}, {'Dv' if heads else 'Hv'}] "
                         f"with ({', '.join(kv)}) = {keys.shape[:-1]} from keys, got "
                         f"{values.shape}")
    if 0 in keys.shape[:-1]:
        raise ValueError(f"keys: expected at least one key and one row, got shape {keys.shape}")
    if query.shape[-2] == 0 and layout != "single":
        raise ValueError(f"query: expected at least one query step, got shape {query.shape}")
    if 0 in query.shape or 0 in keys.shape or 0 in values.shape:
        raise ValueError(f"query/keys/values: every axis must be non-empty, got query "
                         f"{query.shape}, keys {keys.shape}, values {values.shape}")
    if heads and query.shape[1] % keys.shape[1]:
        raise ValueError(f"keys: the query's {query.shape[1]} heads must be a multiple of the "
                         f"keys' {keys.shape[1]} heads (grouped-query attention: query head i "
                         "reads kv head i // (h / h_kv))")
    p = score_params(score, params, query.shape[-1], keys.shape[-1], dtype,
                     shapes=f"query {query.shape} and keys {keys.shape}")
    scale = score_scale(score, scale, keys.shape[-1])
    return query, keys, values, layout, p, scale


def validate_attention(query: Any, keys: Any, values: Any, score: Any, params: Any,
                       lengths: Any = None, mask: Any = None, causal: Any = False,
                       scale: Any = None, bias: Any = None,
                       need_weights: Any = True, softcap: Any = None) -> AttentionInputs:
    """Check every `attention_forward` argument; return them in the heads layout."""
    query, keys, values, layout, p, scale = check_arrays(query, keys, values, score, params,
                                                         scale)
    softcap = softcap_value(softcap)
    heads = layout == "heads"
    dtype = query.dtype
    if lengths is not None:
        lengths = checks.lengths_array(lengths, keys.shape[0], keys.shape[-2])
    # strided input gives the bits of a contiguous copy: BLAS sums a product in an order that
    # follows the memory layout (a copy only when the caller's array is not C-contiguous)
    same = values is keys
    query, keys = np.ascontiguousarray(query), np.ascontiguousarray(keys)
    values = keys if same else np.ascontiguousarray(values)
    if not heads:
        query = query[:, None, None] if layout == "single" else query[:, None]
        keys, values = keys[:, None], values[:, None]
    B, h, Tq, _ = query.shape
    h_kv, Tk = keys.shape[1:3]
    weights = {"single": (B, Tk), "steps": (B, Tq, Tk), "heads": (B, h, Tq, Tk)}[layout]
    labels = {"single": "[B, Tk]", "steps": "[B, Tq, Tk]", "heads": "[B, h, Tq, Tk]"}[layout]
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if not isinstance(need_weights, (bool, np.bool_)):
        raise TypeError(f"need_weights: expected a bool, got {type(need_weights).__name__}")
    inputs = AttentionInputs(query, keys, values, p, lengths, None, bool(causal), scale, None,
                             None, score, layout, h // h_kv, bool(need_weights), softcap)
    if mask is not None:
        mask = inputs.from_user(np.broadcast_to(bool_mask("mask", mask, weights, labels),
                                                weights))
    bias_shape = None
    if bias is not None:
        if not isinstance(bias, np.ndarray):
            raise TypeError(f"bias: expected a float numpy.ndarray broadcastable to {labels}, "
                            f"got {type(bias).__name__}")
        if bias.dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"bias: expected dtype float32 or float64 (a bool mask is passed "
                            f"as mask=), got {bias.dtype}")
        checks.same_dtype("bias", bias, dtype, "query")
        bias_shape = bias.shape
        bias = inputs.from_user(_broadcastable("bias", bias, weights, labels))
    return inputs._replace(mask=mask, bias=bias, bias_shape=bias_shape)


def _causal(start: int, stop: int, Tk: int) -> np.ndarray:
    """[1, 1, stop - start, Tk]: query i (start <= i < stop) sees keys j <= i (top-left
    aligned, SDPA's is_causal)."""
    return (np.arange(Tk)[None, :] <= np.arange(start, stop)[:, None])[None, None]


def compact(a: np.ndarray) -> np.ndarray:
    """A broadcast view reduced to its own extent: axes of stride 0 become size 1 (a bias
    [Tk] seen as [B, h, Tq, Tk] is [1, 1, 1, Tk] again)."""
    index = tuple(slice(0, 1) if s == 0 else slice(None) for s in a.strides)
    return a[index]


def visibility(a: AttentionInputs, *, with_lengths: bool = True,
               with_causal: bool = True, rows: slice = slice(None)) -> np.ndarray | None:
    """Which (query, key) pairs are visible: a bool array broadcastable to [B, h, Tq, Tk], the
    AND of lengths, mask, causal and bias != -inf (lengths and causal only when asked: a kernel
    that handles a prefix per row itself leaves them out); None when all are. `rows`, a slice
    of the query steps, restricts it to those queries ([B, h, rows, Tk])."""
    Tq = a.query.shape[2]
    Tk = a.keys.shape[2]
    start, stop, _ = rows.indices(Tq)
    parts = []
    if with_lengths and a.lengths is not None and a.lengths.min() < Tk:
        parts.append((np.arange(Tk) < a.lengths[:, None])[:, None, None, :])
    if a.mask is not None:
        parts.append(compact(a.mask[:, :, rows]))
    if with_causal and a.causal and start < Tk - 1:  # (rows from Tk - 1 on see every key)
        parts.append(_causal(start, stop, Tk))
    if a.bias is not None:
        finite = compact(a.bias[:, :, rows]) != -np.inf  # NaN stays visible: it is data
        if not finite.all():
            parts.append(finite)
    if not parts:
        return None
    visible = parts[0]
    for part in parts[1:]:
        visible = visible & part
    return visible


@documented
class Padding(NamedTuple):
    """Rows that are not data (None: there are none)."""

    keys: np.ndarray | None  # bool, broadcastable to [B, h_kv, Tk, 1]: True = a real key row
    queries: np.ndarray | None  # bool, broadcastable to [B, h, Tq, 1]: True = sees a key


def padding(a: AttentionInputs, visible: np.ndarray | None) -> Padding:
    """The key/value rows no query of their group sees, and the query rows that see no key."""
    if visible is None:
        return Padding(None, None)
    seen = visible.any(axis=2)  # [B?, h?, Tk?]: some query of that head sees key j
    return _padding(a, seen, visible.any(axis=3, keepdims=True))


def padding_by_blocks(a: AttentionInputs) -> Padding:
    """`padding(a, visibility(a))` without the [B, h, Tq, Tk] visibility: computed a block of
    query rows at a time (blocks of at most 2^22 (query, key) pairs), for the path that forms
    nothing of size Tq x Tk. The result has full-size axes where `padding`'s may be 1."""
    B, h, Tq, _ = a.query.shape
    Tk = a.keys.shape[2]
    step = max(1, (1 << 22) // (B * h * Tk))
    seen = np.zeros((B, h, Tk), bool)
    sees = np.ones((B, h, Tq, 1), bool)
    hidden = False
    for start in range(0, Tq, step):
        rows = slice(start, min(start + step, Tq))
        visible = visibility(a, rows=rows)
        if visible is None:  # this block's queries see every key
            seen[...] = True
            continue
        hidden = True
        seen |= visible.any(axis=2)
        sees[:, :, rows] = visible.any(axis=3, keepdims=True)
    return _padding(a, seen, sees) if hidden else Padding(None, None)


def _padding(a: AttentionInputs, seen: np.ndarray, sees: np.ndarray) -> Padding:
    """Padding from seen [B?, h?, Tk?] (a query of that head sees key j) and sees
    [B?, h?, Tq?, 1] (query i sees a key)."""
    h_kv = a.keys.shape[1]
    if seen.shape[1] > 1:  # one entry per query head: a kv row is real if one head sees it
        seen = seen.reshape(seen.shape[0], h_kv, a.group, seen.shape[2]).any(axis=2)
    keys = None if seen.all() else seen[..., None]
    return Padding(keys, None if sees.all() else sees)


def log_sum_exp(m: np.ndarray, total: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A row's log-sum-exp m + log(total) from its max m and total = sum_j exp(s_j - m), in
    `dtype`: -inf where total is 0 (a row that sees no key), NaN where either is NaN."""
    with np.errstate(divide="ignore"):  # log(0) = -inf is the answer there
        return np.where(total == 0, -np.inf, m + np.log(total)).astype(dtype)


def row_statistic(a: AttentionInputs, x: np.ndarray) -> np.ndarray:
    """A per-query-row array [B, h, Tq] (the log-sum-exp) in the caller's layout: [B],
    [B, Tq] or [B, h, Tq], the weights' shape without the Tk axis."""
    return a.to_user(x[..., None])[..., 0]


def without_padding(x: np.ndarray, real: np.ndarray | None) -> np.ndarray:
    """`x` with the rows where `real` is False replaced by exact zeros (x itself if none)."""
    return x if real is None else np.where(real, x, x.dtype.type(0))


def reduce_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The adjoint of broadcasting an array of `shape` up to x.shape: sum x over the axes the
    broadcast added or stretched, so the result has `shape`."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def attention_cotangents(a: AttentionInputs, d_context: Any, d_weights: Any,
                         Hv: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Check d_context (like the context) and d_weights (like the weights, or None) against the
    forward; return them in the heads layout."""
    B, h, Tq, _ = a.query.shape
    Tk = a.keys.shape[2]
    dtype = a.query.dtype
    axes = {"single": ("B",), "steps": ("B", "Tq"), "heads": ("B", "h", "Tq")}[a.layout]
    sizes = {"B": B, "h": h, "Tq": Tq, "Tk": Tk, "Hv": Hv}
    d_context = _like_axes("d_context", d_context, (*axes, "Hv"), sizes, dtype)
    if d_weights is not None and not a.need_weights:
        raise ValueError("d_weights: the forward ran with need_weights=False, so there are no "
                         "weights to take a cotangent of; pass d_weights=None (or run the "
                         "forward with need_weights=True)")
    if d_weights is not None:
        d_weights = a.from_user(_like_axes("d_weights", d_weights, (*axes, "Tk"), sizes, dtype))
    return a.from_user(d_context), d_weights


def _like_axes(name: str, d: Any, axes: tuple[str, ...], sizes: dict[str, int],
               dtype: np.dtype) -> np.ndarray:
    d = checks.float_array(name, d, axes)
    checks.same_dtype(name, d, dtype, "query")
    checks.shape_is(name, d, tuple(sizes[n] for n in axes), f"[{', '.join(axes)}]")
    return d


def like(name: str, d: Any, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
    """A cotangent of exactly `shape` and `dtype` (`what` names the output it belongs to)."""
    if not isinstance(d, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray shaped like {what} {shape}, got "
                        f"{type(d).__name__}")
    if d.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {d.dtype}")
    checks.same_dtype(name, d, dtype, "query")
    checks.shape_is(name, d, shape, f"like {what}")
    return d


def gradient_outputs(a: AttentionInputs, sum_kv: Any, out: Any, *reads: Any) -> tuple:
    """Check `attention_backward`'s sum_kv and out; return (sum_kv, (d_query, d_keys,
    d_values) buffers, each an array or None). Buffers must be C-contiguous, writeable, shaped
    and typed like the gradient they receive, and share no memory with each other, with the
    forward's query, keys and values, or with `reads` (d_context, d_weights): a kernel reads
    those while it writes the buffers."""
    k_shape = a.keys.shape if a.layout == "heads" else a.keys.shape[:1] + a.keys.shape[2:]
    v_shape = a.values.shape if a.layout == "heads" else a.values.shape[:1] + a.values.shape[2:]
    sum_kv = sum_kv_flag(sum_kv, k_shape, v_shape)
    q = a.query
    q_shape = {"single": (q.shape[0], q.shape[3]), "steps": (q.shape[0], *q.shape[2:]),
               "heads": q.shape}[a.layout]
    inputs = [("query", a.query), ("keys", a.keys), ("values", a.values),
              *zip(("d_context", "d_weights"), reads, strict=False)]
    return sum_kv, gradient_buffers(out, sum_kv, (q_shape, k_shape, v_shape), q.dtype, inputs)


def sum_kv_flag(sum_kv: Any, k_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> bool:
    """Check `attention_backward`'s sum_kv for keys and values of these shapes (the caller's
    layout): d_keys + d_values needs one shape. Return it as a bool."""
    if not isinstance(sum_kv, (bool, np.bool_)):
        raise TypeError(f"sum_kv: expected a bool, got {type(sum_kv).__name__}")
    if sum_kv and k_shape != v_shape:
        raise ValueError(f"sum_kv: d_keys + d_values needs keys and values of one shape, got "
                         f"keys {k_shape} and values {v_shape}")
    return bool(sum_kv)


def host_buffer(name: str, buf: Any) -> np.ndarray:
    """A gradient buffer given as a NumPy array (a TypeError otherwise)."""
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray or None, got {type(buf).__name__}")
    return buf


def writable(name: str, buf: np.ndarray) -> None:
    """Raise `ValueError` unless a kernel may write the NumPy buffer in place."""
    if not (buf.flags.c_contiguous and buf.flags.writeable):
        raise ValueError(f"{name}: expected a C-contiguous, writeable array")


def shares_memory(buf: Any, x: Any) -> bool:
    """Whether the NumPy buffer may share memory with `x` (False for anything not NumPy)."""
    return isinstance(x, np.ndarray) and bool(np.may_share_memory(buf, x))


def gradient_buffers(out: Any, sum_kv: bool, shapes: tuple, dtype: np.dtype,
                     reads: list[tuple[str, Any]], *,
                     array: Callable[[str, Any], Any] = host_buffer,
                     in_place: Callable[[str, Any], None] = writable,
                     overlap: Callable[[Any, Any], bool] = shares_memory) -> tuple:
    """Check `attention_backward`'s out: None, or (d_query, d_keys, d_values) with out[2]
    None when sum_kv, each entry None or a buffer of `dtype` and of its gradient's shape in
    `shapes`. A buffer becomes ``array(name, buf)``, must pass ``in_place(name, that)`` and
    must not share memory, by ``overlap(a, b)``, with another buffer or with the arrays of
    `reads`, the (name, array) pairs a kernel reads while it writes the buffers. The defaults
    take NumPy arrays; a backend whose arrays live elsewhere (`kernels.cuda`: device arrays,
    which have .shape and .dtype too) passes its own hooks, so both raise the same errors.
    Return the three arrays `array` gave (None where out has None)."""
    if out is None:
        return None, None, None
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError("out: expected a tuple (d_query, d_keys, d_values) of arrays or None")
    names = ("out[0] (d_query)", "out[1] (d_keys + d_values)" if sum_kv else "out[1] (d_keys)",
             "out[2] (d_values)")
    if sum_kv and out[2] is not None:
        raise ValueError("out[2]: with sum_kv=True the sum goes to out[1] and out[2] must be "
                         "None")
    bufs = []
    for name, buf, shape in zip(names, out, shapes, strict=True):
        if buf is not None:
            buf = array(name, buf)
            checks.same_dtype(name, buf, dtype, "query")
            checks.shape_is(name, buf, shape, "like the gradient")
            in_place(name, buf)
        bufs.append(buf)
    given = [(name, buf) for name, buf in zip(names, bufs, strict=True) if buf is not None]
    for i, (name, buf) in enumerate(given):
        for other, x in [*reads, *given[i + 1:]]:
            if x is not None and overlap(buf, x):
                raise ValueError(f"{name}: overlaps the memory of {other}; gradient buffers "
                                 "must be separate arrays")
    return tuple(bufs)


def deliver(a: AttentionInputs, d_query: np.ndarray, d_keys: np.ndarray,
            d_values: np.ndarray | None, sum_kv: bool, out: tuple) -> tuple:
    """Gradients in the heads layout -> (d_query, d_keys, d_values) in the caller's layout,
    summed into d_keys (d_values None) when sum_kv (d_values None on entry: d_keys already
    holds the sum), written into the `out` buffers given (unless computed there already)."""
    def layout_kv(x):
        return x if x is None or a.layout == "heads" else x[:, 0]

    grads = [a.to_user(d_query), layout_kv(d_keys), layout_kv(d_values)]
    if sum_kv:
        grads = [grads[0], grads[1] if grads[2] is None else grads[1] + grads[2], None]
    for i, buf in enumerate(out):
        if buf is not None and not np.shares_memory(buf, grads[i]):
            np.copyto(buf, grads[i])
            grads[i] = buf
        elif buf is not None:
            grads[i] = buf
    return tuple(grads)


def masked_softmax(scores: Any, lengths: Any, mask: Any) -> tuple:
    """Check `masked_softmax_forward`'s arguments; return (scores, lengths as int64 or None,
    mask or None)."""
    scores = checks.float_array_ranks("scores", scores, _SCORE_RANKS)
    if 0 in scores.shape:
        raise ValueError(f"scores: expected non-empty axes, got shape {scores.shape}")
    if lengths is not None:
        lengths = checks.lengths_array(lengths, scores.shape[0], scores.shape[-1])
    if mask is not None:
        mask = bool_mask("mask", mask, scores.shape, "like the scores")
    return scores, lengths, mask


def like_weights(name: str, d: Any, weights: np.ndarray) -> np.ndarray:
    """A cotangent shaped and typed like the softmax weights it belongs to."""
    d = checks.float_array_ranks(name, d, _SCORE_RANKS)
    checks.same_dtype(name, d, weights.dtype, "scores")
    checks.shape_is(name, d, weights.shape, "like the weights")
    return d


def additive_scores(query_proj: Any, key_proj: Any, u: Any):
    """Check `additive_scores_forward`'s arguments; return them."""
    qa = checks.float_array_ranks("query_proj", query_proj,
                                  (("B", "A"), ("B", "Tq", "A"), ("B", "h", "Tq", "A")))
    heads = qa.ndim == 4
    ka = checks.float_array("key_proj", key_proj,
                            ("B", "h", "Tk", "A") if heads else ("B", "Tk", "A"))
    u = checks.float_array("u", u, ("A",))
    checks.same_dtype("key_proj", ka, qa.dtype, "query_proj")
    checks.same_dtype("u", u, qa.dtype, "query_proj")
    if 0 in ka.shape or 0 in qa.shape:
        raise ValueError(f"key_proj/query_proj: expected non-empty axes, got {ka.shape} and "
                         f"{qa.shape}")
    lead = ka.shape[:2] if heads else ka.shape[:1]
    if qa.shape[:len(lead)] != lead or qa.shape[-1] != ka.shape[-1]:
        raise ValueError(f"query_proj: expected the leading axes {lead} and the width "
                         f"A = {ka.shape[-1]} of key_proj {ka.shape}, got {qa.shape}")
    checks.shape_is("u", u, (ka.shape[-1],), "[A]")
    return qa, ka, u


def weighted_sum(weights: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check `weighted_sum_forward`'s arguments; return them."""
    w = checks.float_array_ranks("weights", weights, _SCORE_RANKS)
    heads = w.ndim == 4
    values = checks.float_array("values", values,
                                ("B", "h", "Tk", "Hv") if heads else ("B", "Tk", "Hv"))
    checks.same_dtype("values", values, w.dtype, "weights")
    lead = (w.shape[:2] if heads else w.shape[:1]) + (w.shape[-1],)
    if values.shape[:-1] != lead:
        raise ValueError(f"values: expected leading axes {lead} (batch{', heads' * heads} and "
                         f"Tk from weights {w.shape}), got {values.shape}")
    return w, values


def scores(query: Any, keys: Any, score: Any, params: Any, scale: Any):
    """Check `attention_scores_forward`'s arguments: query [..., Tq, Hq] and keys [..., Tk, Hk]
    with the same leading axes (one or two). Return (query, keys, params, scale)."""
    query = checks.float_array_ranks("query", query, (("B", "Tq", "Hq"),
                                                       ("B", "h", "Tq", "Hq")))
    labels = ("B", "Tk", "Hk") if query.ndim == 3 else ("B", "h", "Tk", "Hk")
    keys = checks.float_array("keys", keys, labels)
    checks.same_dtype("keys", keys, query.dtype, "query")
    if keys.shape[:-2] != query.shape[:-2]:
        raise ValueError(f"keys: expected the query's leading axes {query.shape[:-2]}, got "
                         f"{keys.shape}")
    if 0 in query.shape or 0 in keys.shape:
        raise ValueError(f"query/keys: expected non-empty axes, got {query.shape} and "
                         f"{keys.shape}")
    p = score_params(score, params, query.shape[-1], keys.shape[-1], query.dtype)
    return query, keys, p, score_scale(score, scale, keys.shape[-1])
