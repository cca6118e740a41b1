"""The catalogue's Transformer part: layer norm, GELU, the encoder and decoder layers and
`nn.Transformer`, registered at import (by the package, after `numpy_ref.golden.cases`).

Each ``_<family>_config`` function draws its data with a fixed seed and registers a `Config`
whose ``run`` computes the forward and backward with numpy_ref in the arrays' dtype, as in
`numpy_ref.golden.cases`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

import numpy_ref as ref
from numpy_ref.golden.cases import _normal, _param_grads, _uniform
from numpy_ref.golden.registry import register

# --------------------------------------------------------------------------------------------
# layer_norm


def _layer_norm_config(config: str, *, shape: tuple[int, ...], E: int, variant: str = "torch",
                       eps: float = 1e-5, affine: bool = True) -> None:
    def make(rng):
        params = ({"weight": 1 + _normal(rng, E, scale=0.3), "bias": _normal(rng, E, scale=0.3)}
                  if affine else {})
        x = _normal(rng, *shape, E, scale=1.5) + _normal(rng, *shape, 1)  # rows off centre
        return {"x": x}, params, {"d_y": _normal(rng, *shape, E)}

    def run(inp, par, cot):
        y, cache = ref.layer_norm_forward(inp["x"], par, eps=eps, variant=variant)
        d_x, d_p = ref.layer_norm_backward(cot["d_y"], cache)
        return {"y": y}, {"d_x": d_x, **_param_grads(d_p)}, {"x_hat": cache.x_hat, "r": cache.r}

    if variant == "torch":
        text = (f"torch.nn.LayerNorm({E}, eps={eps!r}"
                + ("" if affine else ", elementwise_affine=False")
                + f") on x {[*shape, E]}: y = (x - mean) / sqrt(var + eps)"
                + (" * weight + bias" if affine else "")
                + " over the last axis, var the biased variance (F.layer_norm). cache.r: "
                  "1 / sqrt(var + eps) per row [..., 1]")
    else:
        text = (f"The Annotated Transformer's LayerNorm({E}, eps={eps!r}) on x {[*shape, E]}: "
                "y = a_2 * (x - mean) / (std + eps) + b_2 with std = x.std(-1, keepdim=True), "
                "the unbiased std (divided by E - 1), and eps added to the std; param.weight is "
                "its a_2, param.bias its b_2. cache.r: 1 / (std + eps) per row [..., 1]")
    text += ("; cache.x_hat: the normalised x, (x - mean) r. Backward: torch.autograd.grad(y, "
             f"(x{', weight, bias' if affine else ''}), d_y).")
    register("layer_norm", config, "numpy_ref.layer_norm_forward / layer_norm_backward", text,
             {"normalized_shape": E, "eps": eps, "elementwise_affine": affine, "bias": affine,
              "variant": variant}, make, run)


_layer_norm_config("affine", shape=(2, 3), E=6)
_layer_norm_config("no_affine", shape=(4,), E=5, affine=False)
_layer_norm_config("annotated", shape=(2, 3), E=6, variant="annotated", eps=1e-6)


# --------------------------------------------------------------------------------------------
# gelu


def _gelu_config(config: str, *, approximate: str, shape: tuple[int, ...] = (3, 5)) -> None:
    def make(rng):
        x = _normal(rng, *shape, scale=2.0)
        x.reshape(-1)[:4] = [0.0, -6.5, 6.5, -0.75]  # 0, both tails, the minimum's side
        return {"x": x}, {}, {"d_y": _normal(rng, *shape)}

    def run(inp, par, cot):
        y, cache = ref.gelu_forward(inp["x"], approximate=approximate)
        return {"y": y}, {"d_x": ref.gelu_backward(cot["d_y"], cache)}, {}

    formula = ("y = x Phi(x) = x (1 + erf(x / sqrt(2))) / 2, Phi the standard normal CDF"
               if approximate == "none" else
               "y = x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2")
    text = (f"torch.nn.functional.gelu(x, approximate={approximate!r}) on x {list(shape)}: "
            f"{formula}. Backward: torch.autograd.grad(y, x, d_y).")
    register("gelu", config, "numpy_ref.gelu_forward / gelu_backward", text,
             {"approximate": approximate}, make, run)


_gelu_config("exact", approximate="none")
_gelu_config("tanh", approximate="tanh")


# --------------------------------------------------------------------------------------------
# the Transformer layers, their params and masks


def _layer_params(rng: np.random.Generator, E: int, F: int, *, decoder: bool,
                  prefix: str = "") -> dict[str, np.ndarray]:
    """One nn.TransformerEncoderLayer's (DecoderLayer's) state_dict, in its order."""
    p = {}
    for a in ("self_attn", "multihead_attn") if decoder else ("self_attn",):
        p[f"{a}.in_proj_weight"] = _uniform(rng, math.sqrt(6 / (4 * E)), 3 * E, E)
        p[f"{a}.in_proj_bias"] = _normal(rng, 3 * E, scale=0.3)
        p[f"{a}.out_proj.weight"] = _uniform(rng, 1 / math.sqrt(E), E, E)
        p[f"{a}.out_proj.bias"] = _normal(rng, E, scale=0.3)
    p["linear1.weight"] = _uniform(rng, 1 / math.sqrt(E), F, E)
    p["linear1.bias"] = _uniform(rng, 1 / math.sqrt(E), F)
    p["linear2.weight"] = _uniform(rng, 1 / math.sqrt(F), E, F)
    p["linear2.bias"] = _uniform(rng, 1 / math.sqrt(F), E)
    for n in ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2"):
        p[f"{n}.weight"] = 1 + _normal(rng, E, scale=0.2)
        p[f"{n}.bias"] = _normal(rng, E, scale=0.2)
    return {prefix + k: v for k, v in p.items()}


def _norm_params(rng: np.random.Generator, E: int, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}norm.weight": 1 + _normal(rng, E, scale=0.2),
            f"{prefix}norm.bias": _normal(rng, E, scale=0.2)}


def _causal(T: int) -> np.ndarray:
    """torch's causal mask as a bool [T, T]: True (not allowed) above the diagonal."""
    return np.triu(np.ones((T, T), bool), k=1)


