r"""Numba GRU and Elman RNN: each direction's recurrence in one compiled call, the matrix
products in BLAS, as the LSTM kernels (`kernels.lstm`, whose module docstring explains the
design: the per-step products through NumPy's own cblas_?gemm, the two directions of a layer
on two threads, no allocation per step).

Same public functions, argument names, validation, results and caches as `numpy_ref.gru` and
`numpy_ref.rnn` (read them for the math, the shapes and the masking rules); the caches are
numpy_ref's own, so a cache from either backend works with either backward.

What runs where, per layer and direction
----------------------------------------
GRU forward::

    gi = x [T*B, In] @ W_ih^T + b_ih         np.matmul over all steps, into the cache's gates
    per step (one compiled call, no Python between steps):
      linear_before_reset=True:   gh = h @ W_hh^T [B, 3H] (`_gemm`); `_gru_gates` (all three)
      linear_before_reset=False:  gh = h @ W_h{r,z}^T [B, 2H] (`_gemm`); `_gru_gates` r, z and
                                  rh = r h; then W_hn (r h) (`_gemm`); `_gru_gates` n and h'

GRU backward, per step in reverse: `_gru_step_backward` gives dgi_t, dgh_t and the direct part
dh' z of dh; then dh = dgh_t @ W_hh (`_gemm`) plus that part (linear_before_reset=False: first
d(rh) = da_n @ W_hn, then the r and z rows). After the loop, over all T*B rows, one product
each: dW_ih = dgi^T x, dW_hh = dgh^T h_prev (n rows against r h_prev when
linear_before_reset=False), the biases' sums, and d_x = dgi @ W_ih summed over directions.

The RNN is the same with one block: a = gi + h @ W_hh^T + b_hh, h' = tanh(a) or relu(a); its
backward da = dh' act', dh = da @ W_hh.

Padded steps (t >= lengths[b]) cost no pointwise work: the state passes through, the output
and the step's gradients are zeros; the padded steps of layer 0's x are zeroed once first
(padding is not data). The tanh and sigmoid are `kernels._util`'s vectorizing ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
from numba import njit

from kernels._blas import single_threaded_blas
from kernels._config import JIT
from kernels._util import as_type_of, sigmoid, tanh
from kernels.lstm import _contiguous, _gemm, _gemm_for, _run, _two_threads
from numpy_ref.contract import checks, recurrent, unchanged
from numpy_ref.contract.lstm import padding_mask, param_key, without_padding
from numpy_ref.gru import GRUCache, GRUDirectionCache
from numpy_ref.rnn import RNNCache, RNNDirectionCache

__all__ = ["gru_backward", "gru_forward", "rnn_backward", "rnn_forward"]


# --------------------------------------------------------------------------------------------
# GRU: one step's pointwise work, forward and backward


@njit(**JIT)
def _gru_rz(t, lengths, gi, gh, b_hh, h_in, rh):
    """r, z = sigmoid(gi + gh + b_hh) for the first 2H columns, into gi (in place), and
    rh = r h_in; gh [B, >= 2H]. Padded rows: left to `_gru_n`."""
    B, H = h_in.shape
    for b in range(B):
        if t >= lengths[b]:
            continue
        g, hh, hb, rb = gi[b], gh[b], h_in[b], rh[b]
        for j in range(H):
            r = sigmoid(g[j] + hh[j] + b_hh[j])
            g[j] = r
            g[H + j] = sigmoid(g[H + j] + hh[H + j] + b_hh[H + j])
            rb[j] = r * hb[j]


@njit(**JIT)
def _gru_n(t, lengths, lbr, gi, ghn, ghn_col, b_hh, h_in, h_out, gh_n, out, out_col):
    """n and h' (r, z already in gi): gh_n = ghn[:, ghn_col:+H] + b_hn (W_hn h, or W_hn (r h)
    when not lbr); n = tanh(gi_n + r gh_n) (lbr) or tanh(gi_n + gh_n); h_out = n + z (h - n);
    out[:, out_col:+H] = h_out. Padded rows: the state passes through, zeros elsewhere."""
    B, H = h_in.shape
    zero = as_type_of(0.0, h_in[0, 0])
    for b in range(B):
        if t >= lengths[b]:
            gi[b] = zero
            gh_n[b] = zero
            h_out[b] = h_in[b]
            out[b, out_col:out_col + H] = zero
            continue
        g, hh, hb, ho, gn = gi[b], ghn[b], h_in[b], h_out[b], gh_n[b]
        for j in range(H):
            m = hh[ghn_col + j] + b_hh[2 * H + j]
            gn[j] = m
            n = tanh(g[2 * H + j] + (g[j] * m if lbr else m))
            g[2 * H + j] = n
            ho[j] = n + g[H + j] * (hb[j] - n)
        out[b, out_col:out_col + H] = ho


@njit(**JIT)
def _gru_step_backward(t, lengths, lbr, d_out, out_col, dh, gates, h_prev, gh_n, d_gi, d_gh,
                       dh_part, d_an):
    """From dh' = d_out + dh (real rows): d_gi, the n block of d_gh (lbr: da_n r; else da_n,
    also into d_an for d(rh) = da_n W_hn), with lbr the r and z blocks too, and
    dh_part = dh' z. Padded rows: zeros, and dh_part = dh (carried)."""
    B, H = dh.shape
    zero = as_type_of(0.0, dh[0, 0])
    one = zero + 1
    for b in range(B):
        if t >= lengths[b]:
            d_gi[b] = zero
            d_gh[b] = zero
            d_an[b] = zero
            dh_part[b] = dh[b]
            continue
        g, hp, gn, dgi, dgh, dp = gates[b], h_prev[b], gh_n[b], d_gi[b], d_gh[b], dh_part[b]
        for j in range(H):
            dhn = d_out[b, out_col + j] + dh[b, j]
            r, z, n = g[j], g[H + j], g[2 * H + j]
            a_n = dhn * (one - z) * (one - n * n)
            dgi[2 * H + j] = a_n
            a_z = dhn * (hp[j] - n) * z * (one - z)
            dgi[H + j] = a_z
            dgh[H + j] = a_z
            dp[j] = dhn * z
            if lbr:
                dgh[2 * H + j] = a_n * r
                a_r = a_n * gn[j] * r * (one - r)
                dgi[j] = a_r
                dgh[j] = a_r
            else:
                dgh[2 * H + j] = a_n
                d_an[b, j] = a_n


