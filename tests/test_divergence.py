"""The first-divergence report (`numpy_ref.divergence`, `torch_impl.recorder`) finds planted
bugs where they were planted: hand-written LSTMs, GRUs, RNNs and attention in NumPy, and torch
modules recorded with hooks, each with one bug at a known step, gate or sublayer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_ref as ref
from numpy_ref.divergence import (
    DivergenceError,
    describe,
    find_divergence,
    first_divergence,
    intermediates,
)
from torch_impl import recorder
from torch_impl.convert import to_numpy


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


# --------------------------------------------------------------------------------------------
# hand-written implementations (the "user's" code), each recording its intermediates


def my_lstm(x, p, *, lengths=None, bug_step=None, bug="bias"):
    """One-layer LSTM over x [T, B, I], torch's params; a bug in the forget gate at bug_step."""
    T, B, _ = x.shape
    H = p["weight_hh_l0"].shape[1]
    h, c = np.zeros((B, H), x.dtype), np.zeros((B, H), x.dtype)
    rec, out = {}, np.zeros((T, B, H), x.dtype)
    for t in range(T):
        a = x[t] @ p["weight_ih_l0"].T + p["bias_ih_l0"] + h @ p["weight_hh_l0"].T + p["bias_hh_l0"]
        a_i, a_f, a_g, a_o = np.split(a, 4, axis=1)
        if t == bug_step and bug == "bias":
            a_f = a_f + 0.5  # a wrong forget bias at this step only
        i, g, o = sigmoid(a_i), np.tanh(a_g), sigmoid(a_o)
        f = np.tanh(a_f) if t == bug_step and bug == "activation" else sigmoid(a_f)
        c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        keep = np.ones((B, 1), bool) if lengths is None else (t < np.asarray(lengths))[:, None]
        h, c = np.where(keep, h_new, h), np.where(keep, c_new, c)
        out[t] = np.where(keep, h_new, 0)
        for name, v in (("i", i), ("f", f), ("g", g), ("o", o), ("c", c_new), ("h", h_new)):
            rec[f"l0.forward.t{t}.{name}"] = v
    rec.update(output=out, h_n=h[None], c_n=c[None])
    return rec


def my_gru(x, p, h0, *, linear_before_reset=True):
    """One-layer GRU; torch's GRU applies r to (W_hn h + b_hn), the other variant to h."""
    T = x.shape[0]
    H = h0.shape[1]
    w_ih, w_hh, b_ih, b_hh = (p[k] for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0",
                                             "bias_hh_l0"))
    h, rec = h0, {}
    for t in range(T):
        gi = x[t] @ w_ih.T + b_ih
        r = sigmoid(gi[:, :H] + h @ w_hh[:H].T + b_hh[:H])
        z = sigmoid(gi[:, H:2 * H] + h @ w_hh[H:2 * H].T + b_hh[H:2 * H])
        if linear_before_reset:
            n = np.tanh(gi[:, 2 * H:] + r * (h @ w_hh[2 * H:].T + b_hh[2 * H:]))
        else:
            n = np.tanh(gi[:, 2 * H:] + (r * h) @ w_hh[2 * H:].T + b_hh[2 * H:])
        h = (1 - z) * n + z * h
        rec.update({f"l0.forward.t{t}.r": r, f"l0.forward.t{t}.z": z,
                    f"l0.forward.t{t}.n": n, f"l0.forward.t{t}.h": h})
    return rec


def my_attention(q, k, v, *, stable=True, scale=None, context_bug=False):
    """Scaled-dot attention [B, Tq, H] in the inputs' dtype; the planted bugs: no row max in
    the softmax, a wrong scale, the context from the keys."""
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(0, 2, 1)) * q.dtype.type(scale)
    e = np.exp(s - s.max(axis=-1, keepdims=True)) if stable else np.exp(s)
    with np.errstate(invalid="ignore"):
        w = e / e.sum(axis=-1, keepdims=True)
    c = w @ (k if context_bug else v)
    return {"scores": s, "logits": s, "weights": w, "context": c}


# --------------------------------------------------------------------------------------------
# the LSTM


def _lstm_case(T=6, B=3, I=4, H=5, seed=0):
    rng = np.random.default_rng(seed)
    p = ref.init_lstm_params(I, H, rng=seed)
    return rng.standard_normal((T, B, I)), p


def test_a_correct_lstm_reports_no_divergence_with_every_name_compared() -> None:
    x, p = _lstm_case()
    report = find_divergence(ref.lstm_forward, (x, p), {}, my_lstm(x, p))
    assert report.ok and report.first is None and not report.missing
    assert len(report.compared) == report.total == 6 * 6 + 3
    assert report.passed_before == report.compared
    report.raise_if_diverged()
    assert "no divergence" in str(report)