def _padding(N: int, T: int, padded: Sequence[int]) -> np.ndarray:
    """A bool key padding mask [N, T]: row n's last padded[n] positions are padding (True)."""
    m = np.zeros((N, T), bool)
    for n, k in enumerate(padded):
        if k:
            m[n, T - k:] = True
    return m


def _lay(batch_first: bool, T: int, N: int, E: int) -> tuple[int, int, int]:
    return (N, T, E) if batch_first else (T, N, E)


def _layer_text(module: str, E: int, nhead: int, F: int, activation: str, batch_first: bool,
                norm_first: bool) -> str:
    return (f"torch.nn.{module}({E}, {nhead}, dim_feedforward={F}, dropout=0.0, "
            f"activation={activation!r}, batch_first={batch_first}, norm_first={norm_first})")


_PADDING_TEXT = (" Padding is not data: a position that its key padding mask marks (True) is "
                 "read as zeros wherever it is read, so input.{x} there may hold anything; "
                 "output.out is exactly 0 in {rows}, cotangent.d_out there is ignored and "
                 "grad.{dx} is exactly 0 there (torch computes such a row from what it holds; "
                 "every other row agrees with torch).")


def _masks_text(masks: Sequence[tuple[str, str]]) -> str:
    return "".join(f", {name}=input.{name} ({what})" for name, what in masks)


_BOOL = "bool [{}], True = not allowed"
_CAUSAL = "bool [{}], the causal mask: True above the diagonal (not allowed)"
_KPM = "bool [N, {}], True = padding"


# --------------------------------------------------------------------------------------------
# transformer_encoder_layer


def _encoder_layer_config(config: str, *, E: int, nhead: int, F: int, N: int, S: int,
                          norm_first: bool, activation: str = "relu", batch_first: bool = False,
                          padded: Sequence[int] | None = None, causal: bool = False) -> None:
    def make(rng):
        params = _layer_params(rng, E, F, decoder=False)
        inputs = {"src": _normal(rng, *_lay(batch_first, S, N, E))}
        if causal:
            inputs["src_mask"] = _causal(S)
        if padded is not None:
            inputs["src_key_padding_mask"] = _padding(N, S, padded)
        return inputs, params, {"d_out": _normal(rng, *_lay(batch_first, S, N, E))}

    def run(inp, par, cot):
        out, cache = ref.transformer_encoder_layer_forward(
            inp["src"], par, nhead=nhead, norm_first=norm_first, activation=activation,
            src_mask=inp.get("src_mask"), src_key_padding_mask=inp.get("src_key_padding_mask"),
            batch_first=batch_first)
        d_src, d_p = ref.transformer_encoder_layer_backward(cot["d_out"], cache)
        return {"out": out}, {"d_src": d_src, **_param_grads(d_p)}, {}

    masks = []
    if causal:
        masks.append(("src_mask", _CAUSAL.format("S, S")))
    if padded is not None:
        masks.append(("src_key_padding_mask", _KPM.format("S")))
    layout = "[N, S, E]" if batch_first else "[S, N, E]"
    text = (_layer_text("TransformerEncoderLayer", E, nhead, F, activation, batch_first,
                        norm_first)
            + f" with its state_dict as params: out = layer(src{_masks_text(masks)}); src "
            f"{layout}, N={N}, S={S}, E={E}; "
            + ("pre-norm: x = src + SA(norm1(src)), out = x + FF(norm2(x))" if norm_first else
               "post-norm: x = norm1(src + SA(src)), out = norm2(x + FF(x))")
            + f", SA self-attention, FF linear2({activation}(linear1(x))), eps 1e-5.")
    if padded is not None:
        text += _PADDING_TEXT.format(x="src", rows="padding rows", dx="d_src")
    text += " Backward: torch.autograd.grad(out, (src, *params), d_out)."
    options = {"d_model": E, "nhead": nhead, "dim_feedforward": F, "activation": activation,
               "norm_first": norm_first, "batch_first": batch_first, "eps": 1e-5,
               "bias": True, "batch": N, "src_len": S,
               "src_mask": "causal" if causal else None,
               "src_key_padding_mask": padded is not None}
    register("transformer_encoder_layer", config,
             "numpy_ref.transformer_encoder_layer_forward / transformer_encoder_layer_backward",
             text, {k: v for k, v in options.items() if v is not None}, make, run)