@njit(**JIT)
def _gru_reset_backward(t, lengths, d_rh, gates, h_prev, d_gi, d_gh, dh_part, d_rz):
    """linear_before_reset=False, after d(rh) = da_n W_hn: dr = d(rh) h, dh_part += d(rh) r,
    the r row of d_gi and d_gh, and d_rz = [da_r, da_z] (contiguous, for dh += d_rz W_h{r,z})."""
    B, H = d_rh.shape
    zero = as_type_of(0.0, d_rh[0, 0])
    one = zero + 1
    for b in range(B):
        if t >= lengths[b]:
            d_rz[b] = zero
            continue
        g, hp, drh = gates[b], h_prev[b], d_rh[b]
        for j in range(H):
            r = g[j]
            a_r = drh[j] * hp[j] * r * (one - r)
            d_gi[b, j] = a_r
            d_gh[b, j] = a_r
            d_rz[b, j] = a_r
            d_rz[b, H + j] = d_gi[b, H + j]
            dh_part[b, j] += drh[j] * r


@njit(**JIT)
def _carry(t, lengths, mm, dh_part, dh):
    """dh = mm + dh_part on real rows, dh_part (the carried dh) on padded ones."""
    for b in range(dh.shape[0]):
        if t >= lengths[b]:
            dh[b] = dh_part[b]
        else:
            dh[b] = mm[b] + dh_part[b]


