"""float16 and bfloat16: the same-precision reference, the truth and the error budget.

torch's own float16/bfloat16 CPU results must pass `numpy_ref.testing.error_budget` for every op
family (that is what proves the budget is not too tight), and deliberately broken kernels must
fail it (that is what proves it is not too loose; those are in test_low_precision_broken.py).
The rest checks the contract: the dtype in is the dtype out, mixed dtypes are refused, a
low-precision cache reads back in its dtype, an input changed between forward and backward is
refused, and the truth is the float64 op.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import numpy_ref as ref
from numpy_ref.contract.unchanged import InputChanged
from numpy_ref.precision import LowPrecisionCache, truth
from numpy_ref.testing import error_budget, half_ulp

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
DTYPES = {"float16": (F16, torch.float16), "bfloat16": (BF16, torch.bfloat16)}
over_dtypes = pytest.mark.parametrize("dtype", list(DTYPES))


def low(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 data rounded to the dtype (the inputs both sides get)."""
    return np.asarray(a, np.float64).astype(DTYPES[dtype][0])


def to_torch(a: np.ndarray, dtype: str, grad: bool = False) -> torch.Tensor:
    """A low-precision ndarray as a torch tensor of the same dtype (exactly)."""
    t = torch.tensor(a.astype(np.float32)).to(DTYPES[dtype][1])
    return t.requires_grad_() if grad else t


def assert_within(report) -> None:
    assert report.tensors, "nothing was judged"
    report.raise_if_over()


# --------------------------------------------------------------------------------------------
# the recurrent family against torch's nn.LSTM / nn.GRU / nn.RNN in float16 and bfloat16


class RecurrentCase(NamedTuple):
    mode: str  # "lstm", "gru", "rnn-tanh", "rnn-relu"
    T: int
    B: int
    I: int
    H: int
    L: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    lengths: tuple[int, ...] | None
    use_h0: bool
    proj: int  # LSTM's proj_size (0: none)
    seed: int


@st.composite
def recurrent_cases(draw, mode: str) -> RecurrentCase:
    T, B, H = draw(st.integers(1, 12)), draw(st.integers(1, 4)), draw(st.integers(1, 24))
    lengths = None
    if draw(st.booleans()):
        lengths = tuple(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    proj = draw(st.integers(0, H - 1)) if mode == "lstm" and H > 1 and draw(st.booleans()) else 0
    return RecurrentCase(mode, T, B, draw(st.integers(1, 16)), H, draw(st.integers(1, 2)),
                         draw(st.booleans()), draw(st.booleans()), draw(st.booleans()),
                         lengths, draw(st.booleans()), proj, draw(st.integers(0, 2**32 - 1)))


def _recurrent_module(case: RecurrentCase) -> torch.nn.Module:
    kind, *nl = case.mode.split("-")
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind]
    options = {"nonlinearity": nl[0]} if nl else {}
    if case.proj:
        options["proj_size"] = case.proj
    torch.manual_seed(case.seed % 2**31)
    return cls(case.I, case.H, num_layers=case.L, bidirectional=case.bidirectional,
               batch_first=case.batch_first, bias=case.bias, **options)