_encoder_layer_config("post_norm_key_padding_mask", E=6, nhead=2, F=10, N=2, S=5,
                      norm_first=False, padded=(0, 2))
_encoder_layer_config("pre_norm_causal_gelu", E=6, nhead=3, F=8, N=2, S=4, norm_first=True,
                      activation="gelu", batch_first=True, causal=True)


# --------------------------------------------------------------------------------------------
# transformer_decoder_layer


def _decoder_layer_config(config: str, *, E: int, nhead: int, F: int, N: int, T: int, S: int,
                          norm_first: bool, activation: str = "relu", batch_first: bool = False,
                          causal: bool = False, memory_padded: Sequence[int] | None = None,
                          float_memory_mask: bool = False) -> None:
    def make(rng):
        params = _layer_params(rng, E, F, decoder=True)
        inputs = {"tgt": _normal(rng, *_lay(batch_first, T, N, E)),
                  "memory": _normal(rng, *_lay(batch_first, S, N, E))}
        if causal:
            inputs["tgt_mask"] = _causal(T)
        if float_memory_mask:
            inputs["memory_mask"] = _normal(rng, T, S)
        if memory_padded is not None:
            inputs["memory_key_padding_mask"] = _padding(N, S, memory_padded)
        return inputs, params, {"d_out": _normal(rng, *_lay(batch_first, T, N, E))}

    def run(inp, par, cot):
        out, cache = ref.transformer_decoder_layer_forward(
            inp["tgt"], inp["memory"], par, nhead=nhead, norm_first=norm_first,
            activation=activation, tgt_mask=inp.get("tgt_mask"),
            memory_mask=inp.get("memory_mask"),
            memory_key_padding_mask=inp.get("memory_key_padding_mask"),
            batch_first=batch_first)
        d_tgt, d_memory, d_p = ref.transformer_decoder_layer_backward(cot["d_out"], cache)
        return {"out": out}, {"d_tgt": d_tgt, "d_memory": d_memory, **_param_grads(d_p)}, {}

    masks = []
    if causal:
        masks.append(("tgt_mask", _CAUSAL.format("T, T")))
    if float_memory_mask:
        masks.append(("memory_mask", "float [T, S], added to the cross-attention's scores"))
    if memory_padded is not None:
        masks.append(("memory_key_padding_mask", _KPM.format("S")))
    layout = "[N, T, E]" if batch_first else "[T, N, E]"
    text = (_layer_text("TransformerDecoderLayer", E, nhead, F, activation, batch_first,
                        norm_first)
            + f" with its state_dict as params: out = layer(tgt, memory{_masks_text(masks)}); "
            f"tgt {layout}, memory likewise, N={N}, T={T}, S={S}, E={E}; "
            + ("pre-norm: x = tgt + SA(norm1(tgt)), x = x + CA(norm2(x), memory), out = x + "
               "FF(norm3(x))" if norm_first else
               "post-norm: x = norm1(tgt + SA(tgt)), x = norm2(x + CA(x, memory)), out = "
               "norm3(x + FF(x))")
            + f", SA self-attention, CA attention over memory (multihead_attn.*), FF "
            f"linear2({activation}(linear1(x))), eps 1e-5.")
    if memory_padded is not None:
        text += (" A memory position that memory_key_padding_mask marks (True) is not data: "
                 "no query sees it, it is read as zeros, so input.memory there may hold "
                 "anything, and grad.d_memory is exactly 0 there (as in torch).")
    text += (" Backward: torch.autograd.grad(out, (tgt, memory, *params), d_out); "
             "grad.d_memory is the cross-attention's key and value gradients added.")
    options = {"d_model": E, "nhead": nhead, "dim_feedforward": F, "activation": activation,
               "norm_first": norm_first, "batch_first": batch_first, "eps": 1e-5,
               "bias": True, "batch": N, "tgt_len": T, "src_len": S,
               "tgt_mask": "causal" if causal else None,
               "memory_mask": "float" if float_memory_mask else None,
               "memory_key_padding_mask": memory_padded is not None}
    register("transformer_decoder_layer", config,
             "numpy_ref.transformer_decoder_layer_forward / transformer_decoder_layer_backward",
             text, {k: v for k, v in options.items() if v is not None}, make, run)