# --------------------------------------------------------------------------------------------
# GRU: the recurrence of one direction
#
# forward `arrays`: (gates [T, B, 3H] holding gi on entry, h_prev [T, B, H] with the first
# step's h0 set, gh_n [T, B, H], h_last [B, H], b_hh [3H], w_t [H, 3H] (lbr: W_hh^T; else
# W_h{r,z}^T [H, 2H]), w_n_t [H, H] (W_hn^T; [0, 0] with lbr), gh [B, 3H or 2H], rh [B, H],
# ghn [B, H]); backward `arrays`: (gates, h_prev, gh_n, w_hh [3H, H] (lbr) or W_h{r,z} [2H, H],
# w_n [H, H] (W_hn; [0, 0] with lbr), dh [B, H] (d_h_n[k] on entry, d_h0 on exit), d_gi, d_gh
# [T, B, 3H], dh_part, d_an, d_rh, mm [B, H], d_rz [B, 2H]).


@njit(**JIT)
def _check_gru(T, B, H, lengths, out, out_col, lbr, w_t, w_n, tensors):
    ok = lengths.shape[0] == B and out.shape[0] == T and out.shape[1] == B \
        and 0 <= out_col and out_col + H <= out.shape[2]
    for a in tensors:
        ok = ok and a.shape[0] == T and a.shape[1] == B
    ok = ok and (w_t.shape == (H, 3 * H) or w_t.shape == (3 * H, H) if lbr else
                 (w_t.shape == (H, 2 * H) or w_t.shape == (2 * H, H)) and w_n.shape == (H, H))
    if not ok:
        raise ValueError("gru steps: inconsistent array shapes")


@njit(**JIT, nogil=True)
def _gru_forward_steps(gemm, reverse, lengths, lbr, out, out_col, arrays):
    gates, h_prev, gh_n, h_last, b_hh, w_t, w_n_t, gh, rh, ghn = arrays
    T, B, H = h_prev.shape
    _check_gru(T, B, H, lengths, out, out_col, lbr, w_t, w_n_t, (gates, gh_n))
    for i in range(T):
        t = T - 1 - i if reverse else i
        h_in = h_prev[t]
        h_out = h_last if i == T - 1 else h_prev[t - 1 if reverse else t + 1]
        _gemm(gemm, h_in, w_t, gh)
        _gru_rz(t, lengths, gates[t], gh, b_hh, h_in, rh)
        if lbr:
            _gru_n(t, lengths, lbr, gates[t], gh, 2 * H, b_hh, h_in, h_out, gh_n[t], out[t],
                   out_col)
        else:
            _gemm(gemm, rh, w_n_t, ghn)
            _gru_n(t, lengths, lbr, gates[t], ghn, 0, b_hh, h_in, h_out, gh_n[t], out[t],
                   out_col)


@njit(**JIT, nogil=True)
def _gru_backward_steps(gemm, reverse, lengths, lbr, d_out, out_col, arrays):
    gates, h_prev, gh_n, w, w_n, dh, d_gi, d_gh, dh_part, d_an, d_rh, mm, d_rz = arrays
    T, B, H = h_prev.shape
    _check_gru(T, B, H, lengths, d_out, out_col, lbr, w, w_n, (gates, gh_n, d_gi, d_gh))
    for i in range(T):
        t = i if reverse else T - 1 - i
        _gru_step_backward(t, lengths, lbr, d_out[t], out_col, dh, gates[t], h_prev[t],
                           gh_n[t], d_gi[t], d_gh[t], dh_part, d_an)
        if lbr:
            _gemm(gemm, d_gh[t], w, mm)
        else:
            _gemm(gemm, d_an, w_n, d_rh)  # a_n = gi_n + (r h) W_hn^T + b_hn
            _gru_reset_backward(t, lengths, d_rh, gates[t], h_prev[t], d_gi[t], d_gh[t],
                                dh_part, d_rz)
            _gemm(gemm, d_rz, w, mm)
        _carry(t, lengths, mm, dh_part, dh)


# --------------------------------------------------------------------------------------------
# RNN: the recurrence of one direction
#
# forward `arrays`: (h_new [T, B, H] holding gi on entry, h_prev [T, B, H] with h0 set, h_last,
# b_hh [H], w_hh_t [H, H], hh [B, H]); backward: (h_new, w_hh [H, H], dh, da [T, B, H], mm)


