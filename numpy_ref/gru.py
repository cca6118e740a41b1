r"""GRU forward and backward in NumPy, with `torch.nn.GRU`'s exact semantics. No autograd.

Shapes
------
T  time steps      B  batch      I  input size (layer 0)      H  hidden size
D  directions (1, or 2 when bidirectional)
L  layers; layer k > 0 reads the previous layer's output, so its input size is D * H

Forward, one step of one direction (gate order r, z, n, as PyTorch stores them)
-------------------------------------------------------------------------------
    gi = x_t W_ih^T + b_ih                                  [B, 3H]  (all T steps in one product)
    gh = h W_hh^T + b_hh                                    [B, 3H]
    r  = sigmoid(gi_r + gh_r)          z = sigmoid(gi_z + gh_z)
    n  = tanh(gi_n + r * gh_n)         (gh_n = W_hn h + b_hn: the reset gate AFTER the product)
    h' = (1 - z) * n + z * h  =  n + z * (h - n)

That is torch's GRU (and ONNX's ``linear_before_reset=1``, Keras' ``reset_after=True``). The
other published GRU, ``linear_before_reset=False`` (ONNX's default, Keras ``reset_after=False``,
d2l, DLFS2), resets the state BEFORE the product:

    n  = tanh(gi_n + (r * h) W_hn^T + b_hn)

Both are exact references here; torch has only the first. With ``bias=False`` (no bias keys)
b_ih = b_hh = 0.

Variable lengths and padding: exactly as the LSTM (`numpy_ref.lstm`): with m_t[b] = t <
lengths[b], a padded step keeps the state and outputs 0 (``h_t = m ? h' : h_{t-1}``); the
padded steps of x are zeroed before anything reads them, so whatever they hold changes no
output and no gradient.

Backward (one step; dh' = dL/dh' = d_out_t + the carried dh, masked as for the LSTM)
-----------------------------------------------------------------------------------
    dn = dh' (1 - z)          dz = dh' (h - n)          dh = dh' z          (h' = n + z (h - n))
    da_n = dn (1 - n^2)                                                     (n = tanh(a_n))
    linear_before_reset=True:  a_n = gi_n + r * gh_n
        dgi_n = da_n          dgh_n = da_n * r          dr = da_n * gh_n
    linear_before_reset=False: a_n = gi_n + (r * h) W_hn^T + b_hn
        dgi_n = da_n          d(rh) = da_n W_hn          dr = d(rh) * h      dh += d(rh) * r
    da_r = dr r (1 - r)       da_z = dz z (1 - z)
    dgi = [da_r, da_z, dgi_n]                              (the gradient of gi, [B, 3H])
    dh += [da_r, da_z] W_h{r,z}  (+ dgh_n W_hn with linear_before_reset=True)

So ``b_in`` and ``b_hn`` get different gradients under torch's GRU: ``db_in = sum da_n`` but
``db_hn = sum da_n * r``, because the reset gate multiplies ``W_hn h + b_hn`` as a whole (with
``linear_before_reset=False`` both are ``sum da_n``). After the loop, with every step's dgi and
dgh stacked [T*B, 3H]: ``dW_ih = dgi^T x``, ``db_ih = sum dgi``, ``dW_hh = dgh^T h_{t-1}``
(its n rows against ``r * h_{t-1}`` with linear_before_reset=False), ``db_hh = sum dgh``,
``dx = dgi W_ih``; what is left in dh is d_h0.

Parameters use `torch.nn.GRU.state_dict()` names and shapes: ``weight_ih_l0`` [3H, I],
``weight_hh_l0`` [3H, H], ``bias_ih_l0``, ``bias_hh_l0`` [3H], ``_reverse`` for direction 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks, recurrent, unchanged
from numpy_ref.contract.fields import documented
from numpy_ref.lstm import sigmoid
from numpy_ref.precision import emulated, rounded, same_precision, step_sum

GATES = 3


def _gates(gi: np.ndarray, h: np.ndarray, p: Mapping[str, np.ndarray], lbr: bool
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step from gi = x W_ih^T + b_ih [B, 3H] and h [B, H] -> (gates [B, 3H] = r, z, n
    activated, gh_n [B, H] = W_hn h + b_hn (the term the reset gate scales; with lbr False the
    product of r * h instead), h_new [B, H])."""
    H = h.shape[1]
    w_hh, b_hh = p["weight_hh"], p.get("bias_hh")
    gates = np.empty_like(gi)
    # `rounded`: the identity except in float16/bfloat16 calls, where it rounds each result
    # that torch's GRU cell writes in the dtype
    if lbr:
        gh = h @ w_hh.T
        if b_hh is not None:
            gh += b_hh
        gh = rounded(gh)
        gates[:, :2 * H] = rounded(sigmoid(rounded(gi[:, :2 * H] + gh[:, :2 * H])))  # r, z
        gh_n = gh[:, 2 * H:]
        gates[:, 2 * H:] = rounded(np.tanh(rounded(gi[:, 2 * H:] + rounded(gates[:, :H] * gh_n))))
    else:
        gh_rz = h @ w_hh[:2 * H].T
        if b_hh is not None:
            gh_rz += b_hh[:2 * H]
        gates[:, :2 * H] = sigmoid(gi[:, :2 * H] + gh_rz)
        gh_n = (gates[:, :H] * h) @ w_hh[2 * H:].T
        if b_hh is not None:
            gh_n += b_hh[2 * H:]
        gates[:, 2 * H:] = np.tanh(gi[:, 2 * H:] + gh_n)
    z, n = gates[:, H:2 * H], gates[:, 2 * H:]
    return gates, gh_n, n + rounded(z * rounded(h - n))


