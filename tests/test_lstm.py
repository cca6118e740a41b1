"""The LSTM backends against torch.nn.LSTM / LSTMCell, and numpy_ref against its finite differences.

The torch reference packs the batch with ``pack_padded_sequence(enforce_sorted=False)`` and pads
it back with ``pad_packed_sequence(total_length=T)`` when there are lengths; gradients are taken
with ``torch.autograd.grad`` under random cotangents on output, h_n and c_n together. Every
weight and bias is random, and ``bias_ih != bias_hh``. The parity and property tests run for
every backend in `BACKENDS` (kernels must match numpy_ref's signatures, checks and results);
the cell, the finite differences and the parameter initialisation are numpy_ref's alone.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from backends import BACKENDS
from error_report import record
from hypothesis import given
from hypothesis import strategies as st

import numpy_ref as ref
import numpy_ref.lstm
from numpy_ref.testing import assert_allclose_named, assert_close_policy
from torch_impl import load_numpy_, reference

# Every implementation of the LSTM API; tests parametrized by `backend` hold each to the same
# comparisons.
over_backends = pytest.mark.parametrize("backend", list(BACKENDS))


class Case(NamedTuple):
    T: int
    B: int
    I: int
    H: int
    P: int  # proj_size, 0 for none
    L: int
    bidirectional: bool
    batch_first: bool
    use_h0: bool
    lengths: tuple[int, ...] | None
    seed: int

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def Ho(self) -> int:
        return self.P or self.H


SIZES = st.sampled_from([1, 2, 3, 5, 7, 8])


@st.composite
def lstm_cases(draw) -> Case:
    T, B, I, H = draw(st.integers(1, 9)), draw(st.integers(1, 5)), draw(SIZES), draw(SIZES)
    P = draw(st.integers(0, H - 1)) if H > 1 and draw(st.booleans()) else 0
    lengths = None
    if draw(st.booleans()):
        lengths = tuple(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    return Case(T, B, I, H, P, draw(st.integers(1, 3)), draw(st.booleans()), draw(st.booleans()),
                draw(st.booleans()), lengths, draw(st.integers(0, 2**32 - 1)))


def make_arrays(case: Case) -> dict:
    """float64 inputs, params (non-zero, bias_ih != bias_hh) and cotangents for a case."""
    rng = np.random.default_rng(case.seed)
    params = ref.init_lstm_params(case.I, case.H, num_layers=case.L,
                                  bidirectional=case.bidirectional, proj_size=case.P, rng=rng)
    params = {k: v * 2.0 for k, v in params.items()}  # wider than torch's init: saturate gates
    T, B, LD = case.T, case.B, case.L * case.D
    x_shape = (B, T, case.I) if case.batch_first else (T, B, case.I)
    out_shape = (*x_shape[:2], case.D * case.Ho)
    return {
        "params": params,
        "x": rng.standard_normal(x_shape),
        "h0": rng.standard_normal((LD, B, case.Ho)),
        "c0": rng.standard_normal((LD, B, case.H)),
        "d_output": rng.standard_normal(out_shape),
        "d_h_n": rng.standard_normal((LD, B, case.Ho)),
        "d_c_n": rng.standard_normal((LD, B, case.H)),
    }


def cast(arrays: dict, dtype) -> dict:
    return {k: cast(v, dtype) if isinstance(v, dict) else v.astype(dtype)
            for k, v in arrays.items()}


def run_ours(case: Case, a: dict, backend: str = "numpy_ref") -> dict[str, np.ndarray]:
    """A backend's forward and backward; the result dict uses the names of `run_torch`."""
    mod = BACKENDS[backend]
    out, (h_n, c_n), cache = mod.lstm_forward(
        a["x"], a["params"], num_layers=case.L, bidirectional=case.bidirectional,
        batch_first=case.batch_first, h0=a["h0"] if case.use_h0 else None,
        c0=a["c0"] if case.use_h0 else None,
        lengths=None if case.lengths is None else np.array(case.lengths),
    )
    d_x, d_params, (d_h0, d_c0) = mod.lstm_backward(a["d_output"], cache, d_h_n=a["d_h_n"],
                                                    d_c_n=a["d_c_n"])
    res = {"output": out, "h_n": h_n, "c_n": c_n, "d_x": d_x, "d_h0": d_h0, "d_c0": d_c0}
    res.update({f"d_{k}": v for k, v in d_params.items()})
    return res