@njit(**JIT)
def _rnn_cell(t, lengths, relu, a, hh, b_hh, h_in, h_out, out, out_col):
    B, H = h_in.shape
    zero = as_type_of(0.0, h_in[0, 0])
    for b in range(B):
        if t >= lengths[b]:
            a[b] = zero
            h_out[b] = h_in[b]
            out[b, out_col:out_col + H] = zero
            continue
        ab, hb, ho = a[b], hh[b], h_out[b]
        for j in range(H):
            s = ab[j] + (hb[j] + b_hh[j])
            y = max(s, zero) if relu else tanh(s)
            if relu and s != s:  # NaN propagates, as torch's relu
                y = s
            ab[j] = y
            ho[j] = y
        out[b, out_col:out_col + H] = ho


@njit(**JIT)
def _rnn_cell_backward(t, lengths, relu, d_out, out_col, dh, h_new, da):
    B, H = dh.shape
    zero = as_type_of(0.0, dh[0, 0])
    one = zero + 1
    for b in range(B):
        if t >= lengths[b]:
            da[b] = zero
            continue
        y, d = h_new[b], da[b]
        for j in range(H):
            g = d_out[b, out_col + j] + dh[b, j]
            if relu:
                d[j] = g if y[j] > zero else zero
            else:
                d[j] = g * (one - y[j] * y[j])


@njit(**JIT)
def _check_rnn(T, B, H, lengths, out, out_col, w, tensors):
    ok = lengths.shape[0] == B and out.shape[0] == T and out.shape[1] == B \
        and 0 <= out_col and out_col + H <= out.shape[2] and w.shape == (H, H)
    for a in tensors:
        ok = ok and a.shape == (T, B, H)
    if not ok:
        raise ValueError("rnn steps: inconsistent array shapes")


@njit(**JIT, nogil=True)
def _rnn_forward_steps(gemm, reverse, lengths, relu, out, out_col, arrays):
    h_new, h_prev, h_last, b_hh, w_hh_t, hh = arrays
    T, B, H = h_prev.shape
    _check_rnn(T, B, H, lengths, out, out_col, w_hh_t, (h_new,))
    for i in range(T):
        t = T - 1 - i if reverse else i
        h_in = h_prev[t]
        h_out = h_last if i == T - 1 else h_prev[t - 1 if reverse else t + 1]
        _gemm(gemm, h_in, w_hh_t, hh)
        _rnn_cell(t, lengths, relu, h_new[t], hh, b_hh, h_in, h_out, out[t], out_col)


@njit(**JIT, nogil=True)
def _rnn_backward_steps(gemm, reverse, lengths, relu, d_out, out_col, arrays):
    h_new, w_hh, dh, da, mm = arrays
    T, B, H = h_new.shape
    _check_rnn(T, B, H, lengths, d_out, out_col, w_hh, (da,))
    for i in range(T):
        t = i if reverse else T - 1 - i
        _rnn_cell_backward(t, lengths, relu, d_out[t], out_col, dh, h_new[t], da[t])
        _gemm(gemm, da[t], w_hh, mm)
        for b in range(B):  # dh = da W_hh on real rows; padded rows carry dh as it is
            if t < lengths[b]:
                dh[b] = mm[b]


# --------------------------------------------------------------------------------------------
# the layer stack (validation as numpy_ref; products over all steps in NumPy)


def _lengths(a: recurrent.StackArgs) -> np.ndarray:
    T, B = a.xt.shape[:2]
    return np.full(B, T, np.int64) if a.lengths is None else a.lengths


def _biases(p: Mapping[str, np.ndarray], G: int, H: int, dtype) -> tuple[np.ndarray | None,
                                                                          np.ndarray]:
    """(b_ih or None, b_hh or zeros [G*H])."""
    if "bias_ih" not in p:
        return None, np.zeros(G * H, dtype)
    return p["bias_ih"], _contiguous(p["bias_hh"])


