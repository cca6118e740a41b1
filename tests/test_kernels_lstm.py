"""What the LSTM kernels must do beyond matching numpy_ref through the public API.

The public `kernels.lstm_*` functions run through every parity, property and bad-input test of
test_lstm.py and test_lstm_bad_input.py (parametrized by backend). Here: bitwise determinism,
the shared cache, the vectorizing activations against long-double references, kernel version
v1 against v2, step kernels and whole-direction cores that refuse inconsistent arrays instead of
leaving their bounds, and the two directions on two threads: the same bits as on one, BLAS
limited to one thread during that call only. Everything here also runs with
NUMBA_DISABLE_JIT=1, which executes the kernels' Python source line by line (CI does that
run).
"""

from __future__ import annotations

import ctypes
import threading

import numba
import numpy as np
import pytest
from test_lstm import Case, cast, make_arrays, run_ours
from threadpoolctl import threadpool_info, threadpool_limits

import kernels
import numpy_ref
from kernels import lstm as kl
from kernels._util import exp_nonpositive, expm1_nonpositive, sigmoid, tanh

JIT_OFF = bool(numba.config.DISABLE_JIT)


def _run(mod, case: Case, a: dict) -> dict[str, np.ndarray]:
    return run_ours(case, a, "kernels" if mod is kl else "numpy_ref")


def test_kernels_lstm_is_exported_from_the_package() -> None:
    assert kernels.lstm_forward is kl.lstm_forward
    assert kernels.lstm_backward is kl.lstm_backward
    assert kernels.attention_forward.__module__ == "kernels.attention"


# ---------------------------------------------------------------------------------------------
# determinism, and the same bits whether the directions run on one thread or two

_DET_CASE = (Case(T=5, B=3, I=4, H=6, P=0, L=2, bidirectional=True, batch_first=False,
                  use_h0=True, lengths=(5, 2, 4), seed=11) if JIT_OFF else
             Case(T=16, B=32, I=24, H=40, P=0, L=2, bidirectional=True, batch_first=False,
                  use_h0=True, lengths=tuple(int(v) for v in
                                             np.random.default_rng(12).integers(1, 17, 32)),
                  seed=11))


def test_kernels_lstm_is_bitwise_deterministic_over_20_calls() -> None:
    a = cast(make_arrays(_DET_CASE), np.float32)
    first = _run(kl, _DET_CASE, a)
    for _ in range(19):
        again = _run(kl, _DET_CASE, a)
        for name, value in first.items():
            np.testing.assert_array_equal(again[name], value, err_msg=name)


def _blas_threads() -> list[tuple[str, int]]:
    return sorted((i["filepath"], i["num_threads"]) for i in threadpool_info()
                  if i["user_api"] == "blas")


def _spy(monkeypatch, name: str, calls: list, *, fail: bool = False) -> None:
    """Wrap kl.<name>: record each call's thread and BLAS thread counts; raise instead when
    `fail` (True: every call; "worker": only on the worker thread)."""
    real = getattr(kl, name)

    def spy(*args):
        thread = threading.current_thread().name
        calls.append((name, thread, _blas_threads()))
        if fail is True or (fail == "worker" and thread.startswith("kernels.lstm")):
            raise RuntimeError(f"{name} failed")
        return real(*args)

    monkeypatch.setattr(kl, name, spy)


_THREAD_CASES = [_DET_CASE, _DET_CASE._replace(P=3 if JIT_OFF else 17, batch_first=True,
                                               lengths=None, seed=21)]
_ONE_CPU = kl._cpus() < 2


@pytest.mark.skipif(_ONE_CPU, reason="the process may use one CPU: nothing runs on two")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", _THREAD_CASES, ids=["lengths-h0", "proj-batch-first"])
def test_kernels_lstm_directions_on_two_threads_give_the_bits_of_one(monkeypatch, case: Case,
                                                                      dtype) -> None:
    """The directions of each layer on two threads (one BLAS thread each) and one after the
    other (on two BLAS threads): every output and gradient the same bits. The spies check that
    each run took the path it names: one direction of each layer on the worker thread and BLAS
    on one thread while they run, or everything on this thread with BLAS as it was."""
    monkeypatch.setattr(kl, "_MIN_WORK", 0)  # the JIT-off case is small
    a = cast(make_arrays(case), dtype)
    calls: list = []
    for name in ("_forward_steps", "_backward_steps"):
        _spy(monkeypatch, name, calls)
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before and all(n == 2 for _, n in before)
        two = _run(kl, case, a)
        assert [name for name, _, _ in calls] == ["_forward_steps"] * 4 + ["_backward_steps"] * 4
        on_worker = [name for name, thread, _ in calls if thread.startswith("kernels.lstm")]
        assert on_worker == ["_forward_steps"] * 2 + ["_backward_steps"] * 2  # one per layer
        assert all(n == 1 for _, _, threads in calls for _, n in threads)
        assert _blas_threads() == before
        calls.clear()
        monkeypatch.setattr(kl, "TWO_THREADS", False)
        one = _run(kl, case, a)
        assert len(calls) == 8 and all(thread == threading.current_thread().name
                                       and threads == before for _, thread, threads in calls)
    for name, value in one.items():
        np.testing.assert_array_equal(two[name], value, err_msg=name)


