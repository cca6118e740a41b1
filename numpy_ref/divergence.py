r"""First divergence: where, in forward order, an implementation first leaves the reference.

A wrong final output says *that* an implementation is wrong; this module says *where*. From a
reference forward's cache, `intermediates` lists every intermediate value in the order the
forward computes it (per layer, direction, step and gate for the recurrent layers; per
sublayer for the Transformer layers); `first_divergence` compares the values you recorded in
your own implementation (any subset of those names) with them, in that order, and names the
first one that leaves the tolerance, with the index there, both values, the error and the
error allowed. Everything before it passed, so the bug is in the computation of that value
from values that were still right. `find_divergence` runs the reference forward in float64 on
your inputs first; `torch_impl.recorder` records a torch module's submodules under these names.

The rule (`numpy_ref.testing.compare`): a value passes where, at every index,

    |got - want| <= atol + rtol * |want|

with, when rtol/atol are not given, a default chosen by the dtype of *your* array:

=============  ==========================  ==================================================
your dtype     rtol = atol                 why
=============  ==========================  ==================================================
float64        1e-7 (`testing.RTOL64`)      torch.testing's float64 default; a correct float64
                                           implementation is near 1e-14
float32        512 * eps32 = 6.1e-5         float32 rounding compounded over a few products
                                           and steps, against the float64 reference
float16        16 * eps16 = 1.6e-2          a few roundings in the dtype; for a budget that
bfloat16       16 * eps = 0.125             follows the precision: `testing.error_budget`
=============  ==========================  ==================================================

Entries that are not data (padded steps of a batch with ``lengths``, key/query rows that are
padding, scores of keys a query may not see) are left out of the comparison: whatever you hold
there passes. An index is always an index into the array as you hand it in.

The names, family by family (hand in arrays of these shapes; any subset of the names)
--------------------------------------------------------------------------------------
``lstm_forward`` (`numpy_ref.lstm`). For each layer k, direction d ("forward", "reverse") and
step t, in the order computed (layer 0 forward t = 0..T-1, layer 0 reverse t = T-1..0, layer 1,
...); t is the time index (position in the sequence), also in the reverse direction:

=========================  ========  ======================================================
name                       shape     value
=========================  ========  ======================================================
``l{k}.{d}.t{t}.i``        [B, H]    input gate sigmoid(a_i)   (torch's gate order i,f,g,o:
``l{k}.{d}.t{t}.f``        [B, H]    forget gate sigmoid(a_f)   the row blocks of weight_ih)
``l{k}.{d}.t{t}.g``        [B, H]    cell candidate tanh(a_g)
``l{k}.{d}.t{t}.o``        [B, H]    output gate sigmoid(a_o)
``l{k}.{d}.t{t}.c``        [B, H]    c_t = f c_{t-1} + i g
``l{k}.{d}.t{t}.h``        [B, Ho]   h_t = o tanh(c_t) (times W_hr^T with proj_size)
``output``                 like out  the layer stack's output ([T, B, D*Ho] or batch-first)
``h_n``, ``c_n``           [L*D, B, Ho], [L*D, B, H]  the final states
=========================  ========  ======================================================

``gru_forward`` (`numpy_ref.gru`): the same scheme with ``r``, ``z``, ``n`` (the activated
gates, torch's order r, z, n) and ``h`` (h_t = n + z (h_{t-1} - n)) per step, each [B, H], then
``output`` and ``h_n``. ``rnn_forward`` (`numpy_ref.rnn`): ``a`` (the pre-activation
x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh) and ``h`` (act(a)) per step, each [B, H], then
``output`` and ``h_n``. Rows b with t >= lengths[b] are not compared at step t.

``attention_forward`` (`numpy_ref.attention`), in the caller's layout (weights' shape
[B, Tk], [B, Tq, Tk] or [B, h, Tq, Tk]; W below):

=============  ===========  ===========================================================
name           shape        value
=============  ===========  ===========================================================
``scores``     W            scale * score(q, k), before the bias (`attention_scores_forward`)
``logits``     W            softcap(scores) + bias: what the softmax reads (== scores without
                            softcap and bias)
``lse``        W minus Tk   each query's log-sum-exp of its visible logits
``weights``    W            the softmax (0 at hidden keys: compared)
``context``    [.., Hv]     weights @ values
=============  ===========  ===========================================================

scores and logits are compared only where the query sees the key; a query that sees no key
at all is compared nowhere. With ``need_weights=False`` only ``lse`` and ``context`` exist.

``multihead_attention_forward`` (`numpy_ref.multihead_attention`), arrays in the caller's
layout ([N, T, E] batch-first, [T, N, E] otherwise, without N unbatched):

==============  =================  ======================================================
name            shape              value
==============  =================  ======================================================
``q``           like query, E      query W_q^T + b_q (the in-projection, heads merged)
``k``, ``v``    like key, E        key W_k^T + b_k, value W_v^T + b_v
``logits``      [N, h, Tq, Tk]     Q K^T / sqrt(d) + float masks, per head (need_weights)
``lse``         [N, h, Tq]         each query's log-sum-exp per head
``weights``     [N, h, Tq, Tk]     the softmax per head, not averaged (need_weights)
``attention``   like query, E      softmax(..) V with the heads merged: out_proj's input
``output``      like query, E      attention W_o^T + b_o
==============  =================  ======================================================

``transformer_encoder_layer_forward`` / ``transformer_decoder_layer_forward``
(`numpy_ref.transformer`): torch's submodule names (``nn.TransformerEncoderLayer``'s and
``nn.TransformerDecoderLayer``'s) for their outputs, ``residualK`` for the dropout-free
residual sums (x + sublayer(..)), each like src/tgt except linear1 and activation ([.., F]);
``self_attn.q`` etc. are the attention's own names above (``self_attn.output`` is
``self_attn``). Padding rows (key padding mask) are not compared.

==================  ===========================================================================
layer, norm_first   names in forward order
==================  ===========================================================================
encoder, post-norm  self_attn.{q,k,v,lse,attention}, self_attn, residual1 (= src + self_attn),
                    norm1, linear1, activation, linear2, residual2 (= norm1 + linear2), norm2,
                    output
encoder, pre-norm   norm1, self_attn.{..}, self_attn (of norm1), residual1 (= src + self_attn),
                    norm2, linear1, activation, linear2, residual2 (= residual1 + linear2),
                    output
decoder, post-norm  self_attn.{..}, self_attn, residual1, norm1, multihead_attn.{..},
                    multihead_attn, residual2 (= norm1 + multihead_attn), norm2, linear1,
                    activation, linear2, residual3, norm3, output
decoder, pre-norm   norm1, self_attn.{..}, self_attn, residual1, norm2, multihead_attn.{..},
                    multihead_attn (of norm2 over memory), residual2, norm3, linear1,
                    activation, linear2, residual3, output
==================  ===========================================================================

(``multihead_attn.{..}`` adds ``multihead_attn.logits`` and ``.weights`` when the decoder
layer ran with need_weights=True.) ``output`` is the layer's result: the last norm (post-norm)
or residual (pre-norm) with padding rows 0.

Only caches of the NumPy reference (backend=numpy_ref) are read; the values not kept in a
cache (a layer norm's output, the LSTM's c_t, the context) are recomputed from it with the
same operations the forward ran.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.attention import AttentionCache, attention_scores_forward
from numpy_ref.contract import attention as attention_contract
from numpy_ref.contract import checks, unchanged
from numpy_ref.contract.fields import documented
from numpy_ref.contract.lstm import param_key
from numpy_ref.gru import GRUCache
from numpy_ref.layer_norm import layer_norm_forward
from numpy_ref.layers import linear_forward
from numpy_ref.lstm import LSTMCache
from numpy_ref.multihead_attention import MultiheadAttentionCache
from numpy_ref.precision import LowPrecisionCache
from numpy_ref.rnn import RNNCache
from numpy_ref.testing import ATOL64, EPS32, RTOL64, Comparison, compare
from numpy_ref.transformer import TransformerDecoderLayerCache, TransformerEncoderLayerCache

__all__ = ["DivergenceError", "DivergenceReport", "Intermediates", "default_tolerance",
           "describe", "find_divergence", "first_divergence", "intermediates"]

EPS16 = float(np.finfo(np.float16).eps)
RTOL32 = ATOL32 = 512 * EPS32  # the float32 default, 6.1e-5
RTOL16 = ATOL16 = 16 * EPS16  # the float16 default, 1.6e-2


class Intermediates(dict):
    """A dict ``name -> array`` in forward order (`intermediates`' result), plus ``valid``:
    ``{name: bool mask broadcastable to the array}``, True = data, for the names where some
    entries are not data (padding); the comparison ignores the others. Names and shapes: the
    `numpy_ref.divergence` module docstring (an entry passes where |got - want| <= tol)."""

    def __init__(self) -> None:
        super().__init__()
        self.valid: dict[str, np.ndarray] = {}

    def add(self, name: str, value: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Append ``name = value`` (value [...]); `valid` (bool, broadcastable to value's
        shape, True = compared) only where some entries are padding (the module docstring)."""
        if name in self:
            raise ValueError(f"intermediate {name!r} listed twice")
        self[name] = value
        if valid is not None:
            valid = np.broadcast_to(np.asarray(valid, bool), value.shape)
            if not valid.all():
                self.valid[name] = valid


# --------------------------------------------------------------------------------------------
# the recurrent layers: one name per layer, direction, step and gate


def _directions(cache: Any) -> Iterable[tuple[int, int, str, Any]]:
    """(layer, direction, its label, its direction cache) in the order the forward ran them."""
    D = 2 if cache.bidirectional else 1
    for layer in range(cache.num_layers):
        for d in range(D):
            yield layer, d, ("reverse" if d else "forward"), cache.directions[layer * D + d]


def _steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _step_valid(cache: Any, t: int) -> np.ndarray | None:
    """[B, 1] bool: the rows for which step t is data (None: every row)."""
    return None if cache.mask is None else cache.mask[t]


def _kept(new: np.ndarray, old: Any, valid: np.ndarray | None) -> np.ndarray:
    """`new` on the rows that are data at this step, `old` on the padded ones."""
    return new if valid is None else np.where(valid, new, old)


def _add_step(out: Intermediates, prefix: str, valid: np.ndarray | None,
              **named: np.ndarray) -> None:
    """One step's values under ``{prefix}.{name}`` (e.g. ``l0.forward.t3.f``), in order."""
    for name, value in named.items():
        out.add(f"{prefix}.{name}", value, valid)


def _finals(out: Intermediates, cache: Any, output: np.ndarray, finals: Sequence[tuple]) -> None:
    """output [T, B, X] (time-major, padded steps 0) in the caller's layout, then the finals."""
    valid = cache.mask
    if cache.batch_first:
        output = output.transpose(1, 0, 2)
        valid = None if valid is None else valid.transpose(1, 0, 2)
    out.add("output", output, valid)
    for name, value in finals:
        out.add(name, value)


def _lstm(cache: LSTMCache) -> Intermediates:
    out = Intermediates()
    H = cache.hidden_size
    outputs, h_n, c_n = {}, [], []
    for layer, d, label, dc in _directions(cache):
        T = dc.x.shape[0]
        w_hr = cache.params.get(param_key("weight_hr", layer, d))
        step_out = np.zeros(dc.h_prev.shape, dc.x.dtype)
        first = T - 1 if dc.reverse else 0
        h_last, c_last = dc.h_prev[first], dc.c_prev[first]  # h0, c0
        for t in _steps(T, dc.reverse):
            gates = dc.gates[t]
            i, f, g, o = (gates[:, k * H:(k + 1) * H] for k in range(4))
            c = f * dc.c_prev[t] + i * g  # the forward's own expression: the same rounding
            h = o * dc.tanh_c[t]
            if w_hr is not None:
                h = h @ w_hr.T
            valid = _step_valid(cache, t)
            _add_step(out, f"l{layer}.{label}.t{t}", valid, i=i, f=f, g=g, o=o, c=c, h=h)
            step_out[t] = _kept(h, 0, valid)
            h_last = _kept(h, h_last, valid)
            c_last = _kept(c, c_last, valid)
        outputs.setdefault(layer, []).append(step_out)
        h_n.append(h_last)
        c_n.append(c_last)
    _finals(out, cache, np.concatenate(outputs[cache.num_layers - 1], axis=-1),
            (("h_n", np.stack(h_n)), ("c_n", np.stack(c_n))))
    return out


def _gru(cache: GRUCache) -> Intermediates:
    out = Intermediates()
    H = cache.hidden_size
    outputs, h_n = {}, []
    for layer, _, label, dc in _directions(cache):
        T = dc.x.shape[0]
        step_out = np.zeros(dc.h_prev.shape, dc.x.dtype)
        h_last = dc.h_prev[T - 1 if dc.reverse else 0]  # h0
        for t in _steps(T, dc.reverse):
            r, z, n = (dc.gates[t][:, k * H:(k + 1) * H] for k in range(3))
            h = n + z * (dc.h_prev[t] - n)  # the forward's own expression
            valid = _step_valid(cache, t)
            _add_step(out, f"l{layer}.{label}.t{t}", valid, r=r, z=z, n=n, h=h)
            step_out[t] = _kept(h, 0, valid)
            h_last = _kept(h, h_last, valid)
        outputs.setdefault(layer, []).append(step_out)
        h_n.append(h_last)
    _finals(out, cache, np.concatenate(outputs[cache.num_layers - 1], axis=-1),
            (("h_n", np.stack(h_n)),))
    return out


def _rnn(cache: RNNCache) -> Intermediates:
    out = Intermediates()
    outputs, h_n = {}, []
    for layer, d, label, dc in _directions(cache):
        T, B, _ = dc.x.shape
        H = dc.h_prev.shape[2]
        p = {k: cache.params[param_key(k, layer, d)]
             for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
             if param_key(k, layer, d) in cache.params}
        gi = dc.x.reshape(T * B, -1) @ p["weight_ih"].T  # as the forward: all steps at once
        if "bias_ih" in p:
            gi += p["bias_ih"]
        gi = gi.reshape(T, B, H)
        step_out = np.zeros(dc.h_prev.shape, dc.x.dtype)
        h_last = dc.h_prev[T - 1 if dc.reverse else 0]  # h0
        for t in _steps(T, dc.reverse):
            a = dc.h_prev[t] @ p["weight_hh"].T
            if "bias_hh" in p:
                a += p["bias_hh"]
            a = gi[t] + a
            h = dc.h_new[t]
            valid = _step_valid(cache, t)
            _add_step(out, f"l{layer}.{label}.t{t}", valid, a=a, h=h)
            step_out[t] = _kept(h, 0, valid)
            h_last = _kept(h, h_last, valid)
        outputs.setdefault(layer, []).append(step_out)
        h_n.append(h_last)
    _finals(out, cache, np.concatenate(outputs[cache.num_layers - 1], axis=-1),
            (("h_n", np.stack(h_n)),))
    return out


# --------------------------------------------------------------------------------------------
# attention and multi-head attention


def _attention(cache: AttentionCache, out: Intermediates | None = None, prefix: str = "",
               user: Callable[[np.ndarray], np.ndarray] | None = None) -> Intermediates:
    """The core's names (scores, logits, lse, weights, context), in the caller's layout, or
    through `user` ([B, h, Tq, X] -> what the caller sees) when given."""
    out = Intermediates() if out is None else out
    a, pad = cache.inputs, cache.padding
    to_user = a.to_user if user is None else user
    B, h, Tq = a.query.shape[:3]
    Tk = a.keys.shape[2]
    sees = pad.queries  # [B?, h?, Tq?, 1]: the query sees some key (None: all do)
    if cache.softmax is not None:
        visible = attention_contract.visibility(a)
        if sees is not None:
            visible = sees if visible is None else visible & sees
        full = (B, h, Tq, Tk)
        vis = None if visible is None else to_user(np.broadcast_to(visible, full))
        rows = None if sees is None else to_user(np.broadcast_to(sees, full))
        if user is None:  # the core alone: its scores before the bias too
            with unchanged.untracked():
                s, _ = attention_scores_forward(cache.scores.query, cache.scores.keys,
                                                score=a.score, params=a.params, scale=a.scale)
            out.add(f"{prefix}scores", to_user(s), vis)
        out.add(f"{prefix}logits", to_user(cache.logits), vis)
    lse_rows = None if sees is None else to_user(np.broadcast_to(sees, (B, h, Tq, 1)))[..., 0]
    if user is None:
        out.add(f"{prefix}lse", cache.lse, lse_rows)
    else:
        out.add(f"{prefix}lse", to_user(cache.lse[..., None])[..., 0], lse_rows)
    if cache.softmax is not None:
        out.add(f"{prefix}weights", to_user(cache.softmax.weights), rows)
        with checks.quiet():
            c = cache.context.weights @ cache.context.values
        c = attention_contract.without_padding(c, sees)
    else:
        c = cache.blocks.context
    if user is None:
        out.add(f"{prefix}context", to_user(c), None if sees is None else to_user(
            np.broadcast_to(sees, c.shape)))
    return out


def _merge(x: np.ndarray, batch_first: bool) -> np.ndarray:
    """[N, h, T, d] -> [N, T, h*d] (batch_first) or [T, N, h*d]: multi-head attention's merge."""
    x = x.transpose(0, 2, 1, 3) if batch_first else x.transpose(2, 0, 1, 3)
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3])