def check_recurrent(case: RecurrentCase, dtype: str) -> None:
    rng = np.random.default_rng(case.seed)
    module = _recurrent_module(case)
    # torch's own init (the float32 tests double it to stress the gates; a ReLU RNN with
    # doubled weights is chaotic, and its gradients then depend on which side of 0 a rounding
    # puts each pre-activation, which no error budget can follow)
    params = {k: low(v.double().numpy(), dtype) for k, v in module.state_dict().items()}
    module = module.to(DTYPES[dtype][1])
    with torch.no_grad():
        for k, v in module.named_parameters():
            v.copy_(to_torch(params[k], dtype))
    D, Ho = 1 + case.bidirectional, case.proj or case.H
    x_shape = (case.B, case.T, case.I) if case.batch_first else (case.T, case.B, case.I)
    x = low(rng.standard_normal(x_shape), dtype)
    h0 = low(rng.standard_normal((case.L * D, case.B, Ho)), dtype)
    c0 = low(rng.standard_normal((case.L * D, case.B, case.H)), dtype)
    d_out = low(rng.standard_normal((*x_shape[:2], D * Ho)), dtype)
    lengths = None if case.lengths is None else np.array(case.lengths)
    kind = case.mode.split("-")[0]
    options = {"num_layers": case.L, "bidirectional": case.bidirectional,
               "batch_first": case.batch_first, "lengths": lengths}
    if kind == "rnn":
        options["nonlinearity"] = case.mode.split("-")[1]
    if case.use_h0:
        options.update({"h0": h0, "c0": c0} if kind == "lstm" else {"h0": h0})

    tx, th0, tc0 = (to_torch(a, dtype, grad=True) for a in (x, h0, c0))
    state = ((th0, tc0) if kind == "lstm" else th0) if case.use_h0 else None
    tin = tx
    if lengths is not None:
        tin = torch.nn.utils.rnn.pack_padded_sequence(
            tx, torch.tensor(case.lengths), batch_first=case.batch_first, enforce_sorted=False)
    out, _ = module(tin, state)
    if lengths is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(
            out, batch_first=case.batch_first, total_length=case.T)
    out.backward(to_torch(d_out, dtype))
    got_grads = {"d_x": tx.grad, **{f"d_{k}": v.grad for k, v in module.named_parameters()}}
    if case.use_h0:
        got_grads["d_h0"] = th0.grad
        if kind == "lstm":
            got_grads["d_c0"] = tc0.grad
    report = error_budget(getattr(ref, f"{kind}_forward"), (x, params), options,
                          got={"output": out}, backward=getattr(ref, f"{kind}_backward"),
                          grad_outputs=(d_out,), got_grads=got_grads)
    assert_within(report)


@over_dtypes
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn-tanh", "rnn-relu"])
@given(data=st.data())
def test_torch_recurrent_layers_pass_the_budget(mode: str, dtype: str, data) -> None:
    check_recurrent(data.draw(recurrent_cases(mode)), dtype)


# --------------------------------------------------------------------------------------------
# the contract


def test_the_dtype_in_is_the_dtype_out_and_the_cache_reads_back_in_it() -> None:
    rng = np.random.default_rng(0)
    for dtype in DTYPES:
        params = {k: low(v, dtype) for k, v in ref.init_lstm_params(3, 4, rng=rng).items()}
        x = low(rng.standard_normal((5, 2, 3)), dtype)
        out, (h_n, c_n), cache = ref.lstm_forward(x, params)
        assert isinstance(cache, LowPrecisionCache)
        assert {out.dtype, h_n.dtype, c_n.dtype} == {DTYPES[dtype][0]}
        d_x, d_params, _ = ref.lstm_backward(low(np.ones_like(out, np.float64), dtype), cache)
        assert d_x.dtype == DTYPES[dtype][0]
        assert {v.dtype for v in d_params.values()} == {DTYPES[dtype][0]}
        assert set(d_params) == set(params)
    q = low(rng.standard_normal((2, 3)), "bfloat16")
    k = low(rng.standard_normal((2, 4, 3)), "bfloat16")
    _, _, cache = ref.attention_forward(q, k, k)
    assert cache.lse.dtype == BF16 and cache.lse.shape == (2,)


def test_mixed_dtypes_are_refused_naming_the_argument() -> None:
    rng = np.random.default_rng(1)
    params = {k: low(v, "float16") for k, v in ref.init_lstm_params(3, 4, rng=rng).items()}
    with pytest.raises(TypeError, match="x has dtype float32, but params"):
        ref.lstm_forward(rng.standard_normal((5, 2, 3)).astype(np.float32), params)
    params["bias_hh_l0"] = params["bias_hh_l0"].astype(BF16)
    with pytest.raises(TypeError, match=r"params\['bias_hh_l0'\] has dtype bfloat16"):
        ref.lstm_forward(low(rng.standard_normal((5, 2, 3)), "float16"), params)
    x = low(rng.standard_normal((4, 3)), "float16")
    y, cache = ref.relu_forward(x)
    with pytest.raises(TypeError, match="the gradients must be float16"):
        ref.relu_backward(y.astype(np.float32), cache)


