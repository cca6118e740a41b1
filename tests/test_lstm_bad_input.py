"""Every bad input to the LSTM gets a clear ValueError/TypeError naming the argument.

The forward/backward table runs against every backend (kernels must reject exactly what
numpy_ref does, with the same messages); the cell and the initialiser are numpy_ref's alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from backends import BACKENDS

import numpy_ref as ref
import numpy_ref.lstm

# The two implementations of the LSTM API.

T, B, I, H = 5, 3, 4, 6
rng = np.random.default_rng(0)
P1 = ref.init_lstm_params(I, H, rng=rng)  # one layer, unidirectional
P1B = ref.init_lstm_params(I, H, bidirectional=True, rng=rng)
P2 = ref.init_lstm_params(I, H, num_layers=2, bidirectional=True, rng=rng)
X = rng.standard_normal((T, B, I))
H0 = np.zeros((1, B, H))


def without(params: dict, key: str) -> dict:
    return {k: v for k, v in params.items() if k != key}


def replaced(params: dict, key: str, value) -> dict:
    return {**params, key: value}


def forward(m, **kw):
    """m.lstm_forward with the defaults above, `kw` overriding them (m: a backend)."""
    args = {"x": X, "params": P1, **kw}
    return m.lstm_forward(args.pop("x"), args.pop("params"), **args)


def backward(m, d_output=None, **kw):
    out, _, cache = m.lstm_forward(X, P1)
    return m.lstm_backward(out if d_output is None else d_output, cache, **kw)


CASES: list[tuple[str, Callable[[object], object], type[Exception], str]] = [
    ("x rank 2", lambda m: forward(m, x=X[0]), ValueError,
     r"x: expected a 3-D array \[T, B, I\], got shape \(3, 4\)"),
    ("x rank 2 batch_first", lambda m: forward(m, x=X[0], batch_first=True), ValueError,
     r"x: expected a 3-D array \[B, T, I\]"),
    ("x integer", lambda m: forward(m, x=X.astype(np.int64)), TypeError,
     r"x: expected dtype float32 or float64, got int64"),
    ("x float16", lambda m: forward(m, x=X.astype(np.float16)), TypeError,
     r"x: .*float16|float64, but x is float16"),  # numpy_ref takes float16, not mixed
    ("x list", lambda m: forward(m, x=X.tolist()), TypeError, r"x: expected a numpy.ndarray"),
    ("x empty", lambda m: forward(m, x=X[:0]), ValueError, r"x: expected at least one step"),
    ("input size mismatch", lambda m: forward(m, x=X[..., :3]), ValueError,
     r"params\['weight_ih_l0'\]: expected shape \[4H, I\] = \(24, 3\), got \(24, 4\)"),
    ("params not a dict", lambda m: forward(m, params=[1, 2]), TypeError,
     r"params: expected a dict"),
    ("params missing weight_hh_l0", lambda m: forward(m, params=without(P1, "weight_hh_l0")),
     ValueError, r"params: missing key 'weight_hh_l0' \(expected shape \[4H, Ho\]\)"),
    ("params missing bias", lambda m: forward(m, params=without(P1, "bias_hh_l0")), ValueError,
     r"params: missing key 'bias_hh_l0' \(expected shape \[4H\] = \(24,\)\)"),
    ("params misshaped bias", lambda m: forward(m, params=replaced(P1, "bias_ih_l0", np.zeros(23))),
     ValueError, r"params\['bias_ih_l0'\]: expected shape \[4H\] = \(24,\), got \(23,\)"),
    ("params weight_hh not 4H", lambda m: forward(m, params=replaced(P1, "weight_hh_l0",
                                                                    np.zeros((23, H)))),
     ValueError, r"params\['weight_hh_l0'\]: expected shape \[4H, Ho\], got \(23, 6\)"),
    ("params list entry", lambda m: forward(m, params=replaced(P1, "bias_ih_l0", [0.0] * 24)),
     TypeError, r"params\['bias_ih_l0'\]: expected a numpy.ndarray, got list"),
    ("params integer entry", lambda m: forward(m, params=replaced(P1, "bias_ih_l0",
                                                                np.zeros(24, np.int32))),
     TypeError, r"params\['bias_ih_l0'\]: expected dtype float32 or float64, got int32"),
    ("params float32 with x float64", lambda m: forward(
        m, params={k: v.astype(np.float32) for k, v in P1.items()}), TypeError,
     r"params\['weight_ih_l0'\]: dtype float32 does not match the dtype of x \(float64\)"),
    ("num_layers beyond params", lambda m: forward(m, num_layers=2), ValueError,
     r"params: missing key 'weight_ih_l1'"),
    ("bidirectional beyond params", lambda m: forward(m, bidirectional=True), ValueError,
     r"params: missing key 'weight_ih_l0_reverse'"),
    ("params with more layers than num_layers", lambda m: forward(m, params=P2, bidirectional=True),
     ValueError, r"params: unexpected keys \[.*'weight_ih_l1'.*\]; they do not fit num_layers=1"),
    ("params bidirectional, option not", lambda m: forward(m, params=P1B), ValueError,
     r"params: unexpected keys \[.*_reverse.*\]; they do not fit .*bidirectional=False"),
    ("layer-1 input is not D*Ho", lambda m: forward(m, params=P2, num_layers=2), ValueError,
     r"params\['weight_ih_l1'\]: expected shape \[4H, D\*Ho\] = \(24, 6\), got \(24, 12\)"),
    ("num_layers zero", lambda m: forward(m, num_layers=0), ValueError,
     r"num_layers: expected an integer >= 1, got 0"),
    ("h0 without c0", lambda m: forward(m, h0=H0), ValueError, r"h0, c0: give both"),
    ("c0 without h0", lambda m: forward(m, c0=H0), ValueError, r"h0, c0: give both"),
    ("h0 wrong shape", lambda m: forward(m, h0=np.zeros((2, B, H)), c0=H0), ValueError,
     r"h0: expected shape \[L\*D, B, Ho\] = \(1, 3, 6\), got \(2, 3, 6\)"),
    ("c0 wrong batch", lambda m: forward(m, h0=H0, c0=np.zeros((1, B + 1, H))), ValueError,
     r"c0: expected shape \[L\*D, B, H\] = \(1, 3, 6\), got \(1, 4, 6\)"),
    ("h0 batch-first by mistake", lambda m: forward(m, h0=np.zeros((B, 1, H)), c0=H0,
                                                    batch_first=True,
                                                    x=X.transpose(1, 0, 2)),
     ValueError, r"h0: expected shape \[L\*D, B, Ho\] = \(1, 3, 6\), got \(3, 1, 6\)"),
    ("h0 rank 2", lambda m: forward(m, h0=H0[0], c0=H0), ValueError, r"h0: expected a 3-D array"),
    ("h0 float32", lambda m: forward(m, h0=H0.astype(np.float32), c0=H0), TypeError,
     r"h0: dtype float32 does not match the dtype of x \(float64\)"),
    ("lengths zero", lambda m: forward(m, lengths=np.array([5, 0, 2])), ValueError,
     r"lengths: every length must be in 1..5, got min 0 and max 5"),
    ("lengths beyond T", lambda m: forward(m, lengths=np.array([6, 1, 2])), ValueError,
     r"lengths: every length must be in 1..5, got min 1 and max 6"),
    ("lengths negative", lambda m: forward(m, lengths=[-1, 1, 2]), ValueError, r"lengths: every"),
    ("lengths float", lambda m: forward(m, lengths=np.array([5.0, 1.0, 2.0])), TypeError,
     r"lengths: expected integers, got dtype float64"),
    ("lengths bool", lambda m: forward(m, lengths=np.array([True, True, True])), TypeError,
     r"lengths: expected integers, got dtype bool"),
    ("lengths wrong shape", lambda m: forward(m, lengths=np.array([5, 1])), ValueError,
     r"lengths: expected shape \[B\] = \(3,\), got \(2,\)"),
    ("lengths 2-D", lambda m: forward(m, lengths=np.array([[5, 1, 2]])), ValueError,
     r"lengths: expected shape \[B\] = \(3,\), got \(1, 3\)"),
    ("dropout", lambda m: forward(m, dropout=0.5), ValueError,
     r"dropout: inter-layer dropout is random and not part of the reference"),
    ("d_output wrong shape", lambda m: backward(m, d_output=np.zeros((T, B, H + 1))), ValueError,
     r"d_output: expected shape \[T, B, D\*Ho\] = \(5, 3, 6\), got \(5, 3, 7\)"),
    ("d_output float32", lambda m: backward(m, d_output=np.zeros((T, B, H), np.float32)), TypeError,
     r"d_output: dtype float32 does not match the dtype of x \(float64\)"),
    ("d_h_n wrong shape", lambda m: backward(m, d_h_n=np.zeros((2, B, H))), ValueError,
     r"d_h_n: expected shape \[L\*D, B, Ho\] = \(1, 3, 6\), got \(2, 3, 6\)"),
    ("d_c_n integer", lambda m: backward(m, d_c_n=np.zeros((1, B, H), np.int64)), TypeError,
     r"d_c_n: expected dtype float32 or float64, got int64"),
    ("cache of another op", lambda m: m.lstm_backward(
        np.zeros((2, 3)), ref.attention_forward(np.ones((2, 3)), np.ones((2, 4, 3)),
                                                np.ones((2, 4, 3)))[2]), TypeError,
     r"cache: expected the LSTMCache returned by lstm_forward, got AttentionCache"),
    ("cache a string", lambda m: m.lstm_backward(np.zeros((T, B, H)), "cache"), TypeError,
     r"cache: expected the LSTMCache returned by lstm_forward, got str"),
]

# numpy_ref only: the single-step cell and the initialiser have no kernels counterpart
REF_ONLY_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("cell h wrong shape", lambda: ref.lstm_cell_forward(
        X[0], np.zeros((B, H + 1)), np.zeros((B, H)),
        {k.removesuffix("_l0"): v for k, v in P1.items()}), ValueError,
     r"h: expected shape \[B, Ho\] = \(3, 6\), got \(3, 7\)"),
    ("cell params with layer suffix", lambda: ref.lstm_cell_forward(
        X[0], np.zeros((B, H)), np.zeros((B, H)), P1), ValueError,
     r"params: missing key 'weight_hh'"),
    ("cell cache of the layer", lambda: ref.lstm_cell_backward(
        np.zeros((B, H)), None, ref.lstm_forward(X, P1)[2]), TypeError,
     r"cache: expected the LSTMCellCache returned by lstm_cell_forward, got LSTMCache"),
    ("init proj_size >= hidden", lambda: ref.init_lstm_params(3, 4, proj_size=4), ValueError,
     r"proj_size: expected 0 <= proj_size < hidden_size = 4, got 4"),
    ("init hidden zero", lambda: ref.init_lstm_params(3, 0), ValueError,
     r"hidden_size: expected an integer >= 1, got 0"),
]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(("call", "exc", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_lstm_bad_input_raises_a_clear_error(call, exc, message, backend: str) -> None:
    with pytest.raises(exc, match=message):
        call(BACKENDS[backend])


@pytest.mark.parametrize(("call", "exc", "message"), [c[1:] for c in REF_ONLY_CASES],
                         ids=[c[0] for c in REF_ONLY_CASES])
def test_lstm_cell_and_init_bad_input_raises_a_clear_error(call, exc, message) -> None:
    with pytest.raises(exc, match=message):
        call()

