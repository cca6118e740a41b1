"""Validation and argument plumbing of the LSTM family (see `numpy_ref.lstm`).

`kernels.lstm` calls the same functions, so both backends reject the same inputs with the same
messages, name the parameters alike and treat padding alike. Each message names the argument,
what was expected and what was received.

Shapes as in `numpy_ref.lstm`: T steps, B rows, I input size, H hidden size, P projection size,
Ho = P or H, D directions, L layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from numpy_ref.contract import checks, unchanged

# --------------------------------------------------------------------------------------------
# parameter names and shapes (torch.nn.LSTM's state_dict)


def param_key(kind: str, layer: int, direction: int) -> str:
    """The state_dict name of one parameter: ``param_key("weight_hh", 1, 1)`` is
    ``"weight_hh_l1_reverse"``. kind: weight_ih, weight_hh, bias_ih, bias_hh or weight_hr."""
    return f"{kind}_l{layer}{'_reverse' if direction else ''}"


def param_specs(
    input_size: int, hidden_size: int, proj_size: int, num_layers: int, directions: int,
    bias: bool = True,
) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(key, shape, labels) of every parameter, in `torch.nn.LSTM.state_dict()` order.

    Per layer and direction: weight_ih [4H, I] (layer 0) or [4H, D*Ho], weight_hh [4H, Ho],
    bias_ih [4H], bias_hh [4H] (not with ``bias=False``), and weight_hr [P, H] when
    proj_size > 0.
    """
    H, P = hidden_size, proj_size
    Ho = P or H
    for layer in range(num_layers):
        layer_in = input_size if layer == 0 else directions * Ho
        for d in range(directions):
            yield (param_key("weight_ih", layer, d), (4 * H, layer_in),
                   "[4H, I]" if layer == 0 else "[4H, D*Ho]")
            yield param_key("weight_hh", layer, d), (4 * H, Ho), "[4H, Ho]"
            if bias:
                yield param_key("bias_ih", layer, d), (4 * H,), "[4H]"
                yield param_key("bias_hh", layer, d), (4 * H,), "[4H]"
            if P:
                yield param_key("weight_hr", layer, d), (P, H), "[P, H]"


def validate_lstm_sizes(input_size: Any, hidden_size: Any, num_layers: Any, proj_size: Any
                        ) -> None:
    """Check `init_lstm_params`'s sizes: positive integers, 0 <= proj_size < hidden_size."""
    for name, v, low in (("input_size", input_size, 1), ("hidden_size", hidden_size, 1),
                         ("num_layers", num_layers, 1), ("proj_size", proj_size, 0)):
        if not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size: expected 0 <= proj_size < hidden_size = {hidden_size}, "
                         f"got {proj_size}")


def _hidden_size(params: Mapping[str, Any], key: str) -> int:
    """H, read off ``params[key]`` = a weight_hh of shape [4H, Ho]."""
    four_h = checks.leading_dim(params, key, 2, "[4H, Ho]")
    if four_h % 4:
        raise ValueError(f"params[{key!r}]: expected shape [4H, Ho], got {params[key].shape}")
    return four_h // 4


# --------------------------------------------------------------------------------------------
# the one-step cell (torch.nn.LSTMCell's names, plus an optional weight_hr)


def _cell_params(params: Mapping[str, Any], I: int, dtype: np.dtype
                 ) -> tuple[dict[str, np.ndarray], int, int]:
    """Check the cell's params against input size I; return (params, H, Ho)."""
    H = _hidden_size(params, "weight_hh")
    P = checks.leading_dim(params, "weight_hr", 2, "[P, H]") if "weight_hr" in params else 0
    Ho = P or H
    p = {
        "weight_ih": checks.param(params, "weight_ih", (4 * H, I), "[4H, I]", dtype, "x"),
        "weight_hh": checks.param(params, "weight_hh", (4 * H, Ho), "[4H, Ho]", dtype, "x"),
    }
    if "bias_ih" in params or "bias_hh" in params:  # both or neither (torch's bias=False)
        for k in ("bias_ih", "bias_hh"):
            p[k] = checks.param(params, k, (4 * H,), "[4H]", dtype, "x")
    if P:
        p["weight_hr"] = checks.param(params, "weight_hr", (P, H), "[P, H]", dtype, "x")
    checks.no_unexpected_keys(params, set(p), "an LSTM cell has weight_ih, weight_hh, "
                              "(both or neither) bias_ih, bias_hh and optionally weight_hr")
    return p, H, Ho