def test_an_input_changed_before_the_backward_is_refused() -> None:
    x = low(np.linspace(-2, 2, 12).reshape(3, 4), "bfloat16")
    y, cache = ref.gelu_forward(x)
    x[0, 0] = 5
    with pytest.raises(InputChanged):
        ref.gelu_backward(y, cache)


def test_the_truth_is_the_float64_op_on_the_rounded_inputs() -> None:
    rng = np.random.default_rng(2)
    x = low(rng.standard_normal((6, 8)), "float16")
    params = {"weight": low(rng.standard_normal(8), "float16"),
              "bias": low(rng.standard_normal(8), "float16")}
    y64, _ = truth(ref.layer_norm_forward, x, params)
    want = torch.nn.functional.layer_norm(
        torch.tensor(x.astype(np.float64)), (8,), torch.tensor(params["weight"].astype(float)),
        torch.tensor(params["bias"].astype(float)))
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, want.numpy(), rtol=1e-13, atol=1e-13)


def test_float32_and_float64_calls_are_untouched() -> None:
    """The wrappers leave other dtypes alone: a float32 call returns float32 and a plain cache."""
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    y, cache = ref.gelu_forward(x)
    assert y.dtype == np.float32 and not isinstance(cache, LowPrecisionCache)


def test_the_correctly_rounded_truth_always_passes_and_one_ulp_more_may_not() -> None:
    """The floor is half an ulp: the truth rounded to the dtype passes whatever the reference
    error; a result two ulps off at the largest entry fails when the reference is exact."""
    x = low(np.array([[0.5, 1.5, -2.25, 3.0]]), "bfloat16")
    y, _ = ref.relu_forward(x)  # exact: reference error 0
    report = error_budget(ref.relu_forward, (x,), got={"y": y})
    assert report.ok and report.tensors[0].allowed == half_ulp(3.0, BF16)
    bad = y.copy()
    bad[0, 3] = np.float32(3.0 + 2 * 2 * half_ulp(3.0, BF16))
    report = error_budget(ref.relu_forward, (x,), got={"y": bad})
    assert not report.ok and report.tensors[0].index == (0, 3)
    assert "FAIL y" in str(report)


def test_half_ulp() -> None:
    assert half_ulp(1.0, F16) == 2.0 ** -11
    assert half_ulp(1.0, BF16) == 2.0 ** -8
    assert half_ulp(3.0, BF16) == 2.0 ** -7
    assert half_ulp(1e-9, F16) == 2.0 ** -25  # below the smallest normal: the subnormal step


def test_error_budget_refuses_float32_calls_and_unknown_names() -> None:
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="float16/bfloat16"):
        error_budget(ref.relu_forward, (x,), got={"y": x})
    xl = low(x, "float16")
    with pytest.raises(ValueError, match="no result named"):
        error_budget(ref.relu_forward, (xl,), got={"output": xl})


# --------------------------------------------------------------------------------------------
# attention against SDPA (its CPU flash kernel in float16/bfloat16) and the math path


class AttentionCase(NamedTuple):
    B: int
    h: int
    h_kv: int
    Tq: int
    Tk: int
    D: int
    causal: bool
    mask: bool  # a bool mask [Tq, Tk] (diagonal kept, so no query is left without a key)
    bias: bool  # a float bias [Tq, Tk] (SDPA's float attn_mask), with a gradient
    scale: float | None
    need_weights: bool
    softcap: float | None
    seed: int


