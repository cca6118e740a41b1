"""The autograd bridges of `torch_impl.functions` and the torch modules' ``backend=``.

- `torch.autograd.gradcheck` in float64 (numerical Jacobian against our hand-written backward,
  through torch's autograd) for attention (every score, every layout, lengths, mask, causal,
  scale, bias, grouped-query, a query that sees no key; with and without the weights),
  multi-head attention (packed and separate projections, bool and float masks, need_weights
  False, per-head weights, [L, N, E]), the LSTM (layers, directions, lengths, h0/c0,
  proj_size, batch_first) and the LSTM cell, on both backends; every output is checked, so the
  weights' and the final states' cotangents are.
- The bridges against torch's own ops (SDPA, nn.LSTM packed, nn.MultiheadAttention): values
  and gradients in float64; float32 stays float32.
- Conventions: double backward is a clear error, an in-place change after forward is torch's
  version-counter error, non-CPU and mixed-device tensors and unknown backends are ValueErrors.
- Backend swap: each torch model trained for a few Adam steps with ``backend="torch"`` and with
  our backends gives the same losses (float64, <= 1e-9 relative) and the same weights.
- CUDA (marked ``cuda``): the attention bridge on CUDA tensors runs `kernels.cuda`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import kernels
import numpy_ref
from torch_impl import BiLSTMAttention, Seq2SeqAttention, functions, reference
from torch_impl.modules import Attention

BACKENDS = ["numpy_ref", "kernels"]
over_backends = pytest.mark.parametrize("backend", BACKENDS)
D64 = torch.float64


def leaf(*shape, seed: int, dtype=D64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)


# --------------------------------------------------------------------------------------------
# gradcheck: attention

ATTENTION_CASES = {
    # name: (query, keys, values shapes, options, params shapes)
    "single-dot-lengths": ((3, 4), (3, 5, 4), (3, 5, 2), {"lengths": [5, 1, 3]}, {}),
    "single-scaled-mask": ((2, 3), (2, 4, 3), (2, 4, 3),
                           {"score": "scaled_dot", "scale": 0.7,
                            "mask": np.array([[1, 0, 1, 1], [0, 0, 0, 0]], bool)}, {}),
    "many-general-causal": ((2, 4, 3), (2, 4, 2), (2, 4, 3),
                            {"score": "general", "causal": True, "lengths": [4, 2]},
                            {"W": (3, 2)}),
    "many-additive-b": ((2, 3, 3), (2, 4, 2), (2, 4, 2), {"score": "additive"},
                        {"W_query": (5, 3), "W_key": (5, 2), "v": (5,), "b": (5,)}),
    "heads-gqa-bias-causal": ((2, 4, 3, 2), (2, 2, 3, 2), (2, 2, 3, 3),
                              {"score": "scaled_dot", "causal": True, "bias": (1, 4, 3, 3)}, {}),
    "heads-mask-bias-inf": ((1, 2, 3, 2), (1, 1, 4, 2), (1, 1, 4, 2),
                            {"mask": np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], bool),
                             "bias": (3, 4)}, {}),
}


def attention_args(name: str, dtype=D64):
    q, k, v, options, params = ATTENTION_CASES[name]
    tensors = [leaf(*q, seed=1, dtype=dtype), leaf(*k, seed=2, dtype=dtype),
               leaf(*v, seed=3, dtype=dtype)]
    options = dict(options)
    names = list(params)
    tensors += [leaf(*s, seed=10 + i, dtype=dtype) for i, s in enumerate(params.values())]
    if "bias" in options:
        bias = leaf(*options.pop("bias"), seed=20, dtype=dtype)
        if name == "heads-mask-bias-inf":
            with torch.no_grad():
                bias[0, 3] = float("-inf")  # a key hidden by the bias alone
            bias = bias.detach().requires_grad_(True)
        tensors.append(bias)
        names.append("bias")
    return tensors, names, options


def attention_call(names, options, backend):
    def call(query, keys, values, *rest):
        named = dict(zip(names, rest, strict=True))
        kw = dict(options)
        if "bias" in named:
            kw["bias"] = named.pop("bias")
        return functions.attention(query, keys, values, params=named or None, backend=backend,
                                   **kw)
    return call


@over_backends
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_gradcheck(backend: str, name: str) -> None:
    tensors, names, options = attention_args(name)
    if name == "heads-mask-bias-inf":  # gradcheck perturbs -inf into NaN: keep bias fixed
        *tensors, bias = tensors
        names = names[:-1]
        options = {**options, "bias": bias.detach()}
    assert gradcheck(attention_call(names, options, backend), tuple(tensors))


@over_backends
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_gradcheck_without_the_weights(backend: str, name: str) -> None:
    """need_weights=False: the weights are None, the context's gradient flows through the
    backend's blockwise backward (gradcheck), and it is the one the weights path gives."""
    tensors, names, options = attention_args(name)
    if name == "heads-mask-bias-inf":  # gradcheck perturbs -inf into NaN: keep bias fixed
        *tensors, bias = tensors
        names = names[:-1]
        options = {**options, "bias": bias.detach()}
    call = attention_call(names, {**options, "need_weights": False}, backend)
    context, weights = call(*tensors)
    assert weights is None
    assert gradcheck(lambda *t: call(*t)[0], tuple(tensors))
    with_weights = attention_call(names, options, backend)(*tensors)[0]
    assert_same([context], [with_weights])
    assert_same(grads_of([context], tensors), grads_of([with_weights], tensors))


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_attention_module_without_the_weights(backend: str) -> None:
    """`Attention(..., backend=)` passes need_weights through: None weights, the same context
    (and gradient) as with them."""
    torch.manual_seed(4)
    module = Attention(3, 3, "general").double()
    module.backend = backend
    q, k = leaf(2, 4, 3, seed=1), leaf(2, 5, 3, seed=2)
    context, weights = module(q, k, lengths=torch.tensor([5, 2]), need_weights=False)
    with_weights = module(q, k, lengths=torch.tensor([5, 2]))[0]
    assert weights is None
    assert_same([context], [with_weights])
    assert_same(grads_of([context], (q, k)), grads_of([with_weights], (q, k)))