def run_torch(case: Case, a: dict, device: str = "cpu") -> dict[str, np.ndarray]:
    """torch.nn.LSTM forward and autograd backward in the dtype of the arrays in `a`.

    Without ``use_h0`` the initial states are zeros that still require grad, so the gradient
    of the implicit zero state (which numpy_ref returns) is checked as well.
    """
    t = {k: torch.tensor(v, device=device) for k, v in a.items() if k != "params"}
    lstm = reference.recurrent_module(a["params"], num_layers=case.L,
                                      bidirectional=case.bidirectional,
                                      batch_first=case.batch_first, device=device)
    x = t["x"].requires_grad_()
    h0 = (t["h0"] if case.use_h0 else torch.zeros_like(t["h0"])).requires_grad_()
    c0 = (t["c0"] if case.use_h0 else torch.zeros_like(t["c0"])).requires_grad_()
    out, (h_n, c_n) = reference.run_packed(lstm, x, (h0, c0), case.lengths)
    names = [n for n, _ in lstm.named_parameters()]
    grads = torch.autograd.grad([out, h_n, c_n], [x, h0, c0, *lstm.parameters()],
                                [t["d_output"], t["d_h_n"], t["d_c_n"]])
    res = {"output": out, "h_n": h_n, "c_n": c_n}
    res.update(zip(["d_x", "d_h0", "d_c0"] + [f"d_{n}" for n in names], grads, strict=True))
    return {k: v.detach().cpu().numpy() for k, v in res.items()}


def check_case(case: Case, dtype=np.float64, device: str = "cpu",
               backend: str = "numpy_ref") -> dict[str, float]:
    """Compare a backend with torch on `case` under the numerical policy; return the errors."""
    a64 = make_arrays(case)
    a = cast(a64, dtype)
    ours = run_ours(case, a, backend)
    reference = run_torch(case, cast(a, np.float64))  # float64 on exactly our inputs
    torch32 = run_torch(case, a, device) if dtype == np.float32 else {}
    assert set(ours) == set(reference), sorted(set(ours) ^ set(reference))
    # A weight gradient is a sum over steps and rows that can cancel to far below its terms
    # (d_weight_hr with P = 1: three entries of 0.005 from terms near 0.1); its rounding error
    # scales with the terms, and torch's own error on so few entries can be a lucky near-zero.
    # As in test_attention.py, the float32 floor of a gradient is taken relative to the case's
    # largest gradient; the 3x-torch term is unchanged.
    grad_scale = max(float(np.abs(v).max()) for k, v in reference.items()
                     if k.startswith("d_") and v.size)
    errors = {}
    for name, value in ours.items():
        assert value.dtype == dtype, f"{name}: dtype {value.dtype}, expected {np.dtype(dtype)}"
        grad = name.startswith("d_")
        errors[name] = assert_close_policy(name, value, reference[name],
                                           torch32=torch32.get(name), grad=grad,
                                           scale=grad_scale if grad else None)
    return errors


@over_backends
@given(case=lstm_cases())
def test_lstm_forward_backward_matches_torch_float64(backend: str, case: Case) -> None:
    errors = check_case(case, np.float64, backend=backend)
    record("LSTM property, largest float64 |ours - torch|", backend, max(errors.values()))


@over_backends
@given(case=lstm_cases())
def test_lstm_forward_backward_float32_within_policy(backend: str, case: Case, device: str) -> None:
    check_case(case, np.float32, device, backend=backend)


