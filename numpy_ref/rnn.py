r"""Elman RNN forward and backward in NumPy, with `torch.nn.RNN`'s exact semantics. No autograd.

Shapes
------
T  time steps      B  batch      I  input size (layer 0)      H  hidden size
D  directions (1, or 2 when bidirectional)
L  layers; layer k > 0 reads the previous layer's output, so its input size is D * H

Forward, one step of one direction
----------------------------------
    a  = x_t W_ih^T + b_ih + h W_hh^T + b_hh               [B, H]  (x W_ih^T of all T steps at once)
    h' = act(a),  act = tanh or relu (``nonlinearity``)

Variable lengths and padding: exactly as the LSTM (`numpy_ref.lstm`): a padded step keeps the
state and outputs 0, and the padded steps of x are zeroed before anything reads them.

Backward (one step; dh' = d_out_t + the carried dh, masked as for the LSTM)
--------------------------------------------------------------------------
    da = dh' * (1 - h'^2)        (tanh)
    da = dh' * (h' > 0)          (relu: torch's threshold_backward, 0 at a = 0)
    dh = da W_hh

After the loop, with every step's da stacked [T*B, H]: ``dW_ih = da^T x``,
``dW_hh = da^T h_{t-1}``, ``db_ih = db_hh = sum da``, ``dx = da W_ih``; what is left in dh is
d_h0. With ``bias=False`` (no bias keys) the biases are 0 and get no gradient.

Parameters use `torch.nn.RNN.state_dict()` names and shapes: ``weight_ih_l0`` [H, I],
``weight_hh_l0`` [H, H], ``bias_ih_l0``, ``bias_hh_l0`` [H], ``_reverse`` for direction 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks, recurrent, unchanged
from numpy_ref.contract.fields import documented
from numpy_ref.precision import emulated, rounded, same_precision, step_sum

GATES = 1


def _step(gi: np.ndarray, h: np.ndarray, p: Mapping[str, np.ndarray], relu: bool
          ) -> np.ndarray:
    """h_new [B, H] from gi = x W_ih^T + b_ih [B, H] and h [B, H]."""
    a = h @ p["weight_hh"].T
    if "bias_hh" in p:
        a += p["bias_hh"]
    a = rounded(gi + rounded(a))  # rounded: the identity except in float16/bfloat16 calls
    return np.maximum(a, 0) if relu else np.tanh(a)


def _step_backward(d_h_new: np.ndarray, h_new: np.ndarray, relu: bool) -> np.ndarray:
    """dL/da [B, H] from dL/dh_new and h_new = act(a)."""
    return np.where(h_new > 0, d_h_new, 0) if relu else d_h_new * (1 - h_new * h_new)


def _weight_grads(da: np.ndarray, x: np.ndarray, h: np.ndarray, p: Mapping[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
    """Rows stacked [N, .]: dW_ih = da^T x, dW_hh = da^T h, db_ih = db_hh = sum da; keyed as p."""
    grads = {"weight_ih": da.T @ x, "weight_hh": da.T @ h}
    if "bias_ih" in p:
        grads["bias_ih"] = da.sum(axis=0)
        grads["bias_hh"] = grads["bias_ih"].copy()
    return {k: grads[k] for k in p}


# --------------------------------------------------------------------------------------------
# one step: the cell (torch.nn.RNNCell's names)


@documented
class RNNCellCache(NamedTuple):
    """What `rnn_cell_backward` needs from one `rnn_cell_forward` call."""

    x: np.ndarray  # [B, I]  input; read for d_weight_ih
    h: np.ndarray  # [B, H]  previous hidden state; read for d_weight_hh
    h_new: np.ndarray  # [B, H]  act(a); read for act'
    params: Mapping[str, np.ndarray]  # the weights; read
    nonlinearity: str  # "tanh" or "relu"
    fingerprints: unchanged.Fingerprints | None = None  # x, h and the weights as the forward
    #   saw them; the backward checks them first (`numpy_ref.contract.unchanged`)


@same_precision()
def rnn_cell_forward(
    x: np.ndarray, h: np.ndarray, params: Mapping[str, np.ndarray], *,
    nonlinearity: str = "tanh",
) -> tuple[np.ndarray, RNNCellCache]:
    """One Elman RNN step, as `torch.nn.RNNCell`:
    ``h_new = act(x W_ih^T + b_ih + h W_hh^T + b_hh)``, act tanh or relu.

    x : [B, I].  h : [B, H].  params : ``weight_ih`` [H, I], ``weight_hh`` [H, H] and (both or
    neither) ``bias_ih``, ``bias_hh`` [H].  Returns h_new [B, H] and the cache.
    Derivation: the `numpy_ref.rnn` module docstring.
    """
    act = recurrent.nonlinearity_of(nonlinearity)
    x, h, p, _ = recurrent.cell_inputs(x, h, params, GATES, "RNN cell")
    gi = x @ p["weight_ih"].T
    if "bias_ih" in p:
        gi += p["bias_ih"]
    h_new = rounded(_step(rounded(gi), h, p, act == "relu"))  # rounded: float16/bfloat16
    fingerprints = recurrent.cell_fingerprints("rnn_cell_forward", "rnn_cell_backward", x, h, p)
    return h_new, RNNCellCache(x, h, h_new, p, act, fingerprints)


@same_precision(backward=True)
def rnn_cell_backward(
    d_h_new: np.ndarray, cache: RNNCellCache
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Backward of `rnn_cell_forward`: d_h_new [B, H] -> (d_x [B, I], d_h [B, H], d_params with
    the keys and shapes of params): ``da = d_h_new act'``, ``d_x = da W_ih``, ``d_h = da W_hh``,
    ``dW_ih = da^T x``, ``dW_hh = da^T h``, ``db = sum da``. Derivation: the `numpy_ref.rnn`
    module docstring."""
    checks.cache_of(cache, RNNCellCache, "rnn_cell_forward")
    unchanged.check(cache.fingerprints)
    x, h, h_new, p, act, _ = cache
    d_h_new = recurrent.cell_cotangent(d_h_new, h)
    da = rounded(_step_backward(d_h_new, h_new, act == "relu"))  # rounded: float16/bfloat16
    return da @ p["weight_ih"], da @ p["weight_hh"], _weight_grads(da, x, h, p)


