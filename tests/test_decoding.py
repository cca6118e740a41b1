"""Greedy decoding and beam search: against the torch module's methods, against each other,
and against an exhaustive search scored by the teacher-forced forward (which also checks that
decoding one token at a time computes what `seq2seq_forward` computes over a whole target).
The comparison with the torch module also runs with the module on CUDA (marked ``cuda``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from models_common import BACKENDS, PAD, ModelCase, case_params, torch_module

import numpy_ref as ref

SEQ2SEQ = [("luong", "dot"), ("luong", "general"), ("luong", "additive"), ("bahdanau", None)]
configs = pytest.mark.parametrize(("decoder", "score"), SEQ2SEQ,
                                  ids=[f"{d}-{s or 'additive'}" for d, s in SEQ2SEQ])
over_backends = pytest.mark.parametrize("backend", list(BACKENDS))
BOS, EOS = 0, 1


def _case(decoder: str, score, V: int = 6, seed: int = 0, B: int = 4,
          cell: str = "lstm") -> ModelCase:
    return ModelCase(decoder, score, B=B, Ts=5, Tt=0, V=7, Vt=V, E=3, H=3, L=2,
                     lengths=(5, 1, 3, 4)[:B], seed_compatible=False, seed=seed, cell=cell)


def _source(case: ModelCase) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case.seed)
    src = rng.integers(0, case.V, (case.B, case.Ts))
    lengths = np.array(case.lengths)
    src[np.arange(case.Ts)[None, :] >= lengths[:, None]] = PAD
    return src, lengths


def _params(case: ModelCase) -> dict[str, np.ndarray]:
    """Params with a generator bias that makes eos likely, so hypotheses end at several
    lengths (the test's sequences are short)."""
    p = case_params(case)
    p["generator.bias"] = p["generator.bias"].copy()
    p["generator.bias"][EOS] += 1.0
    return p


def _log_prob(case: ModelCase, params, src, lengths, row: int, tokens: list[int]) -> float:
    """log P(tokens | src[row]) by teacher forcing: feed bos + tokens[:-1], sum the
    log-softmax at each next token."""
    tgt = np.array([[BOS, *tokens[:-1]]])
    logits, _, _ = ref.seq2seq_forward(src[row:row + 1], tgt, params, decoder=case.model,
                                       score=case.score, src_lengths=lengths[row:row + 1])
    z = logits[0] - logits[0].max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(sum(log_p[t, tok] for t, tok in enumerate(tokens)))


def _hypotheses(V: int, max_len: int):
    """Every finished hypothesis: a sequence ending at its first eos, or max_len tokens."""
    others = [v for v in range(V) if v != EOS]
    for n in range(1, max_len + 1):
        for head in itertools.product(others, repeat=n - 1):
            yield [*head, EOS]
    yield from (list(h) for h in itertools.product(others, repeat=max_len))


def _padded(tokens: list[int], L: int) -> list[int]:
    return tokens + [EOS] * (L - len(tokens))


@over_backends
@configs
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 0.6])
def test_exhaustive_beam_search_finds_the_best_hypothesis(backend, decoder, score,
                                                          length_penalty) -> None:
    """A beam as large as the number of hypotheses keeps them all: its answer is the arg-max
    of sum(log p) / len ** length_penalty over every hypothesis, each scored here by
    teacher forcing."""
    case = _case(decoder, score, V=3, seed=1)
    params = _params(case)
    src, lengths = _source(case)
    max_len = 3
    every = list(_hypotheses(case.Vt, max_len))
    tokens, scores = ref.beam_search(src, params, beam_size=len(every), max_len=max_len,
                                     bos=BOS, eos=EOS, src_lengths=lengths, decoder=decoder,
                                     score=score, length_penalty=length_penalty,
                                     backend=BACKENDS[backend])
    for b in range(case.B):
        scored = [(_log_prob(case, params, src, lengths, b, h) / len(h) ** length_penalty, h)
                  for h in every]
        best_score, best = max(scored, key=lambda sh: sh[0])
        assert abs(scores[b] - best_score) <= 1e-12 * abs(best_score), (b, scores[b], best_score)
        assert list(tokens[b]) == _padded(best, tokens.shape[1]), (b, tokens[b], best)


@over_backends
@configs
def test_beam_size_one_is_greedy_decoding(backend, decoder, score) -> None:
    case = _case(decoder, score, V=8, seed=2)
    params, (src, lengths) = _params(case), _source(case)
    mod = BACKENDS[backend]
    greedy = ref.greedy_decode(src, params, max_len=7, bos=BOS, eos=EOS, src_lengths=lengths,
                               decoder=decoder, score=score, backend=mod)
    beam, scores = ref.beam_search(src, params, beam_size=1, max_len=7, bos=BOS, eos=EOS,
                                   src_lengths=lengths, decoder=decoder, score=score,
                                   length_penalty=0.0, backend=mod)
    np.testing.assert_array_equal(beam, greedy)
    for b in range(case.B):  # the score is the greedy sequence's log-probability
        row = list(greedy[b])
        hyp = row[:row.index(EOS) + 1] if EOS in row else row
        assert abs(scores[b] - _log_prob(case, params, src, lengths, b, hyp)) < 1e-12


