r"""The Transformer by hand, forward and backward: the feed-forward block,
`torch.nn.TransformerEncoderLayer` and `TransformerDecoderLayer` here, their stacks
(`nn.TransformerEncoder`, `nn.TransformerDecoder`) and `nn.Transformer` in
`numpy_ref.transformer_stacks`, with torch's state_dict names, every mask torch takes, and
dropout 0 (the reference is not random). The math of all of them is below.

Everything is composed of public op pairs (`multihead_attention_*`, `layer_norm_*`,
`linear_*`, `relu_*`/`gelu_*`) on the op module ``backend`` (`numpy_ref` by default, `kernels`
for speed), so no derivative is written twice: each backward below is its forward's ops'
backwards in reverse order, the gradients of a value used twice added.

Shapes
------
N  batch     S  source steps     T  target steps     E  d_model     F  dim_feedforward
h  nhead     (arrays are [S, N, E] by default, [N, S, E] with batch_first, [S, E] unbatched)

The feed-forward block (params ``linear1.*`` [F, E], [F]; ``linear2.*`` [E, F], [E])
-------------------------------------------------------------------------------------
    FF(x) = linear2(act(linear1(x)))                act = relu or gelu (exact)

The encoder layer (params ``self_attn.*``, ``linear1.*``, ``linear2.*``, ``norm1.*``,
``norm2.*``)
------------------------------------------------------------------------------------------
    SA(x) = MultiheadAttention(x, x, x, attn_mask=src_mask, key_padding_mask=..., no weights)
    post-norm (norm_first=False, torch's default):   x = norm1(x + SA(x));  y = norm2(x + FF(x))
    pre-norm  (norm_first=True):                     x = x + SA(norm1(x));  y = x + FF(norm2(x))

The decoder layer (adds ``multihead_attn.*`` and ``norm3.*``), with memory from the encoder
-------------------------------------------------------------------------------------------
    CA(x) = MultiheadAttention(x, memory, memory, attn_mask=memory_mask, key_padding_mask=...)
    post-norm:  x = norm1(x + SA(x));  x = norm2(x + CA(x));  y = norm3(x + FF(x))
    pre-norm:   x = x + SA(norm1(x));  x = x + CA(norm2(x));  y = x + FF(norm3(x))

Stacks and nn.Transformer
-------------------------
    encoder(src) = norm(layer_{n-1}( ... layer_0(src)))      params layers.{i}.*, norm.* (optional)
    transformer(src, tgt) = decoder(tgt, encoder(src))       params encoder.*, decoder.*

Backward: the order of a residual block
---------------------------------------
A post-norm block ``y = norm(x + B(x))`` goes back as ``d_z = norm_backward(d_y)``, then
``d_x = d_z + B_backward(d_z)`` (the residual passes d_z unchanged). A pre-norm block
``y = x + B(norm(x))`` as ``d_x = d_y + norm_backward(B_backward(d_y))``. Self-attention's
query, key and value are one x: its three gradients add. Cross-attention's key and value are
the memory: d_memory = d_key + d_value, summed over every decoder layer.

Masks and padding
-----------------
The masks keep torch's meaning and go to multi-head attention as they are (bool: True = not
allowed; float: added to the scores; ``is_causal`` torch's hint). A position that its key
padding mask marks (True, or -inf in a float mask) is padding, as its key in every layer: its
row of the input is read as zeros, its row of the output is 0 and its row of every input
gradient is 0, so whatever it holds (NaN and inf included) changes nothing, bit for bit.
torch computes such a row from what it holds; a real row never reads it, so the real rows agree
with torch. A query that may see no key at all gets attention 0 (its output is then built from
the attention's output bias). torch 2.13's layers do the same in training (their attention runs
without weights, through SDPA, which gives 0 there); the same layer in eval mode under no_grad
(its fused fast path) gives NaN, as does nn.MultiheadAttention asked for its weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks, unchanged
from numpy_ref.contract import layers as layers_contract
from numpy_ref.contract import transformer as contract
from numpy_ref.contract.backend import op_module
from numpy_ref.contract.fields import documented
from numpy_ref.contract.models import group, prefixed
from numpy_ref.precision import same_precision

__all__ = [
    "FeedForwardCache",
    "TransformerDecoderLayerCache",
    "TransformerEncoderLayerCache",
    "feed_forward_backward",
    "feed_forward_forward",
    "transformer_decoder_layer_backward",
    "transformer_decoder_layer_forward",
    "transformer_encoder_layer_backward",
    "transformer_encoder_layer_forward",
]


# --------------------------------------------------------------------------------------------
# the feed-forward block


@documented
class FeedForwardCache(NamedTuple):
    """What `feed_forward_backward` needs."""

    backend: ModuleType  # the op module the forward ran on
    linear1: Any  # linear1's cache (x [..., E])
    activation: Any  # the activation's cache (relu's output or gelu's input [..., F])
    linear2: Any  # linear2's cache
    name: str  # "relu" or "gelu"


@same_precision()
def feed_forward_forward(
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    activation: str = "relu",
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, FeedForwardCache]:
    """The Transformer layer's feed-forward block ``y = linear2(act(linear1(x)))`` (the
    `numpy_ref.transformer` module docstring).

    x [..., E]; params ``linear1.weight`` [F, E], ``linear2.weight`` [E, F] and their biases
    [F], [E] (optional); activation "relu" or "gelu" (exact) -> (y [..., E], cache).
    """
    backend = op_module(backend)
    name = contract.choice("activation", activation, contract.ACTIVATIONS)
    checks.no_unexpected_keys(params, {"linear1.weight", "linear1.bias", "linear2.weight",
                                       "linear2.bias"}, "the block takes linear1.* and linear2.*")
    with checks.quiet():
        a, c1 = backend.linear_forward(x, group(params, "linear1"))
        if name == "relu":
            a, ca = backend.relu_forward(a)
        else:
            a, ca = backend.gelu_forward(a)
        y, c2 = backend.linear_forward(a, group(params, "linear2"))
    return y, FeedForwardCache(backend, c1, ca, c2, name)


@same_precision(backward=True)
def feed_forward_backward(d_y: np.ndarray, cache: FeedForwardCache
                          ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward of `feed_forward_forward`: ``d_a = act'(z) * (d_y W_2)``, ``d_x = d_a W_1``
    with z = linear1(x) (the `numpy_ref.transformer` module docstring).

    d_y [..., E] -> (d_x [..., E], d_params with ``linear1.*`` and ``linear2.*``)."""
    backend, c1, ca, c2, name = checks.cache_of(cache, FeedForwardCache, "feed_forward_forward")
    with checks.quiet():
        d_a, d2 = backend.linear_backward(d_y, c2)
        d_a = (backend.relu_backward if name == "relu" else backend.gelu_backward)(d_a, ca)
        d_x, d1 = backend.linear_backward(d_a, c1)
    grads = {f"linear1.{k}": v for k, v in d1.items()}
    grads |= {f"linear2.{k}": v for k, v in d2.items()}
    return d_x, grads