AWKWARD = [
    Case(T=59, B=7, I=97, H=59, P=0, L=2, bidirectional=True, batch_first=False,
         use_h0=True, lengths=(59, 1, 30, 58, 59, 7, 12), seed=1),
    Case(T=33, B=1, I=1, H=111, P=17, L=1, bidirectional=True, batch_first=True,
         use_h0=False, lengths=None, seed=2),
]
over_awkward = pytest.mark.parametrize(
    "case", AWKWARD, ids=["T59-H59-bi-2layers-lengths", "T33-H111-proj17-batchfirst"])


@over_awkward
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@over_backends
def test_lstm_awkward_sizes_match_torch(backend: str, case: Case, dtype, device: str) -> None:
    check_case(case, dtype, device, backend=backend)


def check_against_torch_on(device: str, case: Case, dtype, backend: str) -> None:
    """A backend (on the CPU) against torch.nn.LSTM on `device` in the same dtype: float64 to
    the float64 policy, float32 to rtol = atol = 1e-3 (the CPU-vs-CUDA rule, TF32 off)."""
    a = cast(make_arrays(case), dtype)
    ours, theirs = run_ours(case, a, backend), run_torch(case, a, device)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for name, value in ours.items():
        assert value.dtype == theirs[name].dtype == dtype, (name, value.dtype)
        if dtype == np.float64:
            assert_close_policy(name, value, theirs[name], grad=name.startswith("d_"))
        else:
            assert_allclose_named(name, value, theirs[name], rtol=1e-3, atol=1e-3)


@over_backends
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_lstm_matches_torch_cuda(backend: str, dtype) -> None:
    """A backend against cuDNN: float64 to the float64 policy, float32 to CPU-vs-CUDA 1e-3."""
    case = Case(T=17, B=5, I=7, H=59, P=0, L=2, bidirectional=True, batch_first=False,
                use_h0=True, lengths=(17, 3, 9, 17, 1), seed=3)
    check_against_torch_on("cuda", case, dtype, backend)


@over_backends
@pytest.mark.cuda
@over_awkward
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_lstm_awkward_sizes_match_torch_cuda(backend: str, case: Case, dtype) -> None:
    """The awkward sizes (projection, batch_first, no h0 among them) against torch on CUDA
    in float64 too: the device-parametrized test compares float64 with the CPU only."""
    check_against_torch_on("cuda", case, dtype, backend)


# ---------------------------------------------------------------------------------------------
# finite differences: numpy_ref checked against itself, no torch involved


@pytest.mark.parametrize(
    "case",
    [
        Case(T=4, B=3, I=2, H=3, P=2, L=2, bidirectional=True, batch_first=False, use_h0=True,
             lengths=(4, 1, 3), seed=4),
        Case(T=3, B=2, I=3, H=2, P=0, L=1, bidirectional=False, batch_first=True, use_h0=True,
             lengths=None, seed=5),
    ],
    ids=["bi-2layers-proj-lengths", "uni-batchfirst"],
)
def test_lstm_backward_matches_finite_differences(case: Case) -> None:
    a = make_arrays(case)
    lengths = None if case.lengths is None else np.array(case.lengths)

    def loss() -> float:
        out, (h_n, c_n), _ = ref.lstm_forward(
            a["x"], a["params"], num_layers=case.L, bidirectional=case.bidirectional,
            batch_first=case.batch_first, h0=a["h0"], c0=a["c0"], lengths=lengths)
        return float(np.sum(out * a["d_output"]) + np.sum(h_n * a["d_h_n"])
                     + np.sum(c_n * a["d_c_n"]))

    ours = run_ours(case, a)
    inputs = {"d_x": a["x"], "d_h0": a["h0"], "d_c0": a["c0"]}
    inputs.update({f"d_{k}": v for k, v in a["params"].items()})
    errors = ref.gradcheck(loss, inputs, {k: ours[k] for k in inputs}, rtol=1e-6, atol=1e-8)
    assert max(errors.values()) < 1e-7


