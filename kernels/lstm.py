r"""Numba LSTM: each direction's recurrence in one compiled call, the matrix products in BLAS.

Same public functions, argument names, validation, results and cache as `numpy_ref.lstm` (read
its docstring for the math, the shapes and the masking rules). The cache is numpy_ref's own
`LSTMCache`, so a cache from either backend works with either backward; `lstm_forward` notes
the one difference in what it holds.

What runs where, per layer and direction
----------------------------------------
Forward (`_forward_direction`)::

    gates = x [T*B, In] @ W_ih^T           np.matmul, one product over all steps, written
                                           where the cache's gates go          [T, B, 4H]
    _forward_steps: one compiled call, no Python between steps; for each step t, in this
    direction's order:
        hw = h_{t-1} @ W_hh^T              `_gemm` (NumPy's BLAS, below)       [B, 4H]
        _cell_forward_v2: a = gates_t + hw + b_ih + b_hh -> gates_t = i, f, g, o (in place);
            c_t = f c_{t-1} + i g; tanh(c_t); r_t = o tanh(c_t); the length mask; writes
            c_t and h_t where the next step reads them, and the output          one pass
        (proj_size) h_t = r_t @ W_hr^T (`_gemm`), then _emit_hidden applies the mask

Backward (`_backward_direction`)::

    _backward_steps: one compiled call, walking the steps in reverse:
        _cell_backward: dL/dr = d_out_t + dL/dh_t (masked) -> dL/dc, da_t = dL/da [B, 4H]
            into this direction's da [T, B, 4H], dL/dc_{t-1}; (proj_size: _hidden_backward
            masks first, dL/dr = dL/dh @ W_hr)
        dL/dh_{t-1} = da_t @ W_hh          `_gemm`
    then over all T*B rows, one np.matmul each:
        d_W_ih = da^T x,  d_W_hh = da^T h_prev,  d_W_hr = dh^T r,  d_b = sum(da)
    and for the layer (`_input_grad`): d_x = da_f @ W_ih_f (+ da_r @ W_ih_r), both directions
    reading the same input; in two halves of its rows when there are two directions.

Padded steps (t >= lengths[b]) cost no pointwise work: the kernels pass the state through and
write zeros. The products still run over all B rows. Padding is not data: when some step is
padded, layer 0's x is copied once with its padded steps set to 0 (`numpy_ref.contract.lstm`'s
`without_padding`, as numpy_ref does), so NaN or inf there reaches no product (d_W_ih = da^T x
included). No step allocates: every per-step array is a view of a cache array or a buffer
allocated once per direction.

The per-step products: NumPy's own BLAS
---------------------------------------
Numba's ``np.dot`` calls SciPy's OpenBLAS, a second library with a thread pool of its own, and
an OpenBLAS worker spins for about 0.1 s after each multi-threaded product: the two directions
of a forward at (T, B, I, H) = (32, 16, 64, 64), their products through ``np.dot`` on two BLAS
threads, ran 4.7x slower right after a multi-threaded ``np.matmul`` (median 3.5 ms against
0.74 ms back to back), the two pools taking the cores from each other. So `_gemm` calls
cblas_sgemm / cblas_dgemm of the library NumPy's matmul calls (a ctypes function pointer, an
argument of the compiled cores, so they stay cached), found once by `_gemm_for` among
threadpoolctl's libraries (the one under NumPy's directory, or the only one loaded); where none
is found, a ctypes callback into ``np.matmul`` stands in (correct, slower: it takes the GIL at
each step). Every product of a layer, and of a training step around it, then shares NumPy's
pool, as when each step called ``np.matmul`` from Python, with the bits np.matmul gives for the
same product.

Threads
-------
A unidirectional layer runs on the calling thread, its products on the process's BLAS threads.
The two directions of a bidirectional layer run on two threads (when their work, T B 4H Ho
multiply-adds each, is at least `_MIN_WORK`, the process may use two CPUs and `TWO_THREADS` is
True): one on the calling thread, the other on a worker thread (one ``ThreadPoolExecutor``
thread, made on first use and again in a forked child), each direction's input product, steps
and weight gradients on its thread, then d_x's two halves likewise. BLAS runs on one thread for
the length of the call (`kernels._blas.single_threaded_blas`: the counts it found are back on
exit, also when a core raises; 5.5 us per call; while it is in effect another thread of the
process that calls BLAS gets one thread too). Both ways run the same pieces through the same
library, so two threads and one give the same bits (multi-threaded OpenBLAS splits a product's
rows and columns, not its sums). Measured forward+backward, (128, 64, 256, 256): 307 ms on two
threads, 338 ms on one (374 ms for the previous loop, below); (32, 16, 64, 64): 1.8 and 2.2 ms.

Python threads, not ``prange``: at the end of a parallel region an OpenMP thread that is done
spin-waits for the other, on the core the other may need; right after a multi-threaded NumPy
product (an OpenBLAS worker spinning), a ``prange`` over the two directions took 3 to 6.5 ms
(median) where two Python threads, which block instead, took 1.0 to 1.3 ms (0.5 and 0.95 ms
back to back). The same spinning OpenBLAS worker still takes a core from the two threads for
its 0.1 s: (32, 32, 128, 256) forward+backward went from 34 to 65 ms when called right after a
512 x 512 ``np.matmul`` (36 and 37 ms on one thread). A loop that runs large NumPy products
between bidirectional layers can be faster with ``TWO_THREADS = False``: a training step of the
Luong encoder-decoder (a unidirectional decoder on NumPy's pool, a [1024, 512] @ [512, 4000]
generator) took 212-216 ms with the encoder on one thread and 240-244 ms on two; the
classifier, with no large product beside its LSTM, 172-182 and 140-147 ms.

One direction is not split over two threads: giving each thread half of the batch (no per-step
synchronisation) was slower than one thread on NumPy's pool, 76 against 65 ms at
(32, 32, 128, 512) forward+backward, since each half packs all of W_hh again at every step.
Whatever the machine, a bidirectional layer's recurrences use two threads; on more cores a
unidirectional layer's products use NumPy's whole pool.

Kernel versions
---------------
The layer loop:

- v1: a Python loop over the steps, calling ``np.matmul`` and a jitted step kernel per step,
  the directions one after the other: 374 ms forward+backward at (128, 64, 256, 256).
- v2 (kept): the whole recurrence of a direction in one compiled call (`_forward_steps`,
  `_backward_steps`), its products through `_gemm`, and the directions of a layer on two
  threads as above: 307 ms. Tried and dropped on the way: Numba's ``np.dot`` for the
  per-step products and ``prange`` for the directions (both above).

The cell:

- ``_cell_forward_v1``: the gate math with ``np.exp`` / ``np.tanh``, one libm call per element
  and gate. Numba has no vector math library here (no SVML), so the loop stays scalar: about
  1.2 ms per step at (B, H) = (64, 256), three times the step's product. Kept as the plain
  statement of the cell and as the reference v2's activations are tested against.
- ``_cell_forward_v2``: the same loop with `sigmoid` / `tanh` (`kernels._util`), built on
  `exp_nonpositive` / `expm1_nonpositive`: a range reduction ``exp(y) = 2^n exp(r)``,
  ``|r| <= ln2/2``, a Taylor polynomial and 2^n built in the exponent bits. Every operation
  has a SIMD form, so LLVM vectorizes the loop (16 float32 lanes with AVX-512): about 60 us
  per step at (64, 256), 20x faster than v1. The steps use v2. (Divisions are ``np.divide``:
  Python's ``/`` checks for a zero divisor and raises, a branch that stops vectorization.)
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
offsets fit (a `ValueError` otherwise): the step kernels, the whole-direction cores (every
array of the direction's tuple against the others) and `_gemm` (shapes and contiguity), so even
a direct call with inconsistent arrays cannot index out of bounds; the public wrappers validate
first, with numpy_ref's own functions, and check every direction before either runs.

An input changed in place between the forward and the backward is refused as numpy_ref
refuses it, by the same check: the forward fingerprints x (when the cache's layer-0 input is a
view of it) and the weights (`numpy_ref.contract.unchanged`, in the cache, which is numpy_ref's
`LSTMCache`), and the backward compares first. It costs about 1% of a forward + backward at
(T, B, I, H) = (128, 64, 256, 256), bidirectional, float32: 3.5-4 ms for the 12 MiB, twice,
against 320-330 ms.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
from numba import njit
from threadpoolctl import threadpool_info

from kernels._blas import single_threaded_blas
from kernels._config import JIT
from kernels._util import as_type_of, sigmoid, tanh
from numpy_ref.contract import checks, unchanged
from numpy_ref.contract.lstm import (
    direction_bias,
    lstm_fingerprints,
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
# the per-step products, through the BLAS library NumPy's matmul calls (why: "The per-step
# products" in the module docstring)

_GEMM: dict[np.dtype, Any] = {}


def _gemm_prototype(real, integer):
    return ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer,
                            integer, real, ctypes.c_void_p, integer, ctypes.c_void_p, integer,
                            real, ctypes.c_void_p, integer)


def _numpy_blas_gemm() -> dict[np.dtype, Any]:
    """{float32: cblas_sgemm, float64: cblas_dgemm} of NumPy's BLAS library (the one under
    NumPy's directory, or the only one loaded), or {} when it cannot be told apart."""
    blas = [i["filepath"] for i in threadpool_info() if i["user_api"] == "blas"]
    home = os.path.dirname(os.path.realpath(np.__file__))
    mine = [f for f in blas if os.path.realpath(f).startswith((home + os.sep, home + ".libs"))]
    for path in mine or (blas if len(blas) == 1 else []):
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_", ""):
            for suffix in ("64_", "_64", ""):
                names = [f"{prefix}cblas_{c}gemm{suffix}" for c in "sd"]
                if all(hasattr(lib, n) for n in names):
                    integer = ctypes.c_int64 if suffix else ctypes.c_int
                    return {np.dtype(dt): _gemm_prototype(real, integer)(
                                ctypes.cast(getattr(lib, n), ctypes.c_void_p).value)
                            for dt, real, n in ((np.float32, ctypes.c_float, names[0]),
                                                (np.float64, ctypes.c_double, names[1]))}
    return {}


