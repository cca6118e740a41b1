r"""LSTM forward and backward in NumPy, with `torch.nn.LSTM`'s exact semantics. No autograd.

Shapes
------
T  time steps                    B  batch
I  input size (layer 0)          H  hidden (cell) size
P  projection size (proj_size)   Ho output size of one direction: P if proj_size > 0 else H
D  directions (1, or 2 when bidirectional)
L  layers; layer k > 0 reads the previous layer's output, so its input size is D * Ho

Forward, one step of one direction (gate order i, f, g, o, as PyTorch stores them)
-------------------------------------------------------------------------------------
    a_t  = x_t W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T           [B, 4H] pre-activations
    i, f, g, o = sigmoid(a_i), sigmoid(a_f), tanh(a_g), sigmoid(a_o)      each [B, H]
    c_t  = f * c_{t-1} + i * g                                  [B, H]
    r_t  = o * tanh(c_t)                                        [B, H]
    h_t  = r_t W_hr^T  if proj_size > 0  else  r_t              [B, Ho]

The input projection ``x W_ih^T + b_ih + b_hh`` of all T steps is one matrix product before the
time loop. The reverse direction runs the same recurrence from t = T-1 down to 0.

Variable lengths (torch's pack_padded_sequence(enforce_sorted=False) + pad_packed_sequence)
--------------------------------------------------------------------------------------------
Let m_t[b] = (t < lengths[b]). A padded step leaves the state alone and outputs exactly zero:

    h_t = m_t ? h_t^new : h_{t-1}      c_t = m_t ? c_t^new : c_{t-1}      out_t = m_t ? h_t^new : 0

so the forward direction's final state is the state at each row's last real step, and the
reverse direction, walking down from T-1, keeps (h0, c0) untouched until it reaches that step.

Padding is not data: the padded steps of x are replaced by zeros before anything reads them,

    x_t[b] = m_t[b] ? x_t[b] : 0

so whatever they hold (NaN and inf included) changes no output and no gradient, bit for bit the
same as zero padding, and d_x is exactly 0 there. (Layers above the first read outputs, which
are already 0 at padded steps.)

Backward (backpropagation through time), one direction, walking the forward loop in reverse
---------------------------------------------------------------------------------------------
Carry dh = dL/dh_t and dc = dL/dc_t (initialised from d_h_n, d_c_n). At step t:

    dh^new = m_t * (d_out_t + dh)              dh_keep = (1 - m_t) * dh      (same for dc)
    dr     = dh^new W_hr   (or dh^new)         dW_hr  += dh^new^T r_t
    do     = dr * tanh(c_t)
    dc^new = dc^new + dr * o * (1 - tanh(c_t)^2)
    di, df, dg = dc^new * g, dc^new * c_{t-1}, dc^new * i
    da     = [di i(1-i), df f(1-f), dg (1-g^2), do o(1-o)]                 [B, 4H]
    dh     = da W_hh + dh_keep                 dc = dc^new * f + dc_keep

A padded row has dh^new = dc^new = 0, so its da and dc^new * f are 0; they are set to exactly 0
(not computed as 0 * gate), so a non-finite state carried through the padding cannot make them
NaN.

After the loop, with every step's da stacked as [T*B, 4H], the weight gradients are one matrix
product each: dW_ih = da^T x, dW_hh = da^T h_{t-1}, db_ih = db_hh = sum(da), dx = da W_ih; what
is left in (dh, dc) is (d_h0, d_c0). Layers are processed last to first; a layer's dx is the
previous layer's d_output.

Parameters use `torch.nn.LSTM.state_dict()` names and shapes, e.g. ``weight_ih_l0`` [4H, I],
``weight_hh_l1_reverse`` [4H, Ho], ``bias_ih_l0`` [4H], ``weight_hr_l0`` [P, H].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks, unchanged
from numpy_ref.contract.fields import documented
from numpy_ref.contract.lstm import (
    cell_fingerprints,
    direction_bias,
    lstm_fingerprints,
    padding_mask,
    param_key,
    param_specs,
    validate_lstm_cell_cotangents,
    validate_lstm_cell_inputs,
    validate_lstm_cotangents,
    validate_lstm_inputs,
    validate_lstm_sizes,
    without_padding,
)
from numpy_ref.precision import emulated, rounded, same_precision, step_sum

# --------------------------------------------------------------------------------------------
# pointwise helpers


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, accurate and overflow-free for any finite x (same dtype as x)."""
    e = np.exp(-np.abs(x))  # in (0, 1]: never overflows
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _gates_forward(a: np.ndarray, c_prev: np.ndarray):
    """Pre-activations a [B, 4H] and c_{t-1} [B, H] -> (gates [B, 4H] = i,f,g,o, c_t, tanh(c_t))."""
    H = c_prev.shape[-1]
    gates = np.empty_like(a)
    gates[:, : 2 * H] = sigmoid(a[:, : 2 * H])  # i, f
    gates[:, 2 * H : 3 * H] = np.tanh(a[:, 2 * H : 3 * H])  # g
    gates[:, 3 * H :] = sigmoid(a[:, 3 * H :])  # o
    gates = rounded(gates)  # float16/bfloat16 calls: each torch op's result is in the dtype
    i, f, g = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H : 3 * H]
    c = rounded(rounded(f * c_prev) + rounded(i * g))
    return gates, c, rounded(np.tanh(c))