# --------------------------------------------------------------------------------------------
# the layers


@documented
class _Options(NamedTuple):
    """A layer's options, as checked."""

    nhead: int  # h
    norm_first: bool  # pre-norm (True) or post-norm
    activation: str  # "relu" or "gelu"
    eps: float  # the layer norms' eps
    batch_first: bool  # [N, S, E] (True) or [S, N, E]


def _options(nhead, norm_first, activation, eps, batch_first) -> _Options:
    if isinstance(nhead, (bool, np.bool_)) or not isinstance(nhead, (int, np.integer)):
        raise TypeError(f"nhead: expected an int, got {type(nhead).__name__}")
    return _Options(int(nhead), contract.flag("norm_first", norm_first),
                    contract.choice("activation", activation, contract.ACTIVATIONS),
                    contract.positive("eps", eps), contract.flag("batch_first", batch_first))


def _zero_rows(x: np.ndarray, pad: np.ndarray | None) -> np.ndarray:
    """x with its padding rows (pad True) set to 0; x itself when there are none."""
    return x if pad is None else np.where(pad, x.dtype.type(0), x)


def _data(name: str, x: Any, batch_first: bool) -> np.ndarray:
    labels = ("N", "S", "E") if batch_first else ("S", "N", "E")
    return checks.float_array_ranks(name, x, (("S", "E"), labels))


@documented
class _Block(NamedTuple):
    """One residual block's caches: its norm's and its sublayer's."""

    norm: Any  # the layer norm's cache
    sublayer: Any  # multi-head attention's or the feed-forward block's cache