def _python_gemm(real):
    """The fallback: a callback into np.matmul with cblas_?gemm's signature (row-major, no
    transposes; each call takes the GIL)."""
    ctype = np.float32 if real is ctypes.c_float else np.float64

    def gemm(order, trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc):
        def view(address, rows, cols):
            return np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(
                np.ctypeslib.as_ctypes_type(ctype))), (rows, cols))
        np.matmul(view(a, M, K), view(b, K, N), out=view(c, M, N))

    return _gemm_prototype(real, ctypes.c_int64)(gemm)


def _gemm_for(dtype: np.dtype):
    """The cblas_?gemm the compiled steps call for `dtype` (found on first use)."""
    if not _GEMM:
        found = _numpy_blas_gemm()
        _GEMM.update(found or {np.dtype(np.float32): _python_gemm(ctypes.c_float),
                               np.dtype(np.float64): _python_gemm(ctypes.c_double)})
    return _GEMM[np.dtype(dtype)]


@njit(**JIT)
def _gemm(fn, a, b, out):
    """out = a @ b through `fn` (a cblas_?gemm): a [M, K], b [K, N], out [M, N], each
    C-contiguous (rows of a C-contiguous array are)."""
    M, K = a.shape
    N = b.shape[1]
    if not (b.shape[0] == K and out.shape == (M, N) and a.flags.c_contiguous
            and b.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("_gemm: inconsistent array shapes")
    if M == 0 or N == 0:
        return
    if K == 0:
        out[:] = as_type_of(0.0, out[0, 0])
        return
    zero = as_type_of(0.0, out[0, 0])
    fn(101, 111, 111, M, N, K, zero + 1, a.ctypes.data, K, b.ctypes.data, N, zero,
       out.ctypes.data, N)  # CblasRowMajor, CblasNoTrans


# --------------------------------------------------------------------------------------------
# the recurrence of one direction, forward: T steps of (BLAS product, cell) in one call
#
# `arrays` is one direction's tuple (bias, w_hh_t, w_hr_t, gates, h_prev, c_prev, tanh_c, h_last,
# c_last, hw, r, h_new): bias [4H] = b_ih + b_hh; w_hh_t [Ho, 4H] = W_hh^T and w_hr_t [H, P] =
# W_hr^T (project; else [0, 0]); the cache's gates [T, B, 4H], holding x W_ih^T on entry,
# h_prev [T, B, Ho], c_prev and tanh_c [T, B, H] (on entry only the state of the direction's
# first step, h0 and c0, is set); h_last [B, Ho], c_last [B, H] (where the final state goes:
# h_n[k], c_n[k]); buffers hw [B, 4H], r [B, H] and h_new [B, Ho] (project; else [0, 0]). Every
# array is C-contiguous (`_gemm` checks the ones it multiplies).


@njit(**JIT)
def _check_forward(lengths, out, out_col, project, arrays):
    bias, w_hh_t, w_hr_t, gates, h_prev, c_prev, tanh_c, h_last, c_last, hw, r, h_new = arrays
    T, B, H4 = gates.shape
    H = H4 // 4
    Ho = h_prev.shape[2]
    ok = (T >= 1 and H4 == 4 * H and lengths.shape[0] == B and bias.shape[0] == H4
          and w_hh_t.shape == (Ho, H4) and h_prev.shape == (T, B, Ho)
          and c_prev.shape == (T, B, H) and tanh_c.shape == (T, B, H)
          and h_last.shape == (B, Ho) and c_last.shape == (B, H) and hw.shape == (B, H4)
          and out.shape[0] == T and out.shape[1] == B and 0 <= out_col
          and out_col + Ho <= out.shape[2])
    ok = ok and (w_hr_t.shape == (H, Ho) and r.shape == (B, H) and h_new.shape == (B, Ho)
                 if project else Ho == H)
    if not ok:
        raise ValueError("_forward_steps: inconsistent array shapes")


@njit(**JIT, nogil=True)
def _forward_steps(gemm, reverse, lengths, out, out_col, project, arrays):
    """Run one direction over all T steps (t = T-1 down to 0 when `reverse`): per step
    hw = h_{t-1} W_hh^T (`_gemm`), `_cell_forward_v2`, and with `project` h_t = r_t W_hr^T and
    `_emit_hidden`. Writes out[:, :, out_col:out_col+Ho] (out [T, B, D*Ho]), the cache's arrays
    and the final state (h_last, c_last). `gemm` is a cblas_?gemm (`_gemm_for`)."""
    _check_forward(lengths, out, out_col, project, arrays)
    bias, w_hh_t, w_hr_t, gates, h_prev, c_prev, tanh_c, h_last, c_last, hw, r, h_new = arrays
    T = gates.shape[0]
    for n in range(T):
        t = T - 1 - n if reverse else n
        nxt = t - 1 if reverse else t + 1  # the step that reads this one's state
        h_in, c_in = h_prev[t], c_prev[t]
        h_out = h_last if n == T - 1 else h_prev[nxt]
        c_out = c_last if n == T - 1 else c_prev[nxt]
        _gemm(gemm, h_in, w_hh_t, hw)
        _cell_forward_v2(t, lengths, bias, hw, c_in, h_in, gates[t], tanh_c[t], c_out, h_out,
                         out[t], out_col, r, project)
        if project:
            _gemm(gemm, r, w_hr_t, h_new)
            _emit_hidden(t, lengths, h_new, h_in, h_out, out[t], out_col)


# --------------------------------------------------------------------------------------------
# the recurrence of one direction, backward
#
# `arrays` is (w_hh, w_hr, gates, c_prev, tanh_c, dh_mm, dh_keep, dc, d_h_new, d_r, da): w_hh
# [4H, Ho] and w_hr [P, H] (or [0, 0]) as the params hold them; the cache's gates [T, B, 4H],
# c_prev and tanh_c [T, B, H]; the carried cotangents dh_mm, dh_keep [B, Ho] and dc [B, H],
# holding d_h_n[k], 0 and d_c_n[k] on entry and d_h0 = dh_mm + dh_keep, d_c0 = dc on exit;
# d_h_new [T, B, Ho] and the buffer d_r [B, H] (project; else [0, 0, 0] and [0, 0]); da
# [T, B, 4H], dL/da of every step. d_out [T, B, D*Ho] is the layer output's cotangent.


@njit(**JIT)
def _check_backward(lengths, d_out, out_col, project, arrays):
    w_hh, w_hr, gates, c_prev, tanh_c, dh_mm, dh_keep, dc, d_h_new, d_r, da = arrays
    T, B, H4 = gates.shape
    H = H4 // 4
    Ho = dh_mm.shape[1]
    ok = (T >= 1 and H4 == 4 * H and lengths.shape[0] == B and w_hh.shape == (H4, Ho)
          and c_prev.shape == (T, B, H) and tanh_c.shape == (T, B, H)
          and dh_mm.shape == (B, Ho) and dh_keep.shape == (B, Ho) and dc.shape == (B, H)
          and da.shape == (T, B, H4) and d_out.shape[0] == T and d_out.shape[1] == B
          and 0 <= out_col and out_col + Ho <= d_out.shape[2])
    ok = ok and (w_hr.shape == (Ho, H) and d_h_new.shape == (T, B, Ho) and d_r.shape == (B, H)
                 if project else Ho == H)
    if not ok:
        raise ValueError("_backward_steps: inconsistent array shapes")


@njit(**JIT, nogil=True)
def _backward_steps(gemm, reverse, lengths, d_out, out_col, project, arrays):
    """BPTT through one direction, walking its forward loop backwards: per step (project:
    `_hidden_backward`, d_r = d_h_new_t W_hr), `_cell_backward` into da[t], then
    dh_mm = da_t W_hh (`_gemm`)."""
    _check_backward(lengths, d_out, out_col, project, arrays)
    w_hh, w_hr, gates, c_prev, tanh_c, dh_mm, dh_keep, dc, d_h_new, d_r, da = arrays
    T = gates.shape[0]
    for n in range(T):
        t = n if reverse else T - 1 - n
        if project:
            _hidden_backward(t, lengths, d_out[t], out_col, dh_mm, dh_keep, d_h_new[t])
            _gemm(gemm, d_h_new[t], w_hr, d_r)  # h_new = r @ w_hr.T
        _cell_backward(t, lengths, d_out[t], out_col, dh_mm, dh_keep, d_r, dc, gates[t],
                       c_prev[t], tanh_c[t], da[t], 0, project)
        _gemm(gemm, da[t], w_hh, dh_mm)  # a_t = ... + h_{t-1} W_hh^T


# --------------------------------------------------------------------------------------------
# the two directions of a layer on two threads: this one and one worker

TWO_THREADS = True
"""Run the two directions of a bidirectional layer on two threads (see Threads in the module
docstring). False runs the same pieces one after the other on the calling thread, on the
process's BLAS threads: the same bits."""

_MIN_WORK = 1_000_000
"""Multiply-adds of one direction's recurrence (T B 4H Ho) under which a layer stays on one
thread: a hand-off to the worker costs 0.04 ms back to back and 0.15 ms when it slept (here,
the time of a few million multiply-adds); measured, two threads lose at 0.5e6 and win at 1e6."""

_worker: tuple[int, ThreadPoolExecutor] | None = None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _two_threads(D: int, work: int) -> bool:
    """Whether a layer's directions run on two threads."""
    return D == 2 and TWO_THREADS and work >= _MIN_WORK and _cpus() >= 2


def _run(tasks: list[Callable[[], object]], two: bool) -> None:
    """Run the tasks, at most two: when `two`, the second on the worker thread while this
    thread runs the first; else one after the other. Waits for both, also when one raises."""
    global _worker
    if not two or len(tasks) < 2:
        for task in tasks:
            task()
        return
    if _worker is None or _worker[0] != os.getpid():  # a forked child has no worker thread
        _worker = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="kernels.lstm"))
    second = _worker[1].submit(tasks[1])
    try:
        tasks[0]()
    finally:
        second.result()