@over_backends
def test_attention_gradcheck_keys_are_values(backend: str) -> None:
    """The seed's call, one tensor as keys and values: autograd adds d_keys and d_values."""
    q, kv = leaf(3, 4, seed=1), leaf(3, 5, 4, seed=2)
    assert gradcheck(lambda q, kv: functions.attention(q, kv, kv, lengths=[2, 5, 1],
                                                       backend=backend), (q, kv))


# --------------------------------------------------------------------------------------------
# gradcheck: multi-head attention

def mha(E=4, h=2, kdim=None, vdim=None, bias=True) -> torch.nn.MultiheadAttention:
    torch.manual_seed(5)
    return torch.nn.MultiheadAttention(E, h, bias=bias, kdim=kdim, vdim=vdim,
                                       batch_first=True, dtype=D64)


MHA_CASES = {
    "packed-padding-mask": ({}, {"key_padding_mask": np.array([[0, 0, 1], [0, 1, 1]], bool)}),
    "separate-float-mask": ({"kdim": 3, "vdim": 5},
                            {"attn_mask": np.linspace(-1, 1, 6).reshape(2, 3)}),
    "per-head-causal": ({}, {"attn_mask": np.triu(np.ones((2, 3), bool), 1), "is_causal": True,
                             "average_attn_weights": False}),
    "no-weights-no-bias": ({"bias": False}, {"need_weights": False}),
}


@over_backends
@pytest.mark.parametrize("name", list(MHA_CASES))
def test_multihead_attention_gradcheck(backend: str, name: str) -> None:
    module_kw, options = MHA_CASES[name]
    m = mha(**module_kw)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in m.named_parameters()]
    q = leaf(2, 2, 4, seed=1)
    k = leaf(2, 3, m.kdim, seed=2)
    v = leaf(2, 3, m.vdim, seed=3)

    def call(q, k, v, *ps):
        out, w = functions.multihead_attention(q, k, v, dict(zip(names, ps, strict=True)),
                                               num_heads=2, backend=backend, **options)
        return out if w is None else (out, w)
    assert gradcheck(call, (q, k, v, *params))