_decoder_layer_config("post_norm_causal_memory_key_padding_mask", E=6, nhead=2, F=10, N=2, T=4,
                      S=5, norm_first=False, causal=True, memory_padded=(2, 0))
_decoder_layer_config("pre_norm_float_memory_mask", E=6, nhead=3, F=8, N=2, T=3, S=4,
                      norm_first=True, batch_first=True, float_memory_mask=True)


# --------------------------------------------------------------------------------------------
# transformer (nn.Transformer)


def _transformer_config(config: str, *, E: int, nhead: int, F: int, N: int, S: int, T: int,
                        layers: int, src_padded: Sequence[int],
                        tgt_padded: Sequence[int]) -> None:
    def make(rng):
        params = {}
        for side, decoder in (("encoder", False), ("decoder", True)):
            for i in range(layers):
                params |= _layer_params(rng, E, F, decoder=decoder,
                                        prefix=f"{side}.layers.{i}.")
            params |= _norm_params(rng, E, f"{side}.")
        src_pad = _padding(N, S, src_padded)
        inputs = {"src": _normal(rng, S, N, E), "tgt": _normal(rng, T, N, E),
                  "tgt_mask": _causal(T), "src_key_padding_mask": src_pad,
                  "tgt_key_padding_mask": _padding(N, T, tgt_padded),
                  "memory_key_padding_mask": src_pad.copy()}
        return inputs, params, {"d_out": _normal(rng, T, N, E)}

    def run(inp, par, cot):
        out, cache = ref.transformer_forward(
            inp["src"], inp["tgt"], par, nhead=nhead, tgt_mask=inp["tgt_mask"],
            src_key_padding_mask=inp["src_key_padding_mask"],
            tgt_key_padding_mask=inp["tgt_key_padding_mask"],
            memory_key_padding_mask=inp["memory_key_padding_mask"])
        d_src, d_tgt, d_p = ref.transformer_backward(cot["d_out"], cache)
        return {"out": out}, {"d_src": d_src, "d_tgt": d_tgt, **_param_grads(d_p)}, {}

    masks = [("tgt_mask", _CAUSAL.format("T, T")),
             ("src_key_padding_mask", _KPM.format("S")),
             ("tgt_key_padding_mask", _KPM.format("T")),
             ("memory_key_padding_mask", _KPM.format("S") + ", equal to src_key_padding_mask")]
    text = (f"torch.nn.Transformer(d_model={E}, nhead={nhead}, num_encoder_layers={layers}, "
            f"num_decoder_layers={layers}, dim_feedforward={F}, dropout=0.0) with its "
            f"state_dict as params (encoder.layers.{{i}}.*, encoder.norm.*, "
            f"decoder.layers.{{i}}.*, decoder.norm.*): out = model(src, tgt"
            f"{_masks_text(masks)}); src [S, N, E], tgt [T, N, E], N={N}, S={S}, T={T}, E={E}; "
            "post-norm relu layers, eps 1e-5: memory = encoder.norm(encoder layers(src)), out "
            "= decoder.norm(decoder layers(tgt, memory)). Padding is not data: a position its "
            "key padding mask marks (True) is read as zeros wherever it is read, so input.src "
            "and input.tgt there may hold anything; output.out is exactly 0 in tgt's padding "
            "rows, cotangent.d_out there is ignored, and grad.d_src and grad.d_tgt are "
            "exactly 0 in padding rows (torch computes such a row from what it holds; every "
            "other row agrees with torch). Backward: torch.autograd.grad(out, (src, tgt, "
            "*params), d_out).")
    options = {"d_model": E, "nhead": nhead, "num_encoder_layers": layers,
               "num_decoder_layers": layers, "dim_feedforward": F, "activation": "relu",
               "norm_first": False, "batch_first": False, "eps": 1e-5, "bias": True,
               "batch": N, "src_len": S, "tgt_len": T, "tgt_mask": "causal",
               "src_key_padding_mask": True, "tgt_key_padding_mask": True,
               "memory_key_padding_mask": True}
    register("transformer", config, "numpy_ref.transformer_forward / transformer_backward", text,
             options, make, run)


_transformer_config("two_layers_masks", E=4, nhead=2, F=8, N=2, S=5, T=4, layers=2,
                    src_padded=(0, 2), tgt_padded=(1, 0))
