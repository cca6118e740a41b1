"""The models against their torch_impl counterparts, the seed's own class, and themselves.

- Gradient parity: every parameter's gradient of the numpy_ref model (hand-written backward,
  on every backend) against torch autograd of the torch_impl module holding the same weights,
  under random cotangents on the logits and on the attention, float64 and float32 (policy);
  the classifier with and without lengths and in both query modes, the encoder-decoder for
  every decoder and score, 1 and 2 encoder layers, unsorted lengths including 1.
- Training parity: the same initial weights and batches give the same loss at every one of
  200 Adam steps, numpy_ref (or kernels) against torch, within 1e-9 relative in float64.
- Batch independence: a row's outputs do not depend on its batch-mates, except in the
  seed-compatible classifier, whose query reads its batch-mates' states (the seed's bug).
- The seed's own BiLSTM_Attention, replayed: its state_dict loads into ours, and the
  seed-compatible model gives exactly its outputs; the default model agrees with it at B = 1.
- Padding is not data; finite differences; round trips; bad input.
"""

from __future__ import annotations

import error_report
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models_common import (
    BACKENDS,
    PAD,
    ModelCase,
    case_params,
    model_inputs,
    run_ours,
    torch_grads,
    torch_module,
)

import numpy_ref as ref
from numpy_ref.testing import assert_allclose_named, assert_close_policy
from torch_impl import BiLSTMAttention, Seq2SeqAttention, load_numpy_, to_numpy

over_backends = pytest.mark.parametrize("backend", list(BACKENDS))
SEQ2SEQ = [("luong", "dot"), ("luong", "scaled_dot"), ("luong", "general"),
           ("luong", "additive"), ("bahdanau", None)]
seq2seq_configs = pytest.mark.parametrize(("decoder", "score"), SEQ2SEQ,
                                          ids=[f"{d}-{s or 'additive'}" for d, s in SEQ2SEQ])
# A model case runs a whole model twice (ours and torch's): a fifth of the profile's examples.
MODEL_EXAMPLES = settings(max_examples=max(4, settings.default.max_examples // 5))


@st.composite
def model_cases(draw, model: str, score: str | None = None, *, lengths: bool,
                seed_compatible: bool = False, L: int = 1) -> ModelCase:
    """Sizes (1 included, odd ones) and a seed; lengths unsorted, 1 and the full length often."""
    B, Ts = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    drawn = None
    if lengths:
        one = st.one_of(st.just(Ts), st.just(1), st.integers(1, Ts))
        drawn = tuple(draw(st.lists(one, min_size=B, max_size=B)))
    sizes = st.sampled_from([1, 2, 3, 5])
    return ModelCase(model, score, B, Ts, draw(st.integers(1, 5)), draw(st.integers(2, 9)),
                     draw(st.integers(2, 9)), draw(sizes), draw(sizes), L, drawn,
                     seed_compatible, draw(st.integers(0, 2**32 - 1)),
                     draw(st.sampled_from(["lstm", "gru"])))


def check_gradients(case: ModelCase, backend: str, dtype=np.float64, device: str = "cpu",
                    with_d_attention: bool = True) -> float:
    """Our logits, attention and every parameter gradient against torch's, under the policy;
    returns the largest float64 error (0 for float32 runs)."""
    params = case_params(case, dtype)
    inputs = model_inputs(case, dtype)
    logits, attention, grads = run_ours(case, params, inputs, backend,
                                        with_d_attention=with_d_attention)
    assert list(grads) == list(params), "d_params must have the params' keys, in order"
    for name, value in [("logits", logits), ("attention", attention), *grads.items()]:
        assert value.dtype == dtype, f"{name}: dtype {value.dtype}, expected {np.dtype(dtype)}"
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    i64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
               else v) for k, v in inputs.items()}
    want_logits, want_attention, want = torch_grads(case, p64, i64, "cpu",
                                                    with_d_attention=with_d_attention)
    t32 = ({} if dtype == np.float64 else dict(zip(
        ("logits", "attention", "grads"),
        torch_grads(case, params, inputs, device, with_d_attention=with_d_attention),
        strict=True)))
    worst = 0.0
    if dtype == np.float64 and device == "cpu":
        worst = max(assert_close_policy("logits", logits, want_logits),
                    assert_close_policy("attention", attention, want_attention))
    elif dtype == np.float64:  # torch on CUDA against ours, float64
        worst = max(assert_close_policy("logits", logits, t32["logits"]),
                    assert_close_policy("attention", attention, t32["attention"]))
    else:
        assert_close_policy("logits", logits, want_logits, torch32=t32["logits"])
        assert_close_policy("attention", attention, want_attention, torch32=t32["attention"])
    # float32: a gradient's floor is relative to the case's largest gradient (a small gradient
    # next to large ones is a cancellation of terms of their size; see policy.py)
    grad_scale = max(float(np.abs(g).max()) for g in want.values() if g.size)
    for k, g in grads.items():
        if dtype == np.float64:
            reference = want[k] if device == "cpu" else t32["grads"][k]
            worst = max(worst, assert_close_policy(f"d_{k}", g, reference, grad=True))
        else:
            assert_close_policy(f"d_{k}", g, want[k], torch32=t32["grads"][k], grad=True,
                                scale=grad_scale)
    return worst