@pytest.mark.parametrize("bug", ["bias", "activation"])
def test_an_lstm_bug_in_the_forget_gate_at_step_3_is_reported_there(bug: str) -> None:
    x, p = _lstm_case()
    report = find_divergence(ref.lstm_forward, (x, p), {}, my_lstm(x, p, bug_step=3, bug=bug))
    assert not report.ok
    assert report.first.name == "l0.forward.t3.f"
    assert report.passed_before[-1] == "l0.forward.t3.i"  # everything before it passed
    assert len(report.passed_before) == 3 * 6 + 1
    assert report.first.index[0] in range(3) and report.first.error > report.first.allowed
    text = str(report)
    assert "'l0.forward.t3.f'" in text and "step t=3, forget gate" in text
    with pytest.raises(DivergenceError, match=r"l0\.forward\.t3\.f"):
        report.raise_if_diverged()


def test_padded_steps_are_not_compared() -> None:
    x, p = _lstm_case()
    lengths = np.array([6, 2, 4])
    x[2:, 1] = np.nan  # padding: the user's gates there are NaN, the reference's not
    x[4:, 2] = np.nan
    got = my_lstm(x, p, lengths=lengths)
    report = find_divergence(ref.lstm_forward, (x, p), {"lengths": lengths}, got)
    assert report.ok, str(report)
    # a bug in a padded row only is not data either; in a real row it is found
    got["l0.forward.t3.f"] = got["l0.forward.t3.f"].copy()
    got["l0.forward.t3.f"][1] += 1
    assert find_divergence(ref.lstm_forward, (x, p), {"lengths": lengths}, got).ok
    got["l0.forward.t3.f"][2] += 1
    report = find_divergence(ref.lstm_forward, (x, p), {"lengths": lengths}, got)
    assert report.first.name == "l0.forward.t3.f" and report.first.index[0] == 2


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 7), B=st.integers(1, 3), I=st.integers(1, 4), H=st.integers(1, 5),
       seed=st.integers(0, 2**16), where=st.floats(0, 1, allow_nan=False, exclude_max=True))
def test_property_a_correct_lstm_never_diverges_and_a_bug_is_found_at_its_step(
        T: int, B: int, I: int, H: int, seed: int, where: float) -> None:
    x, p = _lstm_case(T, B, I, H, seed)
    assert find_divergence(ref.lstm_forward, (x, p), {}, my_lstm(x, p)).ok
    t = int(where * T)
    report = find_divergence(ref.lstm_forward, (x, p), {}, my_lstm(x, p, bug_step=t))
    assert report.first is not None and report.first.name == f"l0.forward.t{t}.f"


def test_missing_names_are_listed_and_skipped() -> None:
    x, p = _lstm_case()
    got = my_lstm(x, p, bug_step=3)
    only_h = {k: v for k, v in got.items() if k.endswith(".h")}
    report = find_divergence(ref.lstm_forward, (x, p), {}, only_h)
    assert report.first.name == "l0.forward.t3.h"  # the first of the names handed in
    assert len(report.compared) == 6 and "l0.forward.t0.i" in report.missing
    assert report.missing[-3:] == ("output", "h_n", "c_n")
    assert "not handed in (33" in str(report)


def test_unknown_names_and_wrong_shapes_are_errors() -> None:
    x, p = _lstm_case()
    reference = intermediates(ref.lstm_forward(x, p)[-1])
    with pytest.raises(KeyError, match=r"unknown names \['l0.forward.t3.forget'\].*"
                                       r"l0.forward.t0.i, l0.forward.t0.f"):
        first_divergence(reference, {"l0.forward.t3.forget": np.zeros((3, 5))})
    with pytest.raises(ValueError, match=r"'l0.forward.t3.f' has shape \(5, 3\), the "
                                         r"reference's is \(3, 5\)"):
        first_divergence(reference, {"l0.forward.t3.f": np.zeros((5, 3))})


def test_a_bidirectional_stack_names_layers_directions_and_time_indices() -> None:
    rng = np.random.default_rng(1)
    p = ref.init_lstm_params(3, 4, num_layers=2, bidirectional=True, rng=1)
    x = rng.standard_normal((2, 5, 3))
    out, (h_n, c_n), cache = ref.lstm_forward(x, p, num_layers=2, bidirectional=True,
                                              batch_first=True, lengths=[5, 3])
    names = list(intermediates(cache))
    assert names[:2] == ["l0.forward.t0.i", "l0.forward.t0.f"]
    assert names[30] == "l0.reverse.t4.i"  # the reverse walk starts at the last step
    assert names[-3:] == ["output", "h_n", "c_n"]
    assert first_divergence(cache, {"output": out, "h_n": h_n, "c_n": c_n}).ok
    assert describe("l1.reverse.t2.c") == "layer 1, reverse direction, step t=2, cell state c"