# --------------------------------------------------------------------------------------------
# public wrappers: validate (as numpy_ref), allocate, the products over all steps in NumPy, the
# recurrences in the compiled cores


def _contiguous(a: np.ndarray) -> np.ndarray:
    """a itself when C-contiguous and writeable, else a C-contiguous copy: the compiled cores
    then see one array type (a read-only or strided array would compile them once more)."""
    return a if a.flags.c_contiguous and a.flags.writeable else np.array(a, order="C")


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
    N, dtype = T * B, xt.dtype
    mask = padding_mask(lengths, T)  # [T, B, 1] or None
    lengths = np.full(B, T, np.int64) if lengths is None else np.array(lengths, np.int64)
    # [T, B, In]; padded steps are 0 (padding is not data: it reaches no product, d_W_ih included)
    layer_input = _contiguous(without_padding(xt, mask))
    h_n = np.empty((num_layers * D, B, Ho), dtype)
    c_n = np.empty((num_layers * D, B, H), dtype)
    project = Ho != H
    gemm = _gemm_for(dtype)
    two = _two_threads(D, T * B * 4 * H * Ho)
    caches: list[LSTMDirectionCache] = []
    with single_threaded_blas() if two else contextlib.nullcontext():
        for layer in range(num_layers):
            x2 = layer_input.reshape(N, layer_input.shape[2])
            out = np.empty((T, B, D * Ho), dtype)
            arrays = []
            for d in range(D):
                k = layer * D + d
                bias = direction_bias(p, layer, d, H, dtype)
                arrays.append(_forward_arrays(T, d == 1, h0[k], c0[k], h_n[k], c_n[k],
                                              p[param_key("weight_hh", layer, d)], bias,
                                              p.get(param_key("weight_hr", layer, d))))
            for d in range(D):  # every direction checked before either runs
                _check_forward(lengths, out, d * Ho, project, arrays[d])
            _run([partial(_forward_direction, x2, p[param_key("weight_ih", layer, d)], gemm, d,
                          lengths, out, Ho, project, arrays[d]) for d in range(D)], two)
            caches += [LSTMDirectionCache(layer_input, a[4], a[5], a[3], a[6], d == 1)
                       for d, a in enumerate(arrays)]
            layer_input = out
    output = layer_input.transpose(1, 0, 2) if batch_first else layer_input
    cache = LSTMCache(tuple(caches), p, mask, num_layers, bool(bidirectional), bool(batch_first),
                      H, Ho, lstm_fingerprints(x, caches[0].x, p))
    return output, (h_n, c_n), cache