def _input_products(x2: np.ndarray, p: Mapping[str, np.ndarray], G: int, T: int, B: int,
                    H: int) -> np.ndarray:
    """x W_ih^T + b_ih over all T*B rows -> [T, B, G*H] (C-contiguous)."""
    gi = x2 @ p["weight_ih"].T
    if "bias_ih" in p:
        gi += p["bias_ih"]
    return gi.reshape(T, B, G * H)


def _stack_forward(a: recurrent.StackArgs, num_layers: int, G: int, direction):
    """Each layer: per direction ``direction(x2, p, h0, h_last, out, out_col, reverse)`` ->
    its cache; the directions on two threads when worth it. Returns (output time-major, h_n,
    caches, mask)."""
    T, B, _ = a.xt.shape
    H, D, dtype = a.hidden_size, a.directions, a.xt.dtype
    mask = padding_mask(a.lengths, T)
    layer_input = _contiguous(without_padding(a.xt, mask))
    h_n = np.empty((num_layers * D, B, H), dtype)
    caches: list = []
    two = _two_threads(D, T * B * G * H * H)
    with single_threaded_blas() if two else contextlib.nullcontext():
        for layer in range(num_layers):
            x2 = layer_input.reshape(T * B, -1)
            out = np.empty((T, B, D * H), dtype)
            slots: list = [None] * D

            def run(d, x2=x2, out=out, slots=slots, layer=layer):
                k = layer * D + d
                slots[d] = direction(x2, recurrent.layer_params(a.params, layer, d), a.h0[k],
                                     h_n[k], out, d * H, d == 1)
            _run([partial(run, d) for d in range(D)], two)
            caches += [c._replace(x=layer_input) for c in slots]
            layer_input = out
    return layer_input, h_n, caches, mask


def _stack_backward(d_out, d_h_n, cache, G: int, direction):
    """The layers in reverse: per direction ``direction(d_out, out_col, dh, dcache, p,
    lengths)`` -> (d_gi [T*B, G*H], grads); d_x = sum over directions of d_gi W_ih."""
    L, D, H = cache.num_layers, 2 if cache.bidirectional else 1, cache.hidden_size
    T, B, _ = cache.directions[0].x.shape
    dtype = d_out.dtype
    lengths = (np.full(B, T, np.int64) if cache.mask is None
               else cache.mask[:, :, 0].sum(axis=0, dtype=np.int64))
    d_layer_out = _contiguous(d_out)
    d_h0 = np.array(d_h_n, dtype, order="C")
    grads: dict[str, np.ndarray] = {}
    two = _two_threads(D, T * B * G * H * H)
    with single_threaded_blas() if two else contextlib.nullcontext():
        for layer in range(L - 1, -1, -1):
            slots: list = [None] * D

            def run(d, slots=slots, layer=layer, d_layer_out=d_layer_out):
                k = layer * D + d
                slots[d] = direction(d_layer_out, d * H, d_h0[k], cache.directions[k],
                                     recurrent.layer_params(cache.params, layer, d), lengths)
            _run([partial(run, d) for d in range(D)], two)
            d_x = None
            for d in range(D):
                d_gi, g = slots[d]
                dx = d_gi @ cache.params[param_key("weight_ih", layer, d)]
                d_x = dx if d_x is None else d_x + dx
                grads.update({param_key(kind, layer, d): v for kind, v in g.items()})
            d_layer_out = _contiguous(d_x.reshape(T, B, -1))
    return d_layer_out, {k: grads[k] for k in cache.params}, d_h0


def _gru_direction_forward(x2, p, h0, h_last, out, out_col, reverse, lbr, gemm, lengths):
    T, B = out.shape[:2]
    H = h0.shape[1]
    dtype = out.dtype
    gates = _input_products(x2, p, 3, T, B, H)
    _, b_hh = _biases(p, 3, H, dtype)
    h_prev = np.empty((T, B, H), dtype)
    h_prev[T - 1 if reverse else 0] = h0
    gh_n = np.empty((T, B, H), dtype)
    w = p["weight_hh"]
    w_t = _contiguous(w.T) if lbr else _contiguous(w[:2 * H].T)
    w_n_t = np.empty((0, 0), dtype) if lbr else _contiguous(w[2 * H:].T)
    arrays = (gates, h_prev, gh_n, h_last, b_hh, w_t, w_n_t,
              np.empty((B, 3 * H if lbr else 2 * H), dtype), np.empty((B, H), dtype),
              np.empty((B, H), dtype))
    _gru_forward_steps(gemm, reverse, lengths, lbr, out, out_col, arrays)
    return GRUDirectionCache(None, h_prev, gates, gh_n, reverse)