# --------------------------------------------------------------------------------------------
# the layer stack


@documented
class RNNDirectionCache(NamedTuple):
    """One direction of one layer: what its backward needs."""

    x: np.ndarray  # [T, B, In]  this layer's input, 0 at padded steps; read for d_weight_ih
    h_prev: np.ndarray  # [T, B, H]  hidden state entering step t; read for d_weight_hh
    h_new: np.ndarray  # [T, B, H]  act(a_t) of every step; read for act'
    reverse: bool  # whether this is the reverse direction


@documented
class RNNCache(NamedTuple):
    """Everything `rnn_backward` needs from one `rnn_forward` call."""

    directions: tuple[RNNDirectionCache, ...]  # L*D entries, index 2*layer + direction
    params: dict[str, np.ndarray]  # the validated weights; read
    mask: np.ndarray | None  # [T, B, 1] bool, t < lengths[b]; None when no lengths
    num_layers: int  # L
    bidirectional: bool  # D = 2 when True
    batch_first: bool  # whether output (and d_output) are [B, T, D*H]
    hidden_size: int  # H
    nonlinearity: str  # "tanh" or "relu"
    fingerprints: unchanged.Fingerprints | None = None  # x (when layer 0's input is a view of
    #   it) and the weights as the forward saw them; the backward checks them first


def init_rnn_params(
    input_size: int, hidden_size: int, *, num_layers: int = 1, bidirectional: bool = False,
    bias: bool = True, rng: np.random.Generator | int | None = None, dtype: Any = np.float64,
) -> dict[str, np.ndarray]:
    """Random RNN parameters initialised as torch does: every entry ~ U(-1/sqrt(H), 1/sqrt(H)).

    Keys, order and shapes of `torch.nn.RNN(input_size, hidden_size, ...).state_dict()`:
    ``weight_ih_l{k}`` [H, I] (layer 0; D*H above), ``weight_hh_l{k}`` [H, H],
    ``bias_ih_l{k}``, ``bias_hh_l{k}`` [H], and ``_reverse`` ones for the second direction
    (their roles: the `numpy_ref.rnn` module docstring).
    """
    recurrent.validate_sizes(input_size, hidden_size, num_layers)
    rng = np.random.default_rng(rng)
    bound = 1.0 / np.sqrt(hidden_size)
    specs = recurrent.param_specs(input_size, hidden_size, num_layers,
                                  2 if bidirectional else 1, GATES, bool(bias))
    return {k: rng.uniform(-bound, bound, s).astype(dtype) for k, s, _ in specs}


@same_precision()
def rnn_forward(
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    nonlinearity: str = "tanh",
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    h0: np.ndarray | None = None,
    lengths: Any = None,
    dropout: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, RNNCache]:
    """Multi-layer (bi)directional Elman RNN forward, as `torch.nn.RNN`.

    Per step and direction ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``; padded
    steps (t >= lengths[b]) keep the state and output 0 (the `numpy_ref.rnn` module docstring).

    Parameters
    ----------
    x : [T, B, I] (or [B, T, I] with ``batch_first``), float32 or float64.
    params : `torch.nn.RNN.state_dict()` names and shapes (no bias keys for ``bias=False``).
    nonlinearity : "tanh" or "relu".
    h0 : [L*D, B, H] initial state (never batch-first); zeros if None.
    lengths : integer [B], each in 1..T, or None (packed semantics, as `gru_forward`).
    dropout : only 0 is accepted.

    Returns
    -------
    output [T, B, D*H] (or [B, T, D*H]), zero at padded steps; h_n [L*D, B, H]; cache.
    """
    act = recurrent.nonlinearity_of(nonlinearity)
    a = recurrent.stack_inputs(x, params, num_layers, bidirectional, batch_first, h0, lengths,
                               GATES, f", nonlinearity={act!r}", dropout)

    def direction(layer_input, h, p, mask, reverse):
        return _direction_forward(layer_input, h, p, mask, reverse, act == "relu")

    out, h_n, caches, mask = recurrent.stack_forward(a, num_layers, direction)
    output = out.transpose(1, 0, 2) if batch_first else out
    fingerprints = recurrent.stack_fingerprints("rnn_forward", "rnn_backward", x, caches[0].x,
                                                a.params)
    cache = RNNCache(tuple(caches), a.params, mask, num_layers, bool(bidirectional),
                     bool(batch_first), a.hidden_size, act, fingerprints)
    return output, h_n, cache


