"""Validation and argument plumbing of the GRU and the Elman RNN (see `numpy_ref.gru`,
`numpy_ref.rnn`), shared by every backend.

Both layers have one state h (no cell state), ``G`` gate blocks stacked in their weights
(G = 3 for the GRU: r, z, n; G = 1 for the RNN) and torch's state_dict names:
``weight_ih_l{k}`` [G*H, In], ``weight_hh_l{k}`` [G*H, H], ``bias_ih_l{k}``,
``bias_hh_l{k}`` [G*H] (absent with ``bias=False``), ``_reverse`` for the second direction.
The layer stack (layers x directions, the time-major view, lengths and padding) is the LSTM's
(`numpy_ref.contract.lstm`); the math of one direction is the op's own, passed in as a
function, so this module holds no derivative.

Shapes: T steps, B rows, I input size, H hidden size, D directions, L layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks, unchanged
from numpy_ref.contract.fields import documented
from numpy_ref.contract.lstm import padding_mask, param_key, without_padding

NONLINEARITIES = ("tanh", "relu")


def param_specs(input_size: int, hidden_size: int, num_layers: int, directions: int, gates: int,
                bias: bool) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(key, shape, labels) of every parameter, in torch's state_dict order: per layer and
    direction weight_ih [G*H, I] (layer 0) or [G*H, D*H], weight_hh [G*H, H], and with bias
    bias_ih, bias_hh [G*H]."""
    H, G = hidden_size, gates
    gh = f"[{G}H" if G > 1 else "[H"
    for layer in range(num_layers):
        layer_in = input_size if layer == 0 else directions * H
        for d in range(directions):
            yield (param_key("weight_ih", layer, d), (G * H, layer_in),
                   f"{gh}, I]" if layer == 0 else f"{gh}, D*H]")
            yield param_key("weight_hh", layer, d), (G * H, H), f"{gh}, H]"
            if bias:
                yield param_key("bias_ih", layer, d), (G * H,), f"{gh}]"
                yield param_key("bias_hh", layer, d), (G * H,), f"{gh}]"


def validate_sizes(input_size: Any, hidden_size: Any, num_layers: Any) -> None:
    """Check `init_gru_params` / `init_rnn_params` sizes: positive integers."""
    for name, v in (("input_size", input_size), ("hidden_size", hidden_size),
                    ("num_layers", num_layers)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")


def nonlinearity_of(nonlinearity: Any) -> str:
    """The RNN's activation name, checked: "tanh" or "relu"."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    return nonlinearity


def has_bias(params: Mapping[str, Any], key: str) -> bool:
    """Whether the params carry biases (torch's ``bias=True``): ``bias_ih`` of the first cell
    (`key`) or its ``bias_hh`` present. A dict with one of the two fails the key check."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a mapping of str to numpy.ndarray, got "
                        f"{type(params).__name__}")
    return key in params or key.replace("bias_ih", "bias_hh") in params


def _hidden_size(params: Mapping[str, Any], key: str, gates: int) -> int:
    """H, read off ``params[key]``, a weight_hh of shape [G*H, H]."""
    labels = f"[{gates}H, H]" if gates > 1 else "[H, H]"
    rows = checks.leading_dim(params, key, 2, labels)
    if rows % gates:
        raise ValueError(f"params[{key!r}]: expected shape {labels}, got {params[key].shape}")
    return rows // gates


# --------------------------------------------------------------------------------------------
# the one-step cell (torch.nn.GRUCell / RNNCell names)


def cell_inputs(x: Any, h: Any, params: Mapping[str, Any], gates: int, op: str
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], int]:
    """Check a cell's arguments: x [B, I], h [B, H], params ``weight_ih`` [G*H, I],
    ``weight_hh`` [G*H, H] and, both or neither, ``bias_ih``, ``bias_hh`` [G*H].

    Returns ``(x, h, p, H)``, p holding only the cell's keys (the caller's arrays)."""
    x = checks.float_array("x", x, ("B", "I"))
    h = checks.float_array("h", h, ("B", "H"))
    B, I = x.shape
    bias = has_bias(params, "bias_ih")
    H = _hidden_size(params, "weight_hh", gates)
    gh = f"[{gates}H" if gates > 1 else "[H"
    p = {"weight_ih": checks.param(params, "weight_ih", (gates * H, I), f"{gh}, I]", x.dtype,
                                   "x"),
         "weight_hh": checks.param(params, "weight_hh", (gates * H, H), f"{gh}, H]", x.dtype,
                                   "x")}
    if bias:
        for k in ("bias_ih", "bias_hh"):
            p[k] = checks.param(params, k, (gates * H,), f"{gh}]", x.dtype, "x")
    checks.no_unexpected_keys(params, set(p), f"a {op} has weight_ih, weight_hh and (both or "
                              "neither) bias_ih, bias_hh")
    checks.same_dtype("h", h, x.dtype, "x")
    checks.shape_is("h", h, (B, H), "[B, H]")
    return x, h, p, H


