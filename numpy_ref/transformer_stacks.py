r"""The Transformer's stacks, forward and backward by hand: `torch.nn.TransformerEncoder`,
`nn.TransformerDecoder` (layers and the final norm) and `nn.Transformer`, with torch's
state_dict names, built on the layers of `numpy_ref.transformer` (whose module docstring has the
math, the masks and the padding rules).

Shapes: src [S, N, E], tgt [T, N, E] ([N, ., E] with batch_first, [., E] unbatched).

    encoder(src)          = norm(layer_{n-1}( ... layer_0(src)))        params layers.{i}.*, norm.*
    decoder(tgt, memory)  = norm(layer_{n-1}( ... layer_0(tgt, memory), memory))
    transformer(src, tgt) = decoder(tgt, encoder(src))                  params encoder.*, decoder.*

Backward: the norm's, then each layer's from the top; d_memory is summed over the decoder's
layers and flows into the encoder's backward.
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
from numpy_ref.transformer import (
    TransformerDecoderLayerCache,
    TransformerEncoderLayerCache,
    _record,
    _zero_rows,
    transformer_decoder_layer_backward,
    transformer_decoder_layer_forward,
    transformer_encoder_layer_backward,
    transformer_encoder_layer_forward,
)

__all__ = [
    "TransformerCache",
    "TransformerDecoderCache",
    "TransformerEncoderCache",
    "transformer_backward",
    "transformer_decoder_backward",
    "transformer_decoder_forward",
    "transformer_encoder_backward",
    "transformer_encoder_forward",
    "transformer_forward",
]


@documented
class TransformerEncoderCache(NamedTuple):
    """What `transformer_encoder_backward` needs."""

    backend: ModuleType  # the op module the forward ran on
    layers: tuple[TransformerEncoderLayerCache, ...]  # each layer's cache, bottom first
    norm: Any  # the final norm's cache, or None without ``norm.*``
    pad: np.ndarray | None  # bool, broadcastable to src: its padding rows
    keys: tuple[str, ...]  # the params' keys, in the caller's order (d_params comes back in it)
    fingerprints: unchanged.Fingerprints | None = None  # the caller's arrays as the forward saw
    #   them (the layers inside record none); the backward checks them first


@unchanged.memoized()
@same_precision()
def transformer_encoder_forward(
    src: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    nhead: int,
    norm_first: bool = False,
    activation: str = "relu",
    eps: float = 1e-5,
    mask: np.ndarray | None = None,
    src_key_padding_mask: np.ndarray | None = None,
    is_causal: bool | None = None,
    batch_first: bool = False,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, TransformerEncoderCache]:
    """`torch.nn.TransformerEncoder(layer, num_layers, norm)` forward:
    ``out = norm(layer_{n-1}(... layer_0(src)))`` (params ``layers.{i}.*``, each an encoder
    layer's, then ``norm.*`` when given; the `numpy_ref.transformer` module docstring).

    src [S, N, E] / [N, S, E] / [S, E]; mask the layers' src_mask; is_causal None or a bool
    (torch detects a causal mask when None; the results are the same either way) -> (out like
    src, cache). Every other option: `transformer_encoder_layer_forward`.
    """
    backend = op_module(backend)
    n = contract.stack_depth(params, "the encoder")
    fingerprints = _record("transformer_encoder", unchanged.names(
        {"src": src, "params": params, "mask": mask,
         "src_key_padding_mask": src_key_padding_mask}))
    with unchanged.untracked():
        x, caches, norm, pad = _encoder(backend, src, params, n, nhead, norm_first, activation,
                                        eps, mask, src_key_padding_mask, is_causal, batch_first)
    return x, TransformerEncoderCache(backend, caches, norm, pad, tuple(params), fingerprints)


def _encoder(backend, src, params, n, nhead, norm_first, activation, eps, mask,
             src_key_padding_mask, is_causal, batch_first):
    """The encoder's layers and norm -> (out, the layers' caches, the norm's, pad)."""
    caches, x = [], src
    for i in range(n):
        x, c = transformer_encoder_layer_forward(
            x, group(params, f"layers.{i}"), nhead=nhead, norm_first=norm_first,
            activation=activation, eps=eps, src_mask=mask,
            src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal),
            batch_first=batch_first, backend=backend)
        caches.append(c)
    norm = None
    pad = caches[0].pad
    if "norm.weight" in params or "norm.bias" in params:
        x, norm = backend.layer_norm_forward(x, group(params, "norm"), eps=eps)
        x = _zero_rows(x, pad)
    return x, tuple(caches), norm, pad


