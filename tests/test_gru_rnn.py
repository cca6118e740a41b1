"""The GRU and the Elman RNN against torch.nn.GRU / GRUCell / RNN / RNNCell, the other GRU
(``linear_before_reset=False``) against an independent implementation, and numpy_ref against its
finite differences.

The torch reference is `torch_impl.reference` (the module holding our params, run on a batch
packed with ``pack_padded_sequence(enforce_sorted=False)``); gradients come from
``torch.autograd.grad`` under random cotangents on output and h_n together, and the implicit
zero h0 is a leaf too, so d_h0 is always checked. Weights are drawn twice as wide as torch's
init (saturated gates) and ``bias_ih != bias_hh``. Every parity property runs for every backend
that has the op (`RECURRENT_BACKENDS`).

torch has no ``linear_before_reset=False`` GRU: `independent_gru` below writes that formula
(and torch's, to prove the writing against nn.GRU) in torch ops per sequence, walking only
each row's real steps, so neither packing nor our masking is shared with what it checks.
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
from numpy_ref.testing import assert_close_policy
from torch_impl import reference

MODES = ("gru", "rnn-tanh", "rnn-relu")
RECURRENT_BACKENDS = {n: m for n, m in BACKENDS.items() if hasattr(m, "gru_forward")}
over_backends = pytest.mark.parametrize("backend", list(RECURRENT_BACKENDS))
over_modes = pytest.mark.parametrize("mode", MODES)
SIZES = st.sampled_from([1, 2, 3, 5, 7, 8])


class Case(NamedTuple):
    mode: str  # "gru", "rnn-tanh" or "rnn-relu"
    T: int
    B: int
    I: int
    H: int
    L: int
    bidirectional: bool
    batch_first: bool
    use_h0: bool
    bias: bool
    lengths: tuple[int, ...] | None
    seed: int
    linear_before_reset: bool = True

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1


@st.composite
def cases(draw, mode: str) -> Case:
    T, B = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    lengths = None
    if draw(st.booleans()):
        lengths = tuple(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    return Case(mode, T, B, draw(SIZES), draw(SIZES), draw(st.integers(1, 3)),
                draw(st.booleans()), draw(st.booleans()), draw(st.booleans()),
                draw(st.sampled_from([True, True, False])), lengths,
                draw(st.integers(0, 2**32 - 1)))


def _api(mode: str, mod=ref):
    """(forward, backward, init, options) of a mode on module `mod`."""
    if mode == "gru":
        return mod.gru_forward, mod.gru_backward, ref.init_gru_params, {}
    return (mod.rnn_forward, mod.rnn_backward, ref.init_rnn_params,
            {"nonlinearity": mode.removeprefix("rnn-")})


def make_arrays(case: Case) -> dict:
    """float64 params (twice torch's init range; bias_ih != bias_hh), x, h0, cotangents."""
    rng = np.random.default_rng(case.seed)
    init = _api(case.mode)[2]
    params = init(case.I, case.H, num_layers=case.L, bidirectional=case.bidirectional,
                  bias=case.bias, rng=rng)
    params = {k: v * 2.0 for k, v in params.items()}
    x_shape = (case.B, case.T, case.I) if case.batch_first else (case.T, case.B, case.I)
    LD = case.L * case.D
    return {"params": params, "x": rng.standard_normal(x_shape),
            "h0": rng.standard_normal((LD, case.B, case.H)),
            "d_output": rng.standard_normal((*x_shape[:2], case.D * case.H)),
            "d_h_n": rng.standard_normal((LD, case.B, case.H))}


def cast(a: dict, dtype) -> dict:
    return {k: cast(v, dtype) if isinstance(v, dict) else v.astype(dtype) for k, v in a.items()}


def _lengths(case: Case):
    return None if case.lengths is None else np.array(case.lengths)


def run_ours(case: Case, a: dict, backend: str = "numpy_ref") -> dict[str, np.ndarray]:
    forward, backward, _, options = _api(case.mode, RECURRENT_BACKENDS[backend])
    if case.mode == "gru":
        options = {"linear_before_reset": case.linear_before_reset}
    out, h_n, cache = forward(a["x"], a["params"], num_layers=case.L,
                              bidirectional=case.bidirectional, batch_first=case.batch_first,
                              h0=a["h0"] if case.use_h0 else None, lengths=_lengths(case),
                              **options)
    d_x, d_params, d_h0 = backward(a["d_output"], cache, d_h_n=a["d_h_n"])
    return {"output": out, "h_n": h_n, "d_x": d_x, "d_h0": d_h0,
            **{f"d_{k}": v for k, v in d_params.items()}}


def run_torch(case: Case, a: dict, device: str = "cpu") -> dict[str, np.ndarray]:
    """nn.GRU / nn.RNN (torch_impl.reference) forward and autograd backward, in the arrays'
    dtype on `device`, named as `run_ours`."""
    assert case.linear_before_reset, "torch has only the linear_before_reset=True GRU"
    t = {k: torch.tensor(v, device=device) for k, v in a.items() if k != "params"}
    options = {} if case.mode == "gru" else {"nonlinearity": case.mode.removeprefix("rnn-")}
    module = reference.recurrent_module(a["params"], mode=case.mode[:3].upper(),
                                        num_layers=case.L, bidirectional=case.bidirectional,
                                        batch_first=case.batch_first, device=device, **options)
    x = t["x"].requires_grad_()
    h0 = (t["h0"] if case.use_h0 else torch.zeros_like(t["h0"])).requires_grad_()
    out, h_n = reference.run_packed(module, x, h0, case.lengths)
    names, leaves = zip(*module.named_parameters(), strict=True)
    grads = torch.autograd.grad([out, h_n], [x, h0, *leaves], [t["d_output"], t["d_h_n"]])
    res = {"output": out, "h_n": h_n}
    res.update(zip(["d_x", "d_h0", *(f"d_{n}" for n in names)], grads, strict=True))
    return {k: v.detach().cpu().numpy() for k, v in res.items()}


def tanh_conditioning(case: Case, a: dict) -> float:
    """How far ``1 - y^2`` (tanh's derivative from its rounded output y) cancels in the case:
    1 / (1 - max |y|^2) over every layer's real steps, in float64 on the case's inputs. In
    float32 y carries a rounding of eps |y|, so ``1 - y^2`` carries about 2 eps, which is
    relative error 2 eps / (1 - y^2): a gradient through a saturated tanh is that much less
    accurate than its size says, whoever computes it. 1 for the other modes."""
    if case.mode != "rnn-tanh":
        return 1.0
    _, _, cache = ref.rnn_forward(a["x"].astype(np.float64), cast(a["params"], np.float64),
                                  num_layers=case.L, bidirectional=case.bidirectional,
                                  batch_first=case.batch_first,
                                  h0=a["h0"].astype(np.float64) if case.use_h0 else None,
                                  lengths=_lengths(case))
    y = max(float(np.abs(d.h_new if cache.mask is None else
                         np.where(cache.mask, d.h_new, 0)).max()) for d in cache.directions)
    return 1.0 / max(1.0 - y * y, 1e-6)


def compare(ours: dict, reference64: dict, dtype, torch32: dict | None = None,
            conditioning: float = 1.0) -> dict:
    """Every result under the numerical policy; a gradient's float32 floor relative to the
    case's largest gradient (as in test_lstm.py), times `conditioning` (`tanh_conditioning`);
    an output's relative to the terms a state sums, at least 1: a GRU's h' = n + z (h - n)
    mixes |n| < 1 and the previous state and can cancel to far below both (one [1, 1] state
    of 0.016 from terms near 1), and a tanh RNN's state is at most 1. Returns the errors."""
    assert set(ours) == set(reference64), sorted(set(ours) ^ set(reference64))
    grad_scale = conditioning * max(float(np.abs(v).max()) for k, v in reference64.items()
                                    if k.startswith("d_") and v.size)
    out_scale = max([1.0, *(float(np.abs(reference64[k]).max()) for k in ("output", "h_n")
                            if k in reference64 and reference64[k].size)])
    errors = {}
    for name, value in ours.items():
        assert value.dtype == dtype, f"{name}: dtype {value.dtype}, expected {np.dtype(dtype)}"
        grad = name.startswith("d_")
        errors[name] = assert_close_policy(
            name, value, reference64[name], torch32=None if torch32 is None else torch32[name],
            grad=grad, scale=grad_scale if grad else out_scale)
    return errors


def check_case(case: Case, dtype=np.float64, backend: str = "numpy_ref") -> dict[str, float]:
    """A backend against torch on `case`: float64 against torch float64; float32 against torch
    float64 on the same float32 inputs, torch float32 as the trusted result (the policy)."""
    a = cast(make_arrays(case), dtype)
    ours = run_ours(case, a, backend)
    if dtype == np.float64:
        return compare(ours, run_torch(case, a), dtype)
    return compare(ours, run_torch(case, cast(a, np.float64)), dtype, run_torch(case, a),
                   tanh_conditioning(case, a))


# ---------------------------------------------------------------------------------------------
# the layer stack against torch


@over_backends
@over_modes
@given(data=st.data())
def test_matches_torch_float64(backend: str, mode: str, data) -> None:
    errors = check_case(data.draw(cases(mode), label="case"), np.float64, backend)
    record(f"{mode} property, largest float64 |ours - torch|", backend, max(errors.values()))


@over_backends
@over_modes
@given(data=st.data())
def test_float32_within_policy(backend: str, mode: str, data) -> None:
    check_case(data.draw(cases(mode), label="case"), np.float32, backend)


AWKWARD = [
    Case("gru", T=59, B=7, I=1, H=7, L=1, bidirectional=True, batch_first=False, use_h0=True,
         bias=True, lengths=(59, 1, 7, 30, 58, 2, 59), seed=1),
    Case("gru", T=7, B=1, I=59, H=59, L=2, bidirectional=False, batch_first=True, use_h0=False,
         bias=False, lengths=None, seed=2),
    Case("rnn-tanh", T=59, B=7, I=7, H=1, L=3, bidirectional=True, batch_first=True,
         use_h0=True, bias=True, lengths=(1, 59, 7, 7, 33, 58, 2), seed=3),
    Case("rnn-relu", T=7, B=59, I=1, H=59, L=2, bidirectional=True, batch_first=False,
         use_h0=True, bias=False, lengths=None, seed=4),
]


@over_backends
@pytest.mark.parametrize("case", AWKWARD, ids=lambda c: f"{c.mode}-T{c.T}-B{c.B}-H{c.H}")
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_awkward_sizes_match_torch(backend: str, case: Case, dtype) -> None:
    check_case(case, dtype, backend)


@pytest.mark.cuda
@pytest.mark.parametrize("case", AWKWARD, ids=lambda c: f"{c.mode}-T{c.T}-B{c.B}-H{c.H}")
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_matches_torch_cuda(case: Case, dtype) -> None:
    """numpy_ref (CPU) against torch on CUDA (cuDNN) in the same dtype: float64 to the policy,
    float32 to rtol = atol = 1e-3 (the CPU-vs-CUDA rule, TF32 off)."""
    a = cast(make_arrays(case), dtype)
    ours, theirs = run_ours(case, a), run_torch(case, a, "cuda")
    for name, got in ours.items():
        if dtype == np.float64:
            assert_close_policy(name, got, theirs[name], grad=name.startswith("d_"))
        else:
            np.testing.assert_allclose(got, theirs[name], rtol=1e-3, atol=1e-3, err_msg=name)


# ---------------------------------------------------------------------------------------------
# the other GRU (linear_before_reset=False), against an independent implementation


def independent_gru(x: torch.Tensor, h0: torch.Tensor, params: dict[str, torch.Tensor],
                    lengths: list[int], num_layers: int, D: int, lbr: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GRU written from its formula in torch ops, one row at a time over its real steps
    only (no masks, no packing). x [T, B, I] time-major, h0 [L*D, B, H] -> (output [T, B, D*H]
    with zeros at padded steps, h_n [L*D, B, H])."""
    T, B, _ = x.shape
    H = h0.shape[2]
    rows, finals = [], [[None] * B for _ in range(num_layers * D)]
    for b in range(B):
        layer_in = x[:lengths[b], b]  # [l, In]
        for layer in range(num_layers):
            outs = []
            for d in range(D):
                sfx = f"_l{layer}{'_reverse' if d else ''}"
                w_ih, w_hh = params["weight_ih" + sfx], params["weight_hh" + sfx]
                b_ih = params.get("bias_ih" + sfx, torch.zeros(3 * H, dtype=x.dtype))
                b_hh = params.get("bias_hh" + sfx, torch.zeros(3 * H, dtype=x.dtype))
                h = h0[layer * D + d, b]
                steps = range(lengths[b] - 1, -1, -1) if d else range(lengths[b])
                out = [None] * lengths[b]
                for t in steps:
                    gi = w_ih @ layer_in[t] + b_ih
                    r = torch.sigmoid(gi[:H] + w_hh[:H] @ h + b_hh[:H])
                    z = torch.sigmoid(gi[H:2 * H] + w_hh[H:2 * H] @ h + b_hh[H:2 * H])
                    if lbr:
                        n = torch.tanh(gi[2 * H:] + r * (w_hh[2 * H:] @ h + b_hh[2 * H:]))
                    else:
                        n = torch.tanh(gi[2 * H:] + w_hh[2 * H:] @ (r * h) + b_hh[2 * H:])
                    h = (1 - z) * n + z * h
                    out[t] = h
                outs.append(torch.stack(out))
                finals[layer * D + d][b] = h
            layer_in = torch.cat(outs, dim=-1)
        pad = torch.zeros(T - lengths[b], layer_in.shape[1], dtype=x.dtype)
        rows.append(torch.cat([layer_in, pad]))
    return torch.stack(rows, dim=1), torch.stack([torch.stack(f) for f in finals])


def run_independent(case: Case, a: dict, lbr: bool) -> dict[str, np.ndarray]:
    t = {k: torch.tensor(v) for k, v in a.items() if k != "params"}
    params = {k: torch.tensor(v, requires_grad=True) for k, v in a["params"].items()}
    x = t["x"].requires_grad_()
    h0 = (t["h0"] if case.use_h0 else torch.zeros_like(t["h0"])).requires_grad_()
    lengths = list(case.lengths) if case.lengths else [case.T] * case.B
    xt = x.transpose(0, 1) if case.batch_first else x
    out, h_n = independent_gru(xt, h0, params, lengths, case.L, case.D, lbr)
    out = out.transpose(0, 1) if case.batch_first else out
    grads = torch.autograd.grad([out, h_n], [x, h0, *params.values()],
                                [t["d_output"], t["d_h_n"]], allow_unused=True)
    res = {"output": out, "h_n": h_n}
    res.update(zip(["d_x", "d_h0", *(f"d_{k}" for k in params)], grads, strict=True))
    return {k: (np.zeros(a["params"][k[2:]].shape) if v is None else v.detach().numpy())
            for k, v in res.items()}


@st.composite
def small_gru_cases(draw, lbr: bool) -> Case:
    case = draw(cases("gru"))
    return case._replace(T=min(case.T, 5), B=min(case.B, 3), L=min(case.L, 2),
                         lengths=None if case.lengths is None else
                         tuple(min(n, 5) for n in case.lengths[:3]),
                         linear_before_reset=lbr)


def test_independent_gru_is_torchs_gru() -> None:
    """The independent writing with linear_before_reset=True reproduces nn.GRU, so that it can
    be trusted with the other variant."""
    case = Case("gru", T=5, B=3, I=3, H=4, L=2, bidirectional=True, batch_first=True,
                use_h0=True, bias=True, lengths=(5, 2, 4), seed=11)
    a = make_arrays(case)
    compare(run_independent(case, a, True), run_torch(case, a), np.float64)


@over_backends
@given(data=st.data())
def test_gru_linear_before_reset_false_matches_its_formula(backend: str, data) -> None:
    case = data.draw(small_gru_cases(False), label="case")
    a = make_arrays(case)
    errors = compare(run_ours(case, a, backend), run_independent(case, a, False), np.float64)
    record("gru linear_before_reset=False, largest float64 |ours - formula|", backend,
           max(errors.values()))


def test_the_two_grus_differ() -> None:
    """The option is not ignored: the two variants give different outputs on the same params."""
    case = AWKWARD[0]
    a = make_arrays(case)
    one, other = run_ours(case, a), run_ours(case._replace(linear_before_reset=False), a)
    assert np.abs(one["output"] - other["output"]).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# finite differences, cells, padding, init


FD_CASES = [
    Case("gru", T=4, B=3, I=2, H=3, L=2, bidirectional=True, batch_first=False, use_h0=True,
         bias=True, lengths=(4, 1, 3), seed=4),
    Case("gru", T=3, B=2, I=3, H=2, L=1, bidirectional=False, batch_first=True, use_h0=True,
         bias=True, lengths=(1, 3), seed=5, linear_before_reset=False),
    Case("rnn-tanh", T=4, B=3, I=2, H=3, L=2, bidirectional=True, batch_first=True,
         use_h0=True, bias=False, lengths=(2, 4, 3), seed=6),
    Case("rnn-relu", T=4, B=2, I=3, H=3, L=1, bidirectional=True, batch_first=False,
         use_h0=True, bias=True, lengths=None, seed=7),
]


@pytest.mark.parametrize("case", FD_CASES, ids=lambda c: f"{c.mode}-lbr{c.linear_before_reset}")
def test_backward_matches_finite_differences(case: Case) -> None:
    a = make_arrays(case)
    forward, _, _, options = _api(case.mode)
    if case.mode == "gru":
        options = {"linear_before_reset": case.linear_before_reset}

    def loss() -> float:
        out, h_n, _ = forward(a["x"], a["params"], num_layers=case.L,
                              bidirectional=case.bidirectional, batch_first=case.batch_first,
                              h0=a["h0"], lengths=_lengths(case), **options)
        return float(np.sum(out * a["d_output"]) + np.sum(h_n * a["d_h_n"]))

    ours = run_ours(case, a)
    inputs = {"d_x": a["x"], "d_h0": a["h0"], **{f"d_{k}": v for k, v in a["params"].items()}}
    errors = ref.gradcheck(loss, inputs, {k: ours[k] for k in inputs}, rtol=1e-6, atol=1e-8)
    assert max(errors.values()) < 1e-7


def cell_arrays(mode: str, B: int, I: int, H: int, bias: bool, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    G = 3 if mode == "gru" else 1
    shapes = {"weight_ih": (G * H, I), "weight_hh": (G * H, H)}
    if bias:
        shapes.update(bias_ih=(G * H,), bias_hh=(G * H,))
    return {"params": {k: rng.uniform(-1, 1, s) for k, s in shapes.items()},
            "x": rng.standard_normal((B, I)), "h": rng.standard_normal((B, H)),
            "dh": rng.standard_normal((B, H))}


def run_cell(mode: str, a: dict, mod=ref, **options) -> dict[str, np.ndarray]:
    if mode == "gru":
        h_new, cache = mod.gru_cell_forward(a["x"], a["h"], a["params"], **options)
        d_x, d_h, d_params = mod.gru_cell_backward(a["dh"], cache)
    else:
        act = mode.removeprefix("rnn-")
        h_new, cache = mod.rnn_cell_forward(a["x"], a["h"], a["params"], nonlinearity=act)
        d_x, d_h, d_params = mod.rnn_cell_backward(a["dh"], cache)
    return {"h_new": h_new, "d_x": d_x, "d_h": d_h, **{f"d_{k}": v for k, v in d_params.items()}}


def run_torch_cell(mode: str, a: dict) -> dict[str, np.ndarray]:
    I, H = a["x"].shape[1], a["h"].shape[1]
    bias = "bias_ih" in a["params"]
    cell = (torch.nn.GRUCell(I, H, bias=bias, dtype=torch.float64) if mode == "gru" else
            torch.nn.RNNCell(I, H, bias=bias, nonlinearity=mode.removeprefix("rnn-"),
                             dtype=torch.float64))
    cell.load_state_dict({k: torch.tensor(v) for k, v in a["params"].items()})
    x, h = (torch.tensor(a[k], requires_grad=True) for k in "xh")
    h_new = cell(x, h)
    names, leaves = zip(*cell.named_parameters(), strict=True)
    grads = torch.autograd.grad(h_new, [x, h, *leaves], torch.tensor(a["dh"]))
    res = dict(zip(["h_new", "d_x", "d_h", *(f"d_{n}" for n in names)], [h_new, *grads],
                   strict=True))
    return {k: v.detach().numpy() for k, v in res.items()}


@over_backends
@over_modes
@given(B=st.integers(1, 5), I=SIZES, H=SIZES, bias=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_cells_match_torch_float64(backend: str, mode: str, B, I, H, bias, seed) -> None:
    a = cell_arrays(mode, B, I, H, bias, seed)
    compare(run_cell(mode, a, RECURRENT_BACKENDS[backend]), run_torch_cell(mode, a),
            np.float64)


@over_modes
def test_the_cell_is_one_step_of_the_layer(mode: str) -> None:
    """The cell, on the layer's params for layer 0, is exactly one step of the layer."""
    case = Case(mode, T=1, B=3, I=4, H=5, L=1, bidirectional=False, batch_first=False,
                use_h0=True, bias=True, lengths=None, seed=8)
    a = make_arrays(case)
    cell = {k.removesuffix("_l0"): v for k, v in a["params"].items()}
    ca = {"params": cell, "x": a["x"][0], "h": a["h0"][0], "dh": a["d_output"][0] + a["d_h_n"][0]}
    one, layer = run_cell(mode, ca), run_ours(case, a)
    np.testing.assert_array_equal(one["h_new"], layer["output"][0])
    np.testing.assert_array_equal(one["d_x"], layer["d_x"][0])
    np.testing.assert_array_equal(one["d_h"], layer["d_h0"][0])


@over_backends
@over_modes
@pytest.mark.parametrize("fill", ["nan", "inf", "huge"])
def test_padded_steps_change_nothing_bit_for_bit(backend: str, mode: str, fill: str) -> None:
    """Whatever the padded steps of x hold gives the results of zero padding, bit for bit, and
    d_x there is exactly 0."""
    case = Case(mode, T=6, B=4, I=3, H=4, L=2, bidirectional=True, batch_first=True,
                use_h0=True, bias=True, lengths=(6, 1, 3, 5), seed=9)
    a = make_arrays(case)
    padded = np.arange(case.T)[None, :] >= np.array(case.lengths)[:, None]  # [B, T]
    a["x"][padded] = 0.0
    clean = run_ours(case, a, backend)
    a["x"][padded] = {"nan": np.nan, "inf": np.inf, "huge": 1e300}[fill]
    dirty = run_ours(case, a, backend)
    for name, value in clean.items():
        np.testing.assert_array_equal(dirty[name], value, err_msg=name)
    assert np.all(clean["d_x"][padded] == 0) and np.all(clean["output"][padded] == 0)


@over_backends
@over_modes
def test_batch_first_is_a_transpose_and_float32_stays_float32(backend: str, mode: str) -> None:
    case = Case(mode, T=5, B=3, I=2, H=3, L=2, bidirectional=True, batch_first=False,
                use_h0=True, bias=True, lengths=(5, 2, 4), seed=10)
    a = make_arrays(case)
    tm = run_ours(case, a, backend)
    bf = dict(a, x=a["x"].transpose(1, 0, 2).copy(),
              d_output=a["d_output"].transpose(1, 0, 2).copy())
    bfr = run_ours(case._replace(batch_first=True), bf, backend)
    for name, value in tm.items():
        got = bfr[name].transpose(1, 0, 2) if name in ("output", "d_x") else bfr[name]
        np.testing.assert_array_equal(got, value, err_msg=name)
    assert all(v.dtype == np.float32 for v in run_ours(case, cast(a, np.float32), backend)
               .values())


@pytest.mark.parametrize("mode", ["GRU", "RNN"])
@pytest.mark.parametrize("bias", [True, False])
def test_init_params_have_torchs_names_shapes_and_bounds(mode: str, bias: bool) -> None:
    module = getattr(torch.nn, mode)(7, 9, num_layers=3, bidirectional=True, bias=bias)
    init = ref.init_gru_params if mode == "GRU" else ref.init_rnn_params
    ours = init(7, 9, num_layers=3, bidirectional=True, bias=bias, rng=0)
    theirs = module.state_dict()
    assert list(ours) == list(theirs)
    for k, v in ours.items():
        assert v.shape == tuple(theirs[k].shape) and v.dtype == np.float64, k
        assert np.abs(v).max() <= 1 / 3, k  # U(-1/sqrt(9), 1/sqrt(9))
    every = np.abs(np.concatenate([v.ravel() for v in ours.values()]))
    assert every.max() > 0.33 and abs(every.mean() - 1 / 6) < 0.01  # uniform: E|u| = bound / 2


# ---------------------------------------------------------------------------------------------
# bad input


def _gru(**kw):
    rng = np.random.default_rng(0)
    p = ref.init_gru_params(2, 3, rng=rng)
    x = rng.standard_normal((4, 2, 2))
    params = kw.pop("params", p)
    return lambda m: m.gru_forward(x, params, **kw)


BAD = [
    ("x rank 2", lambda m: m.gru_forward(np.zeros((4, 2)), ref.init_gru_params(2, 3)),
     ValueError, r"x: expected a 3-D"),
    ("x integer", lambda m: m.gru_forward(np.zeros((4, 2, 2), int), ref.init_gru_params(2, 3)),
     TypeError, r"x: expected dtype float32 or float64, got int64"),
    ("params missing key", lambda m: m.gru_forward(
        np.zeros((4, 2, 2)), {k: v for k, v in ref.init_gru_params(2, 3).items()
                              if k != "bias_hh_l0"}), ValueError,
     r"params: missing key 'bias_hh_l0' \(expected shape \[3H\] = \(9,\)\)"),
    ("params an LSTM's", lambda m: m.gru_forward(np.zeros((4, 2, 2)),
                                                 ref.init_lstm_params(2, 3)),
     ValueError, r"params\['weight_hh_l0'\]: expected shape \[3H, H\] = \(12, 4\)"),
    ("params extra layer", _gru(params=ref.init_gru_params(2, 3, num_layers=2)), ValueError,
     r"unexpected keys \['bias_hh_l1'"),
    ("h0 wrong shape", _gru(h0=np.zeros((1, 2, 4))), ValueError, r"h0: expected shape"),
    ("h0 float32", _gru(h0=np.zeros((1, 2, 3), np.float32)), TypeError, r"h0"),
    ("lengths zero", _gru(lengths=np.array([4, 0])), ValueError, r"lengths"),
    ("lengths beyond T", _gru(lengths=np.array([5, 1])), ValueError, r"lengths"),
    ("dropout", _gru(dropout=0.5), ValueError, r"dropout"),
    ("linear_before_reset not bool", _gru(linear_before_reset="no"), TypeError,
     r"linear_before_reset: expected a bool"),
    ("rnn nonlinearity", lambda m: m.rnn_forward(np.zeros((4, 2, 2)), ref.init_rnn_params(2, 3),
                                                 nonlinearity="sigmoid"),
     ValueError, r"nonlinearity: expected 'tanh' or 'relu'"),
    ("rnn params of a GRU", lambda m: m.rnn_forward(np.zeros((4, 2, 2)),
                                                    ref.init_gru_params(2, 3)),
     ValueError, r"params\['weight_hh_l0'\]: expected shape \[H, H\] = \(9, 9\), got \(9, 3\)"),
    ("gru cell h wrong size", lambda m: m.gru_cell_forward(
        np.zeros((2, 2)), np.zeros((2, 4)), {k.removesuffix("_l0"): v for k, v in
                                             ref.init_gru_params(2, 3).items()}),
     ValueError, r"h: expected shape \[B, H\] = \(2, 3\), got \(2, 4\)"),
    ("gru backward wrong cache", lambda m: m.gru_backward(np.zeros((4, 2, 3)), None),
     TypeError, r"cache: expected the GRUCache"),
    ("rnn backward d_output shape", lambda m: m.rnn_backward(
        np.zeros((4, 2, 4)), m.rnn_forward(np.zeros((4, 2, 2)), ref.init_rnn_params(2, 3))[2]),
     ValueError, r"d_output: expected shape"),
]


@over_backends
@pytest.mark.parametrize(("call", "exc", "message"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(backend: str, call, exc, message) -> None:
    with pytest.raises(exc, match=message):
        call(RECURRENT_BACKENDS[backend])


# ---------------------------------------------------------------------------------------------
# the kernels: caches shared with numpy_ref, deterministic, threads


def _forward_backward(mod, case: Case, a: dict, backward_mod=None):
    forward = _api(case.mode, mod)[0]
    backward = _api(case.mode, backward_mod or mod)[1]
    options = ({"linear_before_reset": case.linear_before_reset} if case.mode == "gru" else
               {"nonlinearity": case.mode.removeprefix("rnn-")})
    out, h_n, cache = forward(a["x"], a["params"], num_layers=case.L,
                              bidirectional=case.bidirectional, batch_first=case.batch_first,
                              h0=a["h0"], lengths=_lengths(case), **options)
    return (out, h_n, *backward(a["d_output"], cache, d_h_n=a["d_h_n"]))


KERNEL_CASES = [AWKWARD[0], AWKWARD[2], AWKWARD[3],
                AWKWARD[0]._replace(linear_before_reset=False, T=9, lengths=(9, 1, 7, 3, 8, 2, 9))]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c.mode}-lbr{c.linear_before_reset}")
@pytest.mark.parametrize("forward_by", ["numpy_ref", "kernels"])
def test_kernels_caches_work_with_either_backward(case: Case, forward_by: str) -> None:
    """A cache from one backend's forward gives the other backend's backward the same
    gradients (float64, to 1e-12)."""
    import kernels
    a = make_arrays(case)
    other = kernels if forward_by == "numpy_ref" else ref
    mod = ref if forward_by == "numpy_ref" else kernels
    mixed = _forward_backward(mod, case, a, backward_mod=other)
    same = _forward_backward(other, case, a)
    for got, want in zip(mixed[2:], same[2:], strict=True):
        if isinstance(got, dict):
            for k in want:
                np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, err_msg=k)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c.mode}-lbr{c.linear_before_reset}")
def test_kernels_are_deterministic_and_two_threads_give_the_bits_of_one(monkeypatch,
                                                                        case: Case) -> None:
    import kernels
    import kernels.lstm
    a = cast(make_arrays(case), np.float32)

    def flat(results):
        return [r for x in results for r in (x.values() if isinstance(x, dict) else [x])]

    first = flat(_forward_backward(kernels, case, a))
    for _ in range(3):
        for got, want in zip(flat(_forward_backward(kernels, case, a)), first, strict=True):
            np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(kernels.lstm, "_MIN_WORK", 0)
    monkeypatch.setattr(kernels.lstm, "_cpus", lambda: 2)
    for got, want in zip(flat(_forward_backward(kernels, case, a)), first, strict=True):
        np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(kernels.lstm, "TWO_THREADS", False)
    for got, want in zip(flat(_forward_backward(kernels, case, a)), first, strict=True):
        np.testing.assert_array_equal(got, want)
