"""Other frameworks' recurrent layouts (`numpy_ref.layouts`), proved against the frameworks.

- ONNX: each converted layer runs as an ONNX LSTM / GRU / RNN node in ONNX Runtime (float32:
  its recurrent kernels have no float64) with ``sequence_lens`` (unsorted), and in ONNX's own
  reference evaluator (`onnx.reference`, float64; it ignores ``sequence_lens`` and knows no
  ReLU RNN, so full lengths and tanh there), one and two directions, with and without biases
  and initial states, the GRU with ``linear_before_reset`` 1 (torch's) and 0 (the other one);
  our forward on the torch-named params must give their Y, Y_h (and Y_c).
- Keras (its torch backend): ``keras.layers.LSTM``, ``GRU`` (``reset_after`` True and False)
  and ``SimpleRNN`` holding the converted weights give our outputs and final states.
- d2l's and DLFS2's from-scratch GRUs are written here from their books' formulas (NumPy, as
  their code does) and run on the converted weights.
- Every conversion round-trips exactly.

The frameworks come with the ``test`` extra; without them their tests skip.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import numpy_ref as ref
from numpy_ref import layouts

MODES = ("lstm", "gru", "rnn")


def _params(mode: str, I: int, H: int, *, bidirectional: bool, bias: bool = True,
            num_layers: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    init = {"lstm": ref.init_lstm_params, "gru": ref.init_gru_params,
            "rnn": ref.init_rnn_params}[mode]
    p = init(I, H, num_layers=num_layers, bidirectional=bidirectional, bias=bias, rng=seed)
    return {k: v * 2.0 for k, v in p.items()}  # saturating, and bias_ih != bias_hh


def _forward(mode: str, x, params, *, h0=None, c0=None, lengths=None, lbr=True,
             act="tanh", bidirectional=False):
    if mode == "lstm":
        out, (h_n, c_n), _ = ref.lstm_forward(x, params, bidirectional=bidirectional, h0=h0,
                                              c0=c0, lengths=lengths)
        return out, h_n, c_n
    if mode == "gru":
        out, h_n, _ = ref.gru_forward(x, params, bidirectional=bidirectional, h0=h0,
                                      lengths=lengths, linear_before_reset=lbr)
        return out, h_n, None
    out, h_n, _ = ref.rnn_forward(x, params, bidirectional=bidirectional, h0=h0,
                                  lengths=lengths, nonlinearity=act)
    return out, h_n, None


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_onnx_round_trip_is_exact(mode: str, bias: bool) -> None:
    p = _params(mode, 3, 4, bidirectional=True, bias=bias, num_layers=2)
    for layer in (0, 1):
        o = layouts.to_onnx(p, mode, layer=layer)
        back = layouts.from_onnx(o["W"], o["R"], o.get("B"), mode=mode, layer=layer)
        mine = {k: v for k, v in p.items() if f"_l{layer}" in k}
        assert list(back) == list(mine)
        for k in mine:
            np.testing.assert_array_equal(back[k], mine[k], err_msg=k)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reset_after", [True, False])
def test_keras_round_trip_is_exact_up_to_the_bias_split(mode: str, reset_after: bool) -> None:
    p = _params(mode, 3, 4, bidirectional=True)
    for d in (0, 1):
        k = layouts.to_keras(p, mode, direction=d, reset_after=reset_after)
        back = layouts.from_keras(k, mode, direction=d, reset_after=reset_after)
        for kind in ("weight_ih", "weight_hh"):
            key = kind + ("_l0_reverse" if d else "_l0")
            np.testing.assert_array_equal(back[key], p[key])
        sfx = "_l0_reverse" if d else "_l0"
        total = back["bias_ih" + sfx] + back["bias_hh" + sfx]
        np.testing.assert_allclose(total, p["bias_ih" + sfx] + p["bias_hh" + sfx], rtol=0,
                                   atol=1e-15)
        if mode == "gru" and reset_after:  # two biases kept apart
            np.testing.assert_array_equal(back["bias_hh" + sfx], p["bias_hh" + sfx])


def test_d2l_and_dlfs2_round_trips() -> None:
    p = _params("gru", 3, 4, bidirectional=False)
    for to, back in ((layouts.to_d2l_gru, layouts.from_d2l_gru),
                     (layouts.to_dlfs2_gru, layouts.from_dlfs2_gru)):
        q = back(to(p))
        for kind in ("weight_ih", "weight_hh"):
            np.testing.assert_array_equal(q[kind + "_l0"], p[kind + "_l0"])
        np.testing.assert_allclose(q["bias_ih_l0"] + q["bias_hh_l0"],
                                   p["bias_ih_l0"] + p["bias_hh_l0"], atol=1e-15)


def test_a_projected_lstm_has_no_onnx_form_and_bad_modes_are_refused() -> None:
    p = ref.init_lstm_params(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="projections"):
        layouts.to_onnx(p, "lstm")
    with pytest.raises(ValueError, match="mode: expected 'lstm', 'gru' or 'rnn'"):
        layouts.to_onnx(p, "elman")
    with pytest.raises(ValueError, match=r"W, R: expected \[D, 3H, In\]"):
        layouts.from_onnx(np.zeros((1, 7, 2)), np.zeros((1, 7, 2)), mode="gru")


# ---------------------------------------------------------------------------------------------
# ONNX, in ONNX Runtime and in ONNX's reference evaluator


ONNX_CASES = [
    ("lstm", True, True, True, {}), ("lstm", False, False, False, {}),
    ("gru", True, True, True, {"linear_before_reset": 1}),
    ("gru", True, True, False, {"linear_before_reset": 0}),
    ("gru", False, False, True, {"linear_before_reset": 0}),
    ("rnn", True, True, True, {"act": "tanh"}), ("rnn", True, False, True, {"act": "relu"}),
]


def _onnx_model(mode: str, D: int, H: int, has_bias: bool, with_state: bool, attrs: dict,
                dtype, with_lengths: bool):
    from onnx import TensorProto, helper
    op = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[mode]
    inputs = ["X", "W", "R", "B" if has_bias else "", "sequence_lens" if with_lengths else "",
              "initial_h" if with_state else ""]
    if mode == "lstm":
        inputs.append("initial_c" if with_state else "")
    outputs = ["Y", "Y_h"] + (["Y_c"] if mode == "lstm" else [])
    kw = {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"}
    if mode == "gru":
        kw["linear_before_reset"] = attrs["linear_before_reset"]
    if mode == "rnn":
        kw["activations"] = [attrs["act"].capitalize()] * D
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node(op, inputs, outputs, **kw)
    f64 = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.INT32 if n == "sequence_lens"
                                                  else f64, None) for n in inputs if n]
    graph_outputs = [helper.make_tensor_value_info(n, f64, None) for n in outputs]
    graph = helper.make_graph([node], "rnn", graph_inputs, graph_outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize(("mode", "bidirectional", "has_bias", "with_state", "attrs"),
                         ONNX_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("runtime", ["onnxruntime", "onnx-reference"])
def test_onnx_runs_the_converted_layer_as_ours(mode, bidirectional, has_bias, with_state, attrs,
                                               runtime) -> None:
    pytest.importorskip("onnx")
    if runtime == "onnxruntime":
        ort = pytest.importorskip("onnxruntime")
    elif attrs.get("act") == "relu":
        pytest.skip("onnx.reference's RNN knows no 'Relu' activation (ONNX Runtime runs it)")
    T, B, I, H = 5, 3, 2, 4
    D = 2 if bidirectional else 1
    # ONNX Runtime's recurrent kernels are float32 only: the inputs are rounded to float32 and
    # ours runs in float64 on them; the reference evaluator runs float64
    dtype = np.float32 if runtime == "onnxruntime" else np.float64
    tol = 2e-6 if dtype == np.float32 else 1e-12
    rng = np.random.default_rng(1)

    def rounded(a):
        return a.astype(dtype).astype(np.float64)

    p = {k: rounded(v) for k, v in _params(mode, I, H, bidirectional=bidirectional,
                                           bias=has_bias).items()}
    x = rounded(rng.standard_normal((T, B, I)))
    # onnx.reference ignores sequence_lens (ONNX Runtime honours it): full lengths there
    lengths = np.array([5, 2, 4]) if runtime == "onnxruntime" else None
    h0 = rounded(rng.standard_normal((D, B, H))) if with_state else None
    c0 = rounded(rng.standard_normal((D, B, H))) if with_state and mode == "lstm" else None
    out, h_n, c_n = _forward(mode, x, p, h0=h0, c0=c0, lengths=lengths,
                             lbr=bool(attrs.get("linear_before_reset", 1)),
                             act=attrs.get("act", "tanh"), bidirectional=bidirectional)
    feeds = {"X": x, **layouts.to_onnx(p, mode), "initial_h": h0, "initial_c": c0}
    feeds = {k: v.astype(dtype) for k, v in feeds.items() if v is not None}
    if lengths is not None:
        feeds["sequence_lens"] = lengths.astype(np.int32)
    model = _onnx_model(mode, D, H, has_bias, with_state, attrs, dtype, lengths is not None)
    if runtime == "onnxruntime":
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)
    else:
        from onnx.reference import ReferenceEvaluator
        got = ReferenceEvaluator(model).run(None, feeds)
    Y = got[0].transpose(0, 2, 1, 3).reshape(T, B, D * H)  # [T, D, B, H] -> [T, B, D*H]
    assert Y.dtype == dtype
    np.testing.assert_allclose(Y, out, rtol=tol, atol=tol, err_msg="Y")
    np.testing.assert_allclose(got[1], h_n, rtol=tol, atol=tol, err_msg="Y_h")
    if mode == "lstm":
        np.testing.assert_allclose(got[2], c_n, rtol=tol, atol=tol, err_msg="Y_c")


# ---------------------------------------------------------------------------------------------
# Keras (torch backend)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize(("mode", "reset_after", "bias"),
                         [("lstm", True, True), ("lstm", True, False), ("gru", True, True),
                          ("gru", False, True), ("gru", True, False), ("rnn", True, True)])
def test_keras_layers_hold_the_converted_weights_and_agree(mode, reset_after, bias) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on {keras.backend.backend()}, not torch")
    T, B, I, H = 6, 3, 2, 5
    rng = np.random.default_rng(2)
    p = _params(mode, I, H, bidirectional=False, bias=bias)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    h0 = rng.standard_normal((1, B, H)).astype(np.float32)
    c0 = rng.standard_normal((1, B, H)).astype(np.float32)
    p32 = {k: v.astype(np.float32) for k, v in p.items()}
    out, h_n, c_n = _forward(mode, x.astype(np.float64), p, h0=h0.astype(np.float64),
                             c0=c0.astype(np.float64) if mode == "lstm" else None,
                             lbr=reset_after)
    kw = {"return_sequences": True, "return_state": True, "use_bias": bias, "dtype": "float32"}
    if mode == "lstm":
        layer = keras.layers.LSTM(H, unit_forget_bias=False, **kw)
    elif mode == "gru":
        layer = keras.layers.GRU(H, reset_after=reset_after, **kw)
    else:
        layer = keras.layers.SimpleRNN(H, **kw)
    xb = np.ascontiguousarray(x.transpose(1, 0, 2))  # Keras is batch-first
    layer.build((B, T, I))
    w = layouts.to_keras(p32, mode, reset_after=reset_after)
    layer.set_weights([w[k] for k in ("kernel", "recurrent_kernel", "bias") if k in w])
    state = [h0[0], c0[0]] if mode == "lstm" else [h0[0]]
    got = [np.asarray(keras.ops.convert_to_numpy(t)) for t in layer(xb, initial_state=state)]
    np.testing.assert_allclose(got[0].transpose(1, 0, 2), out, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[1], h_n[0], rtol=2e-5, atol=2e-5)
    if mode == "lstm":
        np.testing.assert_allclose(got[2], c_n[0], rtol=2e-5, atol=2e-5)
    back = layouts.from_keras({k: v for k, v in zip(
        ("kernel", "recurrent_kernel", "bias"), layer.get_weights(), strict=False)}, mode,
        reset_after=reset_after)
    out2, _, _ = _forward(mode, x.astype(np.float64), {k: v.astype(np.float64)
                                                        for k, v in back.items()},
                          h0=h0.astype(np.float64),
                          c0=c0.astype(np.float64) if mode == "lstm" else None, lbr=reset_after)
    np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the from-scratch GRUs of d2l and DLFS2, written from their formulas


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def d2l_gru(X, H, w):
    """d2l's ``gru`` (chapter "Gated Recurrent Units", from scratch): X [T, B, I]."""
    outputs = []
    for x in X:
        Z = _sigmoid(x @ w["W_xz"] + H @ w["W_hz"] + w["b_z"])
        R = _sigmoid(x @ w["W_xr"] + H @ w["W_hr"] + w["b_r"])
        H_tilde = np.tanh(x @ w["W_xh"] + (R * H) @ w["W_hh"] + w["b_h"])
        H = Z * H + (1 - Z) * H_tilde
        outputs.append(H)
    return np.stack(outputs), H