# ---------------------------------------------------------------------------------------------
# the single-step cell


def cell_arrays(B: int, I: int, H: int, seed: int) -> dict:
    """float64 params (uniform in [-1, 1], torch.nn.LSTMCell's names), x [B, I], h, c [B, H]
    and the cotangents dh, dc [B, H] of one cell step."""
    rng = np.random.default_rng(seed)
    shapes = {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "bias_ih": (4 * H,),
              "bias_hh": (4 * H,)}  # LSTMCell's state_dict order
    a = {"params": {k: rng.uniform(-1, 1, s) for k, s in shapes.items()}}
    a.update(x=rng.standard_normal((B, I)), h=rng.standard_normal((B, H)),
             c=rng.standard_normal((B, H)))
    a.update(dh=rng.standard_normal((B, H)), dc=rng.standard_normal((B, H)))
    return a


CELL_NAMES = ["h_new", "c_new", "d_x", "d_h", "d_c", "d_weight_ih", "d_weight_hh", "d_bias_ih",
              "d_bias_hh"]


def run_ours_cell(a: dict) -> dict[str, np.ndarray]:
    """numpy_ref's cell forward and backward on `cell_arrays`, named as CELL_NAMES."""
    h_new, c_new, cache = ref.lstm_cell_forward(a["x"], a["h"], a["c"], a["params"])
    d_x, d_h, d_c, d_params = ref.lstm_cell_backward(a["dh"], a["dc"], cache)
    res = {"h_new": h_new, "c_new": c_new, "d_x": d_x, "d_h": d_h, "d_c": d_c}
    res.update({f"d_{k}": v for k, v in d_params.items()})
    return res


def run_torch_cell(a: dict, device: str = "cpu") -> dict[str, np.ndarray]:
    """torch.nn.LSTMCell on `device` in the arrays' dtype and its autograd gradients, named as
    CELL_NAMES (NumPy arrays, back on the CPU)."""
    I, H = a["x"].shape[1], a["h"].shape[1]
    cell = load_numpy_(torch.nn.LSTMCell(I, H, dtype=torch.tensor(a["x"]).dtype,
                                         device=device), a["params"])
    tx, th, tc = (torch.tensor(a[k], device=device, requires_grad=True) for k in "xhc")
    t_h, t_c = cell(tx, (th, tc))
    grads = torch.autograd.grad([t_h, t_c], [tx, th, tc, *cell.parameters()],
                                [torch.tensor(a["dh"], device=device),
                                 torch.tensor(a["dc"], device=device)])
    names = ["h_new", "c_new", "d_x", "d_h", "d_c"] + [f"d_{n}" for n, _ in cell.named_parameters()]
    return {n: t.detach().cpu().numpy() for n, t in zip(names, [t_h, t_c, *grads], strict=True)}


def check_cell_against_torch_on(device: str, a: dict) -> None:
    """numpy_ref's cell (on the CPU) against torch.nn.LSTMCell on `device`, in the arrays'
    dtype: float64 to the float64 policy, float32 (only off the CPU: the CPU test is float64)
    to rtol = atol = 1e-3 (the CPU-vs-CUDA rule, TF32 off)."""
    ours, theirs = run_ours_cell(a), run_torch_cell(a, device)
    assert list(ours) == list(theirs) == CELL_NAMES, (list(ours), list(theirs))
    for name in CELL_NAMES:
        o, t = ours[name], theirs[name]
        assert o.dtype == t.dtype == a["x"].dtype, (name, o.dtype, t.dtype)
        if o.dtype == np.float64:
            assert_close_policy(name, o, t, grad=name.startswith("d_"))
        else:
            assert_allclose_named(name, o, t, rtol=1e-3, atol=1e-3)


