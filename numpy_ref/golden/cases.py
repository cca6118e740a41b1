"""The catalogue: every op configuration that the golden files hold, registered at import.

Each ``_<family>_config`` function draws its data with a fixed seed and registers a `Config`
whose ``run`` computes the forward and backward with numpy_ref in the arrays' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

import numpy_ref as ref
from numpy_ref.golden.registry import Arrays, register

# --------------------------------------------------------------------------------------------
# drawing data


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape) * scale


def _uniform(rng: np.random.Generator, bound: float, *shape: int) -> np.ndarray:
    return rng.uniform(-bound, bound, shape)


def _ids(rng: np.random.Generator, vocab: int, *shape: int) -> np.ndarray:
    return rng.integers(0, vocab, shape).astype(np.int64)


def _i64(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _grads(prefix_free: Mapping[str, np.ndarray | None]) -> Arrays:
    """Gradient dict with None entries (gradients the op does not give) dropped."""
    return {k: v for k, v in prefix_free.items() if v is not None}


def _param_grads(d_params: Mapping[str, np.ndarray]) -> Arrays:
    return {f"d_{k}": v for k, v in d_params.items()}


# --------------------------------------------------------------------------------------------
# lstm_cell


def _lstm_cell_config(config: str, B: int, I: int, H: int, P: int) -> None:
    Ho = P or H

    def make(rng):
        bound = 1 / math.sqrt(H)
        params = {"weight_ih": _uniform(rng, bound, 4 * H, I),
                  "weight_hh": _uniform(rng, bound, 4 * H, Ho),
                  "bias_ih": _uniform(rng, bound, 4 * H),
                  "bias_hh": _uniform(rng, bound, 4 * H)}
        if P:
            params["weight_hr"] = _uniform(rng, bound, P, H)
        inputs = {"x": _normal(rng, B, I), "h": _normal(rng, B, Ho, scale=0.5),
                  "c": _normal(rng, B, H, scale=0.5)}
        cots = {"d_h_new": _normal(rng, B, Ho), "d_c_new": _normal(rng, B, H)}
        return inputs, params, cots

    def run(inp, par, cot):
        h_new, c_new, cache = ref.lstm_cell_forward(inp["x"], inp["h"], inp["c"], par)
        d_x, d_h, d_c, d_p = ref.lstm_cell_backward(cot["d_h_new"], cot["d_c_new"], cache)
        return ({"h_new": h_new, "c_new": c_new},
                {"d_x": d_x, "d_h": d_h, "d_c": d_c, **_param_grads(d_p)},
                {"gates": cache.gates})

    if P:
        semantics = f"""One step of torch.nn.LSTM({I}, {H}, proj_size={P}) (its layer-0 cell,
        params named without the _l0 suffix): gates = x @ weight_ih.T + bias_ih + h @
        weight_hh.T + bias_hh split as i, f, g, o; c_new = f*c + i*g; h_new = (o*tanh(c_new))
        @ weight_hr.T. Backward with cotangents on both h_new and c_new. cache.gates: the
        activated gates i, f, g, o [B, 4H]."""
    else:
        semantics = f"""torch.nn.LSTMCell({I}, {H}): (h_new, c_new) = cell(x, (h, c)), gate
        order i, f, g, o. Backward with cotangents on both h_new and c_new (torch:
        autograd.grad((h_new, c_new), ..., (d_h_new, d_c_new))). cache.gates: the activated
        gates i, f, g, o [B, 4H]."""
    register("lstm_cell", config, "numpy_ref.lstm_cell_forward / lstm_cell_backward",
              semantics, {"batch": B, "input_size": I, "hidden_size": H, "proj_size": P},
              make, run)


_lstm_cell_config("basic", 3, 4, 5, 0)
_lstm_cell_config("proj", 3, 4, 5, 3)


# --------------------------------------------------------------------------------------------
# lstm (the layer stack)


def _lstm_config(config: str, *, T: int, B: int, I: int, H: int, num_layers: int = 1,
                 bidirectional: bool = False, proj_size: int = 0, batch_first: bool = False,
                 lengths: Sequence[int] | None = None, initial_state: bool = False,
                 final_state_cotangents: bool = False) -> None:
    D = 2 if bidirectional else 1
    Ho = proj_size or H
    LD = num_layers * D

    def make(rng):
        params = ref.init_lstm_params(I, H, num_layers=num_layers, bidirectional=bidirectional,
                                      proj_size=proj_size, rng=rng)
        x = _normal(rng, B, T, I) if batch_first else _normal(rng, T, B, I)
        inputs = {"x": x}
        if initial_state:
            inputs["h0"] = _normal(rng, LD, B, Ho, scale=0.5)
            inputs["c0"] = _normal(rng, LD, B, H, scale=0.5)
        if lengths is not None:
            inputs["lengths"] = _i64(lengths)
        out_shape = (B, T, D * Ho) if batch_first else (T, B, D * Ho)
        cots = {"d_output": _normal(rng, *out_shape)}
        if final_state_cotangents:
            cots["d_h_n"] = _normal(rng, LD, B, Ho)
            cots["d_c_n"] = _normal(rng, LD, B, H)
        return inputs, params, cots

    def run(inp, par, cot):
        output, (h_n, c_n), cache = ref.lstm_forward(
            inp["x"], par, num_layers=num_layers, bidirectional=bidirectional,
            batch_first=batch_first, h0=inp.get("h0"), c0=inp.get("c0"),
            lengths=inp.get("lengths"))
        d_x, d_p, (d_h0, d_c0) = ref.lstm_backward(cot["d_output"], cache,
                                                   d_h_n=cot.get("d_h_n"),
                                                   d_c_n=cot.get("d_c_n"))
        grads = {"d_x": d_x, **_param_grads(d_p)}
        if initial_state:
            grads.update(d_h0=d_h0, d_c0=d_c0)
        return {"output": output, "h_n": h_n, "c_n": c_n}, grads, {}

    args = [f"{I}, {H}"]
    if num_layers > 1:
        args.append(f"num_layers={num_layers}")
    if bidirectional:
        args.append("bidirectional=True")
    if proj_size:
        args.append(f"proj_size={proj_size}")
    if batch_first:
        args.append("batch_first=True")
    layout = "[B, T, I]" if batch_first else "[T, B, I]"
    state = "(h0, c0)" if initial_state else "zero initial states"
    text = f"torch.nn.LSTM({', '.join(args)}) on x {layout} from {state}"
    if lengths is not None:
        text += f""" packed with pack_padded_sequence(x, lengths, batch_first={batch_first},
        enforce_sorted=False); output is pad_packed_sequence's padded output (exactly 0 at
        padded steps t >= lengths[b]; d_output there is ignored, x there is not data and
        grad.d_x there is 0); h_n, c_n are each row's state after its last real step"""
    text += f"""; returns output, (h_n, c_n) with h_n [L*D, B, Ho], c_n [L*D, B, H], index
    2*layer + direction. Backward: torch.autograd.grad of (output, h_n, c_n) with cotangents
    d_output{', d_h_n, d_c_n' if final_state_cotangents else ' only (zero on h_n, c_n)'}"""
    text += "; grads of x, h0, c0 and every parameter." if initial_state else \
        "; grads of x and every parameter."
    options = {"num_layers": num_layers, "bidirectional": bidirectional,
               "proj_size": proj_size, "batch_first": batch_first, "input_size": I,
               "hidden_size": H, "seq_len": T, "batch": B,
               "lengths": list(lengths) if lengths is not None else None,
               "initial_state": initial_state, "final_state_cotangents": final_state_cotangents}
    register("lstm", config, "numpy_ref.lstm_forward / lstm_backward", text, options, make,
              run)