@st.composite
def attention_cases(draw) -> AttentionCase:
    h_kv = draw(st.integers(1, 2))
    return AttentionCase(draw(st.integers(1, 2)), h_kv * draw(st.integers(1, 2)), h_kv,
                         draw(st.integers(1, 12)), draw(st.integers(1, 40)),
                         draw(st.sampled_from([1, 8, 16, 64])), draw(st.booleans()),
                         draw(st.booleans()), draw(st.booleans()),
                         draw(st.sampled_from([None, 0.3])), draw(st.booleans()),
                         draw(st.sampled_from([None, None, 5.0])),
                         draw(st.integers(0, 2**32 - 1)))


def check_attention(case: AttentionCase, dtype: str) -> None:
    rng = np.random.default_rng(case.seed)
    q = low(rng.standard_normal((case.B, case.h, case.Tq, case.D)), dtype)
    k = low(rng.standard_normal((case.B, case.h_kv, case.Tk, case.D)), dtype)
    v = low(rng.standard_normal((case.B, case.h_kv, case.Tk, case.D)), dtype)
    d_ctx = low(rng.standard_normal(q.shape), dtype)
    keep = np.ones((case.Tq, case.Tk), bool)
    if case.mask:
        keep = rng.random((case.Tq, case.Tk)) < 0.7
        keep[np.arange(case.Tq), np.minimum(np.arange(case.Tq), case.Tk - 1)] = True
    bias = low(rng.standard_normal((case.Tq, case.Tk)), dtype) if case.bias else None
    options = {"score": "scaled_dot", "causal": case.causal, "scale": case.scale,
               "need_weights": case.need_weights, "softcap": case.softcap}
    if case.mask:
        options["mask"] = keep
    if bias is not None:
        options["bias"] = bias
    tq, tk, tv = (to_torch(a, dtype, grad=True) for a in (q, k, v))
    tb = to_torch(bias, dtype, grad=True) if bias is not None else None
    group = case.h // case.h_kv
    kk, vv = tk.repeat_interleave(group, 1), tv.repeat_interleave(group, 1)
    scale = case.scale if case.scale is not None else case.D ** -0.5
    if case.softcap is None and not case.need_weights:
        # SDPA itself (its CPU flash kernel for these dtypes); the masks as one float mask
        attn = torch.zeros(case.Tq, case.Tk, dtype=tq.dtype)
        hide = ~torch.tensor(keep)
        if case.causal:
            hide |= torch.ones(case.Tq, case.Tk, dtype=torch.bool).triu(1)
        attn = attn.masked_fill(hide, float("-inf"))
        if tb is not None:
            attn = attn + tb
        ctx = torch.nn.functional.scaled_dot_product_attention(
            tq, kk, vv, attn_mask=attn, scale=scale)
        weights = None
    else:  # the math path in the dtype, as torch's eager ops compute it
        s = (tq @ kk.transpose(-1, -2)) * scale
        if case.softcap is not None:
            s = torch.tanh(s / case.softcap) * case.softcap
        if tb is not None:
            s = s + tb
        hide = ~torch.tensor(keep)
        if case.causal:
            hide |= torch.ones(case.Tq, case.Tk, dtype=torch.bool).triu(1)
        weights = torch.softmax(s.masked_fill(hide, float("-inf")), dim=-1)
        ctx = weights @ vv
    ctx.backward(to_torch(d_ctx, dtype))
    got = {"context": ctx}
    if case.need_weights:
        got["weights"] = weights
    grads = {"d_query": tq.grad, "d_keys": tk.grad, "d_values": tv.grad}
    if tb is not None:
        grads["d_bias"] = tb.grad
    report = error_budget(ref.attention_forward, (q, k, v), options, got=got,
                          backward=ref.attention_backward, grad_outputs=(d_ctx,),
                          got_grads=grads)
    assert_within(report)


@over_dtypes
@given(data=st.data())
def test_torch_attention_passes_the_budget(dtype: str, data) -> None:
    check_attention(data.draw(attention_cases()), dtype)


# --------------------------------------------------------------------------------------------
# the Transformer's parts and multi-head attention against torch's modules