def model_config(model: str) -> tuple[str, str | None]:
    """A test id "classifier", "luong-general" or "bahdanau-None" -> (model, score)."""
    decoder, _, score = model.partition("-")
    return decoder, None if score in ("", "None") else score


def _record(case: ModelCase, backend: str, error: float) -> None:
    default = {"classifier": "", "luong": "general", "bahdanau": "additive"}[case.model]
    score = case.score or default
    key = f"{case.model}{'-' + score if score else ''} ({backend})"
    error_report.record("model gradient properties, largest float64 |ours - torch|", key, error)


# ---------------------------------------------------------------------------------------------
# gradient parity with torch autograd


@over_backends
@pytest.mark.parametrize("seed_compatible", [False, True], ids=["fixed", "seed-compatible"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@MODEL_EXAMPLES
@given(data=st.data())
def test_classifier_gradients_match_torch_float64(backend: str, seed_compatible: bool,
                                                  with_lengths: bool, data) -> None:
    case = data.draw(model_cases("classifier", lengths=with_lengths,
                                 seed_compatible=seed_compatible), label="case")
    _record(case, backend, check_gradients(case, backend))


@over_backends
@seq2seq_configs
@pytest.mark.parametrize("L", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@MODEL_EXAMPLES
@given(data=st.data())
def test_seq2seq_gradients_match_torch_float64(backend: str, decoder: str, score, L: int,
                                               with_lengths: bool, data) -> None:
    case = data.draw(model_cases(decoder, score, lengths=with_lengths, L=L), label="case")
    _record(case, backend, check_gradients(case, backend))


@over_backends
@pytest.mark.parametrize("model", ["classifier", *(f"{d}-{s}" for d, s in SEQ2SEQ)])
def test_model_gradients_without_an_attention_cotangent(backend: str, model: str) -> None:
    """d_attention=None: only the logits' cotangent flows (the training case)."""
    decoder, score = model_config(model)
    case = ModelCase(decoder, score, B=3, Ts=5, Tt=4, V=7,
                     Vt=6, E=3, H=2, L=2, lengths=(5, 1, 3), seed_compatible=False, seed=5)
    _record(case, backend, check_gradients(case, backend, with_d_attention=False))


@over_backends
@pytest.mark.parametrize("model", ["classifier", *(f"{d}-{s}" for d, s in SEQ2SEQ)])
@MODEL_EXAMPLES
@given(data=st.data())
def test_model_gradients_float32_within_policy(backend: str, model: str, device: str,
                                               data) -> None:
    decoder, score = model_config(model)
    case = data.draw(model_cases(decoder, score,
                                 lengths=data.draw(st.booleans(), label="lengths"),
                                 seed_compatible=data.draw(st.booleans(), label="seed")),
                     label="case")
    check_gradients(case, backend, np.float32, device)


@pytest.mark.cuda
@over_backends
@pytest.mark.parametrize("model", ["classifier", *(f"{d}-{s}" for d, s in SEQ2SEQ)])
def test_model_gradients_match_torch_cuda_float64(backend: str, model: str) -> None:
    decoder, score = model_config(model)
    case = ModelCase(decoder, score, B=5, Ts=9, Tt=6, V=11,
                     Vt=13, E=7, H=5, L=2, lengths=(9, 1, 4, 9, 2), seed_compatible=False,
                     seed=3)
    check_gradients(case, backend, np.float64, "cuda")


# ---------------------------------------------------------------------------------------------
# training parity: 200 Adam steps, numpy_ref (or kernels) against torch


TRAIN_STEPS = 200


def _classifier_batches(rng: np.random.Generator, V: int, C: int, n: int = 4):
    """n batches (ids [B, T] with -1 past the lengths, lengths, labels [B]) of several sizes."""
    batches = []
    for i in range(n):
        B, T = 3 + i % 2, 5 + i
        lengths = rng.integers(1, T + 1, B)
        lengths[0] = T
        ids = rng.integers(0, V, (B, T))
        ids[np.arange(T)[None, :] >= lengths[:, None]] = PAD
        batches.append((ids, lengths, rng.integers(0, C, B)))
    return batches


def _seq2seq_batches(rng: np.random.Generator, Vs: int, Vt: int, n: int = 4):
    """n batches (src [B, Ts], src_lengths, tgt_in [B, Tt], tgt_out [B, Tt] with -100 on the
    padded target positions, which the loss ignores)."""
    batches = []
    for i in range(n):
        B, Ts, Tt = 3, 4 + i, 3 + i % 3
        src_lengths = rng.integers(1, Ts + 1, B)
        src = rng.integers(0, Vs, (B, Ts))
        src[np.arange(Ts)[None, :] >= src_lengths[:, None]] = PAD
        tgt_lengths = rng.integers(1, Tt + 1, B)
        tgt = rng.integers(0, Vt, (B, Tt + 1))
        tgt_out = tgt[:, 1:].copy()
        tgt_out[np.arange(Tt)[None, :] >= tgt_lengths[:, None]] = -100
        batches.append((src, src_lengths, tgt[:, :-1], tgt_out))
    return batches


def train_ours(case: ModelCase, params: dict, batches, backend: str, steps: int) -> list[float]:
    """Adam on the backend's model (and the backend's Adam): the loss at each step."""
    mod = BACKENDS[backend]
    params = {k: v.copy() for k, v in params.items()}
    opt = mod.Adam(params, lr=1e-2)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        if case.model == "classifier":
            ids, lengths, labels = batch
            logits, _, cache = ref.bilstm_attention_forward(
                ids, params, lengths=lengths, seed_compatible=case.seed_compatible,
                cell=case.cell, backend=mod)
            loss, ce = mod.cross_entropy_forward(logits, labels)
            grads = ref.bilstm_attention_backward(mod.cross_entropy_backward(
                np.ones((), logits.dtype), ce), cache)
        else:
            src, src_lengths, tgt_in, tgt_out = batch
            logits, _, cache = ref.seq2seq_forward(src, tgt_in, params, decoder=case.model,
                                                   score=case.score, src_lengths=src_lengths,
                                                   cell=case.cell, backend=mod)
            # [B, Tt, Vt] -> torch's [B, Vt, Tt] layout of cross_entropy with extra axes
            loss, ce = mod.cross_entropy_forward(logits.transpose(0, 2, 1), tgt_out)
            d_logits = mod.cross_entropy_backward(np.ones((), logits.dtype), ce)
            grads = ref.seq2seq_backward(d_logits.transpose(0, 2, 1), cache)
        opt.step(grads)
        losses.append(float(loss))
    return losses


def train_torch(case: ModelCase, params: dict, batches, steps: int,
                device: str = "cpu") -> list[float]:
    m = torch_module(case, params, device)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        batch = [torch.tensor(a, device=device) for a in batches[step % len(batches)]]
        if case.model == "classifier":
            ids, lengths, labels = batch
            logits, _ = m(ids, lengths)
            loss = F.cross_entropy(logits, labels)
        else:
            src, src_lengths, tgt_in, tgt_out = batch
            logits, _ = m(src, tgt_in, src_lengths)
            loss = F.cross_entropy(logits.transpose(1, 2), tgt_out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


TRAINING_CASES = {
    "classifier": ModelCase("classifier", None, 0, 0, 0, V=12, Vt=3, E=4, H=5, L=1,
                            lengths=None, seed_compatible=False, seed=21),
    "classifier-seed-compatible": ModelCase("classifier", None, 0, 0, 0, V=12, Vt=3, E=4, H=5,
                                            L=1, lengths=None, seed_compatible=True, seed=22),
    "luong-general": ModelCase("luong", "general", 0, 0, 0, V=10, Vt=9, E=4, H=3, L=2,
                               lengths=None, seed_compatible=False, seed=23),
    "luong-additive": ModelCase("luong", "additive", 0, 0, 0, V=10, Vt=9, E=4, H=3, L=1,
                                lengths=None, seed_compatible=False, seed=24),
    "bahdanau": ModelCase("bahdanau", None, 0, 0, 0, V=10, Vt=9, E=4, H=3, L=1, lengths=None,
                          seed_compatible=False, seed=25),
    "classifier-gru": ModelCase("classifier", None, 0, 0, 0, V=12, Vt=3, E=4, H=5, L=1,
                                lengths=None, seed_compatible=False, seed=26, cell="gru"),
    "luong-general-gru": ModelCase("luong", "general", 0, 0, 0, V=10, Vt=9, E=4, H=3, L=2,
                                   lengths=None, seed_compatible=False, seed=27, cell="gru"),
    "bahdanau-gru": ModelCase("bahdanau", None, 0, 0, 0, V=10, Vt=9, E=4, H=3, L=1,
                              lengths=None, seed_compatible=False, seed=28, cell="gru"),
}


def _training_setup(name: str):
    """(case, params at torch's init scale, the case's batches)."""
    case = TRAINING_CASES[name]
    params = {k: v / 1.5 for k, v in case_params(case).items()}
    rng = np.random.default_rng(case.seed)
    batches = (_classifier_batches(rng, case.V, case.Vt) if case.model == "classifier"
               else _seq2seq_batches(rng, case.V, case.Vt))
    return case, params, batches


@over_backends
@pytest.mark.parametrize("name", list(TRAINING_CASES))
def test_training_matches_torch_step_for_step_float64(backend: str, name: str) -> None:
    case, params, batches = _training_setup(name)
    ours = np.array(train_ours(case, params, batches, backend, TRAIN_STEPS))
    want = np.array(train_torch(case, params, batches, TRAIN_STEPS))
    relative = np.abs(ours - want) / np.abs(want)
    error_report.record("200 Adam steps, largest relative |loss - torch loss|",
                        f"{name} ({backend})", float(relative.max()), bound=None)
    step = int(np.argmax(relative))
    assert relative.max() <= 1e-9, (
        f"{name}: step {step} loss {ours[step]!r} vs torch {want[step]!r} (relative "
        f"{relative[step]:.3g} > 1e-9)")
    assert want[-len(batches):].mean() < 0.8 * want[:len(batches)].mean(), "it must learn"


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(TRAINING_CASES))
def test_training_matches_torch_cuda_step_for_step_float64(name: str) -> None:
    case, params, batches = _training_setup(name)
    ours = np.array(train_ours(case, params, batches, "numpy_ref", TRAIN_STEPS))
    want = np.array(train_torch(case, params, batches, TRAIN_STEPS, "cuda"))
    np.testing.assert_allclose(ours, want, rtol=1e-9, atol=0)


@over_backends
@pytest.mark.parametrize("name", ["classifier", "luong-general", "bahdanau", "bahdanau-gru"])
def test_training_float32_within_policy(backend: str, name: str) -> None:
    """30 float32 steps: our losses stay as close to the float64 run as torch's float32 do."""
    case, params, batches = _training_setup(name)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    ours = np.array(train_ours(case, p32, batches, backend, 30))
    want = np.array(train_ours(case, params, batches, "numpy_ref", 30))
    torch32 = np.array(train_torch(case, p32, batches, 30))
    assert_close_policy("losses (float32 training)", ours.astype(np.float32), want,
                        torch32=torch32.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# a row's outputs do not depend on its batch-mates


def _rows_alone(case: ModelCase, params: dict, inputs: dict, backend: str):
    """Run each row on its own; stack the logits and attention."""
    got = []
    for b in range(case.B):
        one = {k: None if v is None else v[b:b + 1] for k, v in inputs.items()}
        got.append(run_ours(case._replace(B=1), params, one, backend)[:2])
    return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])


@over_backends
@pytest.mark.parametrize("model", ["classifier", *(f"{d}-{s}" for d, s in SEQ2SEQ)])
def test_a_rows_outputs_do_not_depend_on_its_batch_mates(backend: str, model: str) -> None:
    decoder, score = model_config(model)
    case = ModelCase(decoder, score, B=4, Ts=6, Tt=5, V=9,
                     Vt=7, E=3, H=4, L=2, lengths=(6, 2, 5, 1), seed_compatible=False, seed=9)
    params, inputs = case_params(case), model_inputs(case)
    logits, attention, _ = run_ours(case, params, inputs, backend)
    alone_logits, alone_attention = _rows_alone(case, params, inputs, backend)
    assert_allclose_named("logits (batched vs one row at a time)", logits, alone_logits,
                          rtol=1e-12, atol=1e-12)
    assert_allclose_named("attention (batched vs one row at a time)", attention,
                          alone_attention, rtol=1e-12, atol=1e-12)


@over_backends
def test_the_seed_compatible_classifier_mixes_rows_and_agrees_at_batch_one(backend) -> None:
    """The seed's bug, shown: batched and one-at-a-time predictions differ (B > 1), and the
    buggy and fixed models agree when B = 1."""
    case = ModelCase("classifier", None, B=3, Ts=5, Tt=0, V=9, Vt=2, E=2, H=5, L=1,
                     lengths=None, seed_compatible=True, seed=10)
    params, inputs = case_params(case), model_inputs(case)
    batched, _, _ = run_ours(case, params, inputs, backend)
    alone, _ = _rows_alone(case, params, inputs, backend)
    assert np.abs(batched - alone).max() > 1e-3, "the seed's query must read other rows"
    fixed = case._replace(seed_compatible=False)
    for b in range(case.B):
        one = {k: None if v is None else v[b:b + 1] for k, v in inputs.items()}
        buggy_logits = run_ours(case._replace(B=1), params, one, backend)[0]
        fixed_logits = run_ours(fixed._replace(B=1), params, one, backend)[0]
        np.testing.assert_array_equal(buggy_logits, fixed_logits)
    fixed_batched, _, _ = run_ours(fixed, params, inputs, backend)
    assert_allclose_named("fixed model (batched vs alone)", fixed_batched, alone, rtol=1e-12,
                          atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the seed's own class, replayed


class SeedBiLSTMAttention(torch.nn.Module):
    """The seed's BiLSTM_Attention, line for line (its globals made arguments; Variable
    dropped; the attention returned as a tensor instead of ``.data.numpy()``)."""

    def __init__(self, vocab_size, embedding_dim, n_hidden, num_classes):
        super().__init__()
        self.n_hidden = n_hidden
        self.embedding = torch.nn.Embedding(vocab_size, embedding_dim)
        self.lstm = torch.nn.LSTM(embedding_dim, n_hidden, bidirectional=True)
        self.out = torch.nn.Linear(n_hidden * 2, num_classes)

    def attention_net(self, lstm_output, final_state):
        hidden = final_state.view(-1, self.n_hidden * 2, 1)
        attn_weights = torch.bmm(lstm_output, hidden).squeeze(2)
        soft_attn_weights = F.softmax(attn_weights, 1)
        context = torch.bmm(lstm_output.transpose(1, 2), soft_attn_weights.unsqueeze(2)).squeeze(2)
        return context, soft_attn_weights

    def forward(self, X):
        input = self.embedding(X)
        input = input.permute(1, 0, 2)
        hidden_state = torch.zeros(1 * 2, len(X), self.n_hidden, dtype=input.dtype)
        cell_state = torch.zeros(1 * 2, len(X), self.n_hidden, dtype=input.dtype)
        output, (final_hidden_state, _) = self.lstm(input, (hidden_state, cell_state))
        output = output.permute(1, 0, 2)
        attn_output, attention = self.attention_net(output, final_hidden_state)
        return self.out(attn_output), attention


@pytest.mark.parametrize("B", [1, 2, 6])
def test_the_seeds_own_state_dict_loads_and_seed_compatible_reproduces_it(B: int) -> None:
    torch.manual_seed(B)
    seed = SeedBiLSTMAttention(16, 2, 5, 2).double()
    ids = torch.randint(0, 16, (B, 3))
    want_logits, want_attention = seed(ids)
    for seed_compatible in (True, False):
        ours = BiLSTMAttention(16, 2, 5, 2, seed_compatible=seed_compatible).double()
        ours.load_state_dict(seed.state_dict(), strict=True)
        got_logits, got_attention = ours(ids)
        params = to_numpy(seed)
        np_logits, np_attention, _ = ref.bilstm_attention_forward(
            ids.numpy(), params, seed_compatible=seed_compatible)
        if seed_compatible or B == 1:  # the seed's model, or any model at B = 1
            torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=0)
            torch.testing.assert_close(got_attention, want_attention, rtol=0, atol=0)
            assert_close_policy("logits (numpy_ref vs the seed)", np_logits,
                                want_logits.detach().numpy())
            assert_close_policy("attention (numpy_ref vs the seed)", np_attention,
                                want_attention.detach().numpy())
        else:
            assert np.abs(got_logits.detach().numpy() - want_logits.detach().numpy()).max() > 1e-6


# ---------------------------------------------------------------------------------------------
# padding is not data


@over_backends
@pytest.mark.parametrize("model", ["classifier", *(f"{d}-{s}" for d, s in SEQ2SEQ)])
def test_source_padding_changes_nothing_bit_for_bit(backend: str, model: str) -> None:
    """Ids past the lengths: -1, a huge id, or zeros; every output and gradient is the same."""
    decoder, score = model_config(model)
    case = ModelCase(decoder, score, B=4, Ts=7, Tt=3, V=9,
                     Vt=6, E=3, H=2, L=2, lengths=(7, 1, 4, 2), seed_compatible=False, seed=12)
    params, inputs = case_params(case), model_inputs(case)
    padded = np.arange(case.Ts)[None, :] >= np.array(case.lengths)[:, None]
    results = []
    for fill in (0, PAD, 10**9):
        src = inputs["src"].copy()
        src[padded] = fill
        results.append(run_ours(case, params, dict(inputs, src=src), backend))
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])
        np.testing.assert_array_equal(other[1], results[0][1])
        for k in params:
            np.testing.assert_array_equal(other[2][k], results[0][2][k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# finite differences (numpy_ref against itself, no torch)


@pytest.mark.parametrize("model", ["classifier", "classifier-seed", *(f"{d}-{s}"
                                                                      for d, s in SEQ2SEQ)])
def test_model_backward_matches_finite_differences(model: str) -> None:
    decoder, _, score = model.partition("-")
    seed_compatible = score == "seed"
    score = None if score in ("", "None", "seed") else score
    case = ModelCase(decoder, score, B=2, Ts=3, Tt=2, V=4, Vt=3, E=2, H=2, L=2,
                     lengths=(3, 2), seed_compatible=seed_compatible, seed=13)
    params, inputs = case_params(case), model_inputs(case)
    _, _, grads = run_ours(case, params, inputs)

    def loss() -> float:
        logits, attention, _ = run_ours(case, params, inputs)
        return float(np.sum(logits * inputs["d_logits"])
                     + np.sum(attention * inputs["d_attention"]))

    errors = ref.gradcheck(loss, params, grads, rtol=1e-6, atol=1e-8)
    assert max(errors.values()) < 1e-7


# ---------------------------------------------------------------------------------------------
# round trips, caches, dtypes


@pytest.mark.parametrize("model", ["classifier", *(f"{d}-{s}" for d, s in SEQ2SEQ)])
def test_to_numpy_and_load_numpy_round_trip_every_model_exactly(model: str) -> None:
    decoder, score = model_config(model)
    torch.manual_seed(1)
    if decoder == "classifier":
        m = BiLSTMAttention(7, 3, 4, 2)
        twin = BiLSTMAttention(7, 3, 4, 2)
        init = ref.init_bilstm_attention_params(7, 3, 4, 2)
    else:
        m = Seq2SeqAttention(7, 8, 3, 4, decoder=decoder, score=score, num_layers=2)
        twin = Seq2SeqAttention(7, 8, 3, 4, decoder=decoder, score=score, num_layers=2)
        init = ref.init_seq2seq_params(7, 8, 3, 4, decoder=decoder, score=score, num_layers=2)
    params = to_numpy(m)
    assert list(params) == list(init), "numpy_ref's init must give the state_dict's keys"
    assert all(params[k].shape == init[k].shape for k in params)
    load_numpy_(twin, params)
    for k, v in twin.state_dict().items():
        torch.testing.assert_close(v, m.state_dict()[k], rtol=0, atol=0)
    back = to_numpy(twin)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k], err_msg=k)


