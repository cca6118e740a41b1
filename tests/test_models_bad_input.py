"""Every bad input to the models and the decoders gets a clear ValueError/TypeError naming the
argument (and, for params, the key and both shapes), on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from backends import BACKENDS

import numpy_ref as ref

CLS = ref.init_bilstm_attention_params(6, 3, 4, 2, rng=0)
IDS = np.array([[0, 1, 2], [3, 4, 5]])
S2S = ref.init_seq2seq_params(6, 7, 3, 2, num_layers=2, rng=0)  # luong, general
BAH = ref.init_seq2seq_params(6, 7, 3, 2, decoder="bahdanau", rng=0)
SRC, TGT = np.array([[0, 1, 2, 3], [4, 5, -1, -1]]), np.array([[0, 1], [2, 3]])
LENGTHS = np.array([4, 2])


def without(params: dict, key: str) -> dict:
    return {k: v for k, v in params.items() if k != key}


def replaced(params: dict, key: str, value) -> dict:
    return {**params, key: value}


def cls(m, ids=IDS, params=CLS, **kw):
    return ref.bilstm_attention_forward(ids, params, backend=m, **kw)


def s2s(m, src=SRC, tgt=TGT, params=S2S, src_lengths=LENGTHS, **kw):
    return ref.seq2seq_forward(src, tgt, params, src_lengths=src_lengths, backend=m, **kw)


def greedy(m, **kw):
    args = dict(max_len=3, bos=0, eos=1, src_lengths=LENGTHS, backend=m)
    args.update(kw)
    return ref.greedy_decode(SRC, S2S, **args)


def beam(m, **kw):
    args = dict(beam_size=2, max_len=3, bos=0, eos=1, src_lengths=LENGTHS, backend=m)
    args.update(kw)
    return ref.beam_search(SRC, S2S, **args)


BAD = [
    # token ids
    ("classifier id too large", lambda m: cls(m, ids=np.array([[0, 6]])), ValueError,
     r"ids: every id must be in 0..5 \(the vocabulary has 6 rows\)"),
    ("classifier negative id", lambda m: cls(m, ids=np.array([[-1, 2]])), ValueError,
     r"ids: every id must be in 0..5 .* e\.g\. -1"),
    ("classifier float ids", lambda m: cls(m, ids=IDS.astype(float)), TypeError,
     r"ids: expected integer token ids, got dtype float64"),
    ("classifier 1-D ids", lambda m: cls(m, ids=IDS[0]), ValueError,
     r"ids: expected token ids \[B, T\] with B, T >= 1, got shape \(3,\)"),
    ("classifier padded id is fine, a real one is not",
     lambda m: cls(m, ids=np.array([[0, 9, 9], [-1, 1, 2]]), lengths=[1, 3]), ValueError,
     r"ids: every id must be in 0..5 .* e\.g\. -1"),
    ("src id too large", lambda m: s2s(m, src=np.array([[0, 6, 1, 2], [1, 2, 0, 0]])),
     ValueError, r"src: every id must be in 0..5"),
    ("tgt id too large", lambda m: s2s(m, tgt=np.array([[0, 7], [1, 2]])), ValueError,
     r"tgt: every id must be in 0..6"),
    ("tgt batch", lambda m: s2s(m, tgt=TGT[:1]), ValueError,
     r"tgt: batch 1 does not match src's batch 2"),
    ("empty tgt", lambda m: s2s(m, tgt=np.zeros((2, 0), int)), ValueError,
     r"tgt: expected token ids \[B, T\] with B, T >= 1, got shape \(2, 0\)"),
    # lengths
    ("lengths zero", lambda m: cls(m, lengths=[0, 3]), ValueError,
     r"lengths: every length must be in 1..3, got min 0 and max 3"),
    ("lengths too long", lambda m: cls(m, lengths=[4, 3]), ValueError,
     r"lengths: every length must be in 1..3, got min 3 and max 4"),
    ("lengths shape", lambda m: cls(m, lengths=[3]), ValueError,
     r"lengths: expected shape \[B\] = \(2,\), got \(1,\)"),
    ("src_lengths too long", lambda m: s2s(m, src_lengths=[5, 2]), ValueError,
     r"src_lengths: every length must be in 1..4, got min 2 and max 5"),
    ("src_lengths float", lambda m: s2s(m, src_lengths=[4.0, 2.0]), TypeError,
     r"src_lengths: expected integers, got dtype float64"),
    # params
    ("classifier missing key", lambda m: cls(m, params=without(CLS, "out.bias")), ValueError,
     r"params: missing key 'out.bias' \(expected shape \[C\] = \(2,\)\)"),
    ("classifier extra key", lambda m: cls(m, params={**CLS, "attention.W": np.zeros((8, 8))}),
     ValueError, r"params: unexpected keys \['attention.W'\]; they are not part of this "
                 r"BiLSTM-attention classifier"),
    ("classifier misshaped key", lambda m: cls(m, params=replaced(CLS, "out.weight",
                                                                  np.zeros((2, 9)))),
     ValueError, r"params\['out.weight'\]: expected shape \[C, 2H\] = \(2, 8\), got \(2, 9\)"),
    ("classifier reverse misshaped",
     lambda m: cls(m, params=replaced(CLS, "lstm.bias_hh_l0_reverse", np.zeros(15))),
     ValueError, r"params\['lstm.bias_hh_l0_reverse'\]: expected shape \[4H\] = \(16,\), "
                 r"got \(15,\)"),
    ("classifier mixed dtype", lambda m: cls(m, params=replaced(
        CLS, "out.bias", CLS["out.bias"].astype(np.float32))), TypeError,
     r"params\['out.bias'\]: dtype float32 does not match the dtype of "
     r"params\['embedding.weight'\]"),
    ("classifier not a dict", lambda m: cls(m, params=list(CLS.values())), TypeError,
     r"params: expected a dict of arrays, got list"),
    ("seq2seq missing key", lambda m: s2s(m, params=without(S2S, "decoder.attention.W")),
     ValueError, r"params: missing key 'decoder.attention.W' \(expected shape \[2H, 2H\] = "
                 r"\(4, 4\)\) for this luong seq2seq with the 'general' score"),
    ("seq2seq params of another score", lambda m: s2s(m, score="dot"), ValueError,
     r"params: unexpected keys \['decoder.attention.W'\]; they are not part of this luong "
     r"seq2seq with the 'dot' score"),
    ("seq2seq params of another decoder", lambda m: s2s(m, params=BAH), ValueError,
     r"params: missing key 'decoder.lstm.weight_ih_l0'"),
    ("seq2seq misshaped generator", lambda m: s2s(m, params=replaced(
        S2S, "generator.weight", np.zeros((7, 5)))), ValueError,
     r"params\['generator.weight'\]: expected shape \[Vt, 2H\] = \(7, 4\), got \(7, 5\)"),
    ("seq2seq missing second layer's reverse",
     lambda m: s2s(m, params=without(S2S, "encoder.bias_hh_l1_reverse")), ValueError,
     r"params: missing key 'encoder.bias_hh_l1_reverse' \(expected shape \[4H\] = \(8,\)\)"),
    ("bahdanau misshaped cell", lambda m: s2s(m, params=replaced(
        BAH, "decoder.cell.weight_ih", np.zeros((16, 6))), decoder="bahdanau"), ValueError,
     r"params\['decoder.cell.weight_ih'\]: expected shape \[8H, E \+ 2H\] = \(16, 7\), "
     r"got \(16, 6\)"),
    # names
    ("unknown decoder", lambda m: s2s(m, decoder="transformer"), ValueError,
     r"decoder: expected one of \('luong', 'bahdanau'\), got 'transformer'"),
    ("unknown score", lambda m: s2s(m, score="cosine"), ValueError,
     r"score: expected one of \('dot', 'scaled_dot', 'general', 'additive'\) or None, "
     r"got 'cosine'"),
    ("bahdanau with dot", lambda m: s2s(m, params=BAH, decoder="bahdanau", score="dot"),
     ValueError, r"score: the 'bahdanau' decoder uses the 'additive' score only, got 'dot'"),
    ("seed_compatible not a bool", lambda m: cls(m, seed_compatible="yes"), TypeError,
     r"seed_compatible: expected True or False, got 'yes'"),
    # decoding
    ("max_len 0", lambda m: greedy(m, max_len=0), ValueError,
     r"max_len: expected an integer >= 1, got 0"),
    ("beam_size 0", lambda m: beam(m, beam_size=0), ValueError,
     r"beam_size: expected an integer >= 1, got 0"),
    ("beam_size float", lambda m: beam(m, beam_size=2.0), ValueError,
     r"beam_size: expected an integer >= 1, got 2.0"),
    ("eos out of range", lambda m: greedy(m, eos=7), ValueError,
     r"eos: expected a token id in 0..6, got 7"),
    ("bos negative", lambda m: beam(m, bos=-1), ValueError,
     r"bos: expected a token id in 0..6, got -1"),
    ("length_penalty nan", lambda m: beam(m, length_penalty=float("nan")), ValueError,
     r"length_penalty: expected a finite float, got nan"),
    # caches
    ("classifier backward, wrong cache", lambda m: ref.bilstm_attention_backward(
        np.zeros((2, 2)), s2s(m)[2]), TypeError,
     r"cache: expected the BiLSTMAttentionCache returned by bilstm_attention_forward, got "
     r"Seq2SeqCache"),
    ("seq2seq backward, a string", lambda m: ref.seq2seq_backward(np.zeros((2, 2, 7)), "c"),
     TypeError, r"cache: expected the Seq2SeqCache returned by seq2seq_forward, got str"),
    ("seq2seq d_logits misshaped", lambda m: ref.seq2seq_backward(np.zeros((2, 2, 6)),
                                                                  s2s(m)[2]),
     ValueError, r"d_y: expected shape like the linear output = \(2, 2, 7\), got \(2, 2, 6\)"),
]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(("call", "error", "message"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_model_bad_input_raises_a_clear_error(backend, call, error, message) -> None:
    with pytest.raises(error, match=message):
        call(BACKENDS[backend])


def test_the_models_cell_option_is_checked_and_the_params_must_fit_it() -> None:
    ids = np.array([[1, 2, 3]])
    p = ref.init_bilstm_attention_params(5, 2, 3, 2, rng=0)
    with pytest.raises(ValueError, match=r"cell: expected one of \('lstm', 'gru'\), got 'rnn'"):
        ref.bilstm_attention_forward(ids, p, cell="rnn")
    # an LSTM classifier's params run as a GRU one: its keys are lstm.*, a GRU's gru.*
    with pytest.raises(ValueError, match=r"params: missing key 'gru.weight_hh_l0'"):
        ref.bilstm_attention_forward(ids, p, cell="gru")
    s2s = ref.init_seq2seq_params(5, 6, 2, 3, cell="gru", rng=0)
    with pytest.raises(ValueError, match=r"params\['encoder.weight_hh_l0'\]: expected shape "
                                         r"\[4H, H\], got \(9, 3\)"):
        ref.seq2seq_forward(ids, ids, s2s)  # a GRU seq2seq's params, run as the LSTM one
    with pytest.raises(ValueError, match=r"cell: expected one of"):
        ref.greedy_decode(ids, s2s, max_len=3, bos=0, eos=1, cell="LSTM")