def dlfs2_gru(xs, h, w):
    """DLFS2's ``GRU.forward`` (chapter 6): xs [T, B, I]; its update is (1 - z) h + z h_hat."""
    Wx, Wh, b = w["Wx"], w["Wh"], w["b"]
    H = Wh.shape[0]
    Wxz, Wxr, Wxh = Wx[:, :H], Wx[:, H:2 * H], Wx[:, 2 * H:]
    Whz, Whr, Whh = Wh[:, :H], Wh[:, H:2 * H], Wh[:, 2 * H:]
    bz, br, bh = b[:H], b[H:2 * H], b[2 * H:]
    outputs = []
    for x in xs:
        z = _sigmoid(x @ Wxz + h @ Whz + bz)
        r = _sigmoid(x @ Wxr + h @ Whr + br)
        h_hat = np.tanh(x @ Wxh + (r * h) @ Whh + bh)
        h = (1 - z) * h + z * h_hat
        outputs.append(h)
    return np.stack(outputs), h


@pytest.mark.parametrize("book", ["d2l", "dlfs2"])
def test_the_books_grus_on_converted_weights_are_ours_with_the_reset_before(book: str) -> None:
    rng = np.random.default_rng(3)
    T, B, I, H = 6, 3, 2, 4
    p = _params("gru", I, H, bidirectional=False)
    x, h0 = rng.standard_normal((T, B, I)), rng.standard_normal((1, B, H))
    out, h_n, _ = _forward("gru", x, p, h0=h0, lbr=False)
    run, to = (d2l_gru, layouts.to_d2l_gru) if book == "d2l" else (dlfs2_gru,
                                                                   layouts.to_dlfs2_gru)
    theirs, h_last = run(x, h0[0], to(p))
    np.testing.assert_allclose(theirs, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h_last, h_n[0], rtol=1e-12, atol=1e-12)