def _gates_backward(d_r, d_c, gates, c_prev, tanh_c):
    """Undo `_gates_forward` and ``r = o * tanh(c)``.

    (dL/dr [B, H], dL/dc_t [B, H]) -> (dL/da [B, 4H], dL/dc_{t-1} [B, H]).
    """
    H = c_prev.shape[-1]
    i, f, g, o = gates[:, :H], gates[:, H : 2 * H], gates[:, 2 * H : 3 * H], gates[:, 3 * H :]
    # `rounded` is the identity except in float16/bfloat16 calls, where it rounds each
    # gradient where torch's autograd writes one in the dtype (a product, an activation's VJP)
    d_c = rounded(d_c + rounded(rounded(d_r * o) * (1 - tanh_c * tanh_c)))  # r = o * tanh(c)
    da = np.empty_like(gates)
    da[:, :H] = rounded(d_c * g) * i * (1 - i)  # c = f * c_prev + i * g, i = sigmoid(a_i)
    da[:, H : 2 * H] = rounded(d_c * c_prev) * f * (1 - f)
    da[:, 2 * H : 3 * H] = rounded(d_c * i) * (1 - g * g)  # g = tanh(a_g)
    da[:, 3 * H :] = rounded(d_r * tanh_c) * o * (1 - o)
    return da, rounded(d_c * f)


# --------------------------------------------------------------------------------------------
# one step: the cell (parameters named as torch.nn.LSTMCell's, plus an optional weight_hr)


@documented
class LSTMCellCache(NamedTuple):
    """What `lstm_cell_backward` needs from one `lstm_cell_forward` call."""

    x: np.ndarray  # [B, I]   input; read for d_weight_ih
    h: np.ndarray  # [B, Ho]  previous hidden state; read for d_weight_hh
    c: np.ndarray  # [B, H]   previous cell state; read for d_f
    gates: np.ndarray  # [B, 4H]  activated gates i, f, g, o; read
    tanh_c: np.ndarray  # [B, H]   tanh of the new cell state; read (r = o * tanh_c recomputed)
    params: Mapping[str, np.ndarray]  # the weights; read
    fingerprints: unchanged.Fingerprints | None = None  # x, h, c and the weights as the
    #   forward saw them; the backward checks them first (`numpy_ref.contract.unchanged`)