_lstm_config("basic", T=4, B=3, I=4, H=5)
_lstm_config("bidirectional_2layer", T=4, B=2, I=3, H=4, num_layers=2, bidirectional=True)
_lstm_config("bidirectional_2layer_lengths", T=5, B=3, I=3, H=4, num_layers=2,
             bidirectional=True, lengths=[3, 5, 1], final_state_cotangents=True)
_lstm_config("initial_state", T=4, B=3, I=3, H=4, bidirectional=True, initial_state=True,
             final_state_cotangents=True)
_lstm_config("proj", T=4, B=2, I=3, H=5, num_layers=2, bidirectional=True, proj_size=3)
_lstm_config("batch_first_lengths", T=4, B=3, I=3, H=4, batch_first=True, lengths=[2, 4, 3])
_lstm_config("all_options", T=5, B=3, I=3, H=5, num_layers=2, bidirectional=True,
             proj_size=2, batch_first=True, lengths=[4, 1, 5], initial_state=True,
             final_state_cotangents=True)


# --------------------------------------------------------------------------------------------
# gru_cell, rnn_cell


def _recurrent_cell_config(family: str, config: str, B: int, I: int, H: int, *,
                           linear_before_reset: bool = True, nonlinearity: str = "tanh",
                           bias: bool = True) -> None:
    G = 3 if family == "gru_cell" else 1

    def make(rng):
        bound = 1 / math.sqrt(H)
        params = {"weight_ih": _uniform(rng, bound, G * H, I),
                  "weight_hh": _uniform(rng, bound, G * H, H)}
        if bias:
            params.update(bias_ih=_uniform(rng, bound, G * H), bias_hh=_uniform(rng, bound, G * H))
        inputs = {"x": _normal(rng, B, I), "h": _normal(rng, B, H, scale=0.5)}
        return inputs, params, {"d_h_new": _normal(rng, B, H)}

    def run(inp, par, cot):
        if family == "gru_cell":
            h_new, cache = ref.gru_cell_forward(inp["x"], inp["h"], par,
                                                linear_before_reset=linear_before_reset)
            d_x, d_h, d_p = ref.gru_cell_backward(cot["d_h_new"], cache)
            extra = {"gates": cache.gates}
        else:
            h_new, cache = ref.rnn_cell_forward(inp["x"], inp["h"], par,
                                                nonlinearity=nonlinearity)
            d_x, d_h, d_p = ref.rnn_cell_backward(cot["d_h_new"], cache)
            extra = {}
        return {"h_new": h_new}, {"d_x": d_x, "d_h": d_h, **_param_grads(d_p)}, extra

    if family == "gru_cell" and linear_before_reset:
        semantics = f"""torch.nn.GRUCell({I}, {H}{'' if bias else ', bias=False'}): h_new =
        cell(x, h), gate order r, z, n: r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr), z
        likewise, n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)), h_new = (1 - z) * n + z *
        h. cache.gates: the activated gates r, z, n [B, 3H]."""
    elif family == "gru_cell":
        semantics = f"""The GRU cell with the reset gate applied before the recurrent product
        (ONNX GRU linear_before_reset=0, Keras reset_after=False; torch has no such cell):
        r, z as torch.nn.GRUCell({I}, {H}) (gate order r, z, n, torch's names), n = tanh(x
        W_in^T + b_in + (r * h) W_hn^T + b_hn), h_new = (1 - z) * n + z * h. cache.gates: the
        activated gates r, z, n [B, 3H]."""
    else:
        semantics = f"""torch.nn.RNNCell({I}, {H}, nonlinearity='{nonlinearity}'): h_new =
        {nonlinearity}(x @ weight_ih.T + bias_ih + h @ weight_hh.T + bias_hh)."""
    semantics += " Backward: torch.autograd.grad(h_new, (x, h, *params), d_h_new)."
    op = family.removesuffix("_cell")
    register(family, config, f"numpy_ref.{op}_cell_forward / {op}_cell_backward", semantics,
             {"batch": B, "input_size": I, "hidden_size": H, "bias": bias,
              **({"linear_before_reset": linear_before_reset} if G == 3 else
                 {"nonlinearity": nonlinearity})}, make, run)