@over_backends
@pytest.mark.parametrize("model", ["classifier", "luong-general", "bahdanau-None"])
def test_model_backward_twice_on_one_cache_and_float32_stays_float32(backend: str,
                                                                    model: str) -> None:
    decoder, score = model_config(model)
    case = ModelCase(decoder, score, B=2, Ts=4, Tt=3, V=5,
                     Vt=4, E=2, H=3, L=1, lengths=(4, 2), seed_compatible=False, seed=14)
    for dtype in (np.float64, np.float32):
        params, inputs = case_params(case, dtype), model_inputs(case, dtype)
        mod = BACKENDS[backend]
        if decoder == "classifier":
            logits, attention, cache = ref.bilstm_attention_forward(
                inputs["src"], params, lengths=inputs["lengths"], backend=mod)
            first = ref.bilstm_attention_backward(inputs["d_logits"], cache)
            second = ref.bilstm_attention_backward(inputs["d_logits"], cache)
        else:
            logits, attention, cache = ref.seq2seq_forward(
                inputs["src"], inputs["tgt"], params, decoder=decoder, score=case.score,
                src_lengths=inputs["lengths"], backend=mod)
            first = ref.seq2seq_backward(inputs["d_logits"], cache)
            second = ref.seq2seq_backward(inputs["d_logits"], cache)
        assert cache.backend is mod
        assert logits.dtype == attention.dtype == dtype
        for k in first:
            assert first[k].dtype == dtype, k
            np.testing.assert_array_equal(first[k], second[k], err_msg=k)