def _module_params(module: torch.nn.Module, dtype: str) -> dict[str, np.ndarray]:
    """The module's params rounded to the dtype, loaded back into it in that dtype."""
    params = {k: low(v.detach().double().numpy(), dtype) for k, v in module.state_dict().items()}
    module.to(DTYPES[dtype][1])
    with torch.no_grad():
        for k, v in module.named_parameters():
            v.copy_(to_torch(params[k], dtype))
    return params


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"d_{k}": v.grad for k, v in module.named_parameters()}


@over_dtypes
@pytest.mark.parametrize("need_weights", [True, False])
@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 3), T=st.integers(1, 10),
       S=st.integers(1, 10), padding=st.booleans(), causal=st.booleans())
def test_torch_multihead_attention_passes_the_budget(dtype, need_weights, seed, N, T, S,
                                                     padding, causal) -> None:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed % 2**31)
    E, heads = 16, 4
    module = torch.nn.MultiheadAttention(E, heads, batch_first=True)
    params = _module_params(module, dtype)
    query = low(rng.standard_normal((N, T, E)), dtype)
    key = low(rng.standard_normal((N, S, E)), dtype)
    d_out = low(rng.standard_normal((N, T, E)), dtype)
    kpm = np.zeros((N, S), bool)
    if padding:
        kpm[:, rng.integers(1, S + 1):] = True  # the first key is always real
    attn_mask = np.triu(np.ones((T, S), bool), 1) if causal else None
    tq, tk = to_torch(query, dtype, grad=True), to_torch(key, dtype, grad=True)
    out, weights = module(tq, tk, tk, key_padding_mask=torch.tensor(kpm),
                          attn_mask=None if attn_mask is None else torch.tensor(attn_mask),
                          need_weights=need_weights, average_attn_weights=False)
    out.backward(to_torch(d_out, dtype))
    got = {"output": out, "weights": weights} if need_weights else {"output": out}
    options = {"num_heads": heads, "key_padding_mask": kpm, "attn_mask": attn_mask,
               "need_weights": need_weights, "average_attn_weights": False}
    report = error_budget(ref.multihead_attention_forward, (query, key, key, params), options,
                          got=got, backward=ref.multihead_attention_backward,
                          grad_outputs=(d_out,),
                          got_grads={"d_query": tq.grad, **_grads(module)})
    assert_within(report)


@over_dtypes
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 3), T=st.integers(1, 8),
       padding=st.booleans())
def test_torch_transformer_encoder_layer_passes_the_budget(dtype, norm_first, activation,
                                                           seed, N, T, padding) -> None:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed % 2**31)
    E, heads, F = 16, 2, 32
    module = torch.nn.TransformerEncoderLayer(E, heads, F, dropout=0.0, activation=activation,
                                              batch_first=True, norm_first=norm_first)
    module.train()  # the fast path is inference-only and would not give gradients
    params = _module_params(module, dtype)
    src = low(rng.standard_normal((N, T, E)), dtype)
    d_out = low(rng.standard_normal((N, T, E)), dtype)
    kpm = None
    if padding:  # padding rows are not data: no gradient flows in from them
        kpm = np.zeros((N, T), bool)
        kpm[:, rng.integers(1, T + 1):] = True
        d_out[kpm] = 0
    tsrc = to_torch(src, dtype, grad=True)
    out = module(tsrc, src_key_padding_mask=None if kpm is None else torch.tensor(kpm))
    out.backward(to_torch(d_out, dtype))
    if kpm is not None:  # padding rows are not data: ours are 0, torch's are computed
        out = out.masked_fill(torch.tensor(kpm)[..., None], 0)
        tsrc.grad.masked_fill_(torch.tensor(kpm)[..., None], 0)
    options = {"nhead": heads, "norm_first": norm_first, "activation": activation,
               "batch_first": True, "src_key_padding_mask": kpm}
    report = error_budget(ref.transformer_encoder_layer_forward, (src, params), options,
                          got={"output": out}, backward=ref.transformer_encoder_layer_backward,
                          grad_outputs=(d_out,), got_grads={"d_src": tsrc.grad,
                                                            **_grads(module)})
    assert_within(report)


@over_dtypes
@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 3), T=st.integers(1, 8),
       S=st.integers(1, 8), norm_first=st.booleans())