def test_kernels_lstm_one_direction_stays_on_this_thread_with_the_blas_threads(
        monkeypatch) -> None:
    """A unidirectional layer runs its steps on the calling thread, its per-step products on
    the process's BLAS threads (NumPy's pool, see the module docstring)."""
    monkeypatch.setattr(kl, "_MIN_WORK", 0)
    case = _DET_CASE._replace(bidirectional=False)
    calls: list = []
    for name in ("_forward_steps", "_backward_steps"):
        _spy(monkeypatch, name, calls)
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        _run(kl, case, cast(make_arrays(case), np.float32))
    assert len(calls) == 4 and all(thread == threading.current_thread().name
                                   and threads == before for _, thread, threads in calls)


@pytest.mark.skipif(_ONE_CPU, reason="the process may use one CPU: nothing runs on two")
@pytest.mark.parametrize("failing", ["_forward_steps", "_backward_steps"])
@pytest.mark.parametrize("where", ["both threads", "worker"])
def test_kernels_lstm_restores_the_blas_thread_counts_when_a_core_raises(
        monkeypatch, failing: str, where: str) -> None:
    """single_threaded_blas is scoped to the call: the counts found before are back after a
    call that returns and after one whose core raises, on this thread or on the worker; the
    error reaches the caller and the next call works."""
    monkeypatch.setattr(kl, "_MIN_WORK", 0)
    a = cast(make_arrays(_DET_CASE), np.float32)
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        first = _run(kl, _DET_CASE, a)
        assert _blas_threads() == before
        calls: list = []
        with monkeypatch.context() as m:
            _spy(m, failing, calls, fail=True if where == "both threads" else "worker")
            with pytest.raises(RuntimeError, match=f"{failing} failed"):
                _run(kl, _DET_CASE, a)
        assert calls and all(n == 1 for _, _, threads in calls for _, n in threads)
        assert _blas_threads() == before
        again = _run(kl, _DET_CASE, a)
    for name, value in first.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_kernels_lstm_step_products_are_numpys_own(dtype) -> None:
    """`_gemm` through the cblas_?gemm found in NumPy's BLAS library gives np.matmul's bits (the
    same library and routine), and so does the np.matmul callback kept for when it is not
    found; an empty or K = 0 product is handled without calling BLAS."""
    rng = np.random.default_rng(23)
    a, b = rng.standard_normal((37, 29)).astype(dtype), rng.standard_normal((29, 53)).astype(dtype)
    real = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    for gemm in (kl._gemm_for(dtype), kl._python_gemm(real)):
        out = np.full((37, 53), np.nan, dtype)
        kl._gemm(gemm, a, b, out)
        np.testing.assert_array_equal(out, a @ b)
        zero_k = np.full((37, 53), np.nan, dtype)
        kl._gemm(gemm, a[:, :0].copy(), b[:0].copy(), zero_k)
        assert np.all(zero_k == 0)
        kl._gemm(gemm, a[:0].copy(), b, np.empty((0, 53), dtype))
    found = kl._numpy_blas_gemm()
    assert not found or set(found) == {np.dtype(np.float32), np.dtype(np.float64)}