@over_backends
def test_multihead_attention_gradcheck_seq_first(backend: str) -> None:
    m = mha()
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in m.named_parameters()]
    x = leaf(3, 2, 4, seed=4)  # [L, N, E]: self-attention, one tensor as query, key and value

    def call(x, *ps):
        return functions.multihead_attention(x, x, x, dict(zip(names, ps, strict=True)),
                                             num_heads=2, batch_first=False, backend=backend)
    assert gradcheck(call, (x, *params))


# --------------------------------------------------------------------------------------------
# gradcheck: LSTM and the LSTM cell

LSTM_CASES = {
    "2-layers-bi-lengths-state-proj": ({"num_layers": 2, "bidirectional": True, "proj_size": 2},
                                       {"lengths": [4, 1, 3]}, True),
    "batch-first-lengths": ({"batch_first": True}, {"lengths": torch.tensor([2, 4, 4])}, False),
    "bi-state": ({"bidirectional": True}, {}, True),
}


@over_backends
@pytest.mark.parametrize("name", list(LSTM_CASES))
def test_lstm_gradcheck(backend: str, name: str) -> None:
    module_kw, options, with_state = LSTM_CASES[name]
    torch.manual_seed(7)
    m = torch.nn.LSTM(2, 3, dtype=D64, **module_kw)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in m.named_parameters()]
    LD = m.num_layers * (2 if m.bidirectional else 1)
    Ho = m.proj_size or m.hidden_size
    x = leaf(*((3, 4, 2) if m.batch_first else (4, 3, 2)), seed=1)
    state = (leaf(LD, 3, Ho, seed=2), leaf(LD, 3, 3, seed=3)) if with_state else ()

    def call(x, *rest):
        h0, c0 = rest[:2] if with_state else (None, None)
        ps = rest[2:] if with_state else rest
        out, (h_n, c_n) = functions.lstm(
            x, dict(zip(names, ps, strict=True)), num_layers=m.num_layers,
            bidirectional=m.bidirectional, batch_first=m.batch_first, h0=h0, c0=c0,
            backend=backend, **options)
        return out, h_n, c_n
    assert gradcheck(call, (x, *state, *params))


@over_backends
def test_lstm_cell_gradcheck(backend: str) -> None:
    torch.manual_seed(8)
    cell = torch.nn.LSTMCell(3, 2, dtype=D64)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in cell.named_parameters()]
    x, h, c = leaf(4, 3, seed=1), leaf(4, 2, seed=2), leaf(4, 2, seed=3)

    def call(x, h, c, *ps):
        return functions.lstm_cell(x, h, c, dict(zip(names, ps, strict=True)), backend=backend)
    assert gradcheck(call, (x, h, c, *params))


# --------------------------------------------------------------------------------------------
# against torch's own ops