def test_torch_transformer_decoder_layer_passes_the_budget(dtype, seed, N, T, S,
                                                           norm_first) -> None:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed % 2**31)
    E, heads, F = 16, 2, 32
    module = torch.nn.TransformerDecoderLayer(E, heads, F, dropout=0.0, batch_first=True,
                                              norm_first=norm_first)
    params = _module_params(module, dtype)
    tgt = low(rng.standard_normal((N, T, E)), dtype)
    memory = low(rng.standard_normal((N, S, E)), dtype)
    d_out = low(rng.standard_normal((N, T, E)), dtype)
    causal = np.triu(np.ones((T, T), bool), 1)
    ttgt, tmem = to_torch(tgt, dtype, grad=True), to_torch(memory, dtype, grad=True)
    out = module(ttgt, tmem, tgt_mask=torch.tensor(causal))
    out.backward(to_torch(d_out, dtype))
    options = {"nhead": heads, "norm_first": norm_first, "batch_first": True,
               "tgt_mask": causal}
    report = error_budget(ref.transformer_decoder_layer_forward, (tgt, memory, params),
                          options, got={"output": out},
                          backward=ref.transformer_decoder_layer_backward,
                          grad_outputs=(d_out,),
                          got_grads={"d_tgt": ttgt.grad, "d_memory": tmem.grad,
                                     **_grads(module)})
    assert_within(report)


@over_dtypes
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 64), E=st.integers(2, 96),
       approximate=st.sampled_from(["none", "tanh"]))