# ---------------------------------------------------------------------------------------------
# one cache for both backends


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("forward_by", ["numpy_ref", "kernels"])
def test_kernels_lstm_cache_works_with_either_backward(forward_by: str, dtype) -> None:
    """A forward's cache from one backend, the backward from the other: the gradients are those
    of the other backend's own pair, up to the forwards' rounding."""
    case = Case(T=6, B=4, I=3, H=5, P=2, L=2, bidirectional=True, batch_first=True,
                use_h0=True, lengths=(6, 1, 4, 3), seed=13)
    a = cast(make_arrays(case), dtype)
    mods = {"numpy_ref": numpy_ref.lstm, "kernels": kl}
    fwd, bwd = mods[forward_by], mods["kernels" if forward_by == "numpy_ref" else "numpy_ref"]
    kw = dict(num_layers=case.L, bidirectional=True, batch_first=True, h0=a["h0"], c0=a["c0"],
              lengths=np.array(case.lengths))
    _, _, cache = fwd.lstm_forward(a["x"], a["params"], **kw)
    _, _, own_cache = bwd.lstm_forward(a["x"], a["params"], **kw)
    assert type(cache) is type(own_cache) is numpy_ref.lstm.LSTMCache
    for mine, theirs in zip(cache.directions, own_cache.directions, strict=True):
        for field in mine._fields:
            v, w = getattr(mine, field), getattr(theirs, field)
            assert np.shape(v) == np.shape(w) and np.asarray(v).dtype == np.asarray(w).dtype, field
    cot = dict(d_h_n=a["d_h_n"], d_c_n=a["d_c_n"])
    got = bwd.lstm_backward(a["d_output"], cache, **cot)
    want = bwd.lstm_backward(a["d_output"], own_cache, **cot)
    rtol, atol = (1e-12, 1e-13) if dtype == np.float64 else (1e-5, 1e-6)
    np.testing.assert_allclose(got[0], want[0], rtol=rtol, atol=atol, err_msg="d_x")
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=rtol, atol=atol, err_msg=k)
    for name, g, w in zip(["d_h0", "d_c0"], got[2], want[2], strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)


# ---------------------------------------------------------------------------------------------
# the vectorizing activations against long-double references


@numba.njit
def _apply(kind, x, out):
    for i in range(x.shape[0]):
        if kind == 0:
            out[i] = sigmoid(x[i])
        elif kind == 1:
            out[i] = tanh(x[i])
        elif kind == 2:
            out[i] = exp_nonpositive(x[i])
        else:
            out[i] = expm1_nonpositive(x[i])