def _mha(cache: MultiheadAttentionCache, out: Intermediates | None = None, prefix: str = "",
         output_name: str = "output") -> Intermediates:
    out = Intermediates() if out is None else out
    a, att = cache.inputs, cache.attention
    if not isinstance(att, AttentionCache):
        raise TypeError("intermediates: this multi-head attention ran on another backend; run "
                        "the reference on numpy_ref (backend=None) to list its intermediates")
    strip = (lambda x: x) if a.batched else (lambda x: x[0])

    def rows(real: np.ndarray | None, like: np.ndarray) -> np.ndarray | None:
        return None if real is None else strip(np.broadcast_to(real, (*like.shape[:-1], 1)))

    ai = att.inputs
    for name, x, real in (("q", ai.query, a.real_queries), ("k", ai.keys, a.real_keys),
                          ("v", ai.values, a.real_keys)):
        merged = _merge(x, a.batch_first)
        out.add(f"{prefix}{name}", strip(merged), rows(real, merged))
    _attention(att, out, prefix, user=strip)
    context = cache.out_proj.x  # the merged heads, out_proj's input
    out.add(f"{prefix}attention", strip(context), rows(a.real_queries, context))
    with checks.quiet():
        y, _ = linear_forward(context, a.out_proj)
    out.add(output_name, strip(y), rows(a.real_queries, y))
    return out