# --------------------------------------------------------------------------------------------
# GRU and RNN


def test_the_gru_reset_gate_variant_is_found_at_the_first_step_in_gate_n() -> None:
    rng = np.random.default_rng(2)
    p = ref.init_gru_params(4, 5, rng=2)
    x, h0 = rng.standard_normal((6, 3, 4)), rng.standard_normal((1, 3, 5))
    args, kwargs = (x, p), {"h0": h0}
    assert find_divergence(ref.gru_forward, args, kwargs, my_gru(x, p, h0[0])).ok
    other = my_gru(x, p, h0[0], linear_before_reset=False)
    report = find_divergence(ref.gru_forward, args, kwargs, other)
    assert report.first.name == "l0.forward.t0.n"
    assert report.passed_before == ("l0.forward.t0.r", "l0.forward.t0.z")
    # ... and the reference's other variant is that implementation exactly
    assert find_divergence(ref.gru_forward, args, {**kwargs, "linear_before_reset": False},
                           other).ok


def test_an_rnn_bug_at_step_2_is_found_in_its_pre_activation() -> None:
    rng = np.random.default_rng(3)
    p = ref.init_rnn_params(3, 4, rng=3)
    x = rng.standard_normal((5, 2, 3))
    h, got = np.zeros((2, 4)), {}
    for t in range(5):
        a = x[t] @ p["weight_ih_l0"].T + p["bias_ih_l0"] + h @ p["weight_hh_l0"].T
        a = a + (2 * p["bias_hh_l0"] if t == 2 else p["bias_hh_l0"])  # bias added twice
        h = np.tanh(a)
        got[f"l0.forward.t{t}.a"], got[f"l0.forward.t{t}.h"] = a, h
    report = find_divergence(ref.rnn_forward, (x, p), {}, got)
    assert report.first.name == "l0.forward.t2.a" and len(report.passed_before) == 4


# --------------------------------------------------------------------------------------------
# attention


def _attention_case(large=False):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 3, 8)) for _ in range(3))
    if large:  # scores of a few hundred: exp overflows float32 without the row max
        q, k = q * 12, k * 12
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


def test_a_correct_float32_attention_passes_under_the_float32_default() -> None:
    q, k, v = _attention_case(large=True)
    got = my_attention(q, k, v)
    report = find_divergence(ref.attention_forward, (q, k, v), {"score": "scaled_dot"}, got)
    assert report.ok, str(report)
    assert report.compared == ("scores", "logits", "weights", "context")
    assert report.missing == ("lse",)
    assert "rtol=6.10352e-05" in report.comparisons[0].rule  # 512 eps32
    # held to the float64 rule instead, float32 rounding fails
    assert not find_divergence(ref.attention_forward, (q, k, v), {"score": "scaled_dot"}, got,
                               rtol=1e-7, atol=1e-7).ok


def test_a_softmax_without_the_row_max_diverges_at_the_weights() -> None:
    q, k, v = _attention_case(large=True)
    with np.errstate(over="ignore"):
        got = my_attention(q, k, v, stable=False)
    report = find_divergence(ref.attention_forward, (q, k, v), {"score": "scaled_dot"}, got)
    assert report.first.name == "weights" and report.passed_before == ("scores", "logits")
    assert np.isnan(report.first.got)


def test_a_wrong_scale_diverges_at_the_scores_and_a_context_bug_at_the_context() -> None:
    q, k, v = _attention_case()
    kwargs = {"score": "scaled_dot"}
    report = find_divergence(ref.attention_forward, (q, k, v), kwargs,
                             my_attention(q, k, v, scale=1 / 8))  # 1/H, not 1/sqrt(H)
    assert report.first.name == "scores"
    report = find_divergence(ref.attention_forward, (q, k, v), kwargs,
                             my_attention(q, k, v, context_bug=True))
    assert report.first.name == "context"
    assert report.passed_before == ("scores", "logits", "weights")