@same_precision(backward=True)
def rnn_backward(
    d_output: np.ndarray, cache: RNNCache, *, d_h_n: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Backpropagation through time for `rnn_forward`: at step t (in reverse)
    ``da_t = (d_out_t + dh) act'``, ``dh <- da_t W_hh``; then ``dW_ih = sum_t da_t^T x_t``,
    ``dW_hh = sum_t da_t^T h_{t-1}``, ``db = sum_t da_t``, ``d_x_t = da_t W_ih``.

    d_output : like output; entries at padded steps are ignored.  d_h_n : [L*D, B, H] or None.
    Returns d_x (like x), d_params (the keys and shapes of params), d_h0 [L*D, B, H].
    Derivation: the `numpy_ref.rnn` module docstring.
    """
    checks.cache_of(cache, RNNCache, "rnn_forward")
    unchanged.check(cache.fingerprints)
    d_out, d_h_n = recurrent.stack_cotangents(d_output, d_h_n, cache)
    relu = cache.nonlinearity == "relu"

    def direction(d_out, d_h, dcache, p, mask):
        return _direction_backward(d_out, d_h, dcache, p, mask, relu)

    d_x, d_params, d_h0 = recurrent.stack_backward(d_out, d_h_n, cache, direction)
    return (d_x.transpose(1, 0, 2) if cache.batch_first else d_x), d_params, d_h0


def _direction_forward(x, h, p, mask, reverse, relu):
    """One direction over x [T, B, In] (0 at padded steps) from h [B, H] -> (out [T, B, H],
    h_last [B, H], cache)."""
    T, B, _ = x.shape
    H = h.shape[1]
    gi = x.reshape(T * B, -1) @ p["weight_ih"].T
    if "bias_ih" in p:
        gi += p["bias_ih"]
    gi = rounded(gi.reshape(T, B, H))  # rounded: float16/bfloat16 calls
    out = np.zeros((T, B, H), x.dtype)
    h_prev = np.empty((T, B, H), x.dtype)
    h_new = np.empty((T, B, H), x.dtype)
    for t in range(T - 1, -1, -1) if reverse else range(T):
        h_prev[t] = h
        h_new[t] = rounded(_step(gi[t], h, p, relu))  # rounded: float16/bfloat16 calls
        if mask is None:
            h = out[t] = h_new[t]
        else:  # padded rows keep their state and output 0
            h = np.where(mask[t], h_new[t], h)
            out[t] = np.where(mask[t], h_new[t], 0)
    return out, h, RNNDirectionCache(x, h_prev, h_new, reverse)


def _direction_backward(d_out, d_h, cache, p, mask, relu):
    """BPTT through one direction -> (d_x [T, B, In], grads under the cell's names, d_h0)."""
    x, h_prev, h_new, reverse = cache
    T, B, _ = x.shape
    H = h_prev.shape[2]
    da = np.zeros((T, B, H), x.dtype)
    w_hh = p["weight_hh"]
    for t in range(T) if reverse else range(T - 1, -1, -1):  # the forward loop, backwards
        d_h_new = d_out[t] + d_h
        if mask is None:
            da[t] = rounded(_step_backward(d_h_new, h_new[t], relu))  # rounded: float16/bf16
            d_h = da[t] @ w_hh
        else:  # padded rows: da = 0 and dh passes through (dh_keep), exactly
            da[t] = np.where(mask[t], rounded(_step_backward(d_h_new, h_new[t], relu)), 0)
            d_h = np.where(mask[t], da[t] @ w_hh, d_h)
        d_h = rounded(d_h)  # float16/bfloat16 calls: torch's step gradients are in the dtype
    rows = T * B
    grads = _weight_grads(da.reshape(rows, H), x.reshape(rows, -1), h_prev.reshape(rows, H), p)
    if emulated() is not None:  # float16/bfloat16: the hidden weights' terms summed per step
        order = range(T) if reverse else range(T - 1, -1, -1)
        grads["weight_hh"] = step_sum(da, h_prev, order)
        if "bias_hh" in grads:
            grads["bias_hh"] = step_sum(da, None, order)
    return (da.reshape(rows, H) @ p["weight_ih"]).reshape(T, B, -1), grads, d_h