def cell_fingerprints(forward: str, backward: str, x: np.ndarray, h: np.ndarray,
                      p: Mapping[str, np.ndarray]) -> unchanged.Fingerprints:
    """What a cell's backward reads of the caller's arrays: x, h and the weights (not the
    biases, which the forward only added)."""
    weights = [(f"params[{k!r}]", p[k]) for k in p if not k.startswith("bias")]
    return unchanged.record(forward, backward, [("x", x), ("h", h), *weights])


def cell_cotangent(d_h_new: Any, h: np.ndarray) -> np.ndarray:
    """Check a cell backward's cotangent d_h_new [B, H] against the forward's h."""
    d_h_new = checks.float_array("d_h_new", d_h_new, ("B", "H"))
    checks.same_dtype("d_h_new", d_h_new, h.dtype, "x")
    checks.shape_is("d_h_new", d_h_new, h.shape, "[B, H]")
    return d_h_new


# --------------------------------------------------------------------------------------------
# the layer stack


@documented
class StackArgs(NamedTuple):
    """The validated arguments of a GRU/RNN forward."""

    xt: np.ndarray  # [T, B, I]  x as a time-major view (no copy)
    params: dict[str, np.ndarray]  # the validated params (the caller's arrays, torch's keys)
    hidden_size: int  # H
    directions: int  # D
    h0: np.ndarray  # [L*D, B, H]  zeros when not given
    lengths: np.ndarray | None  # int64 [B], or None
    bias: bool  # whether the params carry biases


def stack_inputs(x: Any, params: Mapping[str, Any], num_layers: Any, bidirectional: bool,
                 batch_first: bool, h0: Any, lengths: Any, gates: int, options: str,
                 dropout: Any = 0.0) -> StackArgs:
    """Check every argument of a GRU/RNN forward, in the order the errors are reported.
    `options` names the op's own options for the hint of an unexpected key."""
    if dropout != 0:
        raise ValueError(f"dropout: inter-layer dropout is random and not part of the "
                         f"reference; expected 0, got {dropout!r}")
    if not isinstance(num_layers, (int, np.integer)) or isinstance(num_layers, bool) \
            or num_layers < 1:
        raise ValueError(f"num_layers: expected an integer >= 1, got {num_layers!r}")
    x = checks.float_array("x", x, ("B", "T", "I") if batch_first else ("T", "B", "I"))
    xt = x.transpose(1, 0, 2) if batch_first else x
    T, B, I = xt.shape
    if T == 0 or B == 0:
        raise ValueError(f"x: expected at least one step and one row, got shape {x.shape}")
    D = 2 if bidirectional else 1
    bias = has_bias(params, "bias_ih_l0")
    H = _hidden_size(params, "weight_hh_l0", gates)
    p = {k: checks.param(params, k, shape, labels, x.dtype, "x")
         for k, shape, labels in param_specs(I, H, num_layers, D, gates, bias)}
    checks.no_unexpected_keys(
        params, set(p), f"they do not fit num_layers={num_layers}, bidirectional={D == 2}, "
        f"bias={bias}{options} (check those options)")
    if h0 is None:
        h0 = np.zeros((num_layers * D, B, H), x.dtype)
    checks.float_array("h0", h0, ("L*D", "B", "H"))
    checks.same_dtype("h0", h0, x.dtype, "x")
    checks.shape_is("h0", h0, (num_layers * D, B, H), "[L*D, B, H]")
    if lengths is not None:
        lengths = checks.lengths_array(lengths, B, T)
    return StackArgs(xt, p, H, D, h0, lengths, bias)


def stack_fingerprints(forward: str, backward: str, x: np.ndarray, layer_input: np.ndarray,
                       p: Mapping[str, np.ndarray]) -> unchanged.Fingerprints:
    """What a GRU/RNN backward reads of the caller's arrays: x when layer 0's cached input is a
    view of it, and every weight (not the biases, nor h0, which the forward copied)."""
    weights = [(f"params[{k!r}]", p[k]) for k in p if not k.startswith("bias")]
    return unchanged.record(forward, backward,
                            [("x", unchanged.shared(x, layer_input)), *weights])