@same_precision()
def lstm_cell_forward(
    x: np.ndarray, h: np.ndarray, c: np.ndarray, params: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, LSTMCellCache]:
    """One LSTM step, as `torch.nn.LSTMCell` (plus projection when ``weight_hr`` is given).

    ``a = x W_ih^T + b_ih + h W_hh^T + b_hh``; ``i, f, g, o = sigmoid, sigmoid, tanh, sigmoid``
    of its four [B, H] blocks (torch's gate order); ``c_new = f c + i g``;
    ``h_new = o tanh(c_new)`` (times ``W_hr^T`` with a projection). Derivation: the
    `numpy_ref.lstm` module docstring.

    Parameters
    ----------
    x : [B, I] input.  h : [B, Ho] previous hidden state.  c : [B, H] previous cell state.
    params : ``weight_ih`` [4H, I], ``weight_hh`` [4H, Ho], ``bias_ih`` [4H], ``bias_hh`` [4H]
        (both or neither: torch's bias=False), optional ``weight_hr`` [P, H] (then Ho = P).

    Returns
    -------
    h_new [B, Ho], c_new [B, H], cache.
    """
    x, h, c, p, H, _ = validate_lstm_cell_inputs(x, h, c, params)
    a = x @ p["weight_ih"].T
    if "bias_ih" in p:  # torch's bias=False: no biases
        a += p["bias_ih"] + p["bias_hh"]
    a += h @ p["weight_hh"].T
    gates, c_new, tanh_c = _gates_forward(a, c)
    r = gates[:, 3 * H :] * tanh_c
    h_new = r @ p["weight_hr"].T if "weight_hr" in p else r
    return h_new, c_new, LSTMCellCache(x, h, c, gates, tanh_c, p, cell_fingerprints(x, h, c, p))