_recurrent_cell_config("gru_cell", "basic", 3, 4, 5)
_recurrent_cell_config("gru_cell", "linear_before_reset_false", 3, 4, 5,
                       linear_before_reset=False)
_recurrent_cell_config("rnn_cell", "tanh", 3, 4, 5)
_recurrent_cell_config("rnn_cell", "relu_no_bias", 3, 4, 5, nonlinearity="relu", bias=False)


# --------------------------------------------------------------------------------------------
# gru, rnn (the layer stacks)


def _gru_rnn_config(family: str, config: str, *, T: int, B: int, I: int, H: int,
                    num_layers: int = 1, bidirectional: bool = False,
                    batch_first: bool = False, lengths: Sequence[int] | None = None,
                    initial_state: bool = False, linear_before_reset: bool = True,
                    nonlinearity: str = "tanh", bias: bool = True) -> None:
    D = 2 if bidirectional else 1
    LD = num_layers * D
    init = ref.init_gru_params if family == "gru" else ref.init_rnn_params
    options = ({"linear_before_reset": linear_before_reset} if family == "gru" else
               {"nonlinearity": nonlinearity})

    def make(rng):
        params = init(I, H, num_layers=num_layers, bidirectional=bidirectional, bias=bias,
                      rng=rng)
        inputs = {"x": _normal(rng, B, T, I) if batch_first else _normal(rng, T, B, I)}
        if initial_state:
            inputs["h0"] = _normal(rng, LD, B, H, scale=0.5)
        if lengths is not None:
            inputs["lengths"] = _i64(lengths)
        out_shape = (B, T, D * H) if batch_first else (T, B, D * H)
        return inputs, params, {"d_output": _normal(rng, *out_shape),
                                "d_h_n": _normal(rng, LD, B, H)}

    def run(inp, par, cot):
        forward = ref.gru_forward if family == "gru" else ref.rnn_forward
        backward = ref.gru_backward if family == "gru" else ref.rnn_backward
        output, h_n, cache = forward(inp["x"], par, num_layers=num_layers,
                                     bidirectional=bidirectional, batch_first=batch_first,
                                     h0=inp.get("h0"), lengths=inp.get("lengths"), **options)
        d_x, d_p, d_h0 = backward(cot["d_output"], cache, d_h_n=cot["d_h_n"])
        grads = {"d_x": d_x, **_param_grads(d_p)}
        if initial_state:
            grads["d_h0"] = d_h0
        return {"output": output, "h_n": h_n}, grads, {}

    args = [f"{I}, {H}"]
    if num_layers > 1:
        args.append(f"num_layers={num_layers}")
    if bidirectional:
        args.append("bidirectional=True")
    if batch_first:
        args.append("batch_first=True")
    if not bias:
        args.append("bias=False")
    if family == "rnn":
        args.append(f"nonlinearity='{nonlinearity}'")
    module = "GRU" if family == "gru" else "RNN"
    if family == "gru" and not linear_before_reset:
        text = f"""The GRU with the reset gate applied before the recurrent product (ONNX
        linear_before_reset=0, Keras reset_after=False; torch has none), with
        torch.nn.GRU({', '.join(args)})'s names and layout: n = tanh(x W_in^T + b_in +
        (r * h) W_hn^T + b_hn), everything else as torch.nn.GRU"""
    else:
        text = f"torch.nn.{module}({', '.join(args)})"
    text += f""" on x {'[B, T, I]' if batch_first else '[T, B, I]'} from
    {'h0' if initial_state else 'a zero initial state'}"""
    if lengths is not None:
        text += """, packed with pack_padded_sequence(enforce_sorted=False) by lengths
        (output exactly 0 at padded steps, d_output there ignored, grad.d_x there 0; h_n each
        row's state after its last real step)"""
    text += f"""; returns output and h_n [L*D, B, H], index 2*layer + direction. Backward:
    torch.autograd.grad of (output, h_n) with cotangents d_output, d_h_n; grads of x
    {', h0' if initial_state else ''} and every parameter."""
    register(family, config, f"numpy_ref.{family}_forward / {family}_backward", text,
             {"num_layers": num_layers, "bidirectional": bidirectional,
              "batch_first": batch_first, "input_size": I, "hidden_size": H, "seq_len": T,
              "batch": B, "bias": bias, "initial_state": initial_state,
              "lengths": list(lengths) if lengths is not None else None, **options},
             make, run)


