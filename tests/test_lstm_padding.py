"""Padding is not data: with `lengths`, the padded steps of x (t >= lengths[b]) are not input.

Whatever they hold (NaN, +inf, -inf) must change no output and no gradient, in every backend,
bit for bit the same as zero padding: output, h_n, c_n, d_x, every d_params entry, d_h0, d_c0
(np.array_equal), for every layer, both directions, batch_first and proj_size. The output and
d_x are exactly 0 at padded steps. NaN in a real step is data: it propagates as NaN into its
own row (and the weight gradients) without raising, and leaves the other rows bit for bit
alone.

On CUDA, each case is also run against torch.nn.LSTM on a packed batch (cuDNN), with zeros and
with NaN in the padded steps of x and d_output on both sides.

Every CPU test is parametrized by backend; the kernels cases carry "kernels" in their ids, so CI's
``NUMBA_DISABLE_JIT=1 pytest -k kernels`` runs them with the kernels' Python source.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_lstm import BACKENDS, Case, cast, make_arrays, run_ours, run_torch

from numpy_ref.testing import assert_allclose_named, assert_close_policy

over_backends = pytest.mark.parametrize("backend", list(BACKENDS))

FILLS = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}

# every row length in 1..T, and at least one padded step in every case
CASES = {
    "uni-1layer": Case(T=5, B=3, I=3, H=4, P=0, L=1, bidirectional=False, batch_first=False,
                       use_h0=True, lengths=(5, 1, 3), seed=21),
    "bi-2layers": Case(T=6, B=4, I=3, H=5, P=0, L=2, bidirectional=True, batch_first=False,
                       use_h0=True, lengths=(6, 2, 5, 1), seed=22),
    "bi-2layers-proj-batchfirst": Case(T=5, B=3, I=4, H=5, P=2, L=2, bidirectional=True,
                                       batch_first=True, use_h0=False, lengths=(2, 5, 4),
                                       seed=23),
    "uni-3layers-proj-zero-states": Case(T=4, B=2, I=2, H=3, P=1, L=3, bidirectional=False,
                                         batch_first=False, use_h0=False, lengths=(1, 3),
                                         seed=24),
}


def _padded(case: Case) -> np.ndarray:
    """[T, B] bool, True at padded steps (t >= lengths[b])."""
    return np.arange(case.T)[:, None] >= np.array(case.lengths)[None, :]


def _steps_rows(case: Case, a: np.ndarray) -> np.ndarray:
    """An x- or output-shaped array as [T, B, ...] (undo batch_first)."""
    return a.transpose(1, 0, 2) if case.batch_first else a


def _fill_padding(case: Case, a: np.ndarray, value: float) -> np.ndarray:
    """A copy of the x- or output-shaped `a` with `value` at every padded step."""
    out = a.copy()
    _steps_rows(case, out)[_padded(case)] = value
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("fill", list(FILLS))
@pytest.mark.parametrize("name", list(CASES))
@over_backends
def test_lstm_padded_x_changes_nothing_bit_for_bit(backend: str, name: str, fill: str,
                                                   dtype) -> None:
    """NaN / inf in padded x (and in padded d_output) give exactly the zero-padding results."""
    case = CASES[name]
    a = cast(make_arrays(case), dtype)
    zero = dict(a, x=_fill_padding(case, a["x"], 0.0),
                d_output=_fill_padding(case, a["d_output"], 0.0))
    want = run_ours(case, zero, backend)
    noisy = dict(a, x=_fill_padding(case, a["x"], FILLS[fill]),
                 d_output=_fill_padding(case, a["d_output"], FILLS[fill]))
    got = run_ours(case, noisy, backend)
    assert set(got) == set(want)
    pad = _padded(case)
    for key, value in got.items():
        assert value.dtype == dtype, key
        assert np.all(np.isfinite(value)), f"{key}: non-finite entries from the padding"
        assert np.array_equal(value, want[key]), f"{key}: differs from zero padding"
    assert np.all(_steps_rows(case, got["output"])[pad] == 0)
    assert np.all(_steps_rows(case, got["d_x"])[pad] == 0)


@pytest.mark.parametrize("name", list(CASES))
@over_backends
def test_lstm_nan_in_a_real_step_propagates_to_its_row_only(backend: str, name: str) -> None:
    """NaN in a real step of x is data: NaN in that row's output from there on (the whole row
    once a reverse direction or a deeper layer mixes the steps), NaN in d_weight_ih_l0; no
    error or warning (RuntimeWarnings are errors in this suite); the other rows and the
    padding are bit for bit as without it."""
    case = CASES[name]
    a = make_arrays(case)
    # the longest row that has padding: real steps after t0, and padded steps after those
    b = max((n for n in range(case.B) if case.lengths[n] < case.T), key=case.lengths.__getitem__)
    t0 = case.lengths[b] // 2
    clean = run_ours(case, a, backend)
    x = a["x"].copy()
    _steps_rows(case, x)[t0, b, 0] = np.nan
    got = run_ours(case, dict(a, x=x), backend)

    out, length = _steps_rows(case, got["output"]), case.lengths[b]
    affected = slice(0, length) if case.bidirectional else slice(t0, length)
    assert np.all(np.isnan(out[affected, b]))
    assert np.all(np.isfinite(np.delete(out[:length, b], np.r_[affected], axis=0)))
    assert np.all(np.isnan(got["h_n"][:, b]).any(axis=-1))
    assert np.isnan(got["d_weight_ih_l0"]).any()
    pad = _padded(case)
    assert np.all(out[pad] == 0)
    assert np.all(_steps_rows(case, got["d_x"])[pad] == 0)
    others = np.arange(case.B) != b
    for key in ("output", "d_x"):
        assert np.array_equal(_steps_rows(case, got[key])[:, others],
                              _steps_rows(case, clean[key])[:, others]), key
    for key in ("h_n", "c_n", "d_h0", "d_c0"):
        assert np.array_equal(got[key][:, others], clean[key][:, others]), key


def check_padded_against_torch_on(device: str, name: str, fill: str, dtype) -> None:
    """numpy_ref against torch on `device` (packed by the lengths) in the same dtype, the padded
    steps of x and d_output filled with `fill` on both sides: float64 to the float64 rule,
    float32 to rtol = atol = 1e-3 (the CPU-vs-CUDA rule, TF32 off)."""
    case = CASES[name]
    a = cast(make_arrays(case), dtype)
    value = 0.0 if fill == "zero" else FILLS[fill]
    a = dict(a, x=_fill_padding(case, a["x"], value),
             d_output=_fill_padding(case, a["d_output"], value))
    ours, theirs = run_ours(case, a), run_torch(case, a, device)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for key, got in ours.items():
        assert got.dtype == theirs[key].dtype == dtype, (key, got.dtype, theirs[key].dtype)
        if dtype == np.float64:
            assert_close_policy(key, got, theirs[key], grad=key.startswith("d_"))
        else:
            assert_allclose_named(key, got, theirs[key], rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("fill", ["zero", "nan"])
@pytest.mark.parametrize("name", list(CASES))
def test_lstm_padded_batch_matches_torch_cuda(name: str, fill: str, dtype) -> None:
    """Every case (one and two directions, 1 to 3 layers, proj_size, batch_first, zero initial
    states) against torch on CUDA over packed lengths."""
    check_padded_against_torch_on("cuda", name, fill, dtype)