# --------------------------------------------------------------------------------------------
# the Transformer layers


def _layer_params(arguments: tuple) -> dict[str, np.ndarray]:
    """The layer's params from its cache's ``arguments`` (``params['key']`` entries)."""
    return {n[len("params['"):-2]: v for n, v, _ in arguments if n.startswith("params[")}


def _argument(arguments: tuple, name: str) -> np.ndarray:
    return next(v for n, v, _ in arguments if n == name)


def _group(p: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) + 1:]: v for k, v in p.items() if k.startswith(prefix + ".")}


def _and_valid(out: Intermediates, name: str, valid: np.ndarray) -> None:
    """Narrow ``out.valid[name]`` to `valid` too (broadcastable to the array)."""
    v = np.broadcast_to(valid, out[name].shape)
    if name in out.valid:
        v = v & out.valid[name]
    if not v.all():
        out.valid[name] = v


def _query_rows(pad: np.ndarray, kind: str, batch_first: bool) -> np.ndarray:
    """The real rows (not `pad`, a layer's padding [N, T, 1], [T, N, 1] or [T, 1]) as a mask
    broadcastable to an array of `kind`: "layer" (the layer's layout [.., E]), "heads"
    (attention's per-head [N, h, Tq, X]) or "lse" ([N, h, Tq]); without N unbatched."""
    if kind == "layer":
        return ~pad
    real = ~pad[..., 0]  # [N, T], [T, N] or [T]
    if real.ndim == 2 and not batch_first:
        real = real.T  # [N, T]
    if real.ndim == 1:  # unbatched: [h, Tq, X] or [h, Tq]
        return real[None, :, None] if kind == "heads" else real[None, :]
    return real[:, None, :, None] if kind == "heads" else real[:, None, :]