_gru_rnn_config("gru", "basic", T=4, B=3, I=4, H=5)
_gru_rnn_config("gru", "bidirectional_2layer_lengths", T=5, B=3, I=3, H=4, num_layers=2,
                bidirectional=True, lengths=[3, 5, 1], initial_state=True)
_gru_rnn_config("gru", "linear_before_reset_false", T=5, B=3, I=3, H=4, bidirectional=True,
                batch_first=True, lengths=[5, 2, 4], initial_state=True,
                linear_before_reset=False)
_gru_rnn_config("gru", "no_bias", T=4, B=2, I=3, H=4, bias=False)
_gru_rnn_config("rnn", "tanh_bidirectional_lengths", T=5, B=3, I=3, H=4, num_layers=2,
                bidirectional=True, lengths=[4, 1, 5], initial_state=True)
_gru_rnn_config("rnn", "relu_batch_first", T=4, B=3, I=3, H=4, batch_first=True,
                nonlinearity="relu")


# --------------------------------------------------------------------------------------------
# attention


def _attention_config(config: str, *, score: str, layout: str, B: int = 2, Tq: int = 3,
                      Tk: int = 4, Hq: int = 5, Hk: int | None = None, Hv: int | None = None,
                      heads: int = 1, kv_heads: int | None = None, A: int = 4,
                      additive_bias: bool = True, lengths: Sequence[int] | None = None,
                      mask: str | None = None, causal: bool = False,
                      scale: float | None = None, bias_shape: tuple[int, ...] | None = None,
                      d_weights: bool = False) -> None:
    """layout: "single" (query [B, Hq]), "many" ([B, Tq, Hq]) or "heads" ([B, h, Tq, D])."""
    Hk = Hq if Hk is None else Hk
    Hv = Hk if Hv is None else Hv
    kv_heads = heads if kv_heads is None else kv_heads
    if layout == "single":
        q_shape, kv_lead, w_shape = (B, Hq), (B, Tk), (B, Tk)
    elif layout == "many":
        q_shape, kv_lead, w_shape = (B, Tq, Hq), (B, Tk), (B, Tq, Tk)
    else:
        q_shape, kv_lead, w_shape = (B, heads, Tq, Hq), (B, kv_heads, Tk), (B, heads, Tq, Tk)
    c_shape = (*q_shape[:-1], Hv)
    group = heads // kv_heads

    def make(rng):
        inputs = {"query": _normal(rng, *q_shape), "keys": _normal(rng, *kv_lead, Hk),
                  "values": _normal(rng, *kv_lead, Hv)}
        if lengths is not None:
            inputs["lengths"] = _i64(lengths)
        if mask is not None:
            m = rng.random(w_shape if mask == "full" else w_shape[-2:]) < 0.6
            m[..., 0] = True  # every query sees a key
            inputs["mask"] = m
        if bias_shape is not None:
            inputs["bias"] = _normal(rng, *bias_shape)
        params = {}
        if score == "general":
            params = {"W": _normal(rng, Hq, Hk, scale=1 / math.sqrt(Hq))}
        elif score == "additive":
            params = {"W_query": _normal(rng, A, Hq, scale=1 / math.sqrt(Hq)),
                      "W_key": _normal(rng, A, Hk, scale=1 / math.sqrt(Hk)),
                      "v": _normal(rng, A)}
            if additive_bias:
                params["b"] = _normal(rng, A, scale=0.5)
        cots = {"d_context": _normal(rng, *c_shape)}
        if d_weights:
            cots["d_weights"] = _normal(rng, *w_shape)
        return inputs, params, cots

    def run(inp, par, cot):
        q, k, v = inp["query"], inp["keys"], inp["values"]
        context, weights, cache = ref.attention_forward(
            q, k, v, score=score, params=par or None, lengths=inp.get("lengths"),
            mask=inp.get("mask"), causal=causal, scale=scale, bias=inp.get("bias"))
        d_q, d_k, d_v, d_p = ref.attention_backward(cot["d_context"], cache,
                                                    d_weights=cot.get("d_weights"))
        # the raw scores (scale * score(q, k), no bias, no masking) on the stored inputs
        q4 = q[:, None, None] if layout == "single" else q[:, None] if layout == "many" else q
        k4 = k[:, None] if layout != "heads" else np.repeat(k, group, axis=1)
        s, _ = ref.attention_scores_forward(q4, k4, score=score, params=par or None,
                                            scale=scale)
        s = s[:, 0, 0] if layout == "single" else s[:, 0] if layout == "many" else s
        grads = {"d_query": d_q, "d_keys": d_k, "d_values": d_v, **_param_grads(d_p)}
        return {"context": context, "weights": weights}, _grads(grads), {"scores": s}

    eff_scale = None if score == "additive" else (
        scale if scale is not None else (1 / math.sqrt(Hk) if score == "scaled_dot" else 1.0))
    score_text = {
        "dot": "s = scale * q . k",
        "scaled_dot": "s = scale * q . k",
        "general": "s = scale * (q @ W) . k, W [Hq, Hk] (Luong general)",
        "additive": "s = v . tanh(W_query q" + (" + b" if additive_bias else "")
                    + " + W_key k) (Bahdanau)",
    }[score]
    if layout == "single":
        lay = f"one query per row: query [B, Hq] = [{B}, {Hq}], keys [B, Tk, Hk]"
    elif layout == "many":
        lay = f"many queries: query [B, Tq, Hq] = [{B}, {Tq}, {Hq}], keys [B, Tk, Hk]"
    else:
        lay = (f"SDPA's heads layout: query [B, h, Tq, D] = [{B}, {heads}, {Tq}, {Hq}], keys/"
               f"values [B, h_kv, Tk, D] with h_kv = {kv_heads}"
               + (f" (grouped-query: query head i reads kv head i // {group}; torch: "
                  "F.scaled_dot_product_attention(..., enable_gqa=True))" if group > 1 else ""))
    text = (f"numpy_ref.attention_forward(query, keys, values, score={score!r}"
            + (f", scale={scale!r}" if scale is not None else "")
            + f"): {lay}; {score_text}"
            + (f" with scale = {eff_scale!r}" if eff_scale is not None else "")
            + "; weights = softmax over the keys each query sees; context = weights @ values.")
    hidden = []
    if lengths is not None:
        hidden.append("keys j >= lengths[b] get weight exactly 0")
    if mask is not None:
        hidden.append("input.mask (bool, True = attend, SDPA's bool attn_mask"
                      + (", broadcast over the leading axes" if mask != "full" else "") + ")")
    if causal:
        hidden.append("causal: query i sees keys j <= i (SDPA's is_causal)")
    if bias_shape is not None:
        hidden.append("input.bias (float, broadcast to the weights, added to the scaled "
                      "scores: SDPA's float attn_mask; grad.d_bias is its gradient in its "
                      "own shape)")
    if hidden:
        text += " " + "; ".join(hidden) + "."
    if score in ("dot", "scaled_dot") and layout != "single":
        text += (" In torch: F.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale)"
                 " with the weights softmax(q k^T * scale + mask).")
    text += (" Backward with cotangents d_context" + (" and d_weights" if d_weights else "")
             + ". cache.scores: the raw scores " + ("score(q, k)" if score == "additive"
                                                      else "scale * score(q, k)")
             + " of every (query, key) pair, before bias, masking and softmax.")
    options = {"score": score, "layout": layout, "causal": causal,
               "scale": eff_scale, "additive_bias": additive_bias if score == "additive"
               else None, "heads": heads if layout == "heads" else None,
               "kv_heads": kv_heads if layout == "heads" else None,
               "mask": mask, "bias_shape": list(bias_shape) if bias_shape else None,
               "d_weights": d_weights}
    register("attention", config, "numpy_ref.attention_forward / attention_backward", text,
              {k: v for k, v in options.items() if v is not None}, make, run)