@same_precision(backward=True)
def lstm_cell_backward(
    d_h_new: np.ndarray, d_c_new: np.ndarray | None, cache: LSTMCellCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Backward of `lstm_cell_forward`: one step of the module docstring's BPTT.

    ``dc = d_c_new + d_r o (1 - tanh(c_new)^2)`` with ``d_r = d_h_new`` (``d_h_new W_hr`` with a
    projection); ``da = [dc g i(1-i), dc c f(1-f), dc i (1-g^2), d_r tanh(c_new) o(1-o)]``;
    ``d_x = da W_ih``, ``d_h = da W_hh``, ``d_c = dc f``, ``dW_ih = da^T x``, ``dW_hh = da^T h``,
    ``db_ih = db_hh = sum_b da``. Derivation: the `numpy_ref.lstm` module docstring.

    Parameters
    ----------
    d_h_new : [B, Ho] gradient of the new hidden state.
    d_c_new : [B, H] gradient of the new cell state, or None for zero.

    Returns
    -------
    d_x [B, I], d_h [B, Ho], d_c [B, H], d_params (same keys and shapes as params).
    """
    checks.cache_of(cache, LSTMCellCache, "lstm_cell_forward")
    unchanged.check(cache.fingerprints)
    d_h_new, d_c_new = validate_lstm_cell_cotangents(d_h_new, d_c_new, cache)
    x, h, c, gates, tanh_c, p, _ = cache
    H = c.shape[1]
    grads = {}
    if "weight_hr" in p:  # h_new = r @ weight_hr.T
        r = gates[:, 3 * H :] * tanh_c
        grads["weight_hr"] = d_h_new.T @ r
        d_r = d_h_new @ p["weight_hr"]
    else:
        d_r = d_h_new
    da, d_c = _gates_backward(d_r, d_c_new, gates, c, tanh_c)
    grads["weight_ih"] = da.T @ x  # a = x @ weight_ih.T + ... + h @ weight_hh.T
    grads["weight_hh"] = da.T @ h
    grads["bias_ih"] = da.sum(axis=0)
    grads["bias_hh"] = grads["bias_ih"].copy()
    return da @ p["weight_ih"], da @ p["weight_hh"], d_c, {k: grads[k] for k in p}


# --------------------------------------------------------------------------------------------
# the full layer stack


@documented
class LSTMDirectionCache(NamedTuple):
    """One direction of one layer: what its backward needs."""

    x: np.ndarray  # [T, B, In]  this layer's input, 0 at padded steps; read for d_weight_ih
    h_prev: np.ndarray  # [T, B, Ho]  hidden state entering step t; read for d_weight_hh
    c_prev: np.ndarray  # [T, B, H]   cell state entering step t; read
    gates: np.ndarray  # [T, B, 4H]  activated gates i, f, g, o; read
    tanh_c: np.ndarray  # [T, B, H]   tanh(c_t^new); read (r_t = o * tanh_c recomputed)
    reverse: bool  # whether this is the reverse direction


@documented
class LSTMCache(NamedTuple):
    """Everything `lstm_backward` needs from one `lstm_forward` call."""

    directions: tuple[LSTMDirectionCache, ...]  # L*D entries, index 2*layer + direction
    params: dict[str, np.ndarray]  # the validated weights; read
    mask: np.ndarray | None  # [T, B, 1] bool, t < lengths[b]; None when no lengths
    num_layers: int  # L
    bidirectional: bool  # D = 2 when True
    batch_first: bool  # whether output (and d_output) are [B, T, D*Ho]
    hidden_size: int  # H
    output_size: int  # Ho
    fingerprints: unchanged.Fingerprints | None = None  # x (when layer 0's input is a view of
    #   it) and the weights as the forward saw them; the backward checks them first
    #   (`numpy_ref.contract.unchanged`)


def init_lstm_params(
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    proj_size: int = 0,
    bias: bool = True,
    rng: np.random.Generator | int | None = None,
    dtype: Any = np.float64,
) -> dict[str, np.ndarray]:
    """Random LSTM parameters initialised as torch does: every entry ~ U(-1/sqrt(H), 1/sqrt(H)).

    Sizes: ``weight_ih_l{k}`` [4H, I] (layer 0; D * Ho above), ``weight_hh_l{k}`` [4H, Ho],
    ``bias_ih_l{k}``, ``bias_hh_l{k}`` [4H] (none with ``bias=False``), ``weight_hr_l{k}``
    [P, H] when proj_size = P > 0,
    and the same with ``_reverse`` for the second direction (their roles: the
    `numpy_ref.lstm` module docstring).

    Returns a dict with `torch.nn.LSTM.state_dict()` keys, in the same order and shapes.
    """
    validate_lstm_sizes(input_size, hidden_size, num_layers, proj_size)
    rng = np.random.default_rng(rng)
    bound = 1.0 / np.sqrt(hidden_size)
    specs = param_specs(input_size, hidden_size, proj_size, num_layers, 2 if bidirectional else 1,
                        bool(bias))
    return {k: rng.uniform(-bound, bound, s).astype(dtype) for k, s, _ in specs}


@same_precision()
def lstm_forward(
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    h0: np.ndarray | None = None,
    c0: np.ndarray | None = None,
    lengths: Any = None,
    dropout: float = 0.0,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], LSTMCache]:
    """Multi-layer (bi)directional LSTM forward, as `torch.nn.LSTM`.

    Per step and direction: ``a_t = x_t W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T``, gates
    ``i, f, g, o``, ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)`` (``W_hr`` projects it);
    padded steps (t >= lengths[b]) keep the state and output 0. Derivation and the padding
    rules: the `numpy_ref.lstm` module docstring.

    Parameters
    ----------
    x : [T, B, I] (or [B, T, I] with ``batch_first``), float32 or float64.
    params : `torch.nn.LSTM.state_dict()` names and shapes, the dtype of x (no bias keys for
        ``bias=False``).
    h0 : [L*D, B, Ho] and c0 : [L*D, B, H] initial states (never batch-first); zeros if None.
        Give both or neither.
    lengths : integer [B], each in 1..T, or None. Same result as packing the batch with
        ``pack_padded_sequence(enforce_sorted=False)`` and padding the output back to T.
    dropout : only 0 is accepted; inter-layer dropout is random and not part of a reference.

    Returns
    -------
    output : [T, B, D*Ho] (or [B, T, D*Ho]), zero at padded steps.
    (h_n [L*D, B, Ho], c_n [L*D, B, H]) : final states, index ``2*layer + direction``.
    cache : `LSTMCache` for `lstm_backward`.
    """
    xt, p, H, Ho, D, h0, c0, lengths = validate_lstm_inputs(
        x, params, num_layers, bidirectional, batch_first, h0, c0, lengths, dropout)
    mask = padding_mask(lengths, xt.shape[0])  # [T, B, 1] or None
    layer_input = without_padding(xt, mask)  # padded steps are 0: padding is not data
    caches, h_n, c_n = [], [], []
    for layer in range(num_layers):
        outputs = []
        for d in range(D):
            k = layer * D + d
            out, h, c, cache = _direction_forward(
                layer_input, h0[k], c0[k], p[param_key("weight_ih", layer, d)],
                p[param_key("weight_hh", layer, d)],
                direction_bias(p, layer, d, H, xt.dtype),
                p.get(param_key("weight_hr", layer, d)), mask, reverse=d == 1,
            )
            outputs.append(out)
            caches.append(cache)
            h_n.append(h)
            c_n.append(c)
        layer_input = np.concatenate(outputs, axis=-1) if D == 2 else outputs[0]  # [T, B, D*Ho]
    output = layer_input.transpose(1, 0, 2) if batch_first else layer_input
    cache = LSTMCache(tuple(caches), p, mask, num_layers, bool(bidirectional),
                      bool(batch_first), H, Ho, lstm_fingerprints(x, caches[0].x, p))
    return output, (np.stack(h_n), np.stack(c_n)), cache


@same_precision(backward=True)
def lstm_backward(
    d_output: np.ndarray,
    cache: LSTMCache,
    *,
    d_h_n: np.ndarray | None = None,
    d_c_n: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Backpropagation through time for `lstm_forward`.

    Walks each direction's steps in reverse, carrying ``dh``, ``dc`` (from d_h_n, d_c_n): at
    step t ``dh = d_out_t + dh``, ``da_t = dgates(dh, dc)`` (as `lstm_cell_backward`), then
    ``dh <- da_t W_hh``, ``dc <- dc_t f_t``; after the loop
    ``dW_ih = sum_t da_t^T x_t``, ``dW_hh = sum_t da_t^T h_{t-1}``, ``db = sum_t da_t``,
    ``d_x_t = da_t W_ih``. Derivation: the `numpy_ref.lstm` module docstring.

    Parameters
    ----------
    d_output : gradient of `output`, same shape ([T, B, D*Ho], or [B, T, D*Ho] when batch-first).
        Entries at padded steps are ignored (the output there is a constant 0).
    d_h_n : [L*D, B, Ho] and d_c_n : [L*D, B, H] gradients of the final states, or None (zero).

    Returns
    -------
    d_x : like x.  d_params : dict with the keys and shapes of params.
    (d_h0 [L*D, B, Ho], d_c0 [L*D, B, H]) : gradients of the initial states (returned also when
    the forward used the default zero states).
    """
    checks.cache_of(cache, LSTMCache, "lstm_forward")
    unchanged.check(cache.fingerprints)
    d_layer_out, d_h_n, d_c_n = validate_lstm_cotangents(d_output, d_h_n, d_c_n, cache)
    L, D = cache.num_layers, 2 if cache.bidirectional else 1
    B = d_layer_out.shape[1]
    H, Ho, dtype = cache.hidden_size, cache.output_size, d_layer_out.dtype
    grads: dict[str, np.ndarray] = {}
    d_h0 = np.empty((L * D, B, Ho), dtype)
    d_c0 = np.empty((L * D, B, H), dtype)
    for layer in range(L - 1, -1, -1):
        d_x = None
        for d in range(D):
            k = layer * D + d
            w_hr = cache.params.get(param_key("weight_hr", layer, d))
            dx, g, d_h0[k], d_c0[k] = _direction_backward(
                d_layer_out[:, :, d * Ho : (d + 1) * Ho], d_h_n[k], d_c_n[k],
                cache.directions[k], cache.params[param_key("weight_ih", layer, d)],
                cache.params[param_key("weight_hh", layer, d)], w_hr, cache.mask,
            )
            d_x = dx if d_x is None else d_x + dx  # both directions read the same input
            for kind, v in g.items():
                grads[param_key(kind, layer, d)] = v
        d_layer_out = d_x
    d_x = d_layer_out.transpose(1, 0, 2) if cache.batch_first else d_layer_out
    return d_x, {k: grads[k] for k in cache.params}, (d_h0, d_c0)