_ACTIVATIONS = {  # kind, long-double reference, max ulp (float32, float64) for |x| <= 20
    "sigmoid": (0, lambda x: 1 / (1 + np.exp(-x)), (3.0, 8.0)),
    "tanh": (1, np.tanh, (3.0, 3.0)),
    "exp": (2, np.exp, (2.0, 7.0)),
    "expm1": (3, np.expm1, (1.0, 1.5)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(_ACTIVATIONS))
def test_kernels_activations_are_accurate_and_total(name: str, dtype) -> None:
    kind, reference, bounds = _ACTIVATIONS[name]
    n = 2001 if JIT_OFF else 200001
    grid = np.concatenate([np.linspace(-20, 20, n), np.geomspace(1e-30, 20, n // 10),
                           -np.geomspace(1e-30, 20, n // 10), [0.0]]).astype(dtype)
    if kind >= 2:  # exp and expm1 take y <= 0 only
        grid = -np.abs(grid)
    out = np.empty_like(grid)
    _apply(kind, grid, out)
    want = reference(grid.astype(np.longdouble))
    ulp = np.abs(out.astype(np.longdouble) - want) / np.spacing(np.abs(want).astype(dtype))
    worst = int(np.argmax(ulp))
    limit = bounds[0] if dtype == np.float32 else bounds[1]
    assert ulp[worst] <= limit, (f"{name}({grid[worst]!r}) = {out[worst]!r}, expected "
                                 f"{float(want[worst])!r}: {float(ulp[worst]):.2f} ulp > {limit}")
    # beyond the grid: infinities give the limits, huge arguments no overflow, NaN stays NaN
    big = np.finfo(dtype).max
    edge = np.array([-np.inf, -big, -1e4, -700.0, -100.0, np.nan] if kind >= 2 else
                    [-np.inf, -big, -1e4, -100.0, 100.0, 1e4, big, np.inf, np.nan], dtype)
    got = np.empty_like(edge)
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow is expected
        _apply(kind, edge, got)
    with np.errstate(over="ignore"):  # the reference's own exp(1e4) is inf, as it should be
        want_edge = reference(edge[:-1].astype(np.longdouble)).astype(np.float64)
    np.testing.assert_allclose(got[:-1], want_edge.astype(dtype), rtol=1e-5,
                               atol=np.finfo(dtype).tiny, err_msg=name)
    assert np.isnan(got[-1]), f"{name}(nan) = {got[-1]!r}"


# ---------------------------------------------------------------------------------------------
# step kernels: v1 against v2, and arrays that do not fit together


def _step_arrays(B: int, H: int, P: int, dtype, seed: int, t: int = 3):
    """Inputs of one forward step; rows 0 and 2 are padded at step t (lengths <= t)."""
    rng = np.random.default_rng(seed)
    Ho = P or H
    lengths = np.arange(B, dtype=np.int64) % 3 * t + (np.arange(B) % 2 == 1)  # some <= t
    lengths[1] = t + 1
    return dict(
        t=t, lengths=lengths,
        bias=rng.standard_normal(4 * H).astype(dtype),
        hw=(3 * rng.standard_normal((B, 4 * H))).astype(dtype),
        c_in=rng.standard_normal((B, H)).astype(dtype),
        h_in=rng.standard_normal((B, Ho)).astype(dtype),
        gates=(3 * rng.standard_normal((B, 4 * H))).astype(dtype),
        tanh_c=np.full((B, H), np.nan, dtype), c_out=np.full((B, H), np.nan, dtype),
        h_out=np.full((B, Ho), np.nan, dtype), out=np.full((B, 2 * Ho), np.nan, dtype),
        out_col=Ho, r=np.full((B, H) if P else (0, 0), np.nan, dtype), project=bool(P),
    )


def _call(kernel, arrays: dict) -> dict:
    arrays = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
    kernel(*arrays.values())
    return arrays


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("P", [0, 3], ids=["no-proj", "proj3"])
def test_kernels_cell_forward_versions_agree(P: int, dtype) -> None:
    B, H = (5, 7) if JIT_OFF else (9, 59)
    arrays = _step_arrays(B, H, P, dtype, seed=14)
    v1, v2 = _call(kl._cell_forward_v1, arrays), _call(kl._cell_forward_v2, arrays)
    rtol = 4 * float(np.finfo(dtype).eps) * (4 if dtype == np.float64 else 1)
    for name in ("gates", "tanh_c", "c_out", "h_out", "out", "r"):
        np.testing.assert_allclose(v2[name], v1[name], rtol=rtol, atol=rtol, err_msg=name)
    padded = arrays["t"] >= arrays["lengths"]
    assert padded.any() and (~padded).any()
    np.testing.assert_array_equal(v2["c_out"][padded], arrays["c_in"][padded])
    assert np.all(v2["gates"][padded] == 0) and np.all(v2["tanh_c"][padded] == 0)
    if not P:
        np.testing.assert_array_equal(v2["h_out"][padded], arrays["h_in"][padded])
        assert np.all(v2["out"][padded, H:] == 0)


@pytest.mark.parametrize("kernel", ["v1", "v2"])
@pytest.mark.parametrize("bad", ["gates", "hw", "c_out", "bias", "lengths", "out_col<0",
                                 "out_col+Ho>cols", "r-missing-when-projecting"])
def test_kernels_cell_forward_rejects_arrays_that_do_not_fit(bad: str, kernel: str) -> None:
    """Called directly (past the validating wrapper), a step kernel checks every shape and
    offset it indexes with before touching memory."""
    arrays = _step_arrays(4, 5, 0, np.float64, seed=15)
    if bad in ("gates", "hw", "c_out", "bias", "lengths"):
        arrays[bad] = arrays[bad][..., :-1] if bad != "lengths" else arrays[bad][:-1]
    elif bad == "out_col<0":
        arrays["out_col"] = -1
    elif bad == "out_col+Ho>cols":
        arrays["out_col"] = 6
    else:
        arrays["project"] = True
    fn = kl._cell_forward_v1 if kernel == "v1" else kl._cell_forward_v2
    with pytest.raises(ValueError, match="inconsistent array shapes"):
        fn(*arrays.values())


def _backward_arrays(B: int, H: int, dtype, seed: int, t: int = 3):
    rng = np.random.default_rng(seed)
    lengths = np.array([t + 1, t, t + 5, 1][:B] + [t + 1] * max(0, B - 4), np.int64)
    return dict(
        t=t, lengths=lengths, d_out=rng.standard_normal((B, 2 * H)).astype(dtype), out_col=H,
        dh_mm=rng.standard_normal((B, H)).astype(dtype), dh_keep=np.zeros((B, H), dtype),
        d_r=np.empty((0, 0), dtype), dc=rng.standard_normal((B, H)).astype(dtype),
        gates=rng.uniform(0, 1, (B, 4 * H)).astype(dtype),
        c_prev=rng.standard_normal((B, H)).astype(dtype),
        tanh_c=rng.uniform(-1, 1, (B, H)).astype(dtype),
        da=np.full((B, 8 * H), np.nan, dtype), da_col=4 * H, project=False,
    )


@pytest.mark.parametrize("bad", ["none", "gates", "dh_keep", "d_out-cols", "da_col<0",
                                 "da_col+4H>cols", "lengths", "d_r-missing-when-projecting"])
def test_kernels_cell_backward_rejects_arrays_that_do_not_fit(bad: str) -> None:
    arrays = _backward_arrays(4, 5, np.float64, seed=16)
    if bad in ("gates", "dh_keep"):
        arrays[bad] = arrays[bad][:, :-1]
    elif bad == "d_out-cols":
        arrays["d_out"] = arrays["d_out"][:, :7]
    elif bad == "da_col<0":
        arrays["da_col"] = -1
    elif bad == "da_col+4H>cols":
        arrays["da_col"] = 21
    elif bad == "lengths":
        arrays["lengths"] = arrays["lengths"][:3]
    elif bad == "d_r-missing-when-projecting":
        arrays["project"] = True
    if bad == "none":
        got = _call(kl._cell_backward, arrays)
        padded = arrays["t"] >= arrays["lengths"]
        assert np.all(got["da"][padded, 20:] == 0) and not np.isnan(got["da"][:, 20:]).any()
        np.testing.assert_array_equal(got["dc"][padded], arrays["dc"][padded])
        return
    with pytest.raises(ValueError, match="inconsistent array shapes"):
        kl._cell_backward(*arrays.values())


def test_kernels_projection_step_kernels_reject_arrays_that_do_not_fit() -> None:
    B, P = 3, 2
    lengths, h = np.full(B, 4, np.int64), np.zeros((B, P))
    with pytest.raises(ValueError, match="_emit_hidden: inconsistent"):
        kl._emit_hidden(0, lengths, h, h, h, np.zeros((B, 2 * P)), 3)
    with pytest.raises(ValueError, match="_emit_hidden: inconsistent"):
        kl._emit_hidden(0, lengths[:2], h, h, h, np.zeros((B, 2 * P)), 0)
    with pytest.raises(ValueError, match="_hidden_backward: inconsistent"):
        kl._hidden_backward(0, lengths, np.zeros((B, 2 * P)), -1, h, h.copy(), h.copy())
    with pytest.raises(ValueError, match="_hidden_backward: inconsistent"):
        kl._hidden_backward(0, lengths, np.zeros((B, 2 * P)), 0, h, h.copy(),
                            np.zeros((B, P + 1)))


@pytest.mark.parametrize("t", [-5, 0, 2, 10**9])
def test_kernels_step_kernels_take_any_step_index_and_lengths(t: int) -> None:
    """The step index and the lengths are only compared, never used as an index: any values
    are safe (negative t: every row real; huge t: every row padded)."""
    arrays = _step_arrays(4, 5, 0, np.float32, seed=17)
    arrays["t"] = t
    arrays["lengths"] = np.array([-3, 0, 2, 10**12], np.int64)
    got = _call(kl._cell_forward_v2, arrays)
    real = t < arrays["lengths"]
    assert not np.isnan(got["c_out"]).any() and not np.isnan(got["out"][:, 5:]).any()
    np.testing.assert_array_equal(got["c_out"][~real], arrays["c_in"][~real])
    assert np.all(got["out"][~real, 5:] == 0)


# ---------------------------------------------------------------------------------------------
# the whole-direction cores, called directly with arrays that do not fit together


def _core_arrays(dtype=np.float64, P: int = 0):
    """Valid arguments of `_forward_steps` and `_backward_steps` for one direction of a layer
    (T, B, In, H) = (4, 3, 5, 6), built by the wrappers' own helpers."""
    T, B, In, H = 4, 3, 5, 6
    Ho = P or H
    rng = np.random.default_rng(22)
    params = numpy_ref.init_lstm_params(In, H, proj_size=P, rng=rng, dtype=dtype)
    x = rng.standard_normal((T, B, In)).astype(dtype)
    lengths = np.array([4, 2, 3], np.int64)
    h_n, c_n = np.zeros((B, Ho), dtype), np.zeros((B, H), dtype)
    out = np.zeros((T, B, 2 * Ho), dtype)
    fwd = kl._forward_arrays(T, True, h_n, c_n, h_n, c_n, params["weight_hh_l0"],
                             params["bias_ih_l0"], params.get("weight_hr_l0"))
    gemm = kl._gemm_for(dtype)
    kl._forward_direction(x.reshape(T * B, In), params["weight_ih_l0"], gemm, 1, lengths, out,
                          Ho, bool(P), fwd)
    cache = kl.LSTMDirectionCache(x, fwd[4], fwd[5], fwd[3], fwd[6], True)
    bwd = kl._backward_arrays(cache, h_n, c_n, params["weight_hh_l0"],
                              params.get("weight_hr_l0"))
    return dict(gemm=gemm, lengths=lengths, out=out, fwd=fwd, bwd=bwd, Ho=Ho, project=bool(P))


def _replace(arrays: tuple, i: int, new: np.ndarray) -> tuple:
    return (*arrays[:i], new, *arrays[i + 1:])


_FORWARD_FIELDS = ["bias", "w_hh_t", "w_hr_t", "gates", "h_prev", "c_prev", "tanh_c", "h_last",
                   "c_last", "hw", "r", "h_new"]
_BACKWARD_FIELDS = ["w_hh", "w_hr", "gates", "c_prev", "tanh_c", "dh_mm", "dh_keep", "dc",
                    "d_h_new", "d_r", "da"]


def _shrunk(a: np.ndarray) -> np.ndarray:
    """a one shorter along its last axis (or an array of ones of its rank when that axis is
    empty): a shape that does not fit. C-contiguous, so that no other type compiles."""
    return np.ascontiguousarray(a[..., :-1]) if a.shape[-1] else np.zeros((1,) * a.ndim, a.dtype)


@pytest.mark.parametrize("P", [0, 2], ids=["no-proj", "proj2"])
def test_kernels_recurrence_cores_reject_arrays_that_do_not_fit(P: int) -> None:
    """Every array `_forward_steps` and `_backward_steps` index with, shrunk in turn, and their
    offsets: a ValueError before any memory is touched; the unchanged arguments run."""
    c = _core_arrays(P=P)
    gemm, lengths, out, Ho, project = c["gemm"], c["lengths"], c["out"], c["Ho"], c["project"]
    d_out = np.ones_like(out)
    kl._forward_steps(gemm, True, lengths, out, Ho, project, c["fwd"])
    kl._backward_steps(gemm, True, lengths, d_out, Ho, project, c["bwd"])
    unused = {"w_hr_t", "r", "h_new", "w_hr", "d_h_new", "d_r"} if not P else set()
    for fields, arrays, core, cotangent in ((_FORWARD_FIELDS, c["fwd"], kl._forward_steps, out),
                                            (_BACKWARD_FIELDS, c["bwd"], kl._backward_steps,
                                             d_out)):
        for i, field in enumerate(fields):
            if field in unused:
                continue
            bad = _replace(arrays, i, _shrunk(arrays[i]))
            with pytest.raises(ValueError, match="inconsistent array shapes"):
                core(gemm, True, lengths, cotangent, Ho, project, bad)
        for bad_lengths, bad_out, col in ((lengths[:-1], cotangent, Ho),  # lengths
                                          (lengths, _shrunk(cotangent), Ho),  # out's columns
                                          (lengths, cotangent[:-1].copy(), Ho),  # out's steps
                                          (lengths, cotangent, -1), (lengths, cotangent, Ho + 1)):
            with pytest.raises(ValueError, match="inconsistent array shapes"):
                core(gemm, True, bad_lengths, bad_out, col, project, arrays)
        with pytest.raises(ValueError, match="inconsistent array shapes"):
            core(gemm, True, lengths, cotangent, Ho, not project, arrays)  # the other mode


def test_kernels_gemm_rejects_arrays_that_do_not_fit() -> None:
    gemm = kl._gemm_for(np.float64)
    a, b, out = np.ones((3, 4)), np.ones((4, 5)), np.empty((3, 5))
    for bad in ((a, b[:-1].copy(), out), (a, b, out[:, :-1].copy()), (a, b, out[:-1].copy()),
                (a, np.asfortranarray(b), out), (a[:, ::2], b[:2].copy(), out),
                (a, b, np.empty((5, 3)).T)):
        with pytest.raises(ValueError, match="_gemm: inconsistent"):
            kl._gemm(gemm, *bad)