def test_attention_scores_of_hidden_keys_are_not_compared() -> None:
    q, k, v = (a.astype(np.float64) for a in _attention_case())
    lengths = np.array([5, 2])
    k5, v5 = np.concatenate([k, k[:, :2]], 1), np.concatenate([v, v[:, :2]], 1)
    got = my_attention(q, k5, v5)
    got["logits"] = got["scores"] = got["scores"].copy()
    got["scores"][1, :, 2:] = -np.inf  # masked_fill, as torch does
    s = got["scores"][1]
    e = np.exp(s - s.max(-1, keepdims=True))
    got["weights"] = got["weights"].copy()
    got["weights"][1] = e / e.sum(-1, keepdims=True)
    got["context"] = got["weights"] @ v5
    report = find_divergence(ref.attention_forward, (q, k5, v5),
                             {"score": "scaled_dot", "lengths": lengths}, got)
    assert report.ok, str(report)
    got["weights"][1, 0, 3] = 0.1  # weight on a hidden key: that is data, and wrong
    report = find_divergence(ref.attention_forward, (q, k5, v5),
                             {"score": "scaled_dot", "lengths": lengths}, got)
    assert report.first.name == "weights" and report.first.index == (1, 0, 3)


def test_multihead_attention_names_match_torch() -> None:
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        out, w = mha(x, x, x, average_attn_weights=False)
    p = to_numpy(mha)
    reference = intermediates(ref.multihead_attention_forward(
        x.numpy(), x.numpy(), x.numpy(), p, num_heads=2, average_attn_weights=False)[-1])
    q = x.numpy() @ p["in_proj_weight"][:8].T + p["in_proj_bias"][:8]
    report = first_divergence(reference, {"q": q, "weights": w, "output": out})
    assert report.ok and report.compared == ("q", "weights", "output")


# --------------------------------------------------------------------------------------------
# a Transformer encoder layer as a torch module, recorded with hooks


class MyEncoderLayer(torch.nn.Module):
    """Post-norm encoder layer with torch's submodule names; `norm2_eps` and `activation` are
    where the bugs go."""

    def __init__(self, E=8, nhead=2, F=16, norm2_eps=1e-5, activation=None):
        super().__init__()
        self.self_attn = torch.nn.MultiheadAttention(E, nhead)
        self.linear1 = torch.nn.Linear(E, F)
        self.linear2 = torch.nn.Linear(F, E)
        self.norm1 = torch.nn.LayerNorm(E)
        self.norm2 = torch.nn.LayerNorm(E, eps=norm2_eps)
        self.activation = activation or torch.nn.ReLU()

    def forward(self, src):
        x = src + self.self_attn(src, src, src, need_weights=False)[0]
        recorder.log("residual1", x)
        x = self.norm1(x)
        x = x + self.linear2(self.activation(self.linear1(x)))
        recorder.log("residual2", x)
        return self.norm2(x)


def _run_recorded(layer, src):
    with torch.no_grad(), recorder.record(layer) as rec:
        out = layer(src)
    return out, rec


@pytest.mark.parametrize("bug, where", [(None, None), ({"norm2_eps": 0.1}, "norm2"),
                                        ({"activation": torch.nn.GELU()}, "activation")])
def test_a_transformer_layer_bug_is_found_in_its_sublayer(bug, where) -> None:
    torch.manual_seed(0)
    layer = MyEncoderLayer(**(bug or {})).double()
    src = torch.randn(5, 2, 8, dtype=torch.float64)
    p = to_numpy(layer)
    _, rec = _run_recorded(layer, src)
    reference = intermediates(ref.transformer_encoder_layer_forward(src.numpy(), p, nhead=2)[-1])
    got = rec.values(keep=reference)
    assert list(got) == ["self_attn", "residual1", "norm1", "linear1", "activation", "linear2",
                         "residual2", "norm2"]
    report = first_divergence(reference, got)
    if where is None:
        assert report.ok, str(report)
        assert "self_attn.q" in report.missing and "output" in report.missing
    else:
        assert report.first.name == where, str(report)
        assert report.passed_before[-1] == {"norm2": "residual2", "activation": "linear1"}[where]


def test_torchs_own_encoder_layer_recorded_with_hooks_passes() -> None:
    torch.manual_seed(1)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).double()  # train mode:
    src = torch.randn(5, 2, 8, dtype=torch.float64)  # not the fused fast path, hooks fire
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with recorder.record(layer) as rec:
        out = layer(src, src_key_padding_mask=kpm)
    reference = intermediates(ref.transformer_encoder_layer_forward(
        src.numpy(), to_numpy(layer), nhead=2, src_key_padding_mask=kpm.numpy())[-1])
    got = rec.values(keep=reference) | {"output": out}
    report = first_divergence(reference, got)
    assert report.ok, str(report)
    assert report.compared == ("self_attn", "norm1", "linear1", "linear2", "norm2", "output")


