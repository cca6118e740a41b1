"""The seed's EncoderDecoder as a Transformer in PyTorch (`TransformerSeq2Seq`), and the autograd
bridges that run `nn.TransformerEncoder` / `nn.TransformerDecoder`'s math on our own pairs.

`TransformerSeq2Seq` has the seed's (the Annotated Transformer's) attributes and methods:
``src_embed`` and ``tgt_embed`` (an nn.Embedding scaled by sqrt(d_model) plus the sinusoidal
positional encoding), ``encoder`` and ``decoder`` (`nn.TransformerEncoder` and
`nn.TransformerDecoder`, each with its final LayerNorm, as `nn.Transformer` builds them),
``generator`` (nn.Linear(d_model, Vt), logits); ``encode(src, src_mask)``, ``decode(memory,
src_mask, tgt, tgt_mask)`` and ``forward(src, tgt, src_mask, tgt_mask)``. Its state_dict is
`numpy_ref.transformer_seq2seq_forward`'s params. Dropout is 0 (the reference is not random).

Masks keep torch's meaning: ``src_mask`` is the source's key padding mask [B, Ts] (True =
padding), which ``src_lengths`` builds; ``tgt_mask`` the decoder's self-attention mask [Tt, Tt]
(True or -inf = not allowed; the causal mask by default).

``backend="numpy_ref" | "kernels"`` runs the encoder and decoder stacks on our hand-written
pairs (`transformer_encoder_forward` / `_backward` and the decoder's) through the bridges
below; the embeddings, the positional encoding and the generator stay torch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from numpy_ref.models.transformer import positional_encoding
from torch_impl.functions import _array, _host_option, _saved, _tensor, resolve_backend
from torch_impl.modules import BACKENDS, _Backend

__all__ = ["PositionalEmbedding", "TransformerSeq2Seq", "transformer_decoder",
           "transformer_encoder"]


# --------------------------------------------------------------------------------------------
# bridges: the stacks on our pairs


@dataclass(frozen=True)
class _StackOptions:
    backend: ModuleType
    names: tuple[str, ...]
    layer: dict[str, Any]  # nhead, norm_first, activation, eps, batch_first
    masks: dict[str, Any]  # the masks and is_causal hints, as NumPy


class TransformerEncoderFunction(torch.autograd.Function):
    """``apply(options, src, *params) -> out``; use `transformer_encoder`."""

    @staticmethod
    def forward(ctx: FunctionCtx, o: _StackOptions, src, *params):
        out, cache = o.backend.transformer_encoder_forward(
            _array(src), dict(zip(o.names, map(_array, params), strict=True)),
            backend=o.backend, **o.layer, **o.masks)
        ctx.options, ctx.cache = o, cache
        ctx.save_for_backward(src, *params)
        return _tensor(out)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_out):
        _saved(ctx)
        o = ctx.options
        d_src, d_params = o.backend.transformer_encoder_backward(_array(d_out), ctx.cache)
        return None, _tensor(d_src), *(_tensor(d_params[n]) for n in o.names)


class TransformerDecoderFunction(torch.autograd.Function):
    """``apply(options, tgt, memory, *params) -> (out, cross-attention weights [n, N, h, T, S]
    or an empty tensor)``; use `transformer_decoder`."""

    @staticmethod
    def forward(ctx: FunctionCtx, o: _StackOptions, tgt, memory, *params):
        out, cache = o.backend.transformer_decoder_forward(
            _array(tgt), _array(memory), dict(zip(o.names, map(_array, params), strict=True)),
            backend=o.backend, **o.layer, **o.masks)
        ctx.options, ctx.cache = o, cache
        ctx.save_for_backward(tgt, memory, *params)
        weights = (torch.from_numpy(np.stack([c.weights for c in cache.layers]))
                   if o.masks.get("need_weights") else torch.empty(0, dtype=tgt.dtype))
        ctx.mark_non_differentiable(weights)
        return _tensor(out), weights

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_out, _d_weights):
        _saved(ctx)
        o = ctx.options
        d_tgt, d_memory, d_params = o.backend.transformer_decoder_backward(_array(d_out),
                                                                           ctx.cache)
        return (None, _tensor(d_tgt), _tensor(d_memory),
                *(_tensor(d_params[n]) for n in o.names))


def _layer_options(layer: nn.Module, batch_first: bool) -> dict[str, Any]:
    """The options of an nn.TransformerEncoderLayer / DecoderLayer, as our layers take them."""
    activation = layer.activation
    name = {"relu": "relu", "gelu": "gelu"}.get(getattr(activation, "__name__", ""), None)
    if name is None and isinstance(activation, (nn.ReLU, nn.GELU)):
        name = "relu" if isinstance(activation, nn.ReLU) else "gelu"
    if name is None:
        raise ValueError(f"the layer's activation {activation!r} is not relu or gelu")
    return {"nhead": layer.self_attn.num_heads, "norm_first": layer.norm_first,
            "activation": name, "eps": layer.norm1.eps, "batch_first": batch_first}


def _stack_params(stack: nn.Module) -> tuple[tuple[str, ...], list[torch.Tensor]]:
    named = dict(stack.named_parameters())
    return tuple(named), list(named.values())


def transformer_encoder(stack: nn.TransformerEncoder, src: torch.Tensor, *,
                        mask: Any = None, src_key_padding_mask: Any = None,
                        is_causal: bool | None = None,
                        backend: str | ModuleType = "numpy_ref") -> torch.Tensor:
    """``stack(src, mask, src_key_padding_mask, is_causal)`` (an `nn.TransformerEncoder` with
    dropout 0) computed by `transformer_encoder_forward` on our pairs, differentiable: each
    parameter of the stack receives its gradient. ``out = norm(layer_{n-1}(... layer_0(src)))``
    (the `numpy_ref.transformer` module docstring). src [S, N, E] or [N, S, E] as the layers'
    batch_first says."""
    module = resolve_backend(backend)
    first = stack.layers[0]
    names, tensors = _stack_params(stack)
    masks = {"mask": _host_option(mask), "src_key_padding_mask": _host_option(
        src_key_padding_mask), "is_causal": is_causal}
    o = _StackOptions(module, names, _layer_options(first, first.self_attn.batch_first), masks)
    return TransformerEncoderFunction.apply(o, src, *tensors)


def transformer_decoder(stack: nn.TransformerDecoder, tgt: torch.Tensor, memory: torch.Tensor,
                        *, tgt_mask: Any = None, memory_mask: Any = None,
                        tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None,
                        tgt_is_causal: bool | None = None, memory_is_causal: bool = False,
                        need_weights: bool = False, backend: str | ModuleType = "numpy_ref"
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``stack(tgt, memory, ...)`` (an `nn.TransformerDecoder` with dropout 0) computed by
    `transformer_decoder_forward` on our pairs, differentiable in tgt, memory and every
    parameter. ``out = norm(layer_{n-1}(... layer_0(tgt, memory), memory))``. With
    need_weights also each layer's cross-attention weights per head [n, N, h, T, S] (no
    gradient flows through them)."""
    module = resolve_backend(backend)
    first = stack.layers[0]
    names, tensors = _stack_params(stack)
    masks = {"tgt_mask": _host_option(tgt_mask), "memory_mask": _host_option(memory_mask),
             "tgt_key_padding_mask": _host_option(tgt_key_padding_mask),
             "memory_key_padding_mask": _host_option(memory_key_padding_mask),
             "tgt_is_causal": tgt_is_causal, "memory_is_causal": memory_is_causal,
             "need_weights": bool(need_weights)}
    o = _StackOptions(module, names, _layer_options(first, first.self_attn.batch_first), masks)
    out, weights = TransformerDecoderFunction.apply(o, tgt, memory, *tensors)
    return (out, weights) if need_weights else out