def grads_of(outputs, inputs, seed: int = 99):
    """Gradients of sum(output * a fixed random cotangent) over every output."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def assert_same(ours, theirs, tol: float = 1e-12) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.dtype == b.dtype, f"{i}: dtype {a.dtype} vs {b.dtype}"
        err = (a - b).abs().max().item() if a.numel() else 0.0
        assert err <= tol * max(1.0, b.abs().max().item()), f"{i}: |ours - torch| = {err:.3g}"


@over_backends
def test_attention_matches_sdpa_with_its_gradients(backend: str) -> None:
    q, k, v = leaf(2, 4, 3, 2, seed=1), leaf(2, 2, 5, 2, seed=2), leaf(2, 2, 5, 3, seed=3)
    bias = leaf(3, 5, seed=4)
    ours = functions.attention(q, k, v, score="scaled_dot", bias=bias, causal=True,
                               backend=backend)[0]
    causal = torch.ones(3, 5, dtype=torch.bool).tril()
    theirs = F.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                            attn_mask=bias.masked_fill(~causal, float("-inf")))
    assert_same([ours], [theirs])
    assert_same(grads_of([ours], (q, k, v, bias)), grads_of([theirs], (q, k, v, bias)))


@over_backends
def test_lstm_matches_packed_nn_lstm_with_its_gradients(backend: str) -> None:
    torch.manual_seed(3)
    m = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=D64)
    x, lengths = leaf(5, 3, 3, seed=1), torch.tensor([5, 2, 4])
    params = dict(m.named_parameters())
    out, (h, c) = functions.lstm(x, params, num_layers=2, bidirectional=True, lengths=lengths,
                                 backend=backend)
    out_t, (h_t, c_t) = reference.run_packed(m, x, None, lengths)
    assert_same([out, h, c], [out_t, h_t, c_t])
    inputs = (x, *params.values())
    assert_same(grads_of([out, h, c], inputs), grads_of([out_t, h_t, c_t], inputs))


@over_backends
def test_multihead_attention_matches_nn_multihead_attention(backend: str) -> None:
    m = mha(kdim=3, vdim=5)
    q, k, v = leaf(2, 2, 4, seed=1), leaf(2, 3, 3, seed=2), leaf(2, 3, 5, seed=3)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    ours = functions.multihead_attention(q, k, v, dict(m.named_parameters()), num_heads=2,
                                         key_padding_mask=pad, backend=backend)
    theirs = m(q, k, v, key_padding_mask=pad)
    assert_same(ours, theirs)
    inputs = (q, k, v, *m.parameters())
    assert_same(grads_of(ours, inputs), grads_of(theirs, inputs))


@over_backends
def test_float32_stays_float32(backend: str) -> None:
    tensors, names, options = attention_args("many-additive-b", torch.float32)
    outputs = attention_call(names, options, backend)(*tensors)
    grads = grads_of(outputs, tensors)
    assert {t.dtype for t in (*outputs, *grads)} == {torch.float32}
    assert all(t.device.type == "cpu" for t in (*outputs, *grads))
    torch.manual_seed(1)
    m = torch.nn.LSTM(2, 3, dtype=torch.float32)
    x = leaf(4, 2, 2, seed=1, dtype=torch.float32)
    out, (h, c) = functions.lstm(x, dict(m.named_parameters()), backend=backend)
    grads = grads_of([out, h, c], (x, *m.parameters()))
    assert {t.dtype for t in (out, h, c, *grads)} == {torch.float32}
    want = m(x)[0]
    assert (out - want).abs().max().item() < 1e-5


def test_only_the_weights_or_only_the_final_state_reach_the_loss() -> None:
    """An output the loss does not use gets no cotangent (None): the backward takes zeros."""
    q, kv = leaf(2, 3, seed=1), leaf(2, 4, 3, seed=2)
    _, w = functions.attention(q, kv, kv)
    dq, dkv = torch.autograd.grad((w * torch.arange(4.0, dtype=D64)).sum(), (q, kv))
    s = (kv @ q.unsqueeze(-1)).squeeze(-1)
    want = torch.autograd.grad((torch.softmax(s, -1) * torch.arange(4.0, dtype=D64)).sum(),
                               (q, kv))
    assert_same([dq, dkv], want)
    torch.manual_seed(2)
    m = torch.nn.LSTM(2, 3, dtype=D64)
    x = leaf(4, 2, 2, seed=3)
    _, (h, _) = functions.lstm(x, dict(m.named_parameters()))
    assert_same(torch.autograd.grad(h.sum(), x), torch.autograd.grad(m(x)[1][0].sum(), x))


# --------------------------------------------------------------------------------------------
# conventions and bad input

def _double_backward_cases():
    q, kv = leaf(2, 3, seed=1), leaf(2, 4, 3, seed=2)
    yield "attention", (lambda: functions.attention(q, kv, kv)[0]), q
    m, x = mha(), leaf(2, 3, 4, seed=5)
    yield "multihead_attention", (lambda: functions.multihead_attention(
        x, x, x, dict(m.named_parameters()), num_heads=2)[0]), x
    lstm = torch.nn.LSTM(3, 2, dtype=D64)
    yield "lstm", (lambda: functions.lstm(kv, dict(lstm.named_parameters()))[0]), kv
    cell = torch.nn.LSTMCell(3, 2, dtype=D64)
    h, c = leaf(2, 2, seed=3), leaf(2, 2, seed=4)
    yield "lstm_cell", (lambda: functions.lstm_cell(q, h, c,
                                                    dict(cell.named_parameters()))[0]), q


@pytest.mark.parametrize("name", ["attention", "multihead_attention", "lstm", "lstm_cell"])
def test_double_backward_is_a_clear_error(name: str) -> None:
    op, x = next((f, x) for n, f, x in _double_backward_cases() if n == name)
    out = op()
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|twice"):
        g.sum().backward()  # reaches the backward's own node: torch names the reason


def test_an_input_changed_in_place_after_forward_is_torchs_error() -> None:
    q, kv = leaf(2, 3, seed=1), leaf(2, 4, 3, seed=2)
    values = kv.detach().clone()
    context, _ = functions.attention(q, kv, values)
    with torch.no_grad():
        values.mul_(2)  # the cache holds a view of values: its gradient would be wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        context.sum().backward()


def test_non_cpu_tensors_are_a_clear_error() -> None:
    q, kv = torch.empty(2, 3, device="meta"), torch.empty(2, 4, 3, device="meta")
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"runs on the CPU.*meta"):
            functions.attention(q, kv, kv, backend=backend)
    with pytest.raises(ValueError, match="every tensor must be on one device"):
        functions.attention(torch.zeros(2, 3), kv, kv)
    with pytest.raises(ValueError, match=r"kernels\.cuda has no LSTM"):
        functions.lstm(kv, {"weight_ih_l0": torch.empty(8, 3, device="meta")},
                       backend="kernels")


def test_cuda_tensors_need_kernels_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU no CUDA tensor exists; the routing decision is tested directly."""
    with pytest.raises(ValueError, match="backend='kernels'"):
        functions._cuda_attention_backend(numpy_ref)
    monkeypatch.setattr(functions, "_CUDA", [None])
    with pytest.raises(ValueError, match=r"kernels\.cuda, which is not usable here"):
        functions._cuda_attention_backend(kernels)