@same_precision(backward=True)
def transformer_encoder_backward(d_out: np.ndarray, cache: TransformerEncoderCache
                                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward of `transformer_encoder_forward`: the norm's backward, then each layer's from
    the top, ``d_x_i = layer_i_backward(d_x_{i+1})`` (the `numpy_ref.transformer` module docstring).

    d_out like out -> (d_src, d_params with ``layers.{i}.*`` and ``norm.*``)."""
    backend, layers, norm, pad, keys, fingerprints = checks.cache_of(
        cache, TransformerEncoderCache, "transformer_encoder_forward")
    unchanged.check(fingerprints)
    with unchanged.untracked():
        return _encoder_backward(backend, layers, norm, pad, keys, d_out)


def _encoder_backward(backend, layers, norm, pad, keys, d_out):
    """The encoder's backward on its cache's fields: the norm's, then each layer's from the top."""
    grads: dict[str, np.ndarray] = {}
    d = d_out
    if norm is not None:
        d = _zero_rows(layers_contract.cotangent("d_out", d_out, layers[0].shape,
                                                 layers[0].dtype, "the encoder's output"), pad)
        d, d_norm = backend.layer_norm_backward(d, norm)
        grads |= prefixed("norm", d_norm)
    for i in reversed(range(len(layers))):
        d, g = transformer_encoder_layer_backward(d, layers[i])
        grads |= prefixed(f"layers.{i}", g)
    return d, {k: grads[k] for k in keys}


@documented
class TransformerDecoderCache(NamedTuple):
    """What `transformer_decoder_backward` needs."""

    backend: ModuleType  # the op module the forward ran on
    layers: tuple[TransformerDecoderLayerCache, ...]  # each layer's cache, bottom first
    norm: Any  # the final norm's cache, or None without ``norm.*``
    pad: np.ndarray | None  # bool, broadcastable to tgt: its padding rows
    keys: tuple[str, ...]  # the params' keys, in the caller's order (d_params comes back in it)
    fingerprints: unchanged.Fingerprints | None = None  # the caller's arrays as the forward saw
    #   them (the layers inside record none); the backward checks them first


@unchanged.memoized()
@same_precision()
def transformer_decoder_forward(
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
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
    batch_first: bool = False,
    need_weights: bool = False,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, TransformerDecoderCache]:
    """`torch.nn.TransformerDecoder(layer, num_layers, norm)` forward:
    ``out = norm(layer_{n-1}(... layer_0(tgt, memory), memory))``, each layer reading the same
    memory (params ``layers.{i}.*``, then ``norm.*`` when given; the `numpy_ref.transformer`
    module docstring).

    tgt [T, N, E] / [N, T, E] / [T, E], memory likewise -> (out like tgt, cache); with
    need_weights each layer's cache keeps its cross-attention weights. Every option:
    `transformer_decoder_layer_forward`.
    """
    backend = op_module(backend)
    n = contract.stack_depth(params, "the decoder")
    fingerprints = _record("transformer_decoder", unchanged.names(
        {"tgt": tgt, "memory": memory, "params": params, "tgt_mask": tgt_mask,
         "memory_mask": memory_mask, "tgt_key_padding_mask": tgt_key_padding_mask,
         "memory_key_padding_mask": memory_key_padding_mask}))
    masks = (tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
             tgt_is_causal, memory_is_causal)
    with unchanged.untracked():
        x, caches, norm, pad = _decoder(backend, tgt, memory, params, n, nhead, norm_first,
                                        activation, eps, masks, batch_first, need_weights)
    return x, TransformerDecoderCache(backend, caches, norm, pad, tuple(params), fingerprints)


def _decoder(backend, tgt, memory, params, n, nhead, norm_first, activation, eps, masks,
             batch_first, need_weights):
    """The decoder's layers and norm -> (out, the layers' caches, the norm's, pad)."""
    (tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal,
     memory_is_causal) = masks
    caches, x = [], tgt
    for i in range(n):
        x, c = transformer_decoder_layer_forward(
            x, memory, group(params, f"layers.{i}"), nhead=nhead, norm_first=norm_first,
            activation=activation, eps=eps, tgt_mask=tgt_mask, memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
            memory_is_causal=memory_is_causal, batch_first=batch_first,
            need_weights=need_weights, backend=backend)
        caches.append(c)
    norm = None
    pad = caches[0].pad
    if "norm.weight" in params or "norm.bias" in params:
        x, norm = backend.layer_norm_forward(x, group(params, "norm"), eps=eps)
        x = _zero_rows(x, pad)
    return x, tuple(caches), norm, pad


@same_precision(backward=True)
def transformer_decoder_backward(d_out: np.ndarray, cache: TransformerDecoderCache
                                 ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Backward of `transformer_decoder_forward`: the norm's, then each layer's from the top,
    ``d_memory = sum over the layers of their d_memory`` (the `numpy_ref.transformer`
    module docstring).

    d_out like out -> (d_tgt, d_memory, d_params with ``layers.{i}.*`` and ``norm.*``)."""
    backend, layers, norm, pad, keys, fingerprints = checks.cache_of(
        cache, TransformerDecoderCache, "transformer_decoder_forward")
    unchanged.check(fingerprints)
    with unchanged.untracked():
        return _decoder_backward(backend, layers, norm, pad, keys, d_out)


def _decoder_backward(backend, layers, norm, pad, keys, d_out):
    """The decoder's backward on its cache's fields: the norm's, then each layer's from the top,
    d_memory summed."""
    grads: dict[str, np.ndarray] = {}
    d = d_out
    if norm is not None:
        d = _zero_rows(layers_contract.cotangent("d_out", d_out, layers[0].shape,
                                                 layers[0].dtype, "the decoder's output"), pad)
        d, d_norm = backend.layer_norm_backward(d, norm)
        grads |= prefixed("norm", d_norm)
    d_memory = None
    for i in reversed(range(len(layers))):
        d, d_m, g = transformer_decoder_layer_backward(d, layers[i])
        d_memory = d_m if d_memory is None else d_memory + d_m
        grads |= prefixed(f"layers.{i}", g)
    return d, d_memory, {k: grads[k] for k in keys}


@documented
class TransformerCache(NamedTuple):
    """What `transformer_backward` needs."""

    encoder: TransformerEncoderCache  # the encoder stack's cache
    decoder: TransformerDecoderCache  # the decoder stack's cache
    keys: tuple[str, ...]  # the params' keys, in order


@same_precision()
def transformer_forward(
    src: np.ndarray,
    tgt: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    nhead: int,
    norm_first: bool = False,
    activation: str = "relu",
    eps: float = 1e-5,
    src_mask: np.ndarray | None = None,
    tgt_mask: np.ndarray | None = None,
    memory_mask: np.ndarray | None = None,
    src_key_padding_mask: np.ndarray | None = None,
    tgt_key_padding_mask: np.ndarray | None = None,
    memory_key_padding_mask: np.ndarray | None = None,
    src_is_causal: bool | None = None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
    batch_first: bool = False,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, TransformerCache]:
    """`torch.nn.Transformer(E, nhead, ..., dropout=0)` forward:
    ``out = decoder(tgt, encoder(src))`` (the `numpy_ref.transformer` module docstring), with
    params ``encoder.layers.{i}.*``, ``encoder.norm.*``, ``decoder.layers.{i}.*``,
    ``decoder.norm.*`` (the module's state_dict).

    src [S, N, E] / [N, S, E] / [S, E]; tgt [T, N, E] / [N, T, E] / [T, E]; the masks and
    options as `nn.Transformer.forward` and the layers' (`transformer_encoder_layer_forward`,
    `transformer_decoder_layer_forward`) -> (out like tgt, cache).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    extra = sorted(k for k in params if not k.startswith(("encoder.", "decoder.")))
    if extra:
        raise ValueError(f"params: unexpected keys {extra} (nn.Transformer's are 'encoder.*' "
                         "and 'decoder.*')")
    options = dict(nhead=nhead, norm_first=norm_first, activation=activation, eps=eps,
                   batch_first=batch_first, backend=backend)
    memory, ce = transformer_encoder_forward(
        src, group(params, "encoder"), mask=src_mask, src_key_padding_mask=src_key_padding_mask,
        is_causal=src_is_causal, **options)
    out, cd = transformer_decoder_forward(
        tgt, memory, group(params, "decoder"), tgt_mask=tgt_mask, memory_mask=memory_mask,
        tgt_key_padding_mask=tgt_key_padding_mask,
        memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
        memory_is_causal=memory_is_causal, **options)
    return out, TransformerCache(ce, cd, tuple(params))


@same_precision(backward=True)
def transformer_backward(d_out: np.ndarray, cache: TransformerCache
                         ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Backward of `transformer_forward`: ``d_tgt, d_memory = decoder_backward(d_out)``, then
    ``d_src = encoder_backward(d_memory)`` (the `numpy_ref.transformer` module docstring).

    d_out like out -> (d_src, d_tgt, d_params with the params' keys)."""
    ce, cd, keys = checks.cache_of(cache, TransformerCache, "transformer_forward")
    d_tgt, d_memory, g_dec = transformer_decoder_backward(d_out, cd)
    d_src, g_enc = transformer_encoder_backward(d_memory, ce)
    grads = prefixed("encoder", g_enc) | prefixed("decoder", g_dec)
    return d_src, d_tgt, {k: grads[k] for k in keys}