# --------------------------------------------------------------------------------------------
# the model


class PositionalEmbedding(nn.Embedding):
    """``embedding(ids) * sqrt(E) + PE[:T]``: the Annotated Transformer's ``Embeddings``
    followed by its ``PositionalEncoding`` (dropout 0), one module whose state_dict is the
    embedding's ``weight``. PE is `numpy_ref.models.positional_encoding`, cast to the
    weight's dtype."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(ids) * math.sqrt(self.embedding_dim)
        pe = torch.from_numpy(positional_encoding(ids.shape[-1], self.embedding_dim))
        return x + pe.to(dtype=x.dtype, device=x.device)


class TransformerSeq2Seq(_Backend, nn.Module):
    """The Transformer encoder-decoder (module docstring): ``forward(src [B, Ts], tgt [B, Tt],
    src_mask=None, tgt_mask=None, *, src_lengths=None) -> (logits [B, Tt, Vt], attention
    [n_dec, B, h, Tt, Ts])``, teacher-forced (tgt holds the decoder's input tokens); the
    attention is each decoder layer's cross-attention per head.

    Parameters are initialised as `nn.Transformer` does (xavier_uniform on every matrix)."""

    def __init__(self, src_vocab: int, tgt_vocab: int, *, d_model: int = 512, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, activation: str = "relu",
                 norm_first: bool = False, layer_norm_eps: float = 1e-5, bias: bool = True,
                 backend: str = "torch") -> None:
        super().__init__()
        self.nhead = nhead
        self.src_embed = PositionalEmbedding(src_vocab, d_model)
        self.tgt_embed = PositionalEmbedding(tgt_vocab, d_model)
        common = {"dim_feedforward": dim_feedforward, "dropout": 0.0, "activation": activation,
                  "layer_norm_eps": layer_norm_eps, "batch_first": True,
                  "norm_first": norm_first, "bias": bias}
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, nhead, **common), num_encoder_layers,
            norm=nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias),
            enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, nhead, **common), num_decoder_layers,
            norm=nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias))
        self.generator = nn.Linear(d_model, tgt_vocab)
        for p in self.parameters():  # nn.Transformer's _reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    @staticmethod
    def padding_mask(src_lengths: Any, src: torch.Tensor) -> torch.Tensor | None:
        """The key padding mask [B, Ts] (True = padding) of `src_lengths` [B], or None."""
        if src_lengths is None:
            return None
        lengths = torch.as_tensor(src_lengths, device=src.device).reshape(-1, 1)
        return torch.arange(src.shape[1], device=src.device)[None, :] >= lengths

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src [B, Ts], src_mask [B, Ts] (True = padding) -> memory [B, Ts, E]. Padded ids are
        read as 0 (padding is not data)."""
        if src_mask is not None:
            src = src.masked_fill(src_mask, 0)
        x = self.src_embed(src)
        if self.backend == "torch":
            return self.encoder(x, src_key_padding_mask=src_mask)
        return transformer_encoder(self.encoder, x, src_key_padding_mask=src_mask,
                                   backend=self.backend)

    def decode(self, memory: torch.Tensor, src_mask: torch.Tensor | None, tgt: torch.Tensor,
               tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """memory [B, Ts, E], tgt [B, Tt] -> the decoder's output [B, Tt, E] (before the
        generator); tgt_mask None means causal."""
        return self._decode(memory, src_mask, tgt, tgt_mask, False)[0]

    def _decode(self, memory, src_mask, tgt, tgt_mask, need_weights):
        """decode, and the cross-attention weights [n_dec, B, h, Tt, Ts] with need_weights."""
        y = self.tgt_embed(tgt)
        if tgt_mask is None:
            tgt_mask = nn.Transformer.generate_square_subsequent_mask(
                tgt.shape[1], device=y.device, dtype=y.dtype)
        if self.backend != "torch":
            return transformer_decoder(self.decoder, y, memory, tgt_mask=tgt_mask,
                                       tgt_is_causal=True, memory_key_padding_mask=src_mask,
                                       need_weights=need_weights, backend=self.backend)
        weights: list[torch.Tensor] = []
        hooks = [h for layer in self.decoder.layers
                 for h in self._record_cross_attention(layer, weights)] if need_weights else []
        try:
            out = self.decoder(y, memory, tgt_mask=tgt_mask, tgt_is_causal=True,
                               memory_key_padding_mask=src_mask)
        finally:
            for h in hooks:
                h.remove()
        return out, torch.stack(weights) if weights else None

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None, *, src_lengths: Any = None,
                need_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (logits [B, Tt, Vt], the cross-attention weights [n_dec, B, h, Tt, Ts], or None
        without need_weights: then no layer forms attention weights)."""
        if src_lengths is not None:
            src_mask = self.padding_mask(src_lengths, src)
        memory = self.encode(src, src_mask)
        out, weights = self._decode(memory, src_mask, tgt, tgt_mask, need_weights)
        return self.generator(out), weights

    def _record_cross_attention(self, layer: nn.Module, into: list) -> list[Any]:
        """Two hooks on the layer's cross-attention: one asks it for its weights per head
        (torch's layer asks for none), one keeps them; the caller removes both."""
        mha = layer.multihead_attn

        def ask(module, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

        def keep(module, args, kwargs, output):
            into.append(output[1])

        return [mha.register_forward_pre_hook(ask, with_kwargs=True),
                mha.register_forward_hook(keep, with_kwargs=True)]

    @torch.no_grad()
    def _log_probs(self, memory, src_mask, prefix) -> torch.Tensor:
        out = self.decode(memory, src_mask, prefix)
        return torch.log_softmax(self.generator(out[:, -1]), dim=-1)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, *, max_len: int, bos: int, eos: int,
                      src_lengths: Any = None) -> torch.Tensor:
        """As `numpy_ref.transformer_greedy_decode`: tokens [B, T_out] (bos not included),
        each row padded with eos after its eos."""
        src_mask = self.padding_mask(src_lengths, src)
        memory = self.encode(src, src_mask)
        B = src.shape[0]
        prefix = torch.full((B, 1), bos, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        out = []
        for _ in range(max_len):
            tokens = torch.where(done, eos, self._log_probs(memory, src_mask, prefix).argmax(1))
            out.append(tokens)
            prefix = torch.cat([prefix, tokens[:, None]], 1)
            done |= tokens == eos
            if bool(done.all()):
                break
        return torch.stack(out, 1)
