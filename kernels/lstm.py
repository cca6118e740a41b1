r"""Numba LSTM: the matrix products in BLAS, everything between them in one jitted pass per step.

Same public functions, argument names, validation, results and cache as `numpy_ref.lstm` (read
its docstring for the math, the shapes and the masking rules). The cache is numpy_ref's own
`LSTMCache`, so a cache from either backend works with either backward; `lstm_forward` notes
the one difference in what it holds.

What runs where, per layer and direction
----------------------------------------
Forward::

    gates = x [T*B, In] @ W_ih^T                   one GEMM over all steps, written where
                                                   the cache's gates go           [T, B, 4H]
    for each step t, in this direction's order:
        hw = h_{t-1} @ W_hh^T                      BLAS, into a reused buffer     [B, 4H]
        _cell_forward_v2: a = gates_t + hw + b_ih + b_hh -> gates_t = i, f, g, o (in place);
            c_t = f c_{t-1} + i g; tanh(c_t); r_t = o tanh(c_t); the length mask; writes
            c_t and h_t where the next step reads them, and the output            one pass
        (proj_size) h_t = r_t @ W_hr^T in BLAS, then _emit_hidden applies the mask

Backward, walking the steps in reverse::

        _cell_backward: dL/dr = d_out_t + dL/dh_t (masked) -> dL/dc, da_t = dL/da [B, 4H],
            dL/dc_{t-1}; (proj_size: _hidden_backward masks first, dL/dr = dL/dh @ W_hr)
        dL/dh_{t-1} = da_t @ W_hh                  BLAS
    then over all T*B rows at once, with both directions side by side in da [T*B, D*4H]:
        d_W_ih = da^T x,  d_b = sum(da),  d_x = da @ [W_ih; W_ih_reverse]     one product each
        d_W_hh = da_d^T h_prev,  d_W_hr = dh_d^T r                          one per direction

so a bidirectional layer's d_x is one GEMM with K = 8H rather than two GEMMs and a sum.
Padded steps (t >= lengths[b]) cost no pointwise work: the kernels pass the state through and
write zeros. The GEMMs still run over all B rows. Padding is not data: when some step is padded,
layer 0's x is copied once with its padded steps set to 0 (`numpy_ref.contract.lstm`'s
`without_padding`, as numpy_ref does), so NaN or inf there reaches no product (d_W_ih = da^T x
included). No step allocates: every per-step array is a view of a cache array or a buffer
allocated once per direction.

Threads
-------
The step kernels are serial (no prange): between two multi-threaded OpenBLAS calls, Numba's
OpenMP workers and OpenBLAS's workers each spin-wait for work and take the cores from one
another; a parallel step kernel made a step 30x slower (8.6 ms instead of 0.3 ms at
(B, H) = (64, 256)). The directions run one after the other. Running the two directions of a
layer on two threads with single-threaded BLAS was 1.1-1.2x faster at (T, B, I, H) =
(128, 64, 256, 256), but numpy's BLAS has no per-call thread count: it meant lowering
OpenBLAS's process-wide thread count during the forward, a global side effect on every other
thread of the caller's process, which this package does not impose.

Kernel versions
---------------
- ``_cell_forward_v1``: the gate math with ``np.exp`` / ``np.tanh``, one libm call per element
  and gate. Numba has no vector math library here (no SVML), so the loop stays scalar: about
  1.2 ms per step at (B, H) = (64, 256), five times the step's GEMM. Kept as the plain
  statement of the cell and as the reference v2's activations are tested against.
- ``_cell_forward_v2``: the same loop with `sigmoid` / `tanh` (`kernels._util`), built on
  `exp_nonpositive` / `expm1_nonpositive`: a range reduction ``exp(y) = 2^n exp(r)``,
  ``|r| <= ln2/2``, a Taylor polynomial and 2^n built in the exponent bits. Every operation
  has a SIMD form, so LLVM vectorizes the loop (16 float32 lanes with AVX-512): about 50 us
  per step at (64, 256), 20x faster than v1. The public functions use v2. (Divisions are
  ``np.divide``: Python's ``/`` checks for a zero divisor and raises, a branch that stops
  vectorization.)
- ``_cell_backward``, ``_hidden_backward``, ``_emit_hidden``: one version each; no
  transcendental functions (the backward reads the saved gates and tanh(c)).

Numerics: the sigmoid is ``1/(1+e)`` or ``e/(1+e)`` with ``e = exp(-|x|)`` and the tanh is
``-m/(2+m)`` with ``m = expm1(-2|x|)``: no overflow for any input, infinities give the limits,
NaN propagates. Measured against long-double references: float32 sigmoid and tanh within
2.5 ulp everywhere; float64 tanh within 2.5 ulp, sigmoid within 8 ulp for |x| <= 20 (2e-15
relative), more only on results under 1e-9 (1e-14 relative near 1e-300). The float64 error
comes from the reduction's ``n ln2``: its Cody-Waite split (exact without an FMA, so the
NUMBA_DISABLE_JIT run is as accurate) is folded back by the ``reassoc`` fast-math flag when
compiled; the error is far inside the float64 policy (1e-7). Vector loops stay in the data's
dtype.

Every jitted kernel checks that the arrays it is handed agree in shape and that its column
offsets fit (a `ValueError` otherwise), so even a direct call with inconsistent arrays cannot
index out of bounds; the public wrappers validate first, with numpy_ref's own functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numba import njit

from kernels._config import JIT
from kernels._util import as_type_of, sigmoid, tanh
from numpy_ref.contract.lstm import (
    padding_mask,
    param_key,
    validate_lstm_cotangents,
    validate_lstm_inputs,
    without_padding,
)
from numpy_ref.lstm import LSTMCache, LSTMDirectionCache

# --------------------------------------------------------------------------------------------
# the libm sigmoid of `_cell_forward_v1` (v2 uses `kernels._util.sigmoid` / `tanh`)


@njit(**JIT)
def _sigmoid_libm(x):
    """The sigmoid of numpy_ref (np.exp of -|x|), one scalar libm call."""
    one = as_type_of(1.0, x)
    e = np.exp(-abs(x))
    return (one if x >= 0 else e) / (one + e)


# --------------------------------------------------------------------------------------------
# one step of one direction, forward
#
# Arrays are per step: row b of every [B, ...] argument is batch row b at step t. On entry
# gates holds the step's input projection x_t W_ih^T (the layer's GEMM wrote it there); the
# kernel adds the bias and h_{t-1} W_hh^T and replaces it with the activated gates. out holds
# the layer output of every direction (this one's Ho columns start at `out_col`). A row is real
# when t < lengths[b]; a padded row keeps its state, outputs 0, and gets zero gates and tanh(c)
# (finite values that the backward multiplies by its zero cotangent).


@njit(**JIT)
def _check_forward_step(lengths, bias, hw, c_in, h_in, gates, tanh_c, c_out, h_out, out, out_col,
                        r, project):
    B, H = c_in.shape
    Ho = h_in.shape[1]
    ok = (lengths.shape[0] == B and bias.shape[0] == 4 * H
          and hw.shape == (B, 4 * H) and gates.shape == (B, 4 * H) and tanh_c.shape == (B, H)
          and c_out.shape == (B, H) and h_in.shape[0] == B and h_out.shape == (B, Ho)
          and out.shape[0] == B and 0 <= out_col and out_col + Ho <= out.shape[1])
    ok = ok and (r.shape == (B, H) if project else Ho == H)
    if not ok:
        raise ValueError("_cell_forward: inconsistent array shapes")


@njit(**JIT)
def _cell_forward_v1(t, lengths, bias, hw, c_in, h_in, gates, tanh_c, c_out, h_out, out, out_col,
                     r, project):
    """a = gates + bias + hw -> gates (i, f, g, o), c_out = f c_in + i g, tanh_c, and either
    r = o tanh(c) (project) or h_out and out[:, out_col:out_col+H] (libm activations).

    lengths [B] int64; bias [4H]; hw [B, 4H]; gates [B, 4H]; c_in, c_out, tanh_c, r [B, H];
    h_in, h_out [B, Ho]; out [B, D*Ho].
    """
    _check_forward_step(lengths, bias, hw, c_in, h_in, gates, tanh_c, c_out, h_out, out, out_col,
                        r, project)
    B, H = c_in.shape
    for b in range(B):
        if t >= lengths[b]:
            _padded_forward_row(b, c_in, h_in, gates, tanh_c, c_out, h_out, out, out_col, r,
                                project)
            continue
        a, hw_row = gates[b], hw[b]
        for j in range(H):
            i = _sigmoid_libm(a[j] + hw_row[j] + bias[j])
            f = _sigmoid_libm(a[H + j] + hw_row[H + j] + bias[H + j])
            g = np.tanh(a[2 * H + j] + hw_row[2 * H + j] + bias[2 * H + j])
            o = _sigmoid_libm(a[3 * H + j] + hw_row[3 * H + j] + bias[3 * H + j])
            c = f * c_in[b, j] + i * g
            tc = np.tanh(c)
            a[j], a[H + j], a[2 * H + j], a[3 * H + j] = i, f, g, o
            c_out[b, j] = c
            tanh_c[b, j] = tc
            if project:
                r[b, j] = o * tc
            else:
                h_out[b, j] = o * tc
                out[b, out_col + j] = o * tc


@njit(**JIT)
def _cell_forward_v2(t, lengths, bias, hw, c_in, h_in, gates, tanh_c, c_out, h_out, out, out_col,
                     r, project):
    """As `_cell_forward_v1`, with the vectorizing `kernels._util.sigmoid` / `tanh`. Each gate
    is read through its own slice so that every inner-loop index is the loop counter itself."""
    _check_forward_step(lengths, bias, hw, c_in, h_in, gates, tanh_c, c_out, h_out, out, out_col,
                        r, project)
    B, H = c_in.shape
    bi, bf, bg, bo = bias[:H], bias[H:2 * H], bias[2 * H:3 * H], bias[3 * H:4 * H]
    for b in range(B):
        if t >= lengths[b]:
            _padded_forward_row(b, c_in, h_in, gates, tanh_c, c_out, h_out, out, out_col, r,
                                project)
            continue
        gr, hr = gates[b], hw[b]
        gi, gf, gg, go = gr[:H], gr[H:2 * H], gr[2 * H:3 * H], gr[3 * H:]
        hi, hf, hg, ho = hr[:H], hr[H:2 * H], hr[2 * H:3 * H], hr[3 * H:]
        cp, cn, tcr = c_in[b], c_out[b], tanh_c[b]
        dest = r[b] if project else h_out[b]
        for j in range(H):
            i = sigmoid(gi[j] + hi[j] + bi[j])
            f = sigmoid(gf[j] + hf[j] + bf[j])
            g = tanh(gg[j] + hg[j] + bg[j])
            o = sigmoid(go[j] + ho[j] + bo[j])
            c = f * cp[j] + i * g
            tc = tanh(c)
            gi[j], gf[j], gg[j], go[j] = i, f, g, o
            cn[j] = c
            tcr[j] = tc
            dest[j] = o * tc
        if not project:
            out[b, out_col:out_col + H] = dest


@njit(**JIT)
def _padded_forward_row(b, c_in, h_in, gates, tanh_c, c_out, h_out, out, out_col, r, project):
    """Row b is past its length: the state passes through, the output is 0."""
    zero = as_type_of(0.0, c_in[0, 0])
    c_out[b] = c_in[b]
    gates[b] = zero
    tanh_c[b] = zero
    if project:
        r[b] = zero  # so h_new = r W_hr^T is 0 too; `_emit_hidden` keeps h_in
    else:
        h_out[b] = h_in[b]
        out[b, out_col:out_col + h_in.shape[1]] = zero


@njit(**JIT)
def _emit_hidden(t, lengths, h_new, h_in, h_out, out, out_col):
    """proj_size: h_out = h_new (real rows) or h_in (padded), out[:, out_col:+P] = h_new or 0.

    h_new, h_in, h_out [B, P]; out [B, D*P]."""
    B, P = h_in.shape
    if not (lengths.shape[0] == B and h_new.shape == (B, P) and h_out.shape == (B, P)
            and out.shape[0] == B and 0 <= out_col and out_col + P <= out.shape[1]):
        raise ValueError("_emit_hidden: inconsistent array shapes")
    for b in range(B):
        if t < lengths[b]:
            h_out[b] = h_new[b]
            out[b, out_col:out_col + P] = h_new[b]
        else:
            h_out[b] = h_in[b]
            out[b, out_col:out_col + P] = as_type_of(0.0, h_in[0, 0])


# --------------------------------------------------------------------------------------------
# one step of one direction, backward
#
# The carried dL/dh_t is held in two parts: dh_mm = da_{t+1} @ W_hh (the BLAS product, written
# over all rows) and dh_keep, what padded rows carry past the steps they skip (in the forward,
# h_t = h_{t-1} there). A padded row has da = 0, so its dh_mm is 0 on the next step and the
# carried value is always dh_mm + dh_keep.


@njit(**JIT)
def _check_backward_step(lengths, d_out, out_col, dh_mm, dh_keep, d_r, dc, gates, c_prev, tanh_c,
                         da, da_col, project):
    B, H = dc.shape
    Ho = dh_mm.shape[1]
    ok = (lengths.shape[0] == B and d_out.shape[0] == B and 0 <= out_col
          and out_col + Ho <= d_out.shape[1] and dh_keep.shape == (B, Ho)
          and dh_mm.shape[0] == B and gates.shape == (B, 4 * H) and c_prev.shape == (B, H)
          and tanh_c.shape == (B, H) and da.shape[0] == B and 0 <= da_col
          and da_col + 4 * H <= da.shape[1])
    ok = ok and (d_r.shape == (B, H) if project else Ho == H)
    if not ok:
        raise ValueError("_cell_backward: inconsistent array shapes")


@njit(**JIT)
def _cell_backward(t, lengths, d_out, out_col, dh_mm, dh_keep, d_r, dc, gates, c_prev, tanh_c, da,
                   da_col, project):
    """Undo one `_cell_forward` step: writes da[:, da_col:da_col+4H], updates dc (dL/dc, in
    place, to dL/dc_{t-1}) and dh_keep.

    dL/dr is d_out[:, out_col:+H] + dh_mm + dh_keep on real rows, or d_r when `project` (then
    `_hidden_backward` has done the masking). lengths [B]; d_out [B, D*Ho]; dh_mm, dh_keep
    [B, Ho]; d_r, dc, c_prev, tanh_c [B, H] (c_prev: c_{t-1}); gates [B, 4H]; da [B, D*4H].
    """
    _check_backward_step(lengths, d_out, out_col, dh_mm, dh_keep, d_r, dc, gates, c_prev, tanh_c,
                         da, da_col, project)
    B, H = dc.shape
    for b in range(B):
        zero = as_type_of(0.0, dc[0, 0])
        one = as_type_of(1.0, zero)
        dar = da[b, da_col:da_col + 4 * H]
        if t >= lengths[b]:  # h_t = h_{t-1}, c_t = c_{t-1}: pass the cotangents through
            dar[:] = zero
            if not project:
                keep, dmr = dh_keep[b], dh_mm[b]
                for j in range(H):
                    keep[j] += dmr[j]
            continue
        gr = gates[b]
        gi, gf, gg, go = gr[:H], gr[H:2 * H], gr[2 * H:3 * H], gr[3 * H:]
        dai, daf, dag, dao = dar[:H], dar[H:2 * H], dar[2 * H:3 * H], dar[3 * H:]
        cp, tcr, dcr = c_prev[b], tanh_c[b], dc[b]
        if project:
            drr = d_r[b]
        else:  # out_t = h_t = r_t on a real step; dh_keep's row serves as dL/dr
            drr, dor, dmr = dh_keep[b], d_out[b, out_col:out_col + H], dh_mm[b]
            for j in range(H):
                drr[j] = dor[j] + dmr[j] + drr[j]
        for j in range(H):
            i, f, g, o = gi[j], gf[j], gg[j], go[j]
            tc = tcr[j]
            dr = drr[j]
            d_c = dcr[j] + dr * o * (one - tc * tc)  # r = o * tanh(c)
            dai[j] = d_c * g * (i - i * i)  # c = f * c_prev + i * g, i = sigmoid(a_i)
            daf[j] = d_c * cp[j] * (f - f * f)
            dag[j] = d_c * i * (one - g * g)  # g = tanh(a_g)
            dao[j] = dr * tc * (o - o * o)
            dcr[j] = d_c * f
        if not project:
            drr[:] = zero  # dh_keep: a real row carries nothing past this step


@njit(**JIT)
def _hidden_backward(t, lengths, d_out, out_col, dh_mm, dh_keep, d_h_new):
    """proj_size: d_h_new = d_out[:, out_col:+P] + dh_mm + dh_keep on real rows (then
    dh_keep = 0), 0 on padded rows (then dh_keep += dh_mm). d_h_new, dh_mm, dh_keep [B, P]."""
    B, P = dh_keep.shape
    if not (lengths.shape[0] == B and d_out.shape[0] == B and 0 <= out_col
            and out_col + P <= d_out.shape[1] and dh_mm.shape == (B, P)
            and d_h_new.shape == (B, P)):
        raise ValueError("_hidden_backward: inconsistent array shapes")
    for b in range(B):
        zero = as_type_of(0.0, dh_keep[0, 0])
        dnr, keep, dmr = d_h_new[b], dh_keep[b], dh_mm[b]
        if t < lengths[b]:
            dor = d_out[b, out_col:out_col + P]
            for j in range(P):
                dnr[j] = dor[j] + dmr[j] + keep[j]
            keep[:] = zero
        else:
            dnr[:] = zero
            for j in range(P):
                keep[j] += dmr[j]


# --------------------------------------------------------------------------------------------
# public wrappers: validate (as numpy_ref), allocate, run the step loops between BLAS products


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
    """Numba `numpy_ref.lstm_forward`: same arguments, checks, shapes, results and cache.

    Parameters
    ----------
    x : [T, B, I] (or [B, T, I] with ``batch_first``), float32 or float64.
    params : `torch.nn.LSTM.state_dict()` names and shapes, the dtype of x.
    h0 : [L*D, B, Ho], c0 : [L*D, B, H], or both None (zeros).
    lengths : integer [B] in 1..T, or None.
    dropout : only 0 (as numpy_ref).

    Returns
    -------
    output [T, B, D*Ho] (or [B, T, D*Ho]), (h_n [L*D, B, Ho], c_n [L*D, B, H]), cache.

    The cache is a `numpy_ref.lstm.LSTMCache` with the same fields and meaning, and each
    direction's x is C-contiguous (layer 0's a time-major copy when x was not, or when padded
    steps were zeroed). One difference: at padded steps (t >= lengths[b]) its gates and tanh_c
    hold zeros, where numpy_ref holds the gates computed from the zeroed input and the carried
    state; both backwards give padded rows an exact zero da, so either backward gives the same
    gradients from either cache.
    """
    xt, p, H, Ho, D, h0, c0, lengths = validate_lstm_inputs(
        x, params, num_layers, bidirectional, batch_first, h0, c0, lengths, dropout)
    T, B, _ = xt.shape
    dtype = xt.dtype
    mask = padding_mask(lengths, T)  # [T, B, 1] or None
    if lengths is None:
        lengths = np.full(B, T, np.int64)
    # [T, B, In]; padded steps are 0 (padding is not data: it reaches no product, d_W_ih included)
    layer_input = np.ascontiguousarray(without_padding(xt, mask))
    h_n = np.empty((num_layers * D, B, Ho), dtype)
    c_n = np.empty((num_layers * D, B, H), dtype)
    caches: list[LSTMDirectionCache] = []
    for layer in range(num_layers):
        out = np.empty((T, B, D * Ho), dtype)
        for d in range(D):
            k = layer * D + d
            caches.append(_direction_forward(
                layer_input, d, out, h0[k], c0[k], h_n[k], c_n[k], lengths,
                p[param_key("weight_ih", layer, d)], p[param_key("weight_hh", layer, d)],
                p[param_key("bias_ih", layer, d)] + p[param_key("bias_hh", layer, d)],
                p.get(param_key("weight_hr", layer, d))))
        layer_input = out
    output = layer_input.transpose(1, 0, 2) if batch_first else layer_input
    cache = LSTMCache(tuple(caches), p, mask, num_layers, bool(bidirectional), bool(batch_first),
                      H, Ho)
    return output, (h_n, c_n), cache


def _direction_forward(x, d, out, h0, c0, h_last, c_last, lengths, w_ih, w_hh, bias, w_hr):
    """Run direction d over the layer input x [T, B, In]: fills out[:, :, d*Ho:(d+1)*Ho],
    h_last [B, Ho] and c_last [B, H]; returns its `LSTMDirectionCache`."""
    T, B, In = x.shape
    H, Ho = c0.shape[1], h0.shape[1]
    dtype = x.dtype
    reverse = d == 1
    gates = np.empty((T, B, 4 * H), dtype)
    np.matmul(x.reshape(T * B, In), w_ih.T, out=gates.reshape(T * B, 4 * H))  # all steps' x W_ih^T
    h_prev = np.empty((T, B, Ho), dtype)  # state entering step t; h_prev[t+1] is h_t's home
    c_prev = np.empty((T, B, H), dtype)
    tanh_c = np.empty((T, B, H), dtype)
    w_hh_t = np.ascontiguousarray(w_hh.T)  # [Ho, 4H]: BLAS is faster on it than on w_hh.T
    hw = np.empty((B, 4 * H), dtype)
    project = w_hr is not None
    r = np.empty((B, H) if project else (0, 0), dtype)
    h_new = np.empty((B, Ho), dtype)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    h_prev[steps[0]] = h0
    c_prev[steps[0]] = c0
    out_col = d * Ho
    for n, t in enumerate(steps):
        last = n == T - 1
        h_out = h_last if last else h_prev[steps[n + 1]]
        c_out = c_last if last else c_prev[steps[n + 1]]
        np.matmul(h_prev[t], w_hh_t, out=hw)
        _cell_forward_v2(t, lengths, bias, hw, c_prev[t], h_prev[t], gates[t], tanh_c[t], c_out,
                         h_out, out[t], out_col, r, project)
        if project:
            np.matmul(r, w_hr.T, out=h_new)
            _emit_hidden(t, lengths, h_new, h_prev[t], h_out, out[t], out_col)
    return LSTMDirectionCache(x, h_prev, c_prev, gates, tanh_c, reverse)


def lstm_backward(
    d_output: np.ndarray,
    cache: LSTMCache,
    *,
    d_h_n: np.ndarray | None = None,
    d_c_n: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Numba `numpy_ref.lstm_backward`: accepts the cache of either backend's forward.

    Parameters
    ----------
    d_output : [T, B, D*Ho] (or [B, T, D*Ho] when batch-first); padded entries are ignored.
    d_h_n : [L*D, B, Ho], d_c_n : [L*D, B, H], or None (zero).

    Returns
    -------
    d_x like x, d_params (keys and shapes of params), (d_h0 [L*D, B, Ho], d_c0 [L*D, B, H]).
    """
    d_out, d_h_n, d_c_n = validate_lstm_cotangents(d_output, d_h_n, d_c_n, cache)
    L, D = cache.num_layers, 2 if cache.bidirectional else 1
    T, B, _ = d_out.shape
    H, Ho, dtype = cache.hidden_size, cache.output_size, d_out.dtype
    lengths = (np.full(B, T, np.int64) if cache.mask is None
               else cache.mask[:, :, 0].sum(axis=0, dtype=np.int64))
    d_layer_out = np.ascontiguousarray(d_out)  # [T, B, D*Ho]
    grads: dict[str, np.ndarray] = {}
    d_h0 = np.empty((L * D, B, Ho), dtype)
    d_c0 = np.empty((L * D, B, H), dtype)
    for layer in range(L - 1, -1, -1):
        da = np.empty((T, B, D * 4 * H), dtype)  # dL/da of every step, directions side by side
        for d in range(D):
            k = layer * D + d
            g = _direction_backward(d_layer_out, d, da, d_h_n[k], d_c_n[k], d_h0[k], d_c0[k],
                                    cache.directions[k],
                                    cache.params[param_key("weight_hh", layer, d)],
                                    cache.params.get(param_key("weight_hr", layer, d)), lengths)
            grads.update({param_key(kind, layer, d): v for kind, v in g.items()})
        # a_t = x_t W_ih^T + b_ih + b_hh + ... for every direction: one product each
        x = cache.directions[layer * D].x
        In = x.shape[2]
        da2 = da.reshape(T * B, D * 4 * H)
        d_w_ih = da2.T @ x.reshape(T * B, In)  # [D*4H, In]
        d_bias = da2.sum(axis=0)
        for d in range(D):
            rows = slice(d * 4 * H, (d + 1) * 4 * H)
            grads[param_key("weight_ih", layer, d)] = d_w_ih[rows]
            grads[param_key("bias_ih", layer, d)] = d_bias[rows]
            grads[param_key("bias_hh", layer, d)] = d_bias[rows].copy()
        w_ih = np.concatenate([cache.params[param_key("weight_ih", layer, d)] for d in range(D)])
        d_layer_out = (da2 @ w_ih).reshape(T, B, In)  # both directions read the same input
    d_x = d_layer_out.transpose(1, 0, 2) if cache.batch_first else d_layer_out
    return d_x, {k: grads[k] for k in cache.params}, (d_h0, d_c0)


