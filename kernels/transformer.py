"""`numpy_ref.transformer` on the Numba kernels: the same functions, defaulting to
``backend=kernels``. The layers are compositions of public op pairs (multi-head attention,
layer norm, linear, the activations), so on this backend their attention runs on the flash
kernel (`need_weights=False` wherever no weights are asked for) and their layer norms and
activations on the compiled ones; the linear layers are BLAS products either way. Read
`numpy_ref.transformer` for the math, shapes, options and masks (the stacks and nn.Transformer:
`numpy_ref.transformer_stacks`).

Each function here is numpy_ref's with the same signature; only the backend's default differs
(None means `kernels`, resolved at call time). The backwards run on the backend their forward
recorded in its cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from numpy_ref import transformer as _layers
from numpy_ref import transformer_stacks as _stacks
from numpy_ref.contract.backend import op_module
from numpy_ref.transformer import (
    FeedForwardCache,
    TransformerDecoderLayerCache,
    TransformerEncoderLayerCache,
    feed_forward_backward,
    transformer_decoder_layer_backward,
    transformer_encoder_layer_backward,
)
from numpy_ref.transformer_stacks import (
    TransformerCache,
    TransformerDecoderCache,
    TransformerEncoderCache,
    transformer_backward,
    transformer_decoder_backward,
    transformer_encoder_backward,
)

__all__ = [
    "FeedForwardCache",
    "TransformerCache",
    "TransformerDecoderCache",
    "TransformerDecoderLayerCache",
    "TransformerEncoderCache",
    "TransformerEncoderLayerCache",
    "feed_forward_backward",
    "feed_forward_forward",
    "transformer_backward",
    "transformer_decoder_backward",
    "transformer_decoder_forward",
    "transformer_decoder_layer_backward",
    "transformer_decoder_layer_forward",
    "transformer_encoder_backward",
    "transformer_encoder_forward",
    "transformer_encoder_layer_backward",
    "transformer_encoder_layer_forward",
    "transformer_forward",
]


def _on_kernels(forward: Callable[..., Any]) -> Callable[..., Any]:
    """numpy_ref's `forward` with ``backend=None`` meaning `kernels` (its docstring kept)."""
    @functools.wraps(forward)
    def wrapped(*args: Any, backend: Any = None, **kwargs: Any) -> Any:
        return forward(*args, backend=op_module(backend, "kernels"), **kwargs)
    return wrapped


feed_forward_forward = _on_kernels(_layers.feed_forward_forward)
transformer_encoder_layer_forward = _on_kernels(_layers.transformer_encoder_layer_forward)
transformer_decoder_layer_forward = _on_kernels(_layers.transformer_decoder_layer_forward)
transformer_encoder_forward = _on_kernels(_stacks.transformer_encoder_forward)
transformer_decoder_forward = _on_kernels(_stacks.transformer_decoder_forward)
transformer_forward = _on_kernels(_stacks.transformer_forward)