def _transformer(cache: Any, decoder: bool) -> Intermediates:
    if not all(isinstance(b.sublayer, MultiheadAttentionCache) or hasattr(b.sublayer, "linear1")
               for b in cache.blocks):
        raise TypeError("intermediates: unexpected Transformer layer cache")
    o, pad = cache.options, cache.pad
    p = _layer_params(cache.arguments)
    x = _argument(cache.arguments, "tgt" if decoder else "src")
    x = x if pad is None else np.where(pad, x.dtype.type(0), x)
    valid = None if pad is None else ~pad
    out = Intermediates()

    def add(name: str, value: np.ndarray) -> None:
        out.add(name, value, valid)

    def norm(z: np.ndarray, name: str) -> np.ndarray:
        with checks.quiet():
            y, _ = layer_norm_forward(z, _group(p, name), eps=o.eps)
        add(name, y)
        return y

    def attention(z: np.ndarray, block: Any, name: str) -> np.ndarray:
        del z  # the block's own cache holds its input
        start = len(out)
        _mha(block.sublayer, out, prefix=f"{name}.", output_name=name)
        if pad is not None:  # the layer's padding rows are not data, in the query's names too
            for key in list(out)[start:]:
                kind = {"k": None, "v": None, "lse": "lse", "logits": "heads",
                        "weights": "heads"}.get(key.rsplit(".", 1)[-1], "layer")
                if kind is not None:
                    _and_valid(out, key, _query_rows(pad, kind, o.batch_first))
        return out[name]

    def feed_forward(z: np.ndarray, block: Any) -> np.ndarray:
        ff = block.sublayer
        with checks.quiet():
            a, _ = linear_forward(z, _group(p, "linear1"))
            add("linear1", a)
            if ff.name == "relu":
                act = np.maximum(a, 0)
            else:
                from numpy_ref.activations import gelu_forward
                act, _ = gelu_forward(a)
            add("activation", act)
            y, _ = linear_forward(act, _group(p, "linear2"))
        add("linear2", y)
        return y

    sublayers: list[tuple[str, Callable[[np.ndarray, Any], np.ndarray]]] = [
        ("self_attn", lambda z, b: attention(z, b, "self_attn"))]
    if decoder:
        sublayers.append(("multihead_attn", lambda z, b: attention(z, b, "multihead_attn")))
    sublayers.append(("ff", feed_forward))
    for k, ((_, run), block) in enumerate(zip(sublayers, cache.blocks, strict=True), 1):
        with checks.quiet():
            if o.norm_first:  # x = x + B(norm(x))
                x = x + run(norm(x, f"norm{k}"), block)
                add(f"residual{k}", x)
            else:  # x = norm(x + B(x))
                s = x + run(x, block)
                add(f"residual{k}", s)
                x = norm(s, f"norm{k}")
    out.add("output", x if pad is None else np.where(pad, x.dtype.type(0), x), valid)
    return out