@given(B=st.integers(1, 5), I=SIZES, H=SIZES, seed=st.integers(0, 2**32 - 1))
def test_lstm_cell_matches_torch_lstmcell_float64(B: int, I: int, H: int, seed: int) -> None:
    check_cell_against_torch_on("cpu", cell_arrays(B, I, H, seed))


@pytest.mark.cuda
@pytest.mark.parametrize(("B", "I", "H"), [(1, 1, 1), (3, 5, 7), (5, 17, 33)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_lstm_cell_matches_torch_lstmcell_cuda(B: int, I: int, H: int, dtype) -> None:
    a = cell_arrays(B, I, H, seed=9)
    a = {k: cast(v, dtype) if k == "params" else v.astype(dtype) for k, v in a.items()}
    check_cell_against_torch_on("cuda", a)


def test_lstm_cell_with_projection_equals_one_lstm_step() -> None:
    """The cell with weight_hr is exactly one step of lstm_forward with proj_size."""
    rng = np.random.default_rng(6)
    params = ref.init_lstm_params(3, 5, proj_size=2, rng=rng)
    x, h0, c0 = rng.standard_normal((1, 4, 3)), rng.standard_normal((1, 4, 2)), \
        rng.standard_normal((1, 4, 5))
    out, (h_n, c_n), cache = ref.lstm_forward(x, params, h0=h0, c0=c0)
    cell_params = {k.removesuffix("_l0"): v for k, v in params.items()}
    h1, c1, cell_cache = ref.lstm_cell_forward(x[0], h0[0], c0[0], cell_params)
    np.testing.assert_allclose(h1, h_n[0], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(c1, c_n[0], rtol=1e-14, atol=1e-15)
    dh, dc = rng.standard_normal((4, 2)), rng.standard_normal((4, 5))
    d_x, d_p, (d_h0, d_c0) = ref.lstm_backward(np.zeros_like(out), cache, d_h_n=dh[None],
                                               d_c_n=dc[None])
    cx, ch, cc, cp = ref.lstm_cell_backward(dh, dc, cell_cache)
    for name, a, b in [("d_x", cx, d_x[0]), ("d_h", ch, d_h0[0]), ("d_c", cc, d_c0[0])] + [
        (f"d_{k}", cp[k.removesuffix("_l0")], v) for k, v in d_p.items()
    ]:
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=name)


# ---------------------------------------------------------------------------------------------
# properties of our own API


def _small_case(**kw) -> Case:
    base = dict(T=6, B=4, I=3, H=5, P=0, L=2, bidirectional=True, batch_first=False,
                use_h0=True, lengths=(6, 2, 5, 1), seed=7)
    return Case(**{**base, **kw})


@over_backends
def test_lstm_noncontiguous_and_fortran_inputs_give_the_same_answer(backend: str) -> None:
    case = _small_case()
    a = make_arrays(case)
    expected = run_ours(case, a, backend)
    strided = dict(a)
    for k in ("x", "h0", "c0", "d_output", "d_h_n", "d_c_n"):
        strided[k] = np.asfortranarray(a[k])
    strided["params"] = {k: np.asfortranarray(v) for k, v in a["params"].items()}
    wide = np.zeros((*a["x"].shape[:2], 2 * a["x"].shape[2]))
    wide[..., ::2] = a["x"]
    strided["x"] = wide[..., ::2]  # every other column: not contiguous in any order
    assert not strided["x"].flags.c_contiguous and not strided["x"].flags.f_contiguous
    got = run_ours(case, strided, backend)
    for name in expected:
        assert_allclose_named(name, got[name], expected[name], rtol=1e-13, atol=1e-14)


@over_backends
def test_lstm_batch_first_is_a_transpose_of_time_major(backend: str) -> None:
    case = _small_case()
    a = make_arrays(case)
    tm = run_ours(case, a, backend)
    bf = dict(a, x=a["x"].transpose(1, 0, 2), d_output=a["d_output"].transpose(1, 0, 2))
    got = run_ours(case._replace(batch_first=True), bf, backend)
    for name in tm:
        want = tm[name].transpose(1, 0, 2) if name in ("output", "d_x") else tm[name]
        np.testing.assert_array_equal(got[name], want, err_msg=name)


@over_backends
def test_lstm_backward_twice_on_one_cache_gives_the_same_gradients(backend: str) -> None:
    case = _small_case()
    a = make_arrays(case)
    mod = BACKENDS[backend]
    _, _, cache = mod.lstm_forward(a["x"], a["params"], num_layers=2, bidirectional=True,
                                   h0=a["h0"], c0=a["c0"], lengths=np.array(case.lengths))
    first = mod.lstm_backward(a["d_output"], cache, d_h_n=a["d_h_n"], d_c_n=a["d_c_n"])
    second = mod.lstm_backward(a["d_output"], cache, d_h_n=a["d_h_n"], d_c_n=a["d_c_n"])
    np.testing.assert_array_equal(first[0], second[0])
    for k in first[1]:
        np.testing.assert_array_equal(first[1][k], second[1][k], err_msg=k)
    np.testing.assert_array_equal(first[2][0], second[2][0])
    np.testing.assert_array_equal(first[2][1], second[2][1])


@over_backends
def test_lstm_padding_is_zero_and_ignored(backend: str) -> None:
    """Output at padded steps is exactly 0; x and d_output there change nothing."""
    case = _small_case()
    a = make_arrays(case)
    base = run_ours(case, a, backend)
    lengths = np.array(case.lengths)
    pad = np.arange(case.T)[:, None] >= lengths[None, :]  # [T, B]
    assert np.all(base["output"][pad] == 0)
    noisy = dict(a, x=a["x"].copy(), d_output=a["d_output"].copy())
    noisy["x"][pad] = 1e3
    noisy["d_output"][pad] = -7.0
    got = run_ours(case, noisy, backend)
    for name in base:
        if name == "d_x":
            np.testing.assert_array_equal(got[name][~pad], base[name][~pad])
            assert np.all(got[name][pad] == 0)
        else:
            np.testing.assert_array_equal(got[name], base[name], err_msg=name)


@over_backends
def test_lstm_full_lengths_equal_no_lengths(backend: str) -> None:
    case = _small_case(lengths=None)
    a = make_arrays(case)
    got = run_ours(case._replace(lengths=(case.T,) * case.B), a, backend)
    want = run_ours(case, a, backend)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@over_backends
def test_lstm_float32_in_float32_out(backend: str) -> None:
    case = _small_case(P=2)
    got = run_ours(case, cast(make_arrays(case), np.float32), backend)
    assert {v.dtype for v in got.values()} == {np.dtype(np.float32)}


def test_init_lstm_params_matches_torch_names_shapes_and_bounds() -> None:
    lstm = torch.nn.LSTM(7, 9, num_layers=3, bidirectional=True, proj_size=4)
    params = ref.init_lstm_params(7, 9, num_layers=3, bidirectional=True, proj_size=4, rng=0,
                                  dtype=np.float32)
    assert list(params) == list(lstm.state_dict())
    for k, v in lstm.state_dict().items():
        assert params[k].shape == tuple(v.shape) and params[k].dtype == np.float32, k
        assert np.abs(params[k]).max() <= 1 / 3 and np.abs(params[k]).max() > 0.25, k
    assert not np.array_equal(params["bias_ih_l0"], params["bias_hh_l0"])
    same_seed = ref.init_lstm_params(7, 9, num_layers=3, bidirectional=True, proj_size=4, rng=0,
                                     dtype=np.float32)
    assert all(np.array_equal(params[k], same_seed[k]) for k in params)


def check_seed_bilstm_on(device: str, backend: str) -> None:
    """The seed's float32 BiLSTM (torch's own init, seed 0) as a state dict: our forward (on
    the CPU) against the module's on `device`; to rtol 1e-5, atol 1e-6 on the CPU and to
    rtol = atol = 1e-3 (the CPU-vs-CUDA rule, TF32 off) elsewhere."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(4, 6, bidirectional=True)
    params = {k: v.numpy() for k, v in lstm.state_dict().items()}
    x = np.random.default_rng(8).standard_normal((5, 2, 4)).astype(np.float32)
    out, (h_n, _), _ = BACKENDS[backend].lstm_forward(x, params, bidirectional=True)
    lstm = lstm.to(device)
    with torch.no_grad():
        t_out, (t_h, _) = lstm(torch.from_numpy(x).to(device))
    rtol, atol = (1e-5, 1e-6) if device == "cpu" else (1e-3, 1e-3)
    assert out.dtype == h_n.dtype == np.float32
    np.testing.assert_allclose(out, t_out.cpu().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(h_n, t_h.cpu().numpy(), rtol=rtol, atol=atol)


@over_backends
def test_seed_bilstm_state_dict_loads_as_is(backend: str) -> None:
    """``{k: v.numpy() for k, v in torch.nn.LSTM(...).state_dict().items()}`` is our params."""
    check_seed_bilstm_on("cpu", backend)


@over_backends
@pytest.mark.cuda
def test_seed_bilstm_state_dict_loads_as_is_cuda(backend: str) -> None:
    check_seed_bilstm_on("cuda", backend)


@over_backends
@pytest.mark.parametrize("case", [
    Case(T=5, B=3, I=2, H=4, P=2, L=2, bidirectional=True, batch_first=True, use_h0=True,
         lengths=(5, 1, 3), seed=12),
    Case(T=4, B=2, I=3, H=3, P=0, L=1, bidirectional=False, batch_first=False, use_h0=False,
         lengths=None, seed=13),
], ids=["bi-2layers-proj-lengths", "uni"])
def test_lstm_without_biases_matches_torch_bias_false(backend: str, case: Case) -> None:
    """torch's ``bias=False``: no bias keys in the params, none in the gradients."""
    a = make_arrays(case)
    a["params"] = {k: v for k, v in a["params"].items() if not k.startswith("bias")}
    ours, theirs = run_ours(case, a, backend), run_torch(case, a)
    assert set(ours) == set(theirs) and not any("bias" in k for k in ours), sorted(ours)
    for name, value in ours.items():
        assert_close_policy(name, value, theirs[name], grad=name.startswith("d_"))


def test_lstm_cell_without_biases_matches_torch_lstmcell_bias_false() -> None:
    a = cell_arrays(3, 4, 5, seed=14)
    a["params"] = {k: v for k, v in a["params"].items() if not k.startswith("bias")}
    cell = torch.nn.LSTMCell(4, 5, bias=False, dtype=torch.float64)
    cell.load_state_dict({k: torch.tensor(v) for k, v in a["params"].items()})
    tx, th, tc = (torch.tensor(a[k], requires_grad=True) for k in "xhc")
    t_h, t_c = cell(tx, (th, tc))
    grads = torch.autograd.grad([t_h, t_c], [tx, th, tc, *cell.parameters()],
                                [torch.tensor(a["dh"]), torch.tensor(a["dc"])])
    ours = run_ours_cell(a)
    want = [t_h, t_c, *grads]
    names = ["h_new", "c_new", "d_x", "d_h", "d_c", "d_weight_ih", "d_weight_hh"]
    assert list(ours) == names
    for name, t in zip(names, want, strict=True):
        assert_close_policy(name, ours[name], t.detach().numpy(), grad=name.startswith("d_"))


def test_init_lstm_params_bias_false_has_torchs_keys() -> None:
    ours = ref.init_lstm_params(3, 4, num_layers=2, bidirectional=True, proj_size=2, bias=False)
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, bias=False)
    assert list(ours) == list(theirs.state_dict())