def _direction_forward(x, h, c, w_ih, w_hh, bias, w_hr, mask, reverse):
    """Run one direction over x [T, B, In] (0 at padded steps); return (out [T, B, Ho], h_last,
    c_last, cache)."""
    T, B, _ = x.shape
    H, Ho = c.shape[1], h.shape[1]
    xw = rounded((x.reshape(T * B, -1) @ w_ih.T + bias).reshape(T, B, 4 * H))  # all steps at once
    out = np.zeros((T, B, Ho), x.dtype)
    h_prev = np.empty((T, B, Ho), x.dtype)
    c_prev = np.empty((T, B, H), x.dtype)
    gates = np.empty((T, B, 4 * H), x.dtype)
    tanh_c = np.empty((T, B, H), x.dtype)
    for t in range(T - 1, -1, -1) if reverse else range(T):
        h_prev[t], c_prev[t] = h, c
        gates[t], c_new, tanh_c[t] = _gates_forward(rounded(xw[t] + rounded(h @ w_hh.T)), c)
        h_new = gates[t, :, 3 * H :] * tanh_c[t]  # r_t
        if w_hr is not None:
            h_new = h_new @ w_hr.T
        h_new, c_new = rounded(h_new), rounded(c_new)  # the state, in float16/bfloat16 calls
        if mask is None:
            h, c = h_new, c_new
            out[t] = h_new
        else:  # padded rows keep their state and output 0
            h, c = np.where(mask[t], h_new, h), np.where(mask[t], c_new, c)
            out[t] = np.where(mask[t], h_new, 0)
    return out, h, c, LSTMDirectionCache(x, h_prev, c_prev, gates, tanh_c, reverse)