# the spec's case: B=2, Tq=3, Tk=4, H=5, lengths [4, 2], both cotangents
_attention_config("scaled_dot_lengths", score="scaled_dot", layout="many", lengths=[4, 2],
                  d_weights=True)
for _score, _kw in (("dot", {}), ("scaled_dot", {}), ("general", {"Hq": 3, "Hk": 5, "Hv": 4}),
                    ("additive", {"Hq": 3, "Hk": 5, "Hv": 4}),
                    ("additive_nobias", {"Hq": 3, "Hk": 5, "Hv": 4, "additive_bias": False})):
    _s = "additive" if _score.startswith("additive") else _score
    _attention_config(f"{_score}_single", score=_s, layout="single", lengths=[4, 3], **_kw)
    _attention_config(f"{_score}_many", score=_s, layout="many", d_weights=True, **_kw)
_attention_config("dot_mask_many", score="dot", layout="many", mask="full", d_weights=True)
_attention_config("heads", score="scaled_dot", layout="heads", heads=2, Hq=4, d_weights=True)
_attention_config("heads_gqa_lengths", score="scaled_dot", layout="heads", heads=4,
                  kv_heads=2, Hq=4, lengths=[2, 4])
_attention_config("heads_causal", score="scaled_dot", layout="heads", heads=2, Tq=4, Tk=4,
                  Hq=3, causal=True, d_weights=True)
_attention_config("heads_mask_scale", score="scaled_dot", layout="heads", heads=2, Hq=3,
                  mask="broadcast", scale=0.7)
_attention_config("heads_bias", score="scaled_dot", layout="heads", heads=2, Hq=3,
                  bias_shape=(2, 3, 4), d_weights=True)
_attention_config("heads_gqa_causal_bias_lengths", score="dot", layout="heads", heads=4,
                  kv_heads=2, Tq=4, Tk=4, Hq=3, causal=True, bias_shape=(1, 4, 4, 4),
                  lengths=[3, 4], d_weights=True)


# --------------------------------------------------------------------------------------------
# multihead_attention