def _gru_direction_backward(d_out, out_col, dh, dcache, p, lengths, lbr, gemm):
    _, h_prev, gates, gh_n, reverse = dcache
    T, B, H = h_prev.shape
    dtype = d_out.dtype
    w = p["weight_hh"]
    d_gi = np.empty((T, B, 3 * H), dtype)
    d_gh = np.empty((T, B, 3 * H), dtype)
    arrays = (_contiguous(gates), _contiguous(h_prev), _contiguous(gh_n),
              _contiguous(w) if lbr else _contiguous(w[:2 * H]),
              np.empty((0, 0), dtype) if lbr else _contiguous(w[2 * H:]), dh, d_gi, d_gh,
              *(np.empty((B, H), dtype) for _ in range(4)), np.empty((B, 2 * H), dtype))
    _gru_backward_steps(gemm, reverse, lengths, lbr, d_out, out_col, arrays)
    N = T * B
    x, hp, dgi, dgh = dcache.x.reshape(N, -1), h_prev.reshape(N, H), d_gi.reshape(N, -1), \
        d_gh.reshape(N, -1)
    if lbr:
        d_w_hh = dgh.T @ hp
    else:
        d_w_hh = np.concatenate([dgh[:, :2 * H].T @ hp,
                                 dgh[:, 2 * H:].T @ (gates[:, :, :H].reshape(N, H) * hp)])
    g = {"weight_ih": dgi.T @ x, "weight_hh": d_w_hh}
    if "bias_ih" in p:
        g["bias_ih"], g["bias_hh"] = dgi.sum(axis=0), dgh.sum(axis=0)
    return dgi, g


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
    """Numba `numpy_ref.gru_forward`: same arguments, checks, shapes, results and cache.

    x [T, B, I] (or [B, T, I]); params of `torch.nn.GRU`; h0 [L*D, B, H] or None; lengths [B]
    or None. Returns output [T, B, D*H] (or [B, T, D*H]), h_n [L*D, B, H] and numpy_ref's
    `GRUCache`. The math: the `numpy_ref.gru` module docstring.
    """
    if not isinstance(linear_before_reset, (bool, np.bool_)):
        raise TypeError(f"linear_before_reset: expected a bool, got {linear_before_reset!r}")
    lbr = bool(linear_before_reset)
    a = recurrent.stack_inputs(x, params, num_layers, bidirectional, batch_first, h0, lengths,
                               3, f", linear_before_reset={lbr}", dropout)
    gemm, lens = _gemm_for(a.xt.dtype), _lengths(a)
    out, h_n, caches, mask = _stack_forward(
        a, num_layers, 3,
        partial(_gru_direction_forward, lbr=lbr, gemm=gemm, lengths=lens))
    output = out.transpose(1, 0, 2) if batch_first else out
    fingerprints = recurrent.stack_fingerprints("gru_forward", "gru_backward", x, caches[0].x,
                                                a.params)
    return output, h_n, GRUCache(tuple(caches), a.params, mask, num_layers,
                                 bool(bidirectional), bool(batch_first), a.hidden_size, lbr,
                                 fingerprints)