# --------------------------------------------------------------------------------------------
# the public functions


_FAMILIES: tuple[tuple[type, Callable[[Any], Intermediates]], ...] = (
    (LSTMCache, _lstm),
    (GRUCache, _gru),
    (RNNCache, _rnn),
    (AttentionCache, _attention),
    (MultiheadAttentionCache, _mha),
    (TransformerEncoderLayerCache, lambda c: _transformer(c, decoder=False)),
    (TransformerDecoderLayerCache, lambda c: _transformer(c, decoder=True)),
)


def intermediates(cache: Any) -> Intermediates:
    """Every intermediate value of a reference forward, ``name -> array``, in forward order:
    e.g. ``"l0.forward.t3.f" = sigmoid(a_f)`` of step 3, ``"logits" = softcap(scale q.k) + bias``.

    cache : the cache of `lstm_forward`, `gru_forward`, `rnn_forward`, `attention_forward`,
        `multihead_attention_forward`, `transformer_encoder_layer_forward` or
        `transformer_decoder_layer_forward` (run on numpy_ref; a float16/bfloat16 call's cache
        gives the values its same-precision reference computed, in float32).

    Returns an `Intermediates` (a dict; ``.valid`` marks the entries that are data). The names
    and shapes of each family: the `numpy_ref.divergence` module docstring.
    """
    if isinstance(cache, LowPrecisionCache):
        cache = cache.inner
    for cls, extract in _FAMILIES:
        if isinstance(cache, cls):
            return extract(cache)
    known = ", ".join(cls.__name__ for cls, _ in _FAMILIES)
    raise TypeError(f"intermediates: expected the cache of a reference forward ({known}), got "
                    f"{type(cache).__name__}")


