"""What the LSTM kernels must do beyond matching numpy_ref through the public API.

The public `kernels.lstm_*` functions run through every parity, property and bad-input test of
test_lstm.py and test_lstm_bad_input.py (parametrized by backend). Here: bitwise determinism,
the shared cache, the vectorizing activations against long-double references, kernel version
v1 against v2, step kernels that refuse inconsistent arrays instead of leaving their bounds,
and the two-thread runner. Everything here also runs with NUMBA_DISABLE_JIT=1, which executes
the kernels' Python source line by line (CI does that run).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from test_lstm import Case, cast, make_arrays, run_ours

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