def validate_lstm_cell_inputs(
    x: Any, h: Any, c: Any, params: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray], int, int]:
    """Check every `lstm_cell_forward` argument: x [B, I], h [B, Ho], c [B, H], params.

    Returns ``(x, h, c, p, H, Ho)``: the arrays, the validated params (the caller's arrays,
    only the cell's keys), the hidden and output sizes.
    """
    x = checks.float_array("x", x, ("B", "I"))
    h = checks.float_array("h", h, ("B", "Ho"))
    c = checks.float_array("c", c, ("B", "H"))
    B, I = x.shape
    p, H, Ho = _cell_params(params, I, x.dtype)
    for name, a, shape, labels in (("h", h, (B, Ho), "[B, Ho]"), ("c", c, (B, H), "[B, H]")):
        checks.same_dtype(name, a, x.dtype, "x")
        checks.shape_is(name, a, shape, labels)
    return x, h, c, p, H, Ho


def cell_fingerprints(x: np.ndarray, h: np.ndarray, c: np.ndarray,
                      p: Mapping[str, np.ndarray]) -> unchanged.Fingerprints:
    """What `lstm_cell_backward` reads of the caller's arrays, fingerprinted
    (`numpy_ref.contract.unchanged`): x, h and c (for d_weight_ih, d_weight_hh and d_f) and the
    weights (weight_ih, weight_hh, weight_hr), not the biases, which the forward only added."""
    weights = [(f"params[{k!r}]", p[k]) for k in p if not k.startswith("bias")]
    return unchanged.record("lstm_cell_forward", "lstm_cell_backward",
                            [("x", x), ("h", h), ("c", c), *weights])