def _direction_backward(d_out, d_h, d_c, cache, w_ih, w_hh, w_hr, mask):
    """BPTT through one direction; returns (d_x [T, B, In], grads, d_h0 [B, Ho], d_c0 [B, H])."""
    x, h_prev, c_prev, gates, tanh_c, reverse = cache
    T, B, _ = x.shape
    H, Ho = c_prev.shape[2], h_prev.shape[2]
    da = np.zeros((T, B, 4 * H), x.dtype)  # dL/da_t for every step
    d_h_new_steps = np.zeros((T, B, Ho), x.dtype) if w_hr is not None else None  # for dW_hr
    # d_h, d_c: the carried dL/dh_t, dL/dc_t (the module docstring's dh, dc)
    for t in range(T) if reverse else range(T - 1, -1, -1):  # the forward loop, backwards
        d_h_new = d_out[t] + d_h  # out_t = h_t^new, and h_t = h_t^new on real steps
        if mask is not None:  # h_t = m ? h_t^new : h_{t-1}, same for c
            d_h_new, d_h_keep = np.where(mask[t], d_h_new, 0), np.where(mask[t], 0, d_h)
            d_c_new = np.where(mask[t], d_c, 0)
        else:
            d_c_new, d_h_keep = d_c, 0
        d_r = d_h_new
        if w_hr is not None:  # h^new = r @ w_hr.T
            d_h_new_steps[t] = d_h_new
            d_r = d_h_new @ w_hr
        da_t, d_c_prev = _gates_backward(d_r, d_c_new, gates[t], c_prev[t], tanh_c[t])
        da_t = rounded(da_t)  # float16/bfloat16 calls: torch's step gradients are in the dtype
        if mask is None:
            da[t], d_c = da_t, d_c_prev
        else:  # padded rows: da = 0 and dc passes through (dc_keep), exactly
            da[t] = np.where(mask[t], da_t, 0)
            d_c = np.where(mask[t], d_c_prev, d_c)
        d_h = da[t] @ w_hh + d_h_keep  # a_t = ... + h_{t-1} @ w_hh.T
        d_h, d_c = rounded(d_h), rounded(d_c)  # float16/bfloat16 calls: torch's step gradients
    da2 = da.reshape(T * B, 4 * H)
    d_bias = da2.sum(axis=0)
    grads = {
        "weight_ih": da2.T @ x.reshape(T * B, -1),  # xw = x @ w_ih.T + b_ih + b_hh
        "weight_hh": da2.T @ h_prev.reshape(T * B, Ho),
        "bias_ih": d_bias,
        "bias_hh": d_bias.copy(),
    }
    if emulated() is not None:  # float16/bfloat16: the hidden weights' terms summed per step
        order = range(T) if reverse else range(T - 1, -1, -1)
        grads["weight_hh"] = step_sum(da, h_prev, order)
        grads["bias_hh"] = step_sum(da, None, order)
    if w_hr is not None:
        r = (gates[:, :, 3 * H :] * tanh_c).reshape(T * B, H)
        grads["weight_hr"] = d_h_new_steps.reshape(T * B, Ho).T @ r
    return (da2 @ w_ih).reshape(T, B, -1), grads, d_h, d_c