def _direction_backward(d_out, d, da, d_h_last, d_c_last, d_h0, d_c0, cache, w_hh, w_hr,
                        lengths):
    """BPTT through direction d: fills da[:, :, d*4H:(d+1)*4H], d_h0 [B, Ho] and d_c0 [B, H];
    returns the gradients of weight_hh (and weight_hr), which only this direction's steps see.
    d_out [T, B, D*Ho] is the layer output's cotangent."""
    _, h_prev, c_prev, gates, tanh_c, reverse = cache
    T, B, Ho = h_prev.shape
    H = c_prev.shape[2]
    dtype = d_out.dtype
    dh_mm = np.array(d_h_last, dtype, order="C")  # dL/dh_t, the BLAS part
    dh_keep = np.zeros((B, Ho), dtype)  # ... and the part padded rows carry
    dc = np.array(d_c_last, dtype, order="C")  # dL/dc_t, updated in place
    project = w_hr is not None
    d_h_new = np.empty((T, B, Ho), dtype) if project else None
    d_r = np.empty((B, H) if project else (0, 0), dtype)
    col, out_col = d * 4 * H, d * Ho
    # the forward loop, backwards; each step's gates, c_{t-1} and tanh(c_t) as saved
    for t in range(T) if reverse else range(T - 1, -1, -1):
        if project:
            _hidden_backward(t, lengths, d_out[t], out_col, dh_mm, dh_keep, d_h_new[t])
            np.matmul(d_h_new[t], w_hr, out=d_r)  # h_new = r @ w_hr.T
        _cell_backward(t, lengths, d_out[t], out_col, dh_mm, dh_keep, d_r, dc,
                       np.ascontiguousarray(gates[t]), np.ascontiguousarray(c_prev[t]),
                       np.ascontiguousarray(tanh_c[t]), da[t], col, project)
        np.matmul(da[t, :, col:col + 4 * H], w_hh, out=dh_mm)  # a_t = ... + h_{t-1} W_hh^T
    np.add(dh_mm, dh_keep, out=d_h0)
    d_c0[...] = dc
    da_d = da[:, :, col:col + 4 * H].reshape(T * B, 4 * H)
    grads = {"weight_hh": da_d.T @ h_prev.reshape(T * B, Ho)}
    if project:  # h_new = r @ w_hr.T, r = o * tanh(c) recomputed
        r = (gates[:, :, 3 * H:] * tanh_c).reshape(T * B, H)
        grads["weight_hr"] = d_h_new.reshape(T * B, Ho).T @ r
    return grads