def _mha_config(config: str, *, E: int, num_heads: int, N: int, Tq: int, Tk: int,
                kdim: int | None = None, vdim: int | None = None, bias: bool = True,
                batch_first: bool = True, key_padding_mask: bool = False,
                attn_mask: str | None = None, average_attn_weights: bool = True,
                need_weights: bool = True) -> None:
    """attn_mask: None, "bool" or "float" ([Tq, Tk]). need_weights=False: no weights output and
    no d_weights cotangent."""
    kdim = E if kdim is None else kdim
    vdim = E if vdim is None else vdim
    packed = kdim == E and vdim == E

    def lay(T, size):
        return (N, T, size) if batch_first else (T, N, size)

    w_shape = (N, Tq, Tk) if average_attn_weights else (N, num_heads, Tq, Tk)

    def make(rng):
        b = 1 / math.sqrt(E)
        params = {}
        if packed:
            params["in_proj_weight"] = _uniform(rng, b, 3 * E, E)
        else:
            params.update(q_proj_weight=_uniform(rng, b, E, E),
                          k_proj_weight=_uniform(rng, b, E, kdim),
                          v_proj_weight=_uniform(rng, b, E, vdim))
        if bias:
            params["in_proj_bias"] = _normal(rng, 3 * E, scale=0.3)
        params["out_proj.weight"] = _uniform(rng, b, E, E)
        if bias:
            params["out_proj.bias"] = _normal(rng, E, scale=0.3)
        inputs = {"query": _normal(rng, *lay(Tq, E)), "key": _normal(rng, *lay(Tk, kdim)),
                  "value": _normal(rng, *lay(Tk, vdim))}
        if key_padding_mask:
            m = np.zeros((N, Tk), bool)
            m[-1, Tk // 2:] = True  # the last row's second half is padding
            inputs["key_padding_mask"] = m
        if attn_mask == "bool":
            m = rng.random((Tq, Tk)) < 0.3
            m[:, 0] = False  # every query may see key 0
            inputs["attn_mask"] = m
        elif attn_mask == "float":
            inputs["attn_mask"] = _normal(rng, Tq, Tk)
        cots = {"d_output": _normal(rng, *lay(Tq, E))}
        if need_weights:
            cots["d_weights"] = _normal(rng, *w_shape)
        return inputs, params, cots

    def run(inp, par, cot):
        out, w, cache = ref.multihead_attention_forward(
            inp["query"], inp["key"], inp["value"], par, num_heads=num_heads,
            key_padding_mask=inp.get("key_padding_mask"), attn_mask=inp.get("attn_mask"),
            average_attn_weights=average_attn_weights, batch_first=batch_first,
            need_weights=need_weights)
        d_q, d_k, d_v, d_p = ref.multihead_attention_backward(cot["d_output"], cache,
                                                              d_weights=cot.get("d_weights"))
        return ({"output": out, **({"weights": w} if need_weights else {})},
                {"d_query": d_q, "d_key": d_k, "d_value": d_v, **_param_grads(d_p)}, {})

    args = [str(E), str(num_heads)]
    if not bias:
        args.append("bias=False")
    if not packed:
        args += [f"kdim={kdim}", f"vdim={vdim}"]
    args.append(f"batch_first={batch_first}")
    masks = []
    if key_padding_mask:
        masks.append("key_padding_mask=input.key_padding_mask (bool [N, Tk], True = padding)")
    if attn_mask:
        masks.append(f"attn_mask=input.attn_mask ({attn_mask} [Tq, Tk]"
                     + (", True = not allowed)" if attn_mask == "bool" else ", added)"))
    text = (f"torch.nn.MultiheadAttention({', '.join(args)}) with its state_dict as params: "
            f"output, weights = mha(query, key, value{''.join(', ' + m for m in masks)}, "
            f"need_weights={need_weights}, average_attn_weights={average_attn_weights}); "
            f"query {'[N, Tq, E]' if batch_first else '[Tq, N, E]'}, N={N}, Tq={Tq}, Tk={Tk}; "
            + ("weights " + ("[N, Tq, Tk] averaged over heads" if average_attn_weights
                             else "[N, h, Tq, Tk]")
               + ". Backward with cotangents d_output and d_weights"
               if need_weights else "no weights. Backward with the cotangent d_output")
            + "; query, key and value are separate tensors, each with its own gradient.")
    options = {"embed_dim": E, "num_heads": num_heads, "kdim": kdim, "vdim": vdim,
               "bias": bias, "batch_first": batch_first, "need_weights": need_weights,
               "average_attn_weights": average_attn_weights,
               "key_padding_mask": key_padding_mask, "attn_mask": attn_mask}
    register("multihead_attention", config,
              "numpy_ref.multihead_attention_forward / multihead_attention_backward", text,
              options, make, run)


_mha_config("key_padding_mask", E=6, num_heads=2, N=2, Tq=3, Tk=4, key_padding_mask=True)
_mha_config("kdim_vdim_float_mask", E=4, num_heads=2, N=2, Tq=3, Tk=4, kdim=3, vdim=5,
            bias=False, batch_first=False, attn_mask="float", average_attn_weights=False)
_mha_config("bool_attn_mask", E=6, num_heads=3, N=2, Tq=4, Tk=3, attn_mask="bool")
_mha_config("no_weights_key_padding_mask", E=6, num_heads=2, N=2, Tq=3, Tk=4,
            key_padding_mask=True, need_weights=False)


# --------------------------------------------------------------------------------------------
# layers: embedding, linear, cross_entropy


def _embedding_config(config: str, *, V: int, E: int, shape: tuple[int, ...],
                      padding_idx: int | None = None) -> None:
    def make(rng):
        ids = _ids(rng, V, *shape)
        ids.reshape(-1)[:3] = [1, 1, 0]  # a repeated id (its gradient rows add) and id 0
        return ({"ids": ids}, {"weight": _normal(rng, V, E)},
                {"d_out": _normal(rng, *shape, E)})

    def run(inp, par, cot):
        out, cache = ref.embedding_forward(inp["ids"], par, padding_idx=padding_idx)
        return {"out": out}, _param_grads(ref.embedding_backward(cot["d_out"], cache)), {}

    text = (f"torch.nn.Embedding({V}, {E}"
            + (f", padding_idx={padding_idx}" if padding_idx is not None else "")
            + "): out = weight[ids] (ids I64); grad.d_weight scatter-adds d_out into the rows "
              "of the ids" + (f" (row {padding_idx} gets no gradient)"
                              if padding_idx is not None else "") + ".")
    register("embedding", config, "numpy_ref.embedding_forward / embedding_backward", text,
              {"num_embeddings": V, "embedding_dim": E, "padding_idx": padding_idx}, make, run)


_embedding_config("basic", V=7, E=3, shape=(2, 4))
_embedding_config("padding_idx", V=6, E=4, shape=(3, 3), padding_idx=0)


def _linear_config(config: str, *, shape: tuple[int, ...], I: int, O: int, bias: bool) -> None:
    def make(rng):
        b = 1 / math.sqrt(I)
        params = {"weight": _uniform(rng, b, O, I)}
        if bias:
            params["bias"] = _uniform(rng, b, O)
        return {"x": _normal(rng, *shape, I)}, params, {"d_y": _normal(rng, *shape, O)}

    def run(inp, par, cot):
        y, cache = ref.linear_forward(inp["x"], par)
        d_x, d_p = ref.linear_backward(cot["d_y"], cache)
        return {"y": y}, {"d_x": d_x, **_param_grads(d_p)}, {}

    text = (f"torch.nn.Linear({I}, {O}, bias={bias}): y = x @ weight.T"
            + (" + bias" if bias else "") + f" on x {[*shape, I]}.")
    register("linear", config, "numpy_ref.linear_forward / linear_backward", text,
              {"in_features": I, "out_features": O, "bias": bias}, make, run)


_linear_config("basic", shape=(2, 3), I=4, O=5, bias=True)
_linear_config("no_bias", shape=(3,), I=4, O=2, bias=False)


def _cross_entropy_config(config: str, *, shape: tuple[int, ...], C: int,
                          reduction: str = "mean", ignore_index: int = -100,
                          label_smoothing: float = 0.0, class_weight: bool = False,
                          probabilities: bool = False, ignored: int = 0) -> None:
    """shape: the logits' shape without the class axis ([N] or [N, d...])."""
    logits_shape = (shape[0], C, *shape[1:])

    def make(rng):
        inputs = {"logits": _normal(rng, *logits_shape, scale=2.0)}
        if probabilities:
            p = rng.random(logits_shape)
            inputs["targets"] = p / p.sum(axis=1, keepdims=True)
        else:
            t = _ids(rng, C, *shape)
            t.reshape(-1)[:ignored] = ignore_index
            inputs["targets"] = t
        if class_weight:
            inputs["weight"] = rng.uniform(0.5, 2.0, C)
        d_loss = _normal(rng, *shape) if reduction == "none" else np.array(rng.normal())
        return inputs, {}, {"d_loss": d_loss}

    def run(inp, par, cot):
        loss, cache = ref.cross_entropy_forward(
            inp["logits"], inp["targets"], ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, weight=inp.get("weight"))
        d_logits = ref.cross_entropy_backward(cot["d_loss"], cache)
        return {"loss": np.asarray(loss)}, {"d_logits": d_logits}, {}

    args = [f"reduction={reduction!r}"]
    if ignored:
        args.append(f"ignore_index={ignore_index}")
    if label_smoothing:
        args.append(f"label_smoothing={label_smoothing}")
    if class_weight:
        args.append("weight=input.weight")
    text = (f"torch.nn.functional.cross_entropy(logits, targets, {', '.join(args)}) with "
            f"logits {list(logits_shape)} and targets "
            + ("class probabilities (float, like the logits; no gradient is given for them)"
               if probabilities else f"class indices (I64 {list(shape)}"
               + (f"; those equal to ignore_index = {ignore_index} take no part, at least "
                  f"{ignored}" if ignored else "") + ")")
            + f"; loss is {'per row' if reduction == 'none' else 'a scalar (shape [])'}; "
            "backward from cotangent d_loss gives grad.d_logits.")
    options = {"classes": C, "reduction": reduction, "ignore_index": ignore_index,
               "label_smoothing": label_smoothing, "class_weight": class_weight,
               "probabilities": probabilities}
    register("cross_entropy", config, "numpy_ref.cross_entropy_forward / "
              "cross_entropy_backward", text, options, make, run)


_cross_entropy_config("mean", shape=(4,), C=5)
_cross_entropy_config("ignore_index_label_smoothing_weight", shape=(5,), C=4,
                      label_smoothing=0.1, class_weight=True, ignored=2)
_cross_entropy_config("sum_spatial", shape=(2, 3), C=4, reduction="sum", ignore_index=1,
                      ignored=1)
_cross_entropy_config("none_probabilities", shape=(3,), C=4, reduction="none",
                      probabilities=True, label_smoothing=0.2)


# --------------------------------------------------------------------------------------------
# models


def _bilstm_attention_config(config: str, *, V: int, E: int, H: int, C: int, B: int, T: int,
                             lengths: Sequence[int] | None, seed_compatible: bool) -> None:
    def make(rng):
        params = ref.init_bilstm_attention_params(V, E, H, C, rng=rng)
        inputs = {"ids": _ids(rng, V, B, T)}
        if lengths is not None:
            inputs["lengths"] = _i64(lengths)
        return inputs, params, {"d_logits": _normal(rng, B, C),
                                "d_attention": _normal(rng, B, T)}

    def run(inp, par, cot):
        logits, attention, cache = ref.bilstm_attention_forward(
            inp["ids"], par, lengths=inp.get("lengths"), seed_compatible=seed_compatible)
        d_p = ref.bilstm_attention_backward(cot["d_logits"], cache,
                                            d_attention=cot["d_attention"])
        return {"logits": logits, "attention": attention}, _param_grads(d_p), {}

    query = ("the seed's query h_n.view(-1, 2H) (h_n [2, B, H] read in memory order: rows "
             "mix sentences when B > 1)" if seed_compatible else
             "each sentence's own query concat(h_n[-2], h_n[-1])")
    text = (f"torch_impl.BiLSTMAttention({V}, {E}, {H}, {C}"
            + (", seed_compatible=True" if seed_compatible else "")
            + f"): embedding(ids) -> nn.LSTM({E}, {H}, bidirectional=True) on [T, B, E]"
            + (" packed by lengths (ids past a length are not data)" if lengths else "")
            + f" -> dot attention over the LSTM output (keys = values) with {query}"
            + (", keys past lengths masked" if lengths else "")
            + f" -> nn.Linear({2 * H}, {C}); outputs logits [B, C] and attention [B, T]. "
            "Backward from d_logits and d_attention; grads of every parameter.")
    register("bilstm_attention", config,
              "numpy_ref.bilstm_attention_forward / bilstm_attention_backward", text,
              {"vocab_size": V, "embedding_dim": E, "n_hidden": H, "num_classes": C,
               "seed_compatible": seed_compatible, "lengths": list(lengths) if lengths else None},
              make, run)


_bilstm_attention_config("default", V=8, E=3, H=4, C=2, B=3, T=4, lengths=[4, 2, 3],
                         seed_compatible=False)
_bilstm_attention_config("seed_compatible", V=8, E=3, H=4, C=2, B=3, T=4, lengths=None,
                         seed_compatible=True)


def _seq2seq_config(config: str, *, decoder: str, score: str | None, Vs: int = 7, Vt: int = 6,
                    E: int = 3, H: int = 3, B: int = 2, Ts: int = 5, Tt: int = 3,
                    src_lengths: Sequence[int] | None = (5, 3), num_layers: int = 1) -> None:
    def make(rng):
        params = ref.init_seq2seq_params(Vs, Vt, E, H, decoder=decoder, score=score,
                                         num_layers=num_layers, rng=rng)
        inputs = {"src": _ids(rng, Vs, B, Ts), "tgt": _ids(rng, Vt, B, Tt)}
        if src_lengths is not None:
            inputs["src_lengths"] = _i64(src_lengths)
        return inputs, params, {"d_logits": _normal(rng, B, Tt, Vt),
                                "d_attention": _normal(rng, B, Tt, Ts)}

    def run(inp, par, cot):
        logits, attention, cache = ref.seq2seq_forward(
            inp["src"], inp["tgt"], par, decoder=decoder, score=score,
            src_lengths=inp.get("src_lengths"))
        d_p = ref.seq2seq_backward(cot["d_logits"], cache, d_attention=cot["d_attention"])
        return {"logits": logits, "attention": attention}, _param_grads(d_p), {}

    used = score or ("general" if decoder == "luong" else "additive")
    if decoder == "luong":
        body = (f"Luong decoder: nn.LSTM({E}, {2 * H}) over the embedded target from the "
                f"encoder's final states, {used!r} attention of every step over the encoder "
                "output, tanh(concat [c_t; s_t]) (no bias), linear generator")
    else:
        body = ("Bahdanau decoder, step by step: additive attention (with bias) queried by the "
                "previous state, nn.LSTMCell on [y_t; c_t], generator on [s_t; c_t; y_t]")
    text = (f"torch_impl.Seq2SeqAttention({Vs}, {Vt}, {E}, {H}, decoder={decoder!r}, "
            f"score={score!r}, num_layers={num_layers}) teacher-forced on src [B, Ts] (ids "
            "past src_lengths are not data) and tgt [B, Tt]: a bidirectional nn.LSTM encoder "
            f"({num_layers} layer(s)) packed by src_lengths, the last layer's final states "
            "starting "
            f"the decoder state (2H = {2 * H}): concat(h_n[-2], h_n[-1]) and "
            f"concat(c_n[-2], c_n[-1]); {body}. Outputs logits [B, Tt, Vt] and attention "
            "[B, Tt, Ts]; backward from d_logits and d_attention; grads of every parameter.")
    register("seq2seq", config, "numpy_ref.seq2seq_forward / seq2seq_backward", text,
              {"src_vocab": Vs, "tgt_vocab": Vt, "embedding_dim": E, "hidden_size": H,
               "decoder": decoder, "score": used, "num_layers": num_layers,
               "src_lengths": list(src_lengths) if src_lengths else None}, make, run)


_seq2seq_config("luong_general", decoder="luong", score="general")
_seq2seq_config("luong_dot", decoder="luong", score="dot")
_seq2seq_config("luong_additive", decoder="luong", score="additive")
_seq2seq_config("bahdanau", decoder="bahdanau", score=None)
_seq2seq_config("luong_scaled_dot_2_layers", decoder="luong", score="scaled_dot", num_layers=2)
_seq2seq_config("bahdanau_2_layers", decoder="bahdanau", score=None, num_layers=2)