@documented
class TransformerEncoderLayerCache(NamedTuple):
    """What `transformer_encoder_layer_backward` needs."""

    backend: ModuleType  # the op module the forward ran on
    options: _Options  # the checked options
    pad: np.ndarray | None  # bool, broadcastable to src: its padding rows (None: none)
    shape: tuple[int, ...]  # src's shape (d_out's)
    dtype: np.dtype  # src's dtype
    blocks: tuple[_Block, _Block]  # self-attention's, the feed-forward block's
    arguments: tuple  # the caller's arrays by name (`numpy_ref.contract.unchanged.names`)
    fingerprints: unchanged.Fingerprints | None = None  # the caller's arrays as the forward saw
    #   them (the ops inside record none: what they hold is the layer's own); the backward
    #   checks them first


def _attention_block(backend, o, p, prefix, x, kv, mask, kpm, is_causal, need_weights=False):
    """multi-head attention of x over kv (kv None: self-attention) with the layer's params."""
    kv = x if kv is None else kv
    return backend.multihead_attention_forward(
        x, kv, kv, group(p, prefix), num_heads=o.nhead, key_padding_mask=kpm, attn_mask=mask,
        is_causal=is_causal, need_weights=need_weights, average_attn_weights=False,
        batch_first=o.batch_first)


def _residual(backend, o, x, norm_params, sublayer):
    """One residual block: ``norm(x + B(x))`` (post-norm) or ``x + B(norm(x))`` (pre-norm);
    `sublayer(z)` returns (B(z), its cache, anything else). -> (y, _Block, anything else)."""
    with checks.quiet():
        if o.norm_first:
            z, cn = backend.layer_norm_forward(x, norm_params, eps=o.eps)
            b, cb, extra = sublayer(z)
            return x + b, _Block(cn, cb), extra
        b, cb, extra = sublayer(x)
        y, cn = backend.layer_norm_forward(x + b, norm_params, eps=o.eps)
        return y, _Block(cn, cb), extra


def _residual_backward(backend, o, d_y, block, sublayer_backward):
    """The backward of `_residual`: `sublayer_backward(d_b, cache)` returns (d_z, its params'
    gradients, anything else). -> (d_x, d_norm, d_sublayer, anything else)."""
    with checks.quiet():
        if o.norm_first:
            d_z, d_sub, extra = sublayer_backward(d_y, block.sublayer)
            d_xn, d_norm = backend.layer_norm_backward(d_z, block.norm)
            return d_y + d_xn, d_norm, d_sub, extra
        d_s, d_norm = backend.layer_norm_backward(d_y, block.norm)
        d_z, d_sub, extra = sublayer_backward(d_s, block.sublayer)
        return d_s + d_z, d_norm, d_sub, extra


def _ff_block(backend, o, p):
    def run(z):
        y, c = backend.feed_forward_forward(z, {k: v for k, v in p.items()
                                                if k.startswith("linear")},
                                            activation=o.activation, backend=backend)
        return y, c, None
    return run


def _ff_backward(backend):
    def run(d, c):
        d_z, grads = backend.feed_forward_backward(d, c)
        return d_z, grads, None
    return run


def _self_attention_backward(backend):
    def run(d, c):
        d_q, d_k, d_v, grads = backend.multihead_attention_backward(d, c)
        return d_q + d_k + d_v, grads, None
    return run