def test_bad_arguments() -> None:
    q, kv = leaf(2, 3, seed=1), leaf(2, 4, 3, seed=2)
    with pytest.raises(ValueError, match="backend: expected one of"):
        functions.attention(q, kv, kv, backend="torch")
    with pytest.raises(TypeError, match=r"params\['W'\] must be a torch.Tensor"):
        functions.attention(q, kv, kv, score="general", params={"W": np.eye(3)})
    with pytest.raises(TypeError, match="dtype"):  # the op's own check, naming the argument
        functions.attention(q.float(), kv, kv)
    with pytest.raises(ValueError, match="lengths"):
        functions.attention(q, kv, kv, lengths=[0, 9])
    with pytest.raises(ValueError, match="backend: expected one of"):
        Attention(3, 3, backend="cuda")
    m = BiLSTMAttention(5, 2, 3, 2)
    with pytest.raises(ValueError, match="backend: expected one of"):
        m.backend = "numba"
    assert m.backend == "torch"


def test_setting_backend_reaches_every_submodule() -> None:
    m = Seq2SeqAttention(5, 6, 2, 3, decoder="bahdanau")
    m.backend = "kernels"
    assert {mod.backend for mod in m.modules() if hasattr(type(mod), "backend")} == {"kernels"}
    assert m.decoder.attention.backend == "kernels"


# --------------------------------------------------------------------------------------------
# backend swap: the torch models trained on our ops