def check_decoding_against_torch_on(device: str, backend: str, decoder: str, score,
                                    beam_size: int, cell: str = "lstm") -> None:
    """Greedy and beam search of a backend (float64, on the CPU) against the torch module's
    methods on `device`: the same tokens, and beam scores to 1e-12 relative."""
    case = _case(decoder, score, V=9, seed=3, cell=cell)
    params, (src, lengths) = _params(case), _source(case)
    m = torch_module(case, params, device)
    t_src, t_lengths = torch.tensor(src, device=device), torch.tensor(lengths, device=device)
    kw = dict(max_len=6, bos=BOS, eos=EOS)
    got = ref.greedy_decode(src, params, src_lengths=lengths, decoder=decoder, score=score,
                            cell=cell, backend=BACKENDS[backend], **kw)
    want = m.greedy_decode(t_src, src_lengths=t_lengths, **kw)
    np.testing.assert_array_equal(got, want.cpu().numpy())
    tokens, scores = ref.beam_search(src, params, beam_size=beam_size, src_lengths=lengths,
                                     decoder=decoder, score=score, length_penalty=0.7,
                                     cell=cell, backend=BACKENDS[backend], **kw)
    t_tokens, t_scores = m.beam_search(t_src, beam_size=beam_size, src_lengths=t_lengths,
                                       length_penalty=0.7, **kw)
    np.testing.assert_array_equal(tokens, t_tokens.cpu().numpy())
    np.testing.assert_allclose(scores, t_scores.cpu().numpy(), rtol=1e-12, atol=0)


@over_backends
@configs
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_decoding_matches_the_torch_modules_methods(backend, decoder, score,
                                                    beam_size) -> None:
    check_decoding_against_torch_on("cpu", backend, decoder, score, beam_size)


@over_backends
@pytest.mark.parametrize(("decoder", "score"), [("luong", "general"), ("bahdanau", None)])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_gru_decoding_matches_the_torch_modules_methods(backend, decoder, score,
                                                        beam_size) -> None:
    """The encoder-decoder with GRUs (a state without c) decodes as the torch module does."""
    check_decoding_against_torch_on("cpu", backend, decoder, score, beam_size, cell="gru")


@pytest.mark.cuda
@configs
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_decoding_matches_the_torch_modules_methods_cuda(decoder, score, beam_size) -> None:
    """numpy_ref against the torch module on CUDA (float64)."""
    check_decoding_against_torch_on("cuda", "numpy_ref", decoder, score, beam_size)


@configs
def test_decoded_rows_end_at_eos_and_are_padded_with_it(decoder, score) -> None:
    case = _case(decoder, score, V=5, seed=4)
    params, (src, lengths) = _params(case), _source(case)
    for max_len in (1, 2, 9):
        outs = [ref.greedy_decode(src, params, max_len=max_len, bos=BOS, eos=EOS,
                                  src_lengths=lengths, decoder=decoder, score=score),
                ref.beam_search(src, params, beam_size=3, max_len=max_len, bos=BOS, eos=EOS,
                                src_lengths=lengths, decoder=decoder, score=score)[0]]
        for tokens in outs:
            assert tokens.dtype.kind == "i" and tokens.shape[0] == case.B
            assert 1 <= tokens.shape[1] <= max_len
            ended = [list(r).index(EOS) if EOS in r else None for r in tokens]
            for r, end in zip(tokens, ended, strict=True):
                if end is not None:
                    assert np.all(r[end:] == EOS), r  # eos, then only eos
            assert tokens.shape[1] == max_len or all(e is not None for e in ended)


@configs
def test_a_rows_decoding_does_not_depend_on_its_batch_mates(decoder, score) -> None:
    case = _case(decoder, score, V=7, seed=5)
    params, (src, lengths) = _params(case), _source(case)
    kw = dict(max_len=6, bos=BOS, eos=EOS, decoder=decoder, score=score)
    tokens, scores = ref.beam_search(src, params, beam_size=3, src_lengths=lengths, **kw)
    greedy = ref.greedy_decode(src, params, src_lengths=lengths, **kw)
    for b in range(case.B):
        one = slice(b, b + 1)
        t1, s1 = ref.beam_search(src[one], params, beam_size=3, src_lengths=lengths[one], **kw)
        g1 = ref.greedy_decode(src[one], params, src_lengths=lengths[one], **kw)
        np.testing.assert_array_equal(_strip(t1[0]), _strip(tokens[b]))
        np.testing.assert_array_equal(_strip(g1[0]), _strip(greedy[b]))
        assert abs(s1[0] - scores[b]) < 1e-12


def _strip(row: np.ndarray) -> list[int]:
    """A decoded row without the eos padding after its first eos."""
    r = list(row)
    return r[:r.index(EOS) + 1] if EOS in r else r