@unchanged.memoized()
@same_precision()
def transformer_encoder_layer_forward(
    src: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    nhead: int,
    norm_first: bool = False,
    activation: str = "relu",
    eps: float = 1e-5,
    src_mask: np.ndarray | None = None,
    src_key_padding_mask: np.ndarray | None = None,
    is_causal: bool = False,
    batch_first: bool = False,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, TransformerEncoderLayerCache]:
    """`torch.nn.TransformerEncoderLayer(E, nhead, F, dropout=0, activation, eps, batch_first,
    norm_first, bias)` forward, with the module's state_dict as params.

    Post-norm ``x = norm1(src + SA(src)); out = norm2(x + FF(x))``, pre-norm
    ``x = src + SA(norm1(src)); out = x + FF(norm2(x))`` (the `numpy_ref.transformer`
    module docstring).

    Parameters
    ----------
    src : [S, N, E], [N, S, E] (batch_first) or unbatched [S, E]; float32 or float64.
    params : ``self_attn.in_proj_weight`` [3E, E], ``self_attn.in_proj_bias`` [3E],
        ``self_attn.out_proj.weight`` [E, E], ``self_attn.out_proj.bias`` [E],
        ``linear1.weight`` [F, E], ``linear1.bias`` [F], ``linear2.weight`` [E, F],
        ``linear2.bias`` [E], ``norm1.weight``, ``norm1.bias``, ``norm2.weight``,
        ``norm2.bias`` [E]; no bias at all for torch's ``bias=False``.
    nhead : h, a divisor of E.
    norm_first, activation ("relu" or "gelu"), eps, batch_first : torch's options.
    src_mask : the self-attention's attn_mask, [S, S] or [N*h, S, S], bool (True = not allowed)
        or float (added).
    src_key_padding_mask : [N, S] ([S] unbatched), bool (True = padding) or float (added; -inf
        marks padding).
    is_causal : torch's hint that src_mask is the causal mask (multi-head attention's rule).
    backend : the op module (`numpy_ref` when None, or `kernels`).

    Returns
    -------
    out : like src (0 in padding rows).  cache.
    """
    backend = op_module(backend)
    o = _options(nhead, norm_first, activation, eps, batch_first)
    src = _data("src", src, o.batch_first)
    contract.heads(o.nhead, src.shape[-1])
    contract.layer_params(params, src.shape[-1], src.dtype, decoder=False)
    pad = contract.padding_rows(src_key_padding_mask, src, o.batch_first)
    named = unchanged.names({"src": src, "params": params, "src_mask": src_mask,
                             "src_key_padding_mask": src_key_padding_mask})
    fingerprints = _record("transformer_encoder_layer", named)
    with unchanged.untracked():
        out, blocks = _encoder_layer(backend, o, src, params, pad, src_mask,
                                     src_key_padding_mask, is_causal)
    cache = TransformerEncoderLayerCache(backend, o, pad, src.shape, src.dtype, blocks, named,
                                         fingerprints)
    return out, cache


def _encoder_layer(backend, o, src, params, pad, src_mask, src_key_padding_mask, is_causal):
    """The encoder layer's two residual blocks -> (out, (self-attention's, feed-forward's))."""
    x = _zero_rows(src, pad)

    def self_attention(z):
        y, _, c = _attention_block(backend, o, params, "self_attn", z, None, src_mask,
                                   src_key_padding_mask, is_causal)
        return y, c, None

    x, sa, _ = _residual(backend, o, x, group(params, "norm1"), self_attention)
    x, ff, _ = _residual(backend, o, x, group(params, "norm2"), _ff_block(backend, o, params))
    return _zero_rows(x, pad), (sa, ff)