def _train(model, batch, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits, attention = model(*batch[:-1])
        target = batch[-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        loss = loss + 0.1 * attention.pow(2).mean()  # a loss on the attention too
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _swap_models():
    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 11, (3, 5), generator=g)
    src = torch.randint(0, 9, (3, 5), generator=g)
    tgt = torch.randint(0, 8, (3, 4), generator=g)
    lengths = torch.tensor([5, 2, 4])
    labels = torch.tensor([0, 1, 1])
    torch.manual_seed(1)
    yield "classifier", BiLSTMAttention(11, 4, 3, 2), (X, labels)
    yield "classifier-lengths", BiLSTMAttention(11, 4, 3, 2), (X, lengths, labels)
    yield "classifier-seed-compatible", BiLSTMAttention(11, 4, 3, 2, seed_compatible=True), \
        (X, labels)
    for decoder, score in [("luong", "general"), ("luong", "additive"), ("luong", "dot"),
                           ("bahdanau", None)]:
        m = Seq2SeqAttention(9, 8, 4, 3, decoder=decoder, score=score, num_layers=2)
        yield f"{decoder}-{m.score}", m, (src, tgt, lengths, tgt)


SWAP_NAMES = [name for name, _, _ in _swap_models()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SWAP_NAMES)
def test_training_with_our_ops_gives_torchs_losses(name: str, backend: str) -> None:
    model, batch = next((m, b) for n, m, b in _swap_models() if n == name)
    model = model.double()
    want_losses, want_weights = _train(copy.deepcopy(model), batch)
    model.backend = backend
    losses, weights = _train(model, batch)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-9, atol=0)
    for k, w in want_weights.items():
        assert (weights[k] - w).abs().max().item() <= 1e-9 * max(1.0, w.abs().max().item()), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_with_our_ops_matches_torch(backend: str) -> None:
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(5)
    src, lengths = torch.randint(0, 9, (3, 5), generator=g), torch.tensor([5, 1, 3])
    for decoder in ("luong", "bahdanau"):
        m = Seq2SeqAttention(9, 8, 4, 3, decoder=decoder).double()
        want = m.beam_search(src, beam_size=3, max_len=5, bos=0, eos=1, src_lengths=lengths)
        greedy = m.greedy_decode(src, max_len=5, bos=0, eos=1, src_lengths=lengths)
        m.backend = backend
        got = m.beam_search(src, beam_size=3, max_len=5, bos=0, eos=1, src_lengths=lengths)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
        assert torch.equal(m.greedy_decode(src, max_len=5, bos=0, eos=1, src_lengths=lengths),
                           greedy)


# --------------------------------------------------------------------------------------------
# CUDA: the attention bridge on kernels.cuda

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("score", ["dot", "scaled_dot"])
def test_attention_bridge_on_cuda_tensors(dtype, score: str) -> None:
    if functions.cuda_backend() is None:
        pytest.skip("kernels.cuda is not usable (numba-cuda missing or sees no GPU)")
    q = leaf(5, 8, seed=1, dtype=dtype).cuda().detach().requires_grad_(True)
    kv = leaf(5, 33, 8, seed=2, dtype=dtype).cuda().detach().requires_grad_(True)
    lengths = torch.tensor([33, 1, 7, 20, 32])
    context, weights = functions.attention(q, kv, kv, score=score, lengths=lengths,
                                           backend="kernels")
    assert context.device.type == "cuda" and context.dtype == dtype
    mask = torch.arange(33)[None, :] < lengths[:, None]
    qc, kvc = q.detach().cpu().requires_grad_(True), kv.detach().cpu().requires_grad_(True)
    want = F.scaled_dot_product_attention(qc[:, None, None], kvc[:, None], kvc[:, None],
                                          attn_mask=mask[:, None, None],
                                          scale=None if score == "scaled_dot" else 1.0)[:, 0, 0]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(context.cpu(), want.detach(), rtol=tol, atol=tol)
    got = grads_of([context], (q, kv))
    ref = grads_of([want], (qc, kvc))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=tol * 10, atol=tol * 10)
    assert weights.device.type == "cuda"