def gru_backward(
    d_output: np.ndarray, cache: GRUCache, *, d_h_n: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Numba `numpy_ref.gru_backward`: d_output like output, d_h_n [L*D, B, H] or None ->
    (d_x like x, d_params, d_h0 [L*D, B, H]). Either backend's cache."""
    checks.cache_of(cache, GRUCache, "gru_forward")
    unchanged.check(cache.fingerprints)
    d_out, d_h_n = recurrent.stack_cotangents(d_output, d_h_n, cache)
    gemm = _gemm_for(d_out.dtype)
    d_x, d_params, d_h0 = _stack_backward(
        d_out, d_h_n, cache, 3, partial(_gru_direction_backward,
                                        lbr=cache.linear_before_reset, gemm=gemm))
    return (d_x.transpose(1, 0, 2) if cache.batch_first else d_x), d_params, d_h0


def _rnn_direction_forward(x2, p, h0, h_last, out, out_col, reverse, relu, gemm, lengths):
    T, B = out.shape[:2]
    H = h0.shape[1]
    dtype = out.dtype
    h_new = _input_products(x2, p, 1, T, B, H)
    _, b_hh = _biases(p, 1, H, dtype)
    h_prev = np.empty((T, B, H), dtype)
    h_prev[T - 1 if reverse else 0] = h0
    arrays = (h_new, h_prev, h_last, b_hh, _contiguous(p["weight_hh"].T),
              np.empty((B, H), dtype))
    _rnn_forward_steps(gemm, reverse, lengths, relu, out, out_col, arrays)
    return RNNDirectionCache(None, h_prev, h_new, reverse)


def _rnn_direction_backward(d_out, out_col, dh, dcache, p, lengths, relu, gemm):
    _, h_prev, h_new, reverse = dcache
    T, B, H = h_prev.shape
    da = np.empty((T, B, H), d_out.dtype)
    arrays = (_contiguous(h_new), _contiguous(p["weight_hh"]), dh, da,
              np.empty((B, H), d_out.dtype))
    _rnn_backward_steps(gemm, reverse, lengths, relu, d_out, out_col, arrays)
    N = T * B
    da2 = da.reshape(N, H)
    g = {"weight_ih": da2.T @ dcache.x.reshape(N, -1), "weight_hh": da2.T @ h_prev.reshape(N, H)}
    if "bias_ih" in p:
        g["bias_ih"] = da2.sum(axis=0)
        g["bias_hh"] = g["bias_ih"].copy()
    return da2, g


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
    """Numba `numpy_ref.rnn_forward`: same arguments, checks, shapes, results and cache.

    Per step ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)`` (the `numpy_ref.rnn`
    module docstring). Returns output, h_n [L*D, B, H] and numpy_ref's `RNNCache`.
    """
    act = recurrent.nonlinearity_of(nonlinearity)
    a = recurrent.stack_inputs(x, params, num_layers, bidirectional, batch_first, h0, lengths,
                               1, f", nonlinearity={act!r}", dropout)
    gemm, lens = _gemm_for(a.xt.dtype), _lengths(a)
    out, h_n, caches, mask = _stack_forward(
        a, num_layers, 1,
        partial(_rnn_direction_forward, relu=act == "relu", gemm=gemm, lengths=lens))
    output = out.transpose(1, 0, 2) if batch_first else out
    fingerprints = recurrent.stack_fingerprints("rnn_forward", "rnn_backward", x, caches[0].x,
                                                a.params)
    return output, h_n, RNNCache(tuple(caches), a.params, mask, num_layers,
                                 bool(bidirectional), bool(batch_first), a.hidden_size, act,
                                 fingerprints)


def rnn_backward(
    d_output: np.ndarray, cache: RNNCache, *, d_h_n: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Numba `numpy_ref.rnn_backward`: d_output like output, d_h_n [L*D, B, H] or None ->
    (d_x like x, d_params, d_h0 [L*D, B, H]). Either backend's cache."""
    checks.cache_of(cache, RNNCache, "rnn_forward")
    unchanged.check(cache.fingerprints)
    d_out, d_h_n = recurrent.stack_cotangents(d_output, d_h_n, cache)
    gemm = _gemm_for(d_out.dtype)
    d_x, d_params, d_h0 = _stack_backward(
        d_out, d_h_n, cache, 1, partial(_rnn_direction_backward,
                                        relu=cache.nonlinearity == "relu", gemm=gemm))
    return (d_x.transpose(1, 0, 2) if cache.batch_first else d_x), d_params, d_h0