def _forward_direction(x2, w_ih, gemm, d, lengths, out, Ho, project, arrays):
    """One direction of a layer: gates = x W_ih^T (one product over all T*B rows, written where
    the cache's gates go), then its steps."""
    gates = arrays[3]
    np.matmul(x2, w_ih.T, out=gates.reshape(x2.shape[0], gates.shape[2]))
    _forward_steps(gemm, d == 1, lengths, out, d * Ho, project, arrays)


def _forward_arrays(T, reverse, h0, c0, h_last, c_last, w_hh, bias, w_hr):
    """One direction's `_forward_steps` arrays: its own copies of the weights, transposed; the
    cache's arrays, with the initial state in place; buffers."""
    B, H, Ho = c0.shape[0], c0.shape[1], h0.shape[1]
    dtype = w_hh.dtype
    h_prev = np.empty((T, B, Ho), dtype)  # state entering step t; h_prev[t+1] is h_t's home
    c_prev = np.empty((T, B, H), dtype)
    first = T - 1 if reverse else 0
    h_prev[first] = h0
    c_prev[first] = c0
    project = w_hr is not None
    none = np.empty((0, 0), dtype)
    return (bias, np.array(w_hh.T, order="C"),
            np.array(w_hr.T, order="C") if project else none,
            np.empty((T, B, 4 * H), dtype), h_prev, c_prev, np.empty((T, B, H), dtype),
            h_last, c_last, np.empty((B, 4 * H), dtype),
            np.empty((B, H), dtype) if project else none,
            np.empty((B, Ho), dtype) if project else none)


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
    checks.cache_of(cache, LSTMCache, "lstm_forward")
    unchanged.check(cache.fingerprints)
    d_out, d_h_n, d_c_n = validate_lstm_cotangents(d_output, d_h_n, d_c_n, cache)
    L, D = cache.num_layers, 2 if cache.bidirectional else 1
    T, B, _ = d_out.shape
    N = T * B
    H, Ho, dtype = cache.hidden_size, cache.output_size, d_out.dtype
    project = Ho != H
    lengths = (np.full(B, T, np.int64) if cache.mask is None
               else cache.mask[:, :, 0].sum(axis=0, dtype=np.int64))
    gemm = _gemm_for(dtype)
    two = _two_threads(D, T * B * 4 * H * Ho)
    d_layer_out = _contiguous(d_out)  # [T, B, D*Ho]
    grads: dict[str, np.ndarray] = {}
    d_h0 = np.empty((L * D, B, Ho), dtype)
    d_c0 = np.empty((L * D, B, H), dtype)
    with single_threaded_blas() if two else contextlib.nullcontext():
        for layer in range(L - 1, -1, -1):
            ks = [layer * D + d for d in range(D)]
            dirs = [cache.directions[k] for k in ks]
            arrays = [_backward_arrays(dirs[d], d_h_n[k], d_c_n[k],
                                       cache.params[param_key("weight_hh", layer, d)],
                                       cache.params.get(param_key("weight_hr", layer, d)))
                      for d, k in enumerate(ks)]
            x2 = _contiguous(dirs[0].x).reshape(N, -1)
            In = x2.shape[1]
            for d in range(D):  # every direction checked before either runs
                _check_backward(lengths, d_layer_out, d * Ho, project, arrays[d])
            g: list[dict[str, np.ndarray]] = [{} for _ in range(D)]
            _run([partial(_backward_direction, g[d], gemm, d, lengths, d_layer_out, Ho, project,
                          arrays[d], x2, _contiguous(dirs[d].h_prev).reshape(N, Ho))
                  for d in range(D)], two)
            # d_x = sum over directions of da_d W_ih_d (both read the same input); with two
            # directions in two halves of its rows, on two threads or one after the other
            da2 = [a[10].reshape(N, 4 * H) for a in arrays]
            w_ih = [cache.params[param_key("weight_ih", layer, d)] for d in range(D)]
            d_x = np.empty((N, In), dtype)
            tmp = np.empty((N, In) if D == 2 else (0, In), dtype)
            _run([partial(_input_grad, da2, w_ih, d_x, tmp, r0, r1)
                  for r0, r1 in ([(0, N // 2), (N // 2, N)] if D == 2 else [(0, N)])], two)
            for d, k in enumerate(ks):
                dh_mm, dh_keep, dc = arrays[d][5:8]
                np.add(dh_mm, dh_keep, out=d_h0[k])
                d_c0[k] = dc
                grads.update({param_key(kind, layer, d): v for kind, v in g[d].items()})
            d_layer_out = d_x.reshape(T, B, In)
    d_x = d_layer_out.transpose(1, 0, 2) if cache.batch_first else d_layer_out
    return d_x, {k: grads[k] for k in cache.params}, (d_h0, d_c0)


def _backward_direction(g, gemm, d, lengths, d_out, Ho, project, arrays, x2, h_prev2):
    """One direction of a layer: its steps, then its weight gradients over all T*B rows, one
    product each: d_W_ih = da^T x, d_W_hh = da^T h_prev, d_b = sum(da) and
    d_W_hr = d_h_new^T r with r = o tanh(c) recomputed; into the dict g, by kind."""
    _backward_steps(gemm, d == 1, lengths, d_out, d * Ho, project, arrays)
    _, _, gates, _, tanh_c, _, _, _, d_h_new, _, da = arrays
    da2 = da.reshape(x2.shape[0], -1)
    d_bias = da2.sum(axis=0)
    g.update(weight_ih=da2.T @ x2, weight_hh=da2.T @ h_prev2, bias_ih=d_bias,
             bias_hh=d_bias.copy())
    if project:  # h_new = r @ w_hr.T
        H = tanh_c.shape[2]
        r = (gates[:, :, 3 * H:] * tanh_c).reshape(-1, H)
        g["weight_hr"] = d_h_new.reshape(r.shape[0], -1).T @ r


def _input_grad(da2, w_ih, d_x, tmp, r0, r1):
    """Rows r0:r1 of d_x = sum over directions d of da_d W_ih_d."""
    np.matmul(da2[0][r0:r1], w_ih[0], out=d_x[r0:r1])
    if len(da2) == 2:
        np.matmul(da2[1][r0:r1], w_ih[1], out=tmp[r0:r1])
        d_x[r0:r1] += tmp[r0:r1]


def _backward_arrays(cache, d_h_last, d_c_last, w_hh, w_hr):
    """One direction's `_backward_steps` arrays: the weights and the cache's arrays
    (C-contiguous), the carried cotangents started from (d_h_last, d_c_last), and the memory
    of d_h_new, d_r and da."""
    _, h_prev, c_prev, gates, tanh_c, _ = cache
    T, B, Ho = h_prev.shape
    H = c_prev.shape[2]
    dtype = gates.dtype
    project = w_hr is not None
    return (_contiguous(w_hh), _contiguous(w_hr) if project else np.empty((0, 0), dtype),
            _contiguous(gates), _contiguous(c_prev), _contiguous(tanh_c),
            np.array(d_h_last, dtype, order="C"),  # dh_mm: dL/dh_t, the BLAS part
            np.zeros((B, Ho), dtype),  # dh_keep: ... and the part padded rows carry
            np.array(d_c_last, dtype, order="C"),  # dc: dL/dc_t, updated in place
            np.empty((T, B, Ho) if project else (0, 0, 0), dtype),  # d_h_new
            np.empty((B, H) if project else (0, 0), dtype),  # d_r
            np.empty((T, B, 4 * H), dtype))  # da