def validate_lstm_cell_cotangents(
    d_h_new: Any, d_c_new: Any, cache: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Check `lstm_cell_backward`'s cotangents: d_h_new [B, Ho], d_c_new [B, H] or None.

    `cache` is the LSTMCellCache of `lstm_cell_forward`, its type already checked by the caller
    (each backend checks its own caches, as every op family does). Returns the cotangents,
    d_c_new as zeros [B, H] when None.
    """
    x, h, c = cache.x, cache.h, cache.c
    d_h_new = checks.float_array("d_h_new", d_h_new, ("B", "Ho"))
    checks.same_dtype("d_h_new", d_h_new, x.dtype, "x")
    checks.shape_is("d_h_new", d_h_new, h.shape, "[B, Ho]")
    if d_c_new is None:
        d_c_new = np.zeros_like(c)
    d_c_new = checks.float_array("d_c_new", d_c_new, ("B", "H"))
    checks.same_dtype("d_c_new", d_c_new, x.dtype, "x")
    checks.shape_is("d_c_new", d_c_new, c.shape, "[B, H]")
    return d_h_new, d_c_new


# --------------------------------------------------------------------------------------------
# the layer stack


def _validate_lstm_params(params: Mapping[str, Any], I: int, num_layers: int, D: int,
                          dtype: np.dtype) -> tuple[dict[str, np.ndarray], int, int]:
    """Check every key and shape; return (validated dict, H, Ho)."""
    H = _hidden_size(params, "weight_hh_l0")
    P = checks.leading_dim(params, "weight_hr_l0", 2, "[P, H]") if "weight_hr_l0" in params else 0
    bias = "bias_ih_l0" in params or "bias_hh_l0" in params  # torch's bias=False: neither
    p = {k: checks.param(params, k, shape, labels, dtype, "x")
         for k, shape, labels in param_specs(I, H, P, num_layers, D, bias)}
    checks.no_unexpected_keys(
        params, set(p),
        f"they do not fit num_layers={num_layers}, bidirectional={D == 2}, "
        f"proj_size={P}, bias={bias} (check those options)",
    )
    return p, H, P or H


def validate_lstm_inputs(
    x: Any, params: Mapping[str, Any], num_layers: Any, bidirectional: bool, batch_first: bool,
    h0: Any, c0: Any, lengths: Any, dropout: Any = 0.0,
) -> tuple[np.ndarray, dict[str, np.ndarray], int, int, int, np.ndarray, np.ndarray,
           np.ndarray | None]:
    """Check every `lstm_forward` argument, in the order the errors are reported.

    Returns ``(xt, p, H, Ho, D, h0, c0, lengths)``: x as a time-major view [T, B, I] (no copy),
    the validated params (the caller's arrays, keyed as torch), the hidden and output sizes,
    the number of directions, h0 [L*D, B, Ho] and c0 [L*D, B, H] (zeros when not given), and
    lengths as int64 [B] or None.
    """
    if dropout != 0:
        raise ValueError(f"dropout: inter-layer dropout is random and not part of the "
                         f"reference; expected 0, got {dropout!r}")
    if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers: expected an integer >= 1, got {num_layers!r}")
    x = checks.float_array("x", x, ("B", "T", "I") if batch_first else ("T", "B", "I"))
    xt = x.transpose(1, 0, 2) if batch_first else x  # [T, B, I]
    T, B, I = xt.shape
    if T == 0 or B == 0:
        raise ValueError(f"x: expected at least one step and one row, got shape {x.shape}")
    D = 2 if bidirectional else 1
    p, H, Ho = _validate_lstm_params(params, I, num_layers, D, x.dtype)
    if (h0 is None) != (c0 is None):
        raise ValueError("h0, c0: give both initial states or neither")
    if h0 is None:
        h0 = np.zeros((num_layers * D, B, Ho), x.dtype)
        c0 = np.zeros((num_layers * D, B, H), x.dtype)
    for name, a, size in (("h0", h0, "Ho"), ("c0", c0, "H")):
        checks.float_array(name, a, ("L*D", "B", size))
        checks.same_dtype(name, a, x.dtype, "x")
        checks.shape_is(name, a, (num_layers * D, B, Ho if size == "Ho" else H),
                        f"[L*D, B, {size}]")
    if lengths is not None:
        lengths = checks.lengths_array(lengths, B, T)
    return xt, p, H, Ho, D, h0, c0, lengths


def padding_mask(lengths: np.ndarray | None, T: int) -> np.ndarray | None:
    """m [T, B, 1] bool, ``m[t, b] = t < lengths[b]`` (lengths int64 [B]); None without lengths."""
    if lengths is None:
        return None
    return (np.arange(T)[:, None] < lengths[None, :])[:, :, None]


def without_padding(xt: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """xt [T, B, I] with its padded steps (mask [T, B, 1] False) replaced by exact zeros.

    Padding is not data: whatever those entries hold (NaN and inf included) then reaches no
    product, so it changes no output and no gradient, bit for bit the same as zero padding.
    Returns xt itself (no copy) when there is no mask or nothing is padded, else a C-contiguous
    copy.
    """
    if mask is None or mask.all():
        return xt
    return np.ascontiguousarray(np.where(mask, xt, xt.dtype.type(0)))


def lstm_fingerprints(x: np.ndarray, layer_input: np.ndarray,
                      p: Mapping[str, np.ndarray]) -> unchanged.Fingerprints:
    """What `lstm_backward` reads of the caller's arrays, fingerprinted
    (`numpy_ref.contract.unchanged`), for either backend: `x` when layer 0's cached input
    `layer_input` is a view of it (not when the forward copied it: padding zeroed, or a
    contiguous copy), and every weight_ih, weight_hh and weight_hr (`p`, the validated params).
    Not the biases, which the forward only added, nor h0 and c0, which it copied."""
    weights = [(f"params[{k!r}]", p[k]) for k in p if not k.startswith("bias")]
    return unchanged.record("lstm_forward", "lstm_backward",
                            [("x", unchanged.shared(x, layer_input)), *weights])


def validate_lstm_cotangents(
    d_output: Any, d_h_n: Any, d_c_n: Any, cache: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check the `lstm_backward` cotangents against the forward that made `cache`.

    `cache` is the LSTMCache of `lstm_forward` (either backend's), its type already checked by
    the caller.
    Returns ``(d_out, d_h_n, d_c_n)``: d_output as a time-major view [T, B, D*Ho] (no copy), and
    d_h_n [L*D, B, Ho], d_c_n [L*D, B, H] (zeros when not given).
    """
    L, D = cache.num_layers, 2 if cache.bidirectional else 1
    first = cache.directions[0]
    T, B, _ = first.x.shape
    H, Ho, dtype = cache.hidden_size, cache.output_size, first.x.dtype
    out_labels = ("B", "T", "D*Ho") if cache.batch_first else ("T", "B", "D*Ho")
    d_output = checks.float_array("d_output", d_output, out_labels)
    checks.same_dtype("d_output", d_output, dtype, "x")
    expected = (B, T, D * Ho) if cache.batch_first else (T, B, D * Ho)
    checks.shape_is("d_output", d_output, expected, f"[{', '.join(out_labels)}]")
    finals = []
    for name, a, size in (("d_h_n", d_h_n, "Ho"), ("d_c_n", d_c_n, "H")):
        shape = (L * D, B, Ho if size == "Ho" else H)
        if a is None:
            a = np.zeros(shape, dtype)
        checks.float_array(name, a, ("L*D", "B", size))
        checks.same_dtype(name, a, dtype, "x")
        checks.shape_is(name, a, shape, f"[L*D, B, {size}]")
        finals.append(a)
    d_h_n, d_c_n = finals
    d_out = d_output.transpose(1, 0, 2) if cache.batch_first else d_output  # [T, B, D*Ho]
    return d_out, d_h_n, d_c_n


def direction_bias(p: Mapping[str, np.ndarray], layer: int, d: int, H: int, dtype: np.dtype
                   ) -> np.ndarray:
    """b_ih + b_hh [4H] of one direction, zeros without biases (torch's bias=False)."""
    key = param_key("bias_ih", layer, d)
    if key not in p:
        return np.zeros(4 * H, dtype)
    return p[key] + p[param_key("bias_hh", layer, d)]