@pytest.mark.cuda
def test_other_ops_on_cuda_are_a_clear_error() -> None:
    x = torch.zeros(3, 2, 2, device="cuda", dtype=D64)
    m = torch.nn.LSTM(2, 3, dtype=D64, device="cuda")
    with pytest.raises(ValueError, match=r"kernels\.cuda has no LSTM"):
        functions.lstm(x, dict(m.named_parameters()), backend="kernels")
    with pytest.raises(ValueError, match="backend='kernels'"):
        functions.attention(x[0], x, x, backend="numpy_ref")


RECURRENT_CASES = {
    "gru-2-layers-bi-lengths-state": ("GRU", {"num_layers": 2, "bidirectional": True},
                                      {"lengths": [4, 1, 3]}, True),
    "gru-other-batch-first-no-bias": ("GRU", {"batch_first": True, "bias": False},
                                      {"linear_before_reset": False,
                                       "lengths": torch.tensor([2, 4, 4])}, False),
    "rnn-tanh-bi-state": ("RNN", {"bidirectional": True}, {}, True),
    "rnn-relu-2-layers-lengths": ("RNN", {"num_layers": 2, "nonlinearity": "relu"},
                                  {"nonlinearity": "relu", "lengths": [3, 4, 1]}, False),
}


@over_backends
@pytest.mark.parametrize("name", list(RECURRENT_CASES))
def test_gru_and_rnn_gradcheck(backend: str, name: str) -> None:
    mode, module_kw, options, with_state = RECURRENT_CASES[name]
    torch.manual_seed(9)
    m = getattr(torch.nn, mode)(2, 3, dtype=D64, **module_kw)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in m.named_parameters()]
    LD = m.num_layers * (2 if m.bidirectional else 1)
    x = leaf(*((3, 4, 2) if m.batch_first else (4, 3, 2)), seed=1)
    state = (leaf(LD, 3, 3, seed=2),) if with_state else ()
    bridge = functions.gru if mode == "GRU" else functions.rnn

    def call(x, *rest):
        h0 = rest[0] if with_state else None
        ps = rest[1:] if with_state else rest
        return bridge(x, dict(zip(names, ps, strict=True)), num_layers=m.num_layers,
                      bidirectional=m.bidirectional, batch_first=m.batch_first, h0=h0,
                      backend=backend, **options)
    assert gradcheck(call, (x, *state, *params))


@over_backends
@pytest.mark.parametrize("mode", ["GRU", "RNN"])
def test_gru_and_rnn_match_packed_nn_modules_with_their_gradients(backend: str,
                                                                  mode: str) -> None:
    torch.manual_seed(10)
    m = getattr(torch.nn, mode)(3, 4, num_layers=2, bidirectional=True, dtype=D64)
    x, lengths = leaf(5, 3, 3, seed=1), torch.tensor([5, 2, 4])
    params = dict(m.named_parameters())
    bridge = functions.gru if mode == "GRU" else functions.rnn
    out, h = bridge(x, params, num_layers=2, bidirectional=True, lengths=lengths,
                    backend=backend)
    out_t, h_t = reference.run_packed(m, x, None, lengths)
    assert_same([out, h], [out_t, h_t])
    inputs = (x, *params.values())
    assert_same(grads_of([out, h], inputs), grads_of([out_t, h_t], inputs))


@over_backends
@pytest.mark.parametrize("mode", ["GRU", "RNN"])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_and_rnn_cells_gradcheck_and_match_torch(backend: str, mode: str,
                                                     bias: bool) -> None:
    torch.manual_seed(11)
    cell = getattr(torch.nn, f"{mode}Cell")(3, 2, bias=bias, dtype=D64)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in cell.named_parameters()]
    x, h = leaf(4, 3, seed=1), leaf(4, 2, seed=2)
    bridge = functions.gru_cell if mode == "GRU" else functions.rnn_cell

    def call(x, h, *ps):
        return bridge(x, h, dict(zip(names, ps, strict=True)), backend=backend)
    assert gradcheck(call, (x, h, *params))
    inputs = (x, h, *cell.parameters())
    ours, theirs = call(*inputs), cell(x, h)
    assert_same([ours], [theirs])
    assert_same(grads_of([ours], inputs), grads_of([theirs], inputs))
