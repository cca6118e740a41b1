"""Other frameworks' recurrent weight layouts, converted to and from torch's, in NumPy alone.

The recurrent ops of this package take torch's state_dict (``weight_ih_l{k}`` [G*H, In],
``weight_hh_l{k}`` [G*H, H], ``bias_ih_l{k}``, ``bias_hh_l{k}`` [G*H], ``_reverse`` for the
second direction). Other frameworks store the same numbers differently:

=============  ============  ========================================  ==================
framework      gate order    weights                                   biases
=============  ============  ========================================  ==================
torch          LSTM i f g o  W_ih [G*H, I], W_hh [G*H, H]              b_ih, b_hh [G*H]
               GRU  r z n
ONNX           LSTM i o f c  W [D, G*H, I], R [D, G*H, H]              B [D, 2*G*H] = [Wb; Rb]
               GRU  z r h    (one node per layer, directions stacked)
Keras          LSTM i f c o  kernel [I, G*H], recurrent_kernel         bias [G*H] (one); GRU with
               GRU  z r h    [H, G*H] (transposed)                     reset_after: [2, 3H]
d2l (scratch)  GRU  z r h    W_xz [I, H], W_hz [H, H], b_z [H], ...    one per gate
DLFS2          GRU  z r h    Wx [I, 3H], Wh [H, 3H]                    b [3H] (one)
=============  ============  ========================================  ==================

Where the reset goes and what z means (the GRU): torch, ONNX ``linear_before_reset=1`` and Keras
``reset_after=True`` reset after the recurrent product (``r * (W_hn h + b_hn)``, our
``linear_before_reset=True``); ONNX's default, Keras ``reset_after=False``, d2l and DLFS2 before
it (``W_hn (r * h)``, our ``linear_before_reset=False``). Everyone but DLFS2 keeps the old state
with z (``h' = (1 - z) n + z h``); DLFS2 writes ``h' = (1 - z) h + z n``, so its z is our
``1 - z`` = sigmoid of the negated pre-activation: its z weights and bias are ours negated.

A layout with one bias per gate (Keras but GRU ``reset_after=True``, d2l, DLFS2) holds
``b_ih + b_hh``: converting to it adds them, converting from it gives ``bias_ih`` = that sum and
``bias_hh`` = 0, which is the same function. For a GRU that holds only with the reset before
the product (``linear_before_reset=False``): with the reset after it, ``b_hn`` is scaled by r
and cannot move into ``b_in``. The numbers do not say which GRU they belong to, so the
one-bias GRU conversions (Keras ``reset_after=False``, d2l, DLFS2) describe the
``linear_before_reset=False`` GRU and are to be run with it.

Conversions are exact (a permutation, a transpose, a sum or a negation per entry) and never
change the caller's arrays. Each function converts one layer; the tests prove every conversion
against the framework itself where it installs (ONNX Runtime and ONNX's reference evaluator).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from numpy_ref.contract.lstm import param_key

__all__ = ["from_d2l_gru", "from_dlfs2_gru", "from_keras", "from_onnx", "to_d2l_gru",
           "to_dlfs2_gru", "to_keras", "to_onnx"]

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
# block b of the other layout is torch's block ORDER[b]
ONNX_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn": (0,)}  # i o f c / z r h
KERAS_ORDER = {"lstm": (0, 1, 2, 3), "gru": (1, 0, 2), "rnn": (0,)}  # i f c o / z r h


def _mode(mode: Any) -> str:
    if mode not in GATES:
        raise ValueError(f"mode: expected 'lstm', 'gru' or 'rnn', got {mode!r}")
    return mode


def _blocks(a: np.ndarray, order: tuple[int, ...], axis: int = 0) -> np.ndarray:
    """a's gate blocks along `axis` reordered: block b of the result is a's block order[b]."""
    parts = np.split(np.asarray(a), len(order), axis=axis)
    return np.concatenate([parts[i] for i in order], axis=axis)


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(order))


def _get(params: Mapping[str, np.ndarray], kind: str, layer: int, d: int) -> np.ndarray:
    key = param_key(kind, layer, d)
    if key not in params:
        raise ValueError(f"params: missing key {key!r} (layer {layer}, direction {d})")
    return np.asarray(params[key])


def _has_bias(params: Mapping[str, np.ndarray], layer: int) -> bool:
    return param_key("bias_ih", layer, 0) in params


def _directions(params: Mapping[str, np.ndarray], layer: int) -> int:
    return 2 if param_key("weight_ih", layer, 1) in params else 1


# --------------------------------------------------------------------------------------------
# ONNX


def to_onnx(params: Mapping[str, np.ndarray], mode: str, *, layer: int = 0
            ) -> dict[str, np.ndarray]:
    """One layer of torch-named params -> ONNX's ``W`` [D, G*H, In], ``R`` [D, G*H, H] and
    (when the params have biases) ``B`` [D, 2*G*H], gates in ONNX's order (LSTM i o f c, GRU
    z r h); D = 2 when the params hold ``_reverse`` keys (ONNX's ``direction="bidirectional"``).

    The GRU's ``linear_before_reset`` attribute is the `gru_forward` option of the same name
    (1 for torch's GRU); an LSTM with projections (``weight_hr``) has no ONNX form.
    """
    mode = _mode(mode)
    if param_key("weight_hr", layer, 0) in params:
        raise ValueError("params: an LSTM with projections (weight_hr) has no ONNX LSTM form")
    order = ONNX_ORDER[mode]
    D = _directions(params, layer)
    out = {"W": np.stack([_blocks(_get(params, "weight_ih", layer, d), order) for d in range(D)]),
           "R": np.stack([_blocks(_get(params, "weight_hh", layer, d), order)
                          for d in range(D)])}
    if _has_bias(params, layer):
        out["B"] = np.stack([np.concatenate([_blocks(_get(params, "bias_ih", layer, d), order),
                                             _blocks(_get(params, "bias_hh", layer, d), order)])
                             for d in range(D)])
    return out


def from_onnx(W: np.ndarray, R: np.ndarray, B: np.ndarray | None = None, *, mode: str,
              layer: int = 0) -> dict[str, np.ndarray]:
    """ONNX's ``W`` [D, G*H, In], ``R`` [D, G*H, H], ``B`` [D, 2*G*H] (None: no biases) ->
    torch-named params of layer `layer` (``weight_ih_l{layer}`` ..., ``_reverse`` when D = 2),
    the inverse of `to_onnx`."""
    mode = _mode(mode)
    W, R = np.asarray(W), np.asarray(R)
    G = GATES[mode]
    if W.ndim != 3 or R.ndim != 3 or W.shape[0] not in (1, 2) or R.shape[:2] != W.shape[:2] \
            or W.shape[1] % G or R.shape[2] * G != R.shape[1]:
        raise ValueError(f"W, R: expected [D, {G}H, In] and [D, {G}H, H] with D 1 or 2, got "
                         f"{W.shape} and {R.shape}")
    inverse = _inverse(ONNX_ORDER[mode])
    out: dict[str, np.ndarray] = {}
    for d in range(W.shape[0]):
        out[param_key("weight_ih", layer, d)] = _blocks(W[d], inverse)
        out[param_key("weight_hh", layer, d)] = _blocks(R[d], inverse)
        if B is not None:
            b = np.asarray(B)[d]
            if b.shape != (2 * W.shape[1],):
                raise ValueError(f"B: expected [D, {2 * W.shape[1]}], got {np.shape(B)}")
            out[param_key("bias_ih", layer, d)] = _blocks(b[:W.shape[1]], inverse)
            out[param_key("bias_hh", layer, d)] = _blocks(b[W.shape[1]:], inverse)
    return {k: out[k] for k in sorted(out, key=_torch_order)}


def _torch_order(key: str) -> tuple:
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    kind = next(k for k in kinds if key.startswith(k))
    return ("_reverse" in key, kinds.index(kind))


# --------------------------------------------------------------------------------------------
# Keras


def _one_bias(params: Mapping[str, np.ndarray], layer: int, d: int) -> np.ndarray:
    return _get(params, "bias_ih", layer, d) + _get(params, "bias_hh", layer, d)


def to_keras(params: Mapping[str, np.ndarray], mode: str, *, layer: int = 0,
             direction: int = 0, reset_after: bool = True) -> dict[str, np.ndarray]:
    """One direction of one layer of torch-named params -> Keras' ``kernel`` [In, G*H],
    ``recurrent_kernel`` [H, G*H] and ``bias`` (Keras' LSTM, GRU, SimpleRNN; gates LSTM
    i f c o, GRU z r h). ``bias`` is ``b_ih + b_hh`` [G*H], except for a GRU with
    ``reset_after=True`` (Keras' default, torch's GRU): [2, 3H], the input and recurrent
    biases. ``reset_after=False`` is the GRU of ``linear_before_reset=False``. No ``bias`` key
    when the params have none (Keras' ``use_bias=False``)."""
    mode = _mode(mode)
    order = KERAS_ORDER[mode]
    out = {"kernel": _blocks(_get(params, "weight_ih", layer, direction), order).T.copy(),
           "recurrent_kernel": _blocks(_get(params, "weight_hh", layer, direction),
                                       order).T.copy()}
    if _has_bias(params, layer):
        if mode == "gru" and reset_after:
            out["bias"] = np.stack([_blocks(_get(params, "bias_ih", layer, direction), order),
                                    _blocks(_get(params, "bias_hh", layer, direction), order)])
        else:
            out["bias"] = _blocks(_one_bias(params, layer, direction), order)
    return out


def from_keras(weights: Mapping[str, np.ndarray], mode: str, *, layer: int = 0,
               direction: int = 0, reset_after: bool = True) -> dict[str, np.ndarray]:
    """Keras' ``kernel``, ``recurrent_kernel`` and optional ``bias`` of an LSTM, GRU or
    SimpleRNN -> torch-named params of one direction of one layer, the inverse of `to_keras`
    (a one-bias layout gives ``bias_ih`` = its bias and ``bias_hh`` = 0)."""
    mode = _mode(mode)
    inverse = _inverse(KERAS_ORDER[mode])
    kernel, recurrent = np.asarray(weights["kernel"]), np.asarray(weights["recurrent_kernel"])
    out = {param_key("weight_ih", layer, direction): _blocks(kernel.T, inverse),
           param_key("weight_hh", layer, direction): _blocks(recurrent.T, inverse)}
    if "bias" in weights:
        bias = np.asarray(weights["bias"])
        if mode == "gru" and reset_after:
            b_ih, b_hh = bias[0], bias[1]
        else:
            b_ih, b_hh = bias, np.zeros_like(bias)
        out[param_key("bias_ih", layer, direction)] = _blocks(b_ih, inverse)
        out[param_key("bias_hh", layer, direction)] = _blocks(b_hh, inverse)
    return out


# --------------------------------------------------------------------------------------------
# the from-scratch GRUs of d2l and DLFS2 (reset before the product: linear_before_reset=False)

_D2L = ("z", "r", "h")


def _gru_blocks(params: Mapping[str, np.ndarray], layer: int, direction: int):
    """(W_ih, W_hh, b) per gate in z, r, h order, b = b_ih + b_hh (or None)."""
    W_ih = np.split(_get(params, "weight_ih", layer, direction), 3)
    W_hh = np.split(_get(params, "weight_hh", layer, direction), 3)
    b = np.split(_one_bias(params, layer, direction), 3) if _has_bias(params, layer) else None
    return [(W_ih[i], W_hh[i], None if b is None else b[i]) for i in (1, 0, 2)]


def to_d2l_gru(params: Mapping[str, np.ndarray], *, layer: int = 0, direction: int = 0
               ) -> dict[str, np.ndarray]:
    """torch-named GRU params (of ``linear_before_reset=False``) -> d2l's from-scratch GRU:
    ``W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h`` with ``X @ W_x*`` ([I, H], [H, H])
    and one bias per gate (zeros when the params have none, as d2l always has them)."""
    out = {}
    for g, (w_ih, w_hh, b) in zip(_D2L, _gru_blocks(params, layer, direction), strict=True):
        out[f"W_x{g}"], out[f"W_h{g}"] = w_ih.T.copy(), w_hh.T.copy()
        out[f"b_{g}"] = np.zeros(w_ih.shape[0], w_ih.dtype) if b is None else b
    return out


def from_d2l_gru(weights: Mapping[str, np.ndarray], *, layer: int = 0, direction: int = 0
                 ) -> dict[str, np.ndarray]:
    """d2l's from-scratch GRU weights -> torch-named params (run them with
    ``linear_before_reset=False``), the inverse of `to_d2l_gru`."""
    order = ("r", "z", "h")
    w_ih = np.concatenate([np.asarray(weights[f"W_x{g}"]).T for g in order])
    w_hh = np.concatenate([np.asarray(weights[f"W_h{g}"]).T for g in order])
    b = np.concatenate([np.asarray(weights[f"b_{g}"]) for g in order])
    return {param_key("weight_ih", layer, direction): w_ih,
            param_key("weight_hh", layer, direction): w_hh,
            param_key("bias_ih", layer, direction): b,
            param_key("bias_hh", layer, direction): np.zeros_like(b)}


def to_dlfs2_gru(params: Mapping[str, np.ndarray], *, layer: int = 0, direction: int = 0
                 ) -> dict[str, np.ndarray]:
    """torch-named GRU params (of ``linear_before_reset=False``) -> DLFS2's ``Wx`` [I, 3H],
    ``Wh`` [H, 3H], ``b`` [3H] (gates z, r, h), with z's weights and bias negated: DLFS2's
    update is ``h' = (1 - z) h + z n``, its z our 1 - z."""
    (wz, uz, bz), (wr, ur, br), (wn, un, bn) = _gru_blocks(params, layer, direction)
    zeros = np.zeros(wz.shape[0], wz.dtype)
    return {"Wx": np.concatenate([-wz, wr, wn]).T.copy(),
            "Wh": np.concatenate([-uz, ur, un]).T.copy(),
            "b": np.concatenate([-(zeros if bz is None else bz), zeros if br is None else br,
                                 zeros if bn is None else bn])}


def from_dlfs2_gru(weights: Mapping[str, np.ndarray], *, layer: int = 0, direction: int = 0
                   ) -> dict[str, np.ndarray]:
    """DLFS2's ``Wx``, ``Wh``, ``b`` -> torch-named params (run them with
    ``linear_before_reset=False``), the inverse of `to_dlfs2_gru`."""
    wz, wr, wn = np.split(np.asarray(weights["Wx"]).T, 3)
    uz, ur, un = np.split(np.asarray(weights["Wh"]).T, 3)
    bz, br, bn = np.split(np.asarray(weights["b"]), 3)
    b = np.concatenate([br, -bz, bn])
    return {param_key("weight_ih", layer, direction): np.concatenate([wr, -wz, wn]),
            param_key("weight_hh", layer, direction): np.concatenate([ur, -uz, un]),
            param_key("bias_ih", layer, direction): b,
            param_key("bias_hh", layer, direction): np.zeros_like(b)}