def default_tolerance(dtype: Any) -> tuple[float, float]:
    """``(rtol, atol)`` for values of `dtype` checked by ``|got - want| <= atol + rtol |want|``
    against a float64 reference: 1e-7 for float64, 512 eps32 for float32, 16 eps of the dtype
    for float16 and bfloat16 (the table of the `numpy_ref.divergence` module docstring)."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return RTOL32, ATOL32
    if dtype == np.float16:
        return RTOL16, ATOL16
    if dtype.name == "bfloat16":
        return 16 * 2.0 ** -7, 16 * 2.0 ** -7
    return RTOL64, ATOL64


_STEP = re.compile(r"^l(\d+)\.(forward|reverse)\.t(\d+)\.(\w+)$")
_GATES = {"i": "input gate", "f": "forget gate", "g": "cell candidate g", "o": "output gate",
          "c": "cell state c", "h": "hidden state h", "r": "reset gate", "z": "update gate",
          "n": "new gate n", "a": "pre-activation a"}


def describe(name: str) -> str:
    """A reader's label of an intermediate's name: ``describe("l0.forward.t3.f") =
    "layer 0, forward direction, step t=3, forget gate"``; other names as they are (the
    `numpy_ref.divergence` module docstring lists them)."""
    m = _STEP.match(name)
    if not m:
        return name
    layer, direction, t, what = m.groups()
    return f"layer {layer}, {direction} direction, step t={t}, {_GATES.get(what, what)}"


class DivergenceError(AssertionError):
    """Raised by `DivergenceReport.raise_if_diverged`: some value breaks ``|got - want| <=
    atol + rtol |want|``; the message is the report (the rule and the names: see the
    module docstring of `numpy_ref.divergence`)."""


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        a = a.numpy()
    return np.asarray(a)


@documented
class DivergenceReport(NamedTuple):
    """Where an implementation first leaves the reference (`first_divergence`); `str()` of it
    is a readable report, ``ok`` whether nothing left the tolerance."""

    comparisons: tuple[Comparison, ...]  # every name handed in, in forward order
    first: Comparison | None  # the first that failed (None: none did)
    missing: tuple[str, ...]  # the reference's names not handed in (not compared), in order
    total: int  # how many names the reference has

    @property
    def ok(self) -> bool:
        """Whether every name compared passed."""
        return self.first is None

    @property
    def compared(self) -> tuple[str, ...]:
        """The names compared, in forward order."""
        return tuple(c.name for c in self.comparisons)

    @property
    def passed_before(self) -> tuple[str, ...]:
        """The names compared before the first failure (all passed); all when ok."""
        out = []
        for c in self.comparisons:
            if not c.ok:
                break
            out.append(c.name)
        return tuple(out)

    @property
    def failed(self) -> tuple[str, ...]:
        """Every name that failed, the first one first."""
        return tuple(c.name for c in self.comparisons if not c.ok)

    def raise_if_diverged(self) -> None:
        """Raise `DivergenceError` with this report when some name failed."""
        if not self.ok:
            raise DivergenceError(str(self))

    def __str__(self) -> str:
        n = len(self.comparisons)
        lines = []
        if self.first is None:
            lines.append(f"no divergence: {n} of {self.total} intermediates compared, all "
                         f"within tolerance")
            if self.comparisons:
                worst = max(self.comparisons, key=lambda c: c.max_error)
                lines.append(f"  largest error {worst.max_error:.3g} at {worst.name!r} "
                             f"({worst.rule})")
        else:
            c = self.first
            before = self.passed_before
            label = describe(c.name)
            lines.append(f"first divergence at {c.name!r}"
                         + (f" ({label})" if label != c.name else "")
                         + f", index {c.index}:")
            lines.append(f"  got {c.got!r}, expected {c.want!r}: error {c.error:.3g} > allowed "
                         f"{c.allowed:.3g} ({c.rule}); max error there {c.max_error:.3g}")
            lines.append(f"  {len(before)} intermediates before it passed"
                         + (f" (the last: {before[-1]!r})" if before else "")
                         + f"; {n} of {self.total} compared, "
                         f"{len(self.failed)} failed in all")
            later = self.failed[1:4]
            if later:
                lines.append("  later failures (downstream of it, or more bugs): "
                             + ", ".join(repr(x) for x in later)
                             + (", ..." if len(self.failed) > 4 else ""))
        if self.missing:
            shown = ", ".join(self.missing[:8]) + (", ..." if len(self.missing) > 8 else "")
            lines.append(f"  not handed in ({len(self.missing)}, skipped): {shown}")
        return "\n".join(lines)


def first_divergence(reference: Mapping[str, Any] | Any, got: Mapping[str, Any], *,
                     rtol: float | None = None, atol: float | None = None) -> DivergenceReport:
    """Compare `got` with the reference's intermediates in forward order and name the first
    that leaves ``|got - want| <= atol + rtol * |want|`` (`numpy_ref.testing.compare`).

    Parameters
    ----------
    reference : `intermediates`' result (or any dict name -> array in forward order), or a
        reference forward's cache (then ``intermediates(cache)``).
    got : your values, name -> array (NumPy or torch), any subset of the reference's names,
        each of its reference's shape (the `numpy_ref.divergence` module docstring's tables).
    rtol, atol : the tolerance; when None, `default_tolerance` of each of your arrays' dtype
        (1e-7 for float64, 512 eps32 for float32).

    Returns a `DivergenceReport`: ``first`` the first failing `Comparison` (its name, index,
    got, want, error, allowed) or None, every comparison in order, the names not handed in.
    Raises KeyError for a name the reference does not have (listing the valid ones) and
    ValueError for a shape that differs from the reference's. Entries that are not data
    (``reference.valid``) are not compared.
    """
    if not isinstance(reference, Mapping):
        reference = intermediates(reference)
    valid = getattr(reference, "valid", {})
    unknown = [k for k in got if k not in reference]
    if unknown:
        names = list(reference)
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40
                                         else "")
        raise KeyError(f"first_divergence: unknown names {unknown}; the reference's names, in "
                       f"forward order: {shown}")
    comparisons, missing, first = [], [], None
    for name, want in reference.items():
        if name not in got:
            missing.append(name)
            continue
        g, w = _np(got[name]), np.asarray(want)
        if g.shape != w.shape:
            raise ValueError(f"first_divergence: {name!r} has shape {g.shape}, the reference's "
                             f"is {w.shape} (the layouts: the numpy_ref.divergence module "
                             f"docstring)")
        r, a = default_tolerance(g.dtype)
        r, a = (r if rtol is None else rtol), (a if atol is None else atol)
        if name in valid:  # entries that are not data: equal on both sides, so they pass
            m = valid[name]
            g = np.where(m, g, g.dtype.type(0) if g.dtype.kind == "f" else 0)
            w = np.where(m, w, w.dtype.type(0))
        c = compare(name, g, w, rtol=r, atol=a)
        comparisons.append(c)
        if first is None and not c.ok:
            first = c
    return DivergenceReport(tuple(comparisons), first, tuple(missing), len(reference))


def _float64(x: Any) -> Any:
    """x with every floating array (in dicts, lists and tuples too) as float64."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return x.astype(np.float64)
    if isinstance(x, Mapping):
        return {k: _float64(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float64(v) for v in x)
    return x


def find_divergence(forward: Callable[..., Any], args: Sequence[Any],
                    kwargs: Mapping[str, Any] | None, got: Mapping[str, Any], *,
                    rtol: float | None = None, atol: float | None = None) -> DivergenceReport:
    """Run the reference ``forward(*args, **kwargs)`` in float64 (every float array of args and
    kwargs, params dicts included, cast; its last result is the cache) and return
    ``first_divergence(intermediates(cache), got, rtol=, atol=)``: where your values `got`
    first leave ``|got - want| <= atol + rtol |want|`` (see the numpy_ref.divergence
    module docstring).

    forward : e.g. `numpy_ref.lstm_forward`.  args, kwargs : its arguments, as you ran yours.
    got : your values, name -> array.
    """
    result = forward(*_float64(tuple(args)), **_float64(dict(kwargs or {})))
    return first_divergence(intermediates(result[-1]), got, rtol=rtol, atol=atol)