def _gates_backward(d_h_new: np.ndarray, gates: np.ndarray, gh_n: np.ndarray, h: np.ndarray,
                    w_hh: np.ndarray, lbr: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undo `_gates`: dL/dh_new [B, H] -> (dgi [B, 3H], dgh [B, 3H], dL/dh [B, H]); dgh is the
    gradient of ``h W_hh^T + b_hh`` (its n block that of ``(r h) W_hn^T + b_hn`` with lbr
    False). The module docstring derives each line."""
    H = h.shape[1]
    r, z, n = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]
    # `rounded`: the identity except in float16/bfloat16 calls (torch's autograd's roundings)
    d_n = rounded(d_h_new * (1 - z))  # h_new = n + z (h - n)
    d_z = rounded(d_h_new * (h - n))
    d_h = rounded(d_h_new * z)
    d_gi = np.empty_like(gates)
    d_gi[:, 2 * H:] = rounded(d_n * (1 - n * n))  # da_n
    d_gh = np.empty_like(gates)
    if lbr:  # a_n = gi_n + r * gh_n
        d_gh[:, 2 * H:] = rounded(d_gi[:, 2 * H:] * r)
        d_r = rounded(d_gi[:, 2 * H:] * gh_n)
    else:  # a_n = gi_n + (r * h) W_hn^T + b_hn
        d_gh[:, 2 * H:] = d_gi[:, 2 * H:]
        d_rh = d_gi[:, 2 * H:] @ w_hh[2 * H:]
        d_r = d_rh * h
        d_h += d_rh * r
    d_gi[:, :H] = rounded(d_r * r * (1 - r))  # r = sigmoid(a_r)
    d_gi[:, H:2 * H] = rounded(d_z * z * (1 - z))
    d_gh[:, :2 * H] = d_gi[:, :2 * H]
    if lbr:
        d_h += d_gh @ w_hh
    else:
        d_h += d_gh[:, :2 * H] @ w_hh[:2 * H]
    return d_gi, d_gh, d_h


def _linear_before_reset(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"linear_before_reset: expected a bool, got {value!r}")
    return bool(value)


def _weight_grads(d_gi: np.ndarray, d_gh: np.ndarray, x: np.ndarray, h: np.ndarray,
                  r: np.ndarray, p: Mapping[str, np.ndarray], lbr: bool) -> dict[str, np.ndarray]:
    """Rows stacked [N, .]: dW_ih = dgi^T x, dW_hh = dgh^T h (n rows against r*h when lbr is
    False), the biases' sums; keyed as p."""
    H = h.shape[1]
    if lbr:
        d_w_hh = d_gh.T @ h
    else:
        d_w_hh = np.concatenate([d_gh[:, :2 * H].T @ h, d_gh[:, 2 * H:].T @ (r * h)])
    grads = {"weight_ih": d_gi.T @ x, "weight_hh": d_w_hh}
    if "bias_ih" in p:
        grads["bias_ih"], grads["bias_hh"] = d_gi.sum(axis=0), d_gh.sum(axis=0)
    return {k: grads[k] for k in p}


# --------------------------------------------------------------------------------------------
# one step: the cell (torch.nn.GRUCell's names)


@documented
class GRUCellCache(NamedTuple):
    """What `gru_cell_backward` needs from one `gru_cell_forward` call."""

    x: np.ndarray  # [B, I]  input; read for d_weight_ih
    h: np.ndarray  # [B, H]  previous hidden state; read
    gates: np.ndarray  # [B, 3H]  activated gates r, z, n; read
    gh_n: np.ndarray  # [B, H]  W_hn h + b_hn (linear_before_reset) or W_hn (r h) + b_hn; read
    params: Mapping[str, np.ndarray]  # the weights; read
    linear_before_reset: bool  # which GRU (the module docstring)
    fingerprints: unchanged.Fingerprints | None = None  # x, h and the weights as the forward
    #   saw them; the backward checks them first (`numpy_ref.contract.unchanged`)


@same_precision()
def gru_cell_forward(
    x: np.ndarray, h: np.ndarray, params: Mapping[str, np.ndarray], *,
    linear_before_reset: bool = True,
) -> tuple[np.ndarray, GRUCellCache]:
    """One GRU step, as `torch.nn.GRUCell` (``linear_before_reset=True``) or the other
    published GRU (``False``: the reset gate applied to h before ``W_hn``).

    ``r, z = sigmoid(x W_i{r,z}^T + b_i{r,z} + h W_h{r,z}^T + b_h{r,z})``,
    ``n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn))``, ``h_new = n + z (h - n)``.
    Derivation: the `numpy_ref.gru` module docstring.

    Parameters
    ----------
    x : [B, I].  h : [B, H].  params : ``weight_ih`` [3H, I], ``weight_hh`` [3H, H] and (both or
        neither) ``bias_ih``, ``bias_hh`` [3H].

    Returns
    -------
    h_new [B, H], cache.
    """
    lbr = _linear_before_reset(linear_before_reset)
    x, h, p, _ = recurrent.cell_inputs(x, h, params, GATES, "GRU cell")
    gi = x @ p["weight_ih"].T
    if "bias_ih" in p:
        gi += p["bias_ih"]
    gates, gh_n, h_new = _gates(rounded(gi), h, p, lbr)  # rounded: float16/bfloat16 calls
    fingerprints = recurrent.cell_fingerprints("gru_cell_forward", "gru_cell_backward", x, h, p)
    return h_new, GRUCellCache(x, h, gates, gh_n, p, lbr, fingerprints)


@same_precision(backward=True)
def gru_cell_backward(
    d_h_new: np.ndarray, cache: GRUCellCache
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Backward of `gru_cell_forward`: ``dn = d_h_new (1 - z)``, ``dz = d_h_new (h - n)``,
    ``d_h = d_h_new z + dgh W_hh``, ``d_x = dgi W_ih``, ``dW_ih = dgi^T x``, ``dW_hh = dgh^T h``.

    d_h_new [B, H] -> (d_x [B, I], d_h [B, H], d_params with the keys and shapes of params).
    Derivation (dgi, dgh per variant): the `numpy_ref.gru` module docstring."""
    checks.cache_of(cache, GRUCellCache, "gru_cell_forward")
    unchanged.check(cache.fingerprints)
    x, h, gates, gh_n, p, lbr, _ = cache
    d_h_new = recurrent.cell_cotangent(d_h_new, h)
    d_gi, d_gh, d_h = _gates_backward(d_h_new, gates, gh_n, h, p["weight_hh"], lbr)
    grads = _weight_grads(d_gi, d_gh, x, h, gates[:, :h.shape[1]], p, lbr)
    return d_gi @ p["weight_ih"], d_h, grads


# --------------------------------------------------------------------------------------------
# the layer stack


@documented
class GRUDirectionCache(NamedTuple):
    """One direction of one layer: what its backward needs."""

    x: np.ndarray  # [T, B, In]  this layer's input, 0 at padded steps; read for d_weight_ih
    h_prev: np.ndarray  # [T, B, H]  hidden state entering step t; read
    gates: np.ndarray  # [T, B, 3H]  activated gates r, z, n; read
    gh_n: np.ndarray  # [T, B, H]  the term the reset gate scales (see GRUCellCache); read
    reverse: bool  # whether this is the reverse direction


@documented
class GRUCache(NamedTuple):
    """Everything `gru_backward` needs from one `gru_forward` call."""

    directions: tuple[GRUDirectionCache, ...]  # L*D entries, index 2*layer + direction
    params: dict[str, np.ndarray]  # the validated weights; read
    mask: np.ndarray | None  # [T, B, 1] bool, t < lengths[b]; None when no lengths
    num_layers: int  # L
    bidirectional: bool  # D = 2 when True
    batch_first: bool  # whether output (and d_output) are [B, T, D*H]
    hidden_size: int  # H
    linear_before_reset: bool  # which GRU (the module docstring)
    fingerprints: unchanged.Fingerprints | None = None  # x (when layer 0's input is a view of
    #   it) and the weights as the forward saw them; the backward checks them first


def init_gru_params(
    input_size: int, hidden_size: int, *, num_layers: int = 1, bidirectional: bool = False,
    bias: bool = True, rng: np.random.Generator | int | None = None, dtype: Any = np.float64,
) -> dict[str, np.ndarray]:
    """Random GRU parameters initialised as torch does: every entry ~ U(-1/sqrt(H), 1/sqrt(H)).

    Keys, order and shapes of `torch.nn.GRU(input_size, hidden_size, num_layers=...,
    bidirectional=..., bias=...).state_dict()`: ``weight_ih_l{k}`` [3H, I] (layer 0; 2H above
    when bidirectional, else H), ``weight_hh_l{k}`` [3H, H], ``bias_ih_l{k}``,
    ``bias_hh_l{k}`` [3H], and ``_reverse`` ones for the second direction (their roles: the
    `numpy_ref.gru` module docstring).
    """
    recurrent.validate_sizes(input_size, hidden_size, num_layers)
    rng = np.random.default_rng(rng)
    bound = 1.0 / np.sqrt(hidden_size)
    specs = recurrent.param_specs(input_size, hidden_size, num_layers,
                                  2 if bidirectional else 1, GATES, bool(bias))
    return {k: rng.uniform(-bound, bound, s).astype(dtype) for k, s, _ in specs}


@same_precision()
def gru_forward(
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    h0: np.ndarray | None = None,
    lengths: Any = None,
    linear_before_reset: bool = True,
    dropout: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, GRUCache]:
    """Multi-layer (bi)directional GRU forward, as `torch.nn.GRU`.

    Per step and direction: the cell of `gru_cell_forward`; padded steps (t >= lengths[b])
    keep the state and output 0. Derivation and the padding rules: the `numpy_ref.gru` module
    docstring.

    Parameters
    ----------
    x : [T, B, I] (or [B, T, I] with ``batch_first``), float32 or float64.
    params : `torch.nn.GRU.state_dict()` names and shapes (no bias keys for ``bias=False``), the
        dtype of x.
    h0 : [L*D, B, H] initial state (never batch-first); zeros if None.
    lengths : integer [B], each in 1..T, or None: the same result as packing the batch with
        ``pack_padded_sequence(enforce_sorted=False)`` and padding the output back to T.
    linear_before_reset : True is torch's GRU; False the other one (module docstring).
    dropout : only 0 is accepted; inter-layer dropout is random and not part of a reference.

    Returns
    -------
    output : [T, B, D*H] (or [B, T, D*H]), zero at padded steps.
    h_n : [L*D, B, H], index ``2*layer + direction``.
    cache : `GRUCache` for `gru_backward`.
    """
    lbr = _linear_before_reset(linear_before_reset)
    a = recurrent.stack_inputs(x, params, num_layers, bidirectional, batch_first, h0, lengths,
                               GATES, f", linear_before_reset={lbr}", dropout)

    def direction(layer_input, h, p, mask, reverse):
        return _direction_forward(layer_input, h, p, mask, reverse, lbr)

    out, h_n, caches, mask = recurrent.stack_forward(a, num_layers, direction)
    output = out.transpose(1, 0, 2) if batch_first else out
    fingerprints = recurrent.stack_fingerprints("gru_forward", "gru_backward", x, caches[0].x,
                                                a.params)
    cache = GRUCache(tuple(caches), a.params, mask, num_layers, bool(bidirectional),
                     bool(batch_first), a.hidden_size, lbr, fingerprints)
    return output, h_n, cache


@same_precision(backward=True)
def gru_backward(
    d_output: np.ndarray, cache: GRUCache, *, d_h_n: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Backpropagation through time for `gru_forward`.

    Walks each direction's steps in reverse, carrying dh (from d_h_n): at step t
    ``dh' = d_out_t + dh``, then `gru_cell_backward`'s step gives (dgi_t, dgh_t) and the new
    dh; after the loop ``dW_ih = sum_t dgi_t^T x_t``, ``dW_hh = sum_t dgh_t^T h_{t-1}``, the
    biases' sums, ``d_x_t = dgi_t W_ih``. Derivation: the `numpy_ref.gru` module docstring.

    Parameters
    ----------
    d_output : like output ([T, B, D*H] or [B, T, D*H]); entries at padded steps are ignored.
    d_h_n : [L*D, B, H] gradient of h_n, or None (zero).

    Returns
    -------
    d_x : like x.  d_params : the keys and shapes of params.  d_h0 : [L*D, B, H] (returned
    also when the forward used the default zero state).
    """
    checks.cache_of(cache, GRUCache, "gru_forward")
    unchanged.check(cache.fingerprints)
    d_out, d_h_n = recurrent.stack_cotangents(d_output, d_h_n, cache)
    lbr = cache.linear_before_reset

    def direction(d_out, d_h, dcache, p, mask):
        return _direction_backward(d_out, d_h, dcache, p, mask, lbr)

    d_x, d_params, d_h0 = recurrent.stack_backward(d_out, d_h_n, cache, direction)
    return (d_x.transpose(1, 0, 2) if cache.batch_first else d_x), d_params, d_h0


def _direction_forward(x, h, p, mask, reverse, lbr):
    """One direction over x [T, B, In] (0 at padded steps) from h [B, H] -> (out [T, B, H],
    h_last [B, H], cache)."""
    T, B, _ = x.shape
    H = h.shape[1]
    gi = x.reshape(T * B, -1) @ p["weight_ih"].T  # all steps at once
    if "bias_ih" in p:
        gi += p["bias_ih"]
    gi = rounded(gi.reshape(T, B, GATES * H))  # rounded: float16/bfloat16 calls
    out = np.zeros((T, B, H), x.dtype)
    h_prev = np.empty((T, B, H), x.dtype)
    gates = np.empty((T, B, GATES * H), x.dtype)
    gh_n = np.empty((T, B, H), x.dtype)
    for t in range(T - 1, -1, -1) if reverse else range(T):
        h_prev[t] = h
        gates[t], gh_n[t], h_new = _gates(gi[t], h, p, lbr)
        h_new = rounded(h_new)  # the state, in float16/bfloat16 calls
        if mask is None:
            h = out[t] = h_new
        else:  # padded rows keep their state and output 0
            h = np.where(mask[t], h_new, h)
            out[t] = np.where(mask[t], h_new, 0)
    return out, h, GRUDirectionCache(x, h_prev, gates, gh_n, reverse)


def _direction_backward(d_out, d_h, cache, p, mask, lbr):
    """BPTT through one direction -> (d_x [T, B, In], grads under the cell's names, d_h0)."""
    x, h_prev, gates, gh_n, reverse = cache
    T, B, _ = x.shape
    H = h_prev.shape[2]
    d_gi = np.zeros((T, B, GATES * H), x.dtype)
    d_gh = np.zeros((T, B, GATES * H), x.dtype)
    w_hh = p["weight_hh"]
    for t in range(T) if reverse else range(T - 1, -1, -1):  # the forward loop, backwards
        d_h_new = d_out[t] + d_h  # out_t = h_t^new, and h_t = h_t^new on real steps
        if mask is not None:  # h_t = m ? h_t^new : h_{t-1}
            d_h_new = np.where(mask[t], d_h_new, 0)
        gi_t, gh_t, d_h_prev = _gates_backward(d_h_new, gates[t], gh_n[t], h_prev[t], w_hh, lbr)
        gi_t, gh_t = rounded(gi_t), rounded(gh_t)  # float16/bfloat16: torch's step gradients
        if mask is None:
            d_gi[t], d_gh[t], d_h = gi_t, gh_t, d_h_prev
        else:  # padded rows: no gate gradient, and dh passes through (dh_keep), exactly
            d_gi[t] = np.where(mask[t], gi_t, 0)
            d_gh[t] = np.where(mask[t], gh_t, 0)
            d_h = np.where(mask[t], d_h_prev, d_h)
        d_h = rounded(d_h)  # float16/bfloat16 calls: torch's step gradients are in the dtype
    rows = T * B
    grads = _weight_grads(d_gi.reshape(rows, -1), d_gh.reshape(rows, -1),
                          x.reshape(rows, -1), h_prev.reshape(rows, H),
                          gates[:, :, :H].reshape(rows, H), p, lbr)
    if emulated() is not None:  # float16/bfloat16: the hidden weights' terms summed per step
        order = range(T) if reverse else range(T - 1, -1, -1)
        grads["weight_hh"] = (step_sum(d_gh, h_prev, order) if lbr else np.concatenate([
            step_sum(d_gh[:, :, :2 * H], h_prev, order),
            step_sum(d_gh[:, :, 2 * H:], gates[:, :, :H] * h_prev, order)]))
        if "bias_hh" in grads:
            grads["bias_hh"] = step_sum(d_gh, None, order)
    return (d_gi.reshape(rows, -1) @ p["weight_ih"]).reshape(T, B, -1), grads, d_h
