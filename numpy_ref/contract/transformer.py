"""Validation of the Transformer's parts (see `numpy_ref.transformer`): layer norm, the
activations, the feed-forward block, the encoder and decoder layers and stacks, with
`torch.nn`'s shapes, state_dict names and mask conventions.

The layers check their own params here, under the names the caller passed (``linear1.weight``,
``self_attn.in_proj_bias``), before the ops they are built from check them again under their
own; the masks are checked by multi-head attention's contract, which the layers call with
them. A layer's params hold every bias or none (torch's ``bias=`` switches them together).

Each message names the argument, what was expected and what was received.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks
from numpy_ref.contract.fields import documented

LAYER_NORM_VARIANTS = ("torch", "annotated")
GELU_APPROXIMATIONS = ("none", "tanh")
ACTIVATIONS = ("relu", "gelu")


def flag(name: str, value: Any) -> bool:
    """A bool option (numpy's bool too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return bool(value)


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    """A string option among `options`."""
    if value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value


def positive(name: str, value: Any) -> float:
    """A positive finite float (eps)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name}: expected a positive float, got {type(value).__name__}")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a positive finite float, got {value!r}")
    return float(value)


def float_data(name: str, x: Any) -> np.ndarray:
    """A float32/float64 ndarray with at least one axis and a non-empty last axis."""
    checks.not_masked(name, x)
    if not isinstance(x, np.ndarray) or x.ndim == 0:
        checks.float_array(name, x, ("...", "E"))  # raises the type / rank message
    if x.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: expected a non-empty last axis [..., E], got {x.shape}")
    return x


def layer_norm(x: Any, params: Mapping[str, Any], eps: Any, variant: Any):
    """Check `layer_norm_forward`'s arguments; return (x, weight or None, bias or None, eps,
    variant)."""
    x = float_data("x", x)
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    E = x.shape[-1]
    weight = bias = None
    if "weight" in params:
        weight = checks.param(params, "weight", (E,), "[E]", x.dtype, "x")
    if "bias" in params:
        bias = checks.param(params, "bias", (E,), "[E]", x.dtype, "x")
    checks.no_unexpected_keys(params, {"weight", "bias"}, "a layer norm takes 'weight' and "
                              "'bias', each optional (elementwise_affine=False: neither; "
                              "bias=False: no 'bias')")
    variant = choice("variant", variant, LAYER_NORM_VARIANTS)
    if variant == "annotated" and E < 2:
        raise ValueError(f"x: the annotated variant's unbiased std needs E >= 2 features, got "
                         f"shape {x.shape}")
    return x, weight, bias, positive("eps", eps), variant


# --------------------------------------------------------------------------------------------
# the layers' params


def heads(nhead: int, E: int) -> None:
    """nhead must be a positive divisor of d_model E (each head gets E / nhead features)."""
    if nhead < 1 or E % nhead:
        raise ValueError(f"nhead: expected a positive divisor of d_model = {E} (the data's "
                         f"last axis), got {nhead}")


@documented
class LayerSizes(NamedTuple):
    """The sizes a layer's params fix."""

    d_model: int  # E
    dim_feedforward: int  # F, linear1's output
    bias: bool  # whether the layer has its biases (torch's bias=)


def layer_params(params: Any, E: int, dtype: np.dtype, decoder: bool, prefix: str = ""
                 ) -> LayerSizes:
    """Check the params of one `nn.TransformerEncoderLayer` (or DecoderLayer with `decoder`)
    of width E, under their full names (`prefix` in front of each, for a stack's layers)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    name = f"{prefix}linear1.weight"
    F = checks.leading_dim(params, name, 2, "[F, E]")
    bias = f"{prefix}linear1.bias" in params
    attention = ("self_attn", "multihead_attn") if decoder else ("self_attn",)
    norms = ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2")
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "linear1.weight": ((F, E), "[F, E]"), "linear2.weight": ((E, F), "[E, F]")}
    for a in attention:
        shapes[f"{a}.in_proj_weight"] = ((3 * E, E), "[3E, E]")
        shapes[f"{a}.out_proj.weight"] = ((E, E), "[E, E]")
    for n in norms:
        shapes[f"{n}.weight"] = ((E,), "[E]")
    if bias:
        shapes |= {"linear1.bias": ((F,), "[F]"), "linear2.bias": ((E,), "[E]")}
        for a in attention:
            shapes[f"{a}.in_proj_bias"] = ((3 * E,), "[3E]")
            shapes[f"{a}.out_proj.bias"] = ((E,), "[E]")
        for n in norms:
            shapes[f"{n}.bias"] = ((E,), "[E]")
    for key, (shape, labels) in shapes.items():
        checks.param(params, prefix + key, shape, labels, dtype, "the layer's input")
    mine = {k for k in params if k.startswith(prefix)}
    hint = ("a layer built with bias=True holds every bias (linear1.bias, norm1.bias, "
            "self_attn.in_proj_bias, ...), one built with bias=False none"
            if bias else "the layer has no linear1.bias, so bias=False: it holds no bias")
    checks.no_unexpected_keys({k: params[k] for k in mine}, {prefix + k for k in shapes},
                              hint)
    return LayerSizes(E, F, bias)


_LAYER = re.compile(r"^layers\.(\d+)\.")


def stack_depth(params: Mapping[str, Any], what: str) -> int:
    """How many layers a stack's params (``layers.{i}.*``, i = 0..n-1) hold."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    indices = {int(m.group(1)) for k in params if (m := _LAYER.match(k))}
    if not indices:
        raise ValueError(f"params: {what} holds no layer (expected keys 'layers.0.*', ...)")
    n = max(indices) + 1
    missing = sorted(set(range(n)) - indices)
    if missing:
        raise ValueError(f"params: {what} has layers up to {n - 1} but no 'layers.{missing[0]}.*'")
    extra = sorted(k for k in params if not _LAYER.match(k) and not k.startswith("norm."))
    if extra:
        raise ValueError(f"params: unexpected keys {extra} in {what} (expected 'layers.{{i}}.*' "
                         "and optionally 'norm.weight', 'norm.bias')")
    return n


# --------------------------------------------------------------------------------------------
# padding


def padding_rows(mask: Any, x: np.ndarray, batch_first: bool) -> np.ndarray | None:
    """The rows of `x` that a key padding mask marks as padding, as a bool array broadcastable
    to x ([N, T, 1], [T, N, 1] or [T, 1] unbatched), or None when it marks none.

    A row is padding where a bool mask holds True or a float mask -inf (the entries that hide
    the position from every query); a finite float entry is a bias, not padding. Only the mask's
    kind and shape are read here; multi-head attention's contract checks the rest.
    """
    if mask is None or not isinstance(mask, np.ndarray):
        return None
    if mask.dtype == np.bool_:
        pad = mask
    elif mask.dtype.kind == "f":
        pad = np.isneginf(mask)
    else:
        return None  # multi-head attention refuses it with its message
    expected = (x.shape[0],) if x.ndim == 2 else (
        (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0]))
    if pad.shape != expected or not pad.any():
        return None  # a misshaped mask: multi-head attention refuses it
    if x.ndim == 2:
        return pad[:, None]
    return pad[:, :, None] if batch_first else pad.T[:, :, None]
