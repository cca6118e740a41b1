"""The Transformer's torch reference: torch's own modules holding our parameters, and the layer
norms and the feed-forward block in torch ops.

- `transformer_module`: ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``, their
  stacks (``nn.TransformerEncoder``, ``nn.TransformerDecoder``) or ``nn.Transformer``, built
  with dropout 0 from the sizes a state_dict's shapes fix and loaded with it; `build_module`
  builds one from sizes alone (torch's init), as the template of a params dict. The module is
  in train mode, so that it takes torch's regular path (the one autograd differentiates), never
  the inference fast path; it is called with the `numpy_ref` op's keyword names, which are
  torch's (``src_mask``, ``src_key_padding_mask``, ``is_causal``, ``tgt_is_causal``, ...).
- `layer_norm`: ``F.layer_norm`` (``variant="torch"``), or the Annotated Transformer's
  ``a_2 * (x - mean) / (std + eps) + b_2`` with the unbiased std written in torch ops
  (``variant="annotated"``).
- `feed_forward`: the layers' ``linear2(activation(linear1(x)))`` in ``F.linear``/``F.relu``/
  ``F.gelu``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_impl.convert import load_numpy_

KINDS = ("encoder_layer", "decoder_layer", "encoder", "decoder", "transformer")
"""What `transformer_module` builds: the two layers, the two stacks and the whole model."""


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, eps: float = 1e-5,
               variant: str = "torch") -> torch.Tensor:
    """torch's answer for `numpy_ref.layer_norm_forward` over the last axis of x [..., E].

    ``variant="torch"``: ``F.layer_norm(x, (E,), weight, bias, eps)`` (nn.LayerNorm's).
    ``variant="annotated"``: the Annotated Transformer's LayerNorm as that code writes it,
    ``weight * (x - mean) / (std + eps) + bias`` with ``std = x.std(-1)`` (unbiased); weight
    and bias each optional (then 1 and 0).
    """
    if variant == "torch":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if variant != "annotated":
        raise ValueError(f"variant: expected 'torch' or 'annotated', got {variant!r}")
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)
    y = (x - mean) / (std + eps)
    if weight is not None:
        y = weight * y
    return y if bias is None else y + bias


def feed_forward(x: torch.Tensor, params: Mapping[str, torch.Tensor], *,
                 activation: str = "relu") -> torch.Tensor:
    """The layers' feed-forward block ``linear2(act(linear1(x)))`` (torch's ``_ff_block``
    without dropout): params ``linear1.weight`` [F, E], ``linear2.weight`` [E, F] and their
    biases (optional); activation "relu" or "gelu" (exact)."""
    act = {"relu": F.relu, "gelu": F.gelu}[activation]
    a = act(F.linear(x, params["linear1.weight"], params.get("linear1.bias")))
    return F.linear(a, params["linear2.weight"], params.get("linear2.bias"))


def build_module(kind: str, d_model: int, nhead: int, dim_feedforward: int, *,
                 num_layers: int = 1, num_decoder_layers: int | None = None,
                 norm: bool = False, norm_bias: bool | None = None, norm_first: bool = False,
                 activation: str = "relu", eps: float = 1e-5, bias: bool = True,
                 batch_first: bool = False, dtype: torch.dtype | None = None,
                 device: Any = None) -> nn.Module:
    """A torch Transformer module of `kind` (one of `KINDS`) with dropout 0, in train mode,
    torch's init.

    num_layers : the stack's depth (the encoder's for "transformer"); num_decoder_layers : the
    decoder's for "transformer" (default num_layers). norm : whether a stack has a final
    LayerNorm (its bias: `norm_bias`, default `bias`); nn.Transformer always has both.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    options = dict(dim_feedforward=dim_feedforward, dropout=0.0, activation=activation,
                   layer_norm_eps=eps, batch_first=batch_first, norm_first=norm_first,
                   bias=bias, device=device, dtype=dtype)
    with warnings.catch_warnings():  # the nested-tensor fast path's notes: not taken in train
        warnings.filterwarnings("ignore", "enable_nested_tensor is True", UserWarning)
        if kind == "transformer":
            module = nn.Transformer(
                d_model, nhead, num_encoder_layers=num_layers,
                num_decoder_layers=num_layers if num_decoder_layers is None
                else num_decoder_layers, **options)
        elif kind.startswith("encoder"):
            module = nn.TransformerEncoderLayer(d_model, nhead, **options)
        else:
            module = nn.TransformerDecoderLayer(d_model, nhead, **options)
        if kind in ("encoder", "decoder"):
            final = None
            if norm:
                final = nn.LayerNorm(d_model, eps=eps, bias=bias if norm_bias is None
                                     else norm_bias, device=device, dtype=dtype)
            if kind == "encoder":
                module = nn.TransformerEncoder(module, num_layers, final,
                                               enable_nested_tensor=False)
            else:
                module = nn.TransformerDecoder(module, num_layers, final)
    return module.train()


_LAYER = re.compile(r"^layers\.(\d+)\.")


def _depth(params: Mapping[str, Any], prefix: str) -> int:
    """How many ``{prefix}layers.{i}.*`` layers params hold."""
    found = {int(m.group(1)) for k in params
             if k.startswith(prefix) and (m := _LAYER.match(k[len(prefix):]))}
    if not found:
        raise ValueError(f"params: no '{prefix}layers.0.*' keys")
    return max(found) + 1


def transformer_module(params: Mapping[str, Any], *, kind: str, nhead: int,
                       norm_first: bool = False, activation: str = "relu", eps: float = 1e-5,
                       batch_first: bool = False, dtype: torch.dtype | None = None,
                       device: Any = None) -> nn.Module:
    """The torch module of `kind` (one of `KINDS`) holding `params`, its state_dict (NumPy
    arrays or tensors), loaded strictly (`torch_impl.convert.load_numpy_`).

    d_model, dim_feedforward, bias, the stacks' depths and whether a stack has a final norm
    (``norm.weight`` / ``norm.bias``) are read from the params' names and shapes; the other
    options are torch's. dtype: the module's (default: that of the first param).
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    first = {"encoder_layer": "", "decoder_layer": "", "encoder": "layers.0.",
             "decoder": "layers.0.", "transformer": "encoder.layers.0."}[kind]
    w1 = np.shape(params[f"{first}linear1.weight"])
    sizes: dict[str, Any] = {}
    if kind in ("encoder", "decoder"):
        sizes = {"num_layers": _depth(params, ""), "norm": "norm.weight" in params,
                 "norm_bias": "norm.bias" in params}
    elif kind == "transformer":
        sizes = {"num_layers": _depth(params, "encoder."),
                 "num_decoder_layers": _depth(params, "decoder.")}
    if dtype is None:
        some = next(iter(params.values()))
        dtype = some.dtype if isinstance(some, torch.Tensor) \
            else torch.from_numpy(np.asarray(some)[:0]).dtype
    module = build_module(kind, w1[1], nhead, w1[0], norm_first=norm_first,
                          activation=activation, eps=eps, bias=f"{first}linear1.bias" in params,
                          batch_first=batch_first, dtype=dtype, device=device, **sizes)
    return load_numpy_(module, {k: _numpy(v) for k, v in params.items()})


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