def layer_params(p: Mapping[str, np.ndarray], layer: int, d: int) -> dict[str, np.ndarray]:
    """One direction's params under the cell's names (weight_ih, weight_hh, bias_ih, bias_hh)."""
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return {k: p[param_key(k, layer, d)] for k in kinds if param_key(k, layer, d) in p}


DirectionForward = Callable[..., tuple[np.ndarray, np.ndarray, Any]]
DirectionBackward = Callable[..., tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]]


def stack_forward(a: StackArgs, num_layers: int, direction_forward: DirectionForward
                  ) -> tuple[np.ndarray, np.ndarray, list, np.ndarray | None]:
    """Run the layers: each direction of each layer is
    ``direction_forward(layer_input [T, B, In], h0 [B, H], params, mask, reverse)`` ->
    ``(out [T, B, H], h_last [B, H], cache)``; a layer's input is the previous layer's
    directions concatenated. The padded steps of x are zeroed first (padding is not data).

    Returns ``(output [T, B, D*H] time-major, h_n [L*D, B, H], caches (index
    2*layer + direction), mask [T, B, 1] or None)``.
    """
    mask = padding_mask(a.lengths, a.xt.shape[0])
    layer_input = without_padding(a.xt, mask)
    caches, h_n = [], []
    for layer in range(num_layers):
        outputs = []
        for d in range(a.directions):
            out, h, cache = direction_forward(layer_input, a.h0[layer * a.directions + d],
                                              layer_params(a.params, layer, d), mask,
                                              reverse=d == 1)
            outputs.append(out)
            caches.append(cache)
            h_n.append(h)
        layer_input = np.concatenate(outputs, axis=-1) if a.directions == 2 else outputs[0]
    return layer_input, np.stack(h_n), caches, mask


def stack_cotangents(d_output: Any, d_h_n: Any, cache: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check a GRU/RNN backward's cotangents against its cache (fields num_layers,
    bidirectional, batch_first, hidden_size, directions[0].x). Returns d_output as a
    time-major view [T, B, D*H] and d_h_n [L*D, B, H] (zeros when not given)."""
    L, D = cache.num_layers, 2 if cache.bidirectional else 1
    T, B, _ = cache.directions[0].x.shape
    H, dtype = cache.hidden_size, cache.directions[0].x.dtype
    labels = ("B", "T", "D*H") if cache.batch_first else ("T", "B", "D*H")
    d_output = checks.float_array("d_output", d_output, labels)
    checks.same_dtype("d_output", d_output, dtype, "x")
    checks.shape_is("d_output", d_output, (B, T, D * H) if cache.batch_first else (T, B, D * H),
                    f"[{', '.join(labels)}]")
    if d_h_n is None:
        d_h_n = np.zeros((L * D, B, H), dtype)
    checks.float_array("d_h_n", d_h_n, ("L*D", "B", "H"))
    checks.same_dtype("d_h_n", d_h_n, dtype, "x")
    checks.shape_is("d_h_n", d_h_n, (L * D, B, H), "[L*D, B, H]")
    return (d_output.transpose(1, 0, 2) if cache.batch_first else d_output), d_h_n


def stack_backward(d_out: np.ndarray, d_h_n: np.ndarray, cache: Any,
                   direction_backward: DirectionBackward
                   ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The layers in reverse: each direction is ``direction_backward(d_out [T, B, H],
    d_h_last [B, H], its cache, params, mask)`` -> ``(d_input [T, B, In], grads under the
    cell's names, d_h0 [B, H])``; both directions' d_input add up (they read the same input),
    which is the layer below's d_output. Returns (d_x time-major, d_params, d_h0)."""
    L, D, H = cache.num_layers, 2 if cache.bidirectional else 1, cache.hidden_size
    d_h0 = np.empty_like(d_h_n)
    grads: dict[str, np.ndarray] = {}
    for layer in range(L - 1, -1, -1):
        d_x = None
        for d in range(D):
            k = layer * D + d
            dx, g, d_h0[k] = direction_backward(
                d_out[:, :, d * H:(d + 1) * H], d_h_n[k], cache.directions[k],
                layer_params(cache.params, layer, d), cache.mask)
            d_x = dx if d_x is None else d_x + dx
            grads.update({param_key(kind, layer, d): v for kind, v in g.items()})
        d_out = d_x
    return d_out, {k: grads[k] for k in cache.params}, d_h0