@same_precision(backward=True)
def transformer_encoder_layer_backward(d_out: np.ndarray, cache: TransformerEncoderLayerCache
                                       ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward of `transformer_encoder_layer_forward`, each residual block in reverse:
    ``d_z = norm_backward(d_y); d_x = d_z + B_backward(d_z)`` (post-norm) or
    ``d_x = d_y + norm_backward(B_backward(d_y))`` (pre-norm), the feed-forward block's, then
    self-attention's (the `numpy_ref.transformer` module docstring).

    d_out like out -> (d_src like src, d_params with the params' keys); padding rows'
    cotangents are ignored and their d_src is 0.
    """
    backend, o, pad, shape, dtype, (sa, ff), named, fingerprints = checks.cache_of(
        cache, TransformerEncoderLayerCache, "transformer_encoder_layer_forward")
    unchanged.check(fingerprints)
    with unchanged.untracked():
        d = _zero_rows(layers_contract.cotangent("d_out", d_out, shape, dtype,
                                                 "the layer's output"), pad)
        d, d_n2, d_ff, _ = _residual_backward(backend, o, d, ff, _ff_backward(backend))
        d, d_n1, d_sa, _ = _residual_backward(backend, o, d, sa, _self_attention_backward(backend))
    grads = prefixed("self_attn", d_sa) | d_ff | prefixed("norm1", d_n1) | prefixed(
        "norm2", d_n2)
    return _zero_rows(d, pad), _ordered(grads, named)


def _record(op: str, named) -> unchanged.Fingerprints | None:
    """Fingerprint a composite's caller arrays (`unchanged.names`) once, for its backward to
    check; the ops it runs inside `unchanged.untracked` record none (None here when the
    composite itself runs inside one, as a stack's layers do)."""
    return unchanged.record(f"{op}_forward", f"{op}_backward", [(n, a) for n, a, _ in named])


def _ordered(grads: dict[str, np.ndarray], named) -> dict[str, np.ndarray]:
    """`grads` in the order of the caller's params (as `unchanged.names` listed them)."""
    order = [n[len("params['"):-2] for n, _, _ in named if n.startswith("params[")]
    return {k: grads[k] for k in order if k in grads}


@documented
class TransformerDecoderLayerCache(NamedTuple):
    """What `transformer_decoder_layer_backward` needs."""

    backend: ModuleType  # the op module the forward ran on
    options: _Options  # the checked options
    pad: np.ndarray | None  # bool, broadcastable to tgt: its padding rows (None: none)
    memory_pad: np.ndarray | None  # bool, broadcastable to memory: its padding rows
    shape: tuple[int, ...]  # tgt's shape (d_out's)
    dtype: np.dtype  # tgt's dtype
    blocks: tuple[_Block, _Block, _Block]  # self-attention's, cross-attention's, feed-forward's
    weights: np.ndarray | None  # the cross-attention's weights [N, h, T, S] ([h, T, S]
    #   unbatched) when the forward was asked for them (need_weights), else None; not read
    arguments: tuple  # the caller's arrays by name (`numpy_ref.contract.unchanged.names`)
    fingerprints: unchanged.Fingerprints | None = None  # the caller's arrays as the forward saw
    #   them (the ops inside record none); the backward checks them first


@unchanged.memoized()
@same_precision()
def transformer_decoder_layer_forward(
    tgt: np.ndarray,
    memory: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    nhead: int,
    norm_first: bool = False,
    activation: str = "relu",
    eps: float = 1e-5,
    tgt_mask: np.ndarray | None = None,
    memory_mask: np.ndarray | None = None,
    tgt_key_padding_mask: np.ndarray | None = None,
    memory_key_padding_mask: np.ndarray | None = None,
    tgt_is_causal: bool = False,
    memory_is_causal: bool = False,
    batch_first: bool = False,
    need_weights: bool = False,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, TransformerDecoderLayerCache]:
    """`torch.nn.TransformerDecoderLayer(E, nhead, F, dropout=0, activation, eps, batch_first,
    norm_first, bias)` forward, with the module's state_dict as params.

    Post-norm ``x = norm1(tgt + SA(tgt)); x = norm2(x + CA(x, memory)); out = norm3(x + FF(x))``,
    pre-norm ``x = tgt + SA(norm1(tgt)); x = x + CA(norm2(x), memory); out = x + FF(norm3(x))``
    (the `numpy_ref.transformer` module docstring).

    Parameters
    ----------
    tgt : [T, N, E], [N, T, E] (batch_first) or unbatched [T, E]; float32 or float64.
    memory : [S, N, E], [N, S, E] or [S, E], tgt's layout and dtype.
    params : the encoder layer's (`transformer_encoder_layer_forward`) plus
        ``multihead_attn.in_proj_weight`` [3E, E], ``multihead_attn.in_proj_bias`` [3E],
        ``multihead_attn.out_proj.*`` and ``norm3.*`` [E].
    tgt_mask : self-attention's attn_mask [T, T] or [N*h, T, T]; memory_mask: cross-attention's
        [T, S] or [N*h, T, S]; bool (True = not allowed) or float (added).
    tgt_key_padding_mask : [N, T]; memory_key_padding_mask : [N, S]; bool (True = padding) or
        float (added; -inf marks padding).
    tgt_is_causal, memory_is_causal : torch's hints that tgt_mask / memory_mask are causal.
    need_weights : keep the cross-attention's weights per head in ``cache.weights`` (torch's
        layer computes none; the attention then takes its explicit path, same values).
    backend : the op module (`numpy_ref` when None, or `kernels`).

    Returns
    -------
    out : like tgt (0 in padding rows).  cache.
    """
    backend = op_module(backend)
    o = _options(nhead, norm_first, activation, eps, batch_first)
    need_weights = contract.flag("need_weights", need_weights)
    tgt = _data("tgt", tgt, o.batch_first)
    memory = _data("memory", memory, o.batch_first)
    checks.same_dtype("memory", memory, tgt.dtype, "tgt")
    if memory.ndim != tgt.ndim:
        raise ValueError(f"memory: expected {tgt.ndim}-D like tgt {tgt.shape}, got shape "
                         f"{memory.shape}")
    contract.heads(o.nhead, tgt.shape[-1])
    contract.layer_params(params, tgt.shape[-1], tgt.dtype, decoder=True)
    pad = contract.padding_rows(tgt_key_padding_mask, tgt, o.batch_first)
    memory_pad = contract.padding_rows(memory_key_padding_mask, memory, o.batch_first)
    named = unchanged.names({"tgt": tgt, "memory": memory, "params": params,
                             "tgt_mask": tgt_mask, "memory_mask": memory_mask,
                             "tgt_key_padding_mask": tgt_key_padding_mask,
                             "memory_key_padding_mask": memory_key_padding_mask})
    fingerprints = _record("transformer_decoder_layer", named)
    masks = (tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
             tgt_is_causal, memory_is_causal)
    with unchanged.untracked():
        out, blocks, weights = _decoder_layer(backend, o, tgt, memory, params, pad, memory_pad,
                                              masks, need_weights)
    cache = TransformerDecoderLayerCache(backend, o, pad, memory_pad, tgt.shape, tgt.dtype,
                                         blocks, weights, named, fingerprints)
    return out, cache


def _decoder_layer(backend, o, tgt, memory, params, pad, memory_pad, masks, need_weights):
    """The decoder layer's three residual blocks -> (out, their caches, the cross-attention
    weights or None)."""
    (tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal,
     memory_is_causal) = masks
    x, mem = _zero_rows(tgt, pad), _zero_rows(memory, memory_pad)

    def self_attention(z):
        y, _, c = _attention_block(backend, o, params, "self_attn", z, None, tgt_mask,
                                   tgt_key_padding_mask, tgt_is_causal)
        return y, c, None

    def cross_attention(z):
        y, w, c = _attention_block(backend, o, params, "multihead_attn", z, mem, memory_mask,
                                   memory_key_padding_mask, memory_is_causal, need_weights)
        return y, c, w

    x, sa, _ = _residual(backend, o, x, group(params, "norm1"), self_attention)
    x, ca, weights = _residual(backend, o, x, group(params, "norm2"), cross_attention)
    x, ff, _ = _residual(backend, o, x, group(params, "norm3"), _ff_block(backend, o, params))
    return _zero_rows(x, pad), (sa, ca, ff), weights


@same_precision(backward=True)
def transformer_decoder_layer_backward(d_out: np.ndarray, cache: TransformerDecoderLayerCache
                                       ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Backward of `transformer_decoder_layer_forward`, its three residual blocks in reverse
    (the `numpy_ref.transformer` module docstring), with ``d_memory = d_key + d_value`` of the
    cross-attention.

    d_out like out -> (d_tgt like tgt, d_memory like memory, d_params with the params' keys).
    Padding rows' cotangents are ignored; d_tgt and d_memory are 0 in padding rows."""
    backend, o, pad, memory_pad, shape, dtype, (sa, ca, ff), _, named, fingerprints = (
        checks.cache_of(cache, TransformerDecoderLayerCache, "transformer_decoder_layer_forward"))
    unchanged.check(fingerprints)

    def cross_backward(d, c):
        d_q, d_k, d_v, grads = backend.multihead_attention_backward(d, c)
        return d_q, grads, d_k + d_v

    with unchanged.untracked():
        d = _zero_rows(layers_contract.cotangent("d_out", d_out, shape, dtype,
                                                 "the layer's output"), pad)
        d, d_n3, d_ff, _ = _residual_backward(backend, o, d, ff, _ff_backward(backend))
        d, d_n2, d_ca, d_memory = _residual_backward(backend, o, d, ca, cross_backward)
        d, d_n1, d_sa, _ = _residual_backward(backend, o, d, sa, _self_attention_backward(backend))
    grads = (prefixed("self_attn", d_sa) | prefixed("multihead_attn", d_ca) | d_ff
             | prefixed("norm1", d_n1) | prefixed("norm2", d_n2) | prefixed("norm3", d_n3))
    return _zero_rows(d, pad), _zero_rows(d_memory, memory_pad), _ordered(grads, named)