# --------------------------------------------------------------------------------------------
# a torch LSTM written as a per-step loop over a cell, recorded by hooks called once per step


class Gate(torch.nn.Module):
    def __init__(self, fn, bug_call=None):
        super().__init__()
        self.fn, self.bug_call, self.calls = fn, bug_call, 0

    def forward(self, a):
        y = self.fn(a + 0.5 if self.calls == self.bug_call else a)
        self.calls += 1
        return y


class Cell(torch.nn.Module):
    def __init__(self, I, H, bug_call=None):
        super().__init__()
        self.ih, self.hh = torch.nn.Linear(I, 4 * H), torch.nn.Linear(H, 4 * H)
        self.input_gate, self.output_gate = Gate(torch.sigmoid), Gate(torch.sigmoid)
        self.forget_gate = Gate(torch.sigmoid, bug_call)
        self.candidate = Gate(torch.tanh)

    def forward(self, x, h, c):
        a_i, a_f, a_g, a_o = (self.ih(x) + self.hh(h)).chunk(4, dim=-1)
        i, f = self.input_gate(a_i), self.forget_gate(a_f)
        g, o = self.candidate(a_g), self.output_gate(a_o)
        c = f * c + i * g
        return o * torch.tanh(c), c


class MyLSTM(torch.nn.Module):
    def __init__(self, I, H, bug_call=None):
        super().__init__()
        self.cell = Cell(I, H, bug_call)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], self.cell.hh.in_features)
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], h, c)
        return h


STEP_NAMES = {"cell.input_gate": "l0.forward.t{call}.i", "cell.forget_gate": "l0.forward.t{call}.f",
              "cell.candidate": "l0.forward.t{call}.g",
              "cell.output_gate": lambda k: f"l0.forward.t{k}.o",
              "cell": ("l0.forward.t{call}.h", "l0.forward.t{call}.c")}


@pytest.mark.parametrize("bug_call", [None, 3])
def test_hooks_on_a_cell_called_once_per_step_record_every_step(bug_call) -> None:
    torch.manual_seed(2)
    model = MyLSTM(3, 4, bug_call).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    with torch.no_grad(), recorder.record(model, STEP_NAMES) as rec:
        model(x)
    assert rec.calls["cell"] == 6 and len(rec.values()) == 36
    cell = model.cell
    w = {"weight_ih_l0": cell.ih.weight, "weight_hh_l0": cell.hh.weight,
         "bias_ih_l0": cell.ih.bias, "bias_hh_l0": cell.hh.bias}
    p = {k: v.detach().numpy() for k, v in w.items()}
    report = find_divergence(ref.lstm_forward, (x.numpy(), p), {}, rec.values())
    if bug_call is None:
        assert report.ok and len(report.compared) == 36, str(report)
    else:
        assert report.first.name == "l0.forward.t3.f", str(report)


def test_the_recorder_refuses_ambiguous_names_and_unknown_submodules() -> None:
    model = MyLSTM(3, 4).double()
    with pytest.raises(KeyError, match=r"no submodules \['cell\.nope'\]"):
        recorder.record(model, {"cell.nope": "x"})
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="recorded twice"), torch.no_grad(), \
            recorder.record(model, {"cell.forget_gate": "l0.forward.t0.f"}):
        model(x)
    recorder.log("ignored", x)  # no recording active: a no-op
    model = MyLSTM(3, 4)  # float32, recorded as float64
    with torch.no_grad(), recorder.record(model, float64=True) as rec:
        model(x.float())
    values = rec.values()
    assert "cell.forget_gate" in values and "cell.forget_gate#1" in values
    assert values["cell.ih"].dtype == np.float64


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_names_follow_torchs_sublayers(norm_first: bool) -> None:
    torch.manual_seed(3)
    layer = torch.nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, norm_first=norm_first,
                                             batch_first=True).double()
    tgt, memory = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 5, 8,
                                                                         dtype=torch.float64)
    with recorder.record(layer) as rec:
        out = layer(tgt, memory)
    reference = intermediates(ref.transformer_decoder_layer_forward(
        tgt.numpy(), memory.numpy(), to_numpy(layer), nhead=2, norm_first=norm_first,
        batch_first=True)[-1])
    names = list(reference)
    assert names.index("self_attn") < names.index("multihead_attn") < names.index("linear1")
    assert names[0] == ("norm1" if norm_first else "self_attn.q") and names[-1] == "output"
    report = first_divergence(reference, rec.values(keep=reference) | {"output": out})
    assert report.ok and {"self_attn", "multihead_attn", "norm3"} <= set(report.compared)