def test_torch_layer_norm_linear_gelu_and_relu_pass_the_budget(dtype, seed, rows, E,
                                                               approximate) -> None:
    """E >= 2: torch's CPU layer norm forms y = x (r gamma) + (beta - mean r gamma), which
    cancels catastrophically on a constant row (E = 1 always is one); that is its float32
    algorithm, not a rounding to the dtype, and no budget built from roundings follows it."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed % 2**31)
    x = low(rng.standard_normal((rows, E)) * 2 + 0.5, dtype)
    d_y = low(rng.standard_normal((rows, E)), dtype)
    for name, module in (("layer_norm", torch.nn.LayerNorm(E)),
                         ("linear", torch.nn.Linear(E, 7))):
        if name == "layer_norm":
            with torch.no_grad():
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
        params = _module_params(module, dtype)
        tx = to_torch(x, dtype, grad=True)
        y = module(tx)
        dy = d_y if name == "layer_norm" else low(rng.standard_normal((rows, 7)), dtype)
        y.backward(to_torch(dy, dtype))
        report = error_budget(getattr(ref, f"{name}_forward"), (x, params), got={"y": y},
                              backward=getattr(ref, f"{name}_backward"), grad_outputs=(dy,),
                              got_grads={"d_x": tx.grad, **_grads(module)})
        assert_within(report)
    for name, fn, options in (("gelu", torch.nn.functional.gelu, {"approximate": approximate}),
                              ("relu", torch.nn.functional.relu, {})):
        tx = to_torch(x, dtype, grad=True)
        y = fn(tx, **options)
        y.backward(to_torch(d_y, dtype))
        report = error_budget(getattr(ref, f"{name}_forward"), (x,), options, got={"y": y},
                              backward=getattr(ref, f"{name}_backward"), grad_outputs=(d_y,),
                              got_grads={"d_x": tx.grad})
        assert_within(report)


# --------------------------------------------------------------------------------------------
# attention's other layouts and scores, the cells, embedding and cross-entropy, a stack


@over_dtypes
@pytest.mark.parametrize("score", ["dot", "scaled_dot", "general"])
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 4), Tq=st.sampled_from([None, 1, 5]),
       Tk=st.integers(1, 30), H=st.sampled_from([4, 16, 48]), lengths=st.booleans())
def test_torch_attention_layouts_and_scores_pass_the_budget(dtype, score, seed, B, Tq, Tk, H,
                                                            lengths) -> None:
    """One query per row ([B, H]) or many ([B, Tq, H]), dot / scaled_dot / general, lengths:
    torch's ops in the dtype, as the seed's model and the Luong decoders compute them."""
    rng = np.random.default_rng(seed)
    q_shape = (B, H) if Tq is None else (B, Tq, H)
    q = low(rng.standard_normal(q_shape), dtype)
    k = low(rng.standard_normal((B, Tk, H)), dtype)
    v = low(rng.standard_normal((B, Tk, H)), dtype)
    d_ctx = low(rng.standard_normal(q_shape), dtype)
    n = rng.integers(1, Tk + 1, size=B) if lengths else None
    params = {"W": low(rng.standard_normal((H, H)) / np.sqrt(H), dtype)} if score == "general" \
        else None
    tq, tk, tv = (to_torch(a, dtype, grad=True) for a in (q, k, v))
    tq3 = tq if Tq is not None else tq[:, None]
    tW = to_torch(params["W"], dtype, grad=True) if params else None
    s = ((tq3 @ tW) if tW is not None else tq3) @ tk.transpose(1, 2)
    if score == "scaled_dot":
        s = s * H ** -0.5
    if n is not None:
        s = s.masked_fill(torch.arange(Tk)[None, None] >= torch.tensor(n)[:, None, None],
                          float("-inf"))
    w = torch.softmax(s, dim=-1)
    ctx = w @ tv
    if Tq is None:
        ctx, w = ctx[:, 0], w[:, 0]
    ctx.backward(to_torch(d_ctx, dtype))
    grads = {"d_query": tq.grad, "d_values": tv.grad}
    if tW is not None:
        grads["d_W"] = tW.grad
    grads["d_keys"] = tk.grad
    report = error_budget(ref.attention_forward, (q, k, v),
                          {"score": score, "params": params, "lengths": n},
                          got={"context": ctx, "weights": w}, backward=ref.attention_backward,
                          grad_outputs=(d_ctx,), got_grads=grads)
    assert_within(report)


@over_dtypes
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn"])
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 5), I=st.integers(1, 16),
       H=st.integers(1, 24), bias=st.booleans())
def test_torch_cells_pass_the_budget(dtype, mode, seed, B, I, H, bias) -> None:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed % 2**31)
    module = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell,
              "rnn": torch.nn.RNNCell}[mode](I, H, bias=bias)
    params = _module_params(module, dtype)
    x, h, c = (low(rng.standard_normal(s), dtype) for s in ((B, I), (B, H), (B, H)))
    dh, dc = low(rng.standard_normal((B, H)), dtype), low(rng.standard_normal((B, H)), dtype)
    tx, th, tc = (to_torch(a, dtype, grad=True) for a in (x, h, c))
    if mode == "lstm":
        h1, c1 = module(tx, (th, tc))
        torch.autograd.backward([h1, c1], [to_torch(dh, dtype), to_torch(dc, dtype)])
        report = error_budget(ref.lstm_cell_forward, (x, h, c, params), got={"h": h1, "c": c1},
                              backward=ref.lstm_cell_backward, grad_outputs=(dh, dc),
                              got_grads={"d_x": tx.grad, "d_h": th.grad, "d_c": tc.grad,
                                         **_grads(module)})
    else:
        h1 = module(tx, th)
        h1.backward(to_torch(dh, dtype))
        report = error_budget(getattr(ref, f"{mode}_cell_forward"), (x, h, params),
                              got={"h": h1}, backward=getattr(ref, f"{mode}_cell_backward"),
                              grad_outputs=(dh,),
                              got_grads={"d_x": tx.grad, "d_h": th.grad, **_grads(module)})
    assert_within(report)


@over_dtypes
@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 40), V=st.integers(2, 12),
       E=st.integers(1, 16), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_torch_embedding_and_cross_entropy_pass_the_budget(dtype, seed, N, V, E,
                                                           reduction) -> None:
    """Without label smoothing: torch computes a smoothed loss as two reduced terms,
    (1 - ls) nll + ls/C smooth, each rounded to the dtype, which the reference does not emulate
    (it forms one weighted sum); its loss can then be 2 ulps off where the budget allows 1."""
    smoothing = 0.0
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=N)  # repeated ids: their gradients are summed
    weight = low(rng.standard_normal((V, E)), dtype)
    d_out = low(rng.standard_normal((N, E)), dtype)
    tw = to_torch(weight, dtype, grad=True)
    out = torch.nn.functional.embedding(torch.tensor(ids), tw)
    out.backward(to_torch(d_out, dtype))
    report = error_budget(ref.embedding_forward, (ids, {"weight": weight}), got={"y": out},
                          backward=ref.embedding_backward, grad_outputs=(d_out,),
                          got_grads={"d_weight": tw.grad})
    assert_within(report)

    logits = low(rng.standard_normal((N, V)) * 3, dtype)
    targets = rng.integers(0, V, size=N)
    tz = to_torch(logits, dtype, grad=True)
    loss = torch.nn.functional.cross_entropy(tz, torch.tensor(targets), reduction=reduction,
                                             label_smoothing=smoothing)
    d_loss = low(rng.standard_normal(loss.shape), dtype)
    loss.backward(to_torch(d_loss, dtype))
    report = error_budget(ref.cross_entropy_forward, (logits, targets),
                          {"reduction": reduction, "label_smoothing": smoothing},
                          got={"loss": loss}, backward=ref.cross_entropy_backward,
                          grad_outputs=(d_loss,), got_grads={"d_logits": tz.grad})
    assert_within(report)


@over_dtypes
@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 3), T=st.integers(1, 8),
       norm_first=st.booleans())
def test_torch_transformer_encoder_stack_passes_the_budget(dtype, seed, N, T,
                                                           norm_first) -> None:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed % 2**31)
    E, heads, F, layers = 16, 2, 32, 2
    layer = torch.nn.TransformerEncoderLayer(E, heads, F, dropout=0.0, batch_first=True,
                                             norm_first=norm_first, activation="gelu")
    module = torch.nn.TransformerEncoder(layer, layers, norm=torch.nn.LayerNorm(E),
                                         enable_nested_tensor=False)
    params = _module_params(module, dtype)
    src = low(rng.standard_normal((N, T, E)), dtype)
    d_out = low(rng.standard_normal((N, T, E)), dtype)
    tsrc = to_torch(src, dtype, grad=True)
    out = module(tsrc)
    out.backward(to_torch(d_out, dtype))
    report = error_budget(ref.transformer_encoder_forward, (src, params),
                          {"nhead": heads, "norm_first": norm_first,
                           "activation": "gelu", "batch_first": True},
                          got={"output": out}, backward=ref.transformer_encoder_backward,
                          grad_outputs=(d_out,),
                          got_grads={"d_src": tsrc.grad, **_grads(module)})
    assert_within(report)


def test_the_first_divergence_report_reads_a_low_precision_cache_and_judges_its_dtype() -> None:
    """A bfloat16 call's cache gives its intermediates (float32, as computed); a bfloat16
    result is held to the dtype's default tolerance, and a planted bug is still found."""
    rng = np.random.default_rng(3)
    params = {k: low(v, "bfloat16") for k, v in ref.init_lstm_params(3, 4, rng=rng).items()}
    x = low(rng.standard_normal((5, 2, 3)), "bfloat16")
    out, _, cache = ref.lstm_forward(x, params)
    named = ref.intermediates(cache)
    assert "l0.forward.t4.h" in named and named["l0.forward.t4.h"].dtype == np.float32
    assert ref.find_divergence(ref.lstm_forward, (x, params), {}, {"output": out}).ok
    mine = {k: v.astype(BF16) for k, v in named.items()}
    mine["l0.forward.t2.o"] = (mine["l0.forward.t2.o"].astype(np.float32) + 0.5).astype(BF16)
    report = ref.find_divergence(ref.lstm_forward, (x, params), {}, mine)
    assert report.first.name == "l0.forward.t2.o"
