"""An array changed in place between a forward and its backward is a clear error, as in torch.

Every cache holds references to the caller's arrays; a backward that read them after an
in-place change would return the gradients of other inputs, silently. The forward fingerprints
the caller's arrays its backward reads (`numpy_ref.contract.unchanged`) and the backward
refuses a change with a `ValueError` naming the argument and both ops. For every op family and
every array its backward reads, inputs, params and the outputs it reads: one element changed,
then a permutation, each refused; an array the backward does not read (a bias, h0), or one the
forward copied, may change (same gradients); a change after the backward (an optimizer's step)
is never checked. The kernels check where numpy_ref's code or the shared LSTM cache does
(`kernels.lstm`, the ops it re-exports, a numpy_ref cache handed to its backward); their
attention family and cross-entropy do not (their module docstrings say so).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
from backends import BACKENDS

import numpy_ref as ref
from numpy_ref.contract import unchanged

# --------------------------------------------------------------------------------------------
# the fingerprint itself


def _one_changed(a: np.ndarray, i: int) -> np.ndarray:
    """A copy of `a` with its i-th element (C order) changed to another value."""
    b = a.copy()
    flat = b.reshape(-1)
    if b.dtype == np.bool_:
        flat[i] = not flat[i]
    elif b.dtype.kind in "iu":
        flat[i] = flat[i] + 1
    else:
        flat[i] = np.nextafter(flat[i], np.inf)  # the smallest change there is
    return b


@pytest.fixture
def checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checksums for arrays of any size (by default one of at most 256 KiB is kept whole)."""
    monkeypatch.setattr(unchanged, "_EXACT", 0)


@pytest.mark.usefixtures("checksums")
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64, np.int32, np.bool_])
def test_every_single_changed_element_is_seen(dtype) -> None:
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((7, 3, 5)) > 0 if dtype == np.bool_
         else (rng.standard_normal((7, 3, 5)) * 10).astype(dtype))
    then = unchanged.fingerprint(a)
    assert unchanged.fingerprint(a.copy()) == then
    for i in range(a.size):
        assert unchanged.fingerprint(_one_changed(a, i)) != then, i


def test_a_change_in_any_chunk_is_seen() -> None:
    """Past the first chunk of words, in the 1-7 bytes after the last whole word, through a
    view that does not start on a word: each is read."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal(3 * 2**15 + 5).astype(np.float32)  # 3 chunks of words, and a tail
    for view in (a, a[1:], a[3:-1]):
        then = unchanged.fingerprint(view)
        for i in (0, 2**15 - 1, 2**16 + 7, view.size - 2, view.size - 1):
            assert unchanged.fingerprint(_one_changed(view, i)) != then, (view.size, i)


@pytest.mark.usefixtures("checksums")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_permutations_are_seen(dtype) -> None:
    """Reversed, two elements swapped, rolled: random data, and data whose words differ only
    in their top bits (one-hot rows, small integers), where a sum of words times odd
    coefficients alone would keep a dozen bits of a swap."""
    rng = np.random.default_rng(2)
    arrays = {"random": rng.standard_normal((40, 30)), "one-hot": np.eye(40, 30),
              "small integers": rng.integers(0, 4, (40, 30)).astype(float),
              "ones at odd positions": np.tile([0.0, 1.0], (40, 15))}
    for what, a in arrays.items():
        a = a.astype(dtype)
        then = unchanged.fingerprint(a)
        for how, b in (("reversed", a[::-1]), ("rows reversed", a[:, ::-1]),
                       ("rolled", np.roll(a, 1)), ("transposed rows", a[[1, 0, *range(2, 40)]])):
            if not np.array_equal(b, a):
                assert unchanged.fingerprint(np.ascontiguousarray(b)) != then, (what, how)
        for i, j in ((0, 1), (5, 600), (0, a.size - 1)):
            b = a.copy().reshape(-1)
            b[[i, j]] = b[[j, i]]
            if not np.array_equal(b, a.reshape(-1)):
                assert unchanged.fingerprint(b.reshape(a.shape)) != then, (what, i, j)


@pytest.mark.usefixtures("checksums")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_swaps_of_values_with_short_mantissas_are_seen(dtype) -> None:
    """A 1.0 swapped with a 0.0, 3000 times in a one-hot array: the words differ only in their
    top bits (float32: every 1.0 in the upper half of a word), where a sum of the words times
    odd coefficients keeps 8 to 11 bits of a swap and would miss a few of them."""
    rng = np.random.default_rng(4)
    a = np.zeros((64, 64), dtype)
    a[:, 1::2][np.arange(64), rng.integers(0, 32, 64)] = 1.0  # one per row, odd columns
    then = unchanged.fingerprint(a)
    ones, zeros = np.flatnonzero(a), np.flatnonzero((a == 0) & (np.arange(a.size) % 2 == 1)
                                                  .reshape(a.shape))
    for i, j in zip(rng.choice(ones, 3000), rng.choice(zeros, 3000), strict=True):
        b = a.copy().reshape(-1)
        b[[i, j]] = b[[j, i]]
        assert unchanged.fingerprint(b.reshape(a.shape)) != then, (i, j)


@pytest.mark.usefixtures("checksums")
def test_layouts_other_than_c_order_are_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fortran order, a transposed view, strided views (copied in pieces: a few hundred
    elements each here), a negative step, a broadcast view (its memory read once): a change of
    any element under the view is seen, and nothing else is."""
    monkeypatch.setattr(unchanged, "_PIECE", 300)
    rng = np.random.default_rng(3)
    base = rng.standard_normal((60, 100))
    fortran = np.asfortranarray(rng.standard_normal((50, 40)))
    views = {"fortran": (fortran, fortran[:, 3:]), "transposed": (base, base[:40, :50].T),
             "strided": (base, base[::3, ::2]), "negative step": (base, base[::-1, :10]),
             "broadcast": (base, np.broadcast_to(base[0, :7], (5, 7)))}
    for what, (base, v) in views.items():
        then = unchanged.fingerprint(v)
        for i in range(0, v.size, 7):
            target = tuple(np.argwhere(base == v.reshape(-1)[i])[0])  # the element under it
            old = base[target]
            base[target] = old + 1.0
            assert unchanged.fingerprint(v) != then, (what, i)
            base[target] = old  # the same bits again: no change
        assert unchanged.fingerprint(v) == then, what
        outside = np.ones(base.shape, bool)
        outside[np.isin(base, v)] = False
        if outside.any():  # an element no view entry reads: changing it is no change
            base[tuple(np.argwhere(outside)[0])] += 1.0
            assert unchanged.fingerprint(v) == then, what


def test_a_small_array_is_kept_whole() -> None:
    """Up to 256 KiB the fingerprint is the bytes themselves: any change at all is seen, a NaN's
    payload and the sign of a zero included; the same bits are no change."""
    a = np.array([0.0, np.nan, 1.5, -2.0])
    then = unchanged.fingerprint(a)
    assert then.contents == a.tobytes()
    other_nan = np.array([0x7FF8000000000001], np.uint64).view(np.float64)[0]
    for i, value in ((0, -0.0), (1, other_nan), (2, 1.5000000000000002)):
        b = a.copy()
        b[i] = value
        assert unchanged.fingerprint(b) != then, i
    b = a.copy()
    b[3] = -2.0
    assert unchanged.fingerprint(b) == then


# --------------------------------------------------------------------------------------------
# the ops: each case runs a forward on arrays it owns, names what its backward reads


class Run(NamedTuple):
    forward: Callable[[], Any]  # the forward on the case's arrays -> its whole result
    backward: Callable[[Any], Any]  # that result -> the gradients
    watched: dict[str, Callable[[Any], np.ndarray]]  # message name -> the array (from result)
    ops: tuple[str, str]  # the forward and backward named in the message


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _input(arrays: dict, key: str) -> Callable[[Any], np.ndarray]:
    return lambda _result: arrays[key]


def _param(params: dict, key: str) -> Callable[[Any], np.ndarray]:
    return lambda _result: params[key]


def _lstm(m) -> Run:
    rng = _rng(1)
    params = ref.init_lstm_params(4, 5, num_layers=2, bidirectional=True, proj_size=3, rng=rng)
    a = {"x": rng.standard_normal((6, 3, 4))}
    d_out = rng.standard_normal((6, 3, 6))
    return Run(lambda: m.lstm_forward(a["x"], params, num_layers=2, bidirectional=True),
               lambda r: m.lstm_backward(d_out, r[2]),
               {"x": _input(a, "x"),
                **{f"params[{k!r}]": _param(params, k) for k in ("weight_ih_l0", "weight_hh_l0",
                                                                 "weight_hr_l0", "weight_ih_l1",
                                                                 "weight_hh_l1_reverse")}},
               ("lstm_forward", "lstm_backward"))


def _lstm_cell(m) -> Run:
    rng = _rng(2)
    p = {"weight_ih": rng.standard_normal((20, 4)), "weight_hh": rng.standard_normal((20, 3)),
         "bias_ih": rng.standard_normal(20), "bias_hh": rng.standard_normal(20),
         "weight_hr": rng.standard_normal((3, 5))}
    a = {"x": rng.standard_normal((2, 4)), "h": rng.standard_normal((2, 3)),
         "c": rng.standard_normal((2, 5))}
    d_h, d_c = rng.standard_normal((2, 3)), rng.standard_normal((2, 5))
    return Run(lambda: m.lstm_cell_forward(a["x"], a["h"], a["c"], p),
               lambda r: m.lstm_cell_backward(d_h, d_c, r[2]),
               {**{k: _input(a, k) for k in a},
                **{f"params[{k!r}]": _param(p, k)
                   for k in ("weight_ih", "weight_hh", "weight_hr")}},
               ("lstm_cell_forward", "lstm_cell_backward"))


def _attention_general(m) -> Run:
    rng = _rng(3)
    a = {"query": rng.standard_normal((2, 3, 4)), "keys": rng.standard_normal((2, 5, 6)),
         "values": rng.standard_normal((2, 5, 7))}
    p = {"W": rng.standard_normal((4, 6))}
    dc = rng.standard_normal((2, 3, 7))
    return Run(lambda: m.attention_forward(a["query"], a["keys"], a["values"], score="general",
                                           params=p),
               lambda r: m.attention_backward(dc, r[2]),
               {**{k: _input(a, k) for k in a}, "params['W']": _param(p, "W"),
                "weights": lambda r: r[1]},
               ("attention_forward", "attention_backward"))


def _attention_additive(m) -> Run:
    rng = _rng(4)
    a = {"query": rng.standard_normal((3, 4)), "keys": rng.standard_normal((3, 5, 6))}
    p = {"W_query": rng.standard_normal((2, 4)), "W_key": rng.standard_normal((2, 6)),
         "v": rng.standard_normal(2), "b": rng.standard_normal(2)}
    dc = rng.standard_normal((3, 6))
    return Run(lambda: m.attention_forward(a["query"], a["keys"], a["keys"], score="additive",
                                           params=p),
               lambda r: m.attention_backward(dc, r[2]),
               {"query": _input(a, "query"), "keys (also values)": _input(a, "keys"),
                **{f"params[{k!r}]": _param(p, k) for k in ("W_query", "W_key", "v")}},
               ("attention_forward", "attention_backward"))


def _attention_no_weights(m) -> Run:
    """Without the weights the backward recomputes the scores: it reads the mask and the bias
    too, and the context it returned."""
    rng = _rng(5)
    a = {"query": rng.standard_normal((2, 2, 3, 4)), "keys": rng.standard_normal((2, 2, 5, 4)),
         "values": rng.standard_normal((2, 2, 5, 3)), "mask": rng.standard_normal((3, 5)) > -1,
         "bias": rng.standard_normal((2, 1, 1, 5))}
    a["mask"][:, 0] = True
    dc = rng.standard_normal((2, 2, 3, 3))
    return Run(lambda: m.attention_forward(a["query"], a["keys"], a["values"], mask=a["mask"],
                                           bias=a["bias"], need_weights=False),
               lambda r: m.attention_backward(dc, r[2]),
               {**{k: _input(a, k) for k in a}, "context": lambda r: r[0]},
               ("attention_forward", "attention_backward"))


def _attention_scores(m) -> Run:
    rng = _rng(6)
    a = {"query": rng.standard_normal((2, 3, 4)), "keys": rng.standard_normal((2, 5, 6))}
    p = {"W": rng.standard_normal((4, 6))}
    ds = rng.standard_normal((2, 3, 5))
    return Run(lambda: m.attention_scores_forward(a["query"], a["keys"], score="general",
                                                  params=p),
               lambda r: m.attention_scores_backward(ds, r[1]),
               {**{k: _input(a, k) for k in a}, "params['W']": _param(p, "W")},
               ("attention_scores_forward", "attention_scores_backward"))


def _masked_softmax(m) -> Run:
    rng = _rng(7)
    scores, dw = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    return Run(lambda: m.masked_softmax_forward(scores, [5, 2, 4]),
               lambda r: m.masked_softmax_backward(dw, r[1]), {"weights": lambda r: r[0]},
               ("masked_softmax_forward", "masked_softmax_backward"))


def _weighted_sum(m) -> Run:
    rng = _rng(8)
    a = {"weights": rng.random((3, 2, 5)), "values": rng.standard_normal((3, 5, 4))}
    dc = rng.standard_normal((3, 2, 4))
    return Run(lambda: m.weighted_sum_forward(a["weights"], a["values"]),
               lambda r: m.weighted_sum_backward(dc, r[1]), {k: _input(a, k) for k in a},
               ("weighted_sum_forward", "weighted_sum_backward"))


def _additive_scores(m) -> Run:
    rng = _rng(9)
    qa, ka, a = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 5, 4)), {
        "u": rng.standard_normal(4)}
    ds = rng.standard_normal((3, 2, 5))
    return Run(lambda: m.additive_scores_forward(qa, ka, a["u"]),
               lambda r: m.additive_scores_backward(ds, r[1]), {"u": _input(a, "u")},
               ("additive_scores_forward", "additive_scores_backward"))


def _multihead(m) -> Run:
    rng = _rng(10)
    E = 4
    a = {"query": rng.standard_normal((2, 3, E)), "key": rng.standard_normal((2, 5, E)),
         "value": rng.standard_normal((2, 5, E))}
    p = {"in_proj_weight": rng.standard_normal((3 * E, E)),
         "in_proj_bias": rng.standard_normal(3 * E),
         "out_proj.weight": rng.standard_normal((E, E)), "out_proj.bias": rng.standard_normal(E)}
    d_out = rng.standard_normal((2, 3, E))
    return Run(lambda: m.multihead_attention_forward(a["query"], a["key"], a["value"], p,
                                                     num_heads=2, average_attn_weights=False),
               lambda r: m.multihead_attention_backward(d_out, r[2]),
               {**{k: _input(a, k) for k in a},
                **{f"params[{k!r}]": _param(p, k) for k in ("in_proj_weight", "out_proj.weight")},
                "weights": lambda r: r[1]},
               ("multihead_attention_forward", "multihead_attention_backward"))


def _multihead_float_mask(m) -> Run:
    rng = _rng(11)
    E = 4
    a = {"query": rng.standard_normal((2, 3, E)), "key_padding_mask": rng.standard_normal((2, 3))}
    p = {"in_proj_weight": rng.standard_normal((3 * E, E)),
         "out_proj.weight": rng.standard_normal((E, E))}
    d_out = rng.standard_normal((2, 3, E))
    return Run(lambda: m.multihead_attention_forward(
        a["query"], a["query"], a["query"], p, num_heads=2,
        key_padding_mask=a["key_padding_mask"], need_weights=False),
               lambda r: m.multihead_attention_backward(d_out, r[2]),
               {"key_padding_mask": _input(a, "key_padding_mask"), "query": _input(a, "query")},
               ("multihead_attention_forward", "multihead_attention_backward"))


def _embedding(m) -> Run:
    rng = _rng(12)
    a = {"ids": rng.integers(0, 6, (3, 4))}
    p = {"weight": rng.standard_normal((7, 2))}
    d_out = rng.standard_normal((3, 4, 2))
    return Run(lambda: m.embedding_forward(a["ids"], p),
               lambda r: m.embedding_backward(d_out, r[1]), {"ids": _input(a, "ids")},
               ("embedding_forward", "embedding_backward"))


def _linear(m) -> Run:
    rng = _rng(13)
    a = {"x": rng.standard_normal((2, 3, 4))}
    p = {"weight": rng.standard_normal((5, 4)), "bias": rng.standard_normal(5)}
    d_y = rng.standard_normal((2, 3, 5))
    return Run(lambda: m.linear_forward(a["x"], p), lambda r: m.linear_backward(d_y, r[1]),
               {"x": _input(a, "x"), "params['weight']": _param(p, "weight")},
               ("linear_forward", "linear_backward"))


def _cross_entropy(m) -> Run:
    rng = _rng(14)
    logits = rng.standard_normal((4, 5))
    a = {"targets": rng.random((4, 5)), "weight": rng.random(5) + 0.5}
    return Run(lambda: m.cross_entropy_forward(logits, a["targets"], weight=a["weight"],
                                               label_smoothing=0.1),
               lambda r: m.cross_entropy_backward(np.float64(1.0), r[1]),
               {k: _input(a, k) for k in a}, ("cross_entropy_forward", "cross_entropy_backward"))


def _classifier(m) -> Run:
    rng = _rng(15)
    p = ref.init_bilstm_attention_params(9, 3, 4, 2, rng=rng)
    a = {"ids": rng.integers(0, 9, (3, 5))}
    d_logits = rng.standard_normal((3, 2))
    return Run(lambda: ref.bilstm_attention_forward(a["ids"], p, backend=m),
               lambda r: ref.bilstm_attention_backward(d_logits, r[2]),
               {"ids": _input(a, "ids"),
                **{f"params[{k!r}]": _param(p, k) for k in ("lstm.weight_ih_l0",
                                                            "lstm.weight_hh_l0_reverse",
                                                            "out.weight")},
                "attention": lambda r: r[1]},
               ("bilstm_attention_forward", "bilstm_attention_backward"))


def _seq2seq(decoder: str, watched: tuple[str, ...]) -> Callable[[Any], Run]:
    def make(m) -> Run:
        rng = _rng(16)
        p = ref.init_seq2seq_params(7, 8, 3, 2, decoder=decoder, rng=rng)
        a = {"src": rng.integers(0, 7, (2, 4)), "tgt": rng.integers(0, 8, (2, 3))}
        d_logits = rng.standard_normal((2, 3, 8))
        names = {"src": _input(a, "src"), "tgt": _input(a, "tgt"), "attention": lambda r: r[1],
                 **{f"params[{k!r}]": _param(p, k) for k in p}}
        return Run(lambda: ref.seq2seq_forward(a["src"], a["tgt"], p, decoder=decoder,
                                               backend=m),
                   lambda r: ref.seq2seq_backward(d_logits, r[2]),
                   {k: names[k] for k in watched}, ("seq2seq_forward", "seq2seq_backward"))
    return make


# (case, the arrays each backend checks): numpy_ref checks every array its backward reads; the
def _recurrent(kind: str) -> Callable[[Any], Run]:
    """The GRU (torch's and the other variant) or the RNN, two layers, both directions."""
    def make(m) -> Run:
        rng = _rng(3)
        init = ref.init_rnn_params if kind == "rnn" else ref.init_gru_params
        params = init(4, 5, num_layers=2, bidirectional=True, rng=rng)
        options = {"linear_before_reset": False} if kind == "gru_other" else {}
        a = {"x": rng.standard_normal((6, 3, 4))}
        d_out = rng.standard_normal((6, 3, 10))
        forward = m.rnn_forward if kind == "rnn" else m.gru_forward
        backward = m.rnn_backward if kind == "rnn" else m.gru_backward
        op = "rnn" if kind == "rnn" else "gru"
        return Run(lambda: forward(a["x"], params, num_layers=2, bidirectional=True, **options),
                   lambda r: backward(d_out, r[2]),
                   {"x": _input(a, "x"),
                    **{f"params[{k!r}]": _param(params, k)
                       for k in ("weight_ih_l0", "weight_hh_l0", "weight_ih_l1_reverse",
                                 "weight_hh_l1")}},
                   (f"{op}_forward", f"{op}_backward"))
    return make


def _recurrent_cell(kind: str) -> Callable[[Any], Run]:
    def make(m) -> Run:
        rng = _rng(4)
        G = 1 if kind == "rnn" else 3
        p = {"weight_ih": rng.standard_normal((G * 3, 4)),
             "weight_hh": rng.standard_normal((G * 3, 3)),
             "bias_ih": rng.standard_normal(G * 3), "bias_hh": rng.standard_normal(G * 3)}
        a = {"x": rng.standard_normal((2, 4)), "h": rng.standard_normal((2, 3))}
        d_h = rng.standard_normal((2, 3))
        forward = m.rnn_cell_forward if kind == "rnn" else m.gru_cell_forward
        backward = m.rnn_cell_backward if kind == "rnn" else m.gru_cell_backward
        return Run(lambda: forward(a["x"], a["h"], p), lambda r: backward(d_h, r[1]),
                   {**{k: _input(a, k) for k in a},
                    **{f"params[{k!r}]": _param(p, k) for k in ("weight_ih", "weight_hh")}},
                   (f"{kind}_cell_forward", f"{kind}_cell_backward"))
    return make


# kernels check the LSTM's, the GRU's and the RNN's, and those of the ops they take from
# numpy_ref (linear, the recurrent cells, the scores, the embedding's forward); their attention
# and cross-entropy do not
CASES: dict[str, tuple[Callable[[Any], Run], dict[str, tuple[str, ...] | None]]] = {
    "lstm": (_lstm, {"numpy_ref": None, "kernels": None}),
    "lstm_cell": (_lstm_cell, {"numpy_ref": None, "kernels": None}),
    "gru": (_recurrent("gru"), {"numpy_ref": None, "kernels": None}),
    "gru_linear_before_reset_false": (_recurrent("gru_other"), {"numpy_ref": None,
                                                                "kernels": None}),
    "rnn": (_recurrent("rnn"), {"numpy_ref": None, "kernels": None}),
    "gru_cell": (_recurrent_cell("gru"), {"numpy_ref": None, "kernels": None}),
    "rnn_cell": (_recurrent_cell("rnn"), {"numpy_ref": None, "kernels": None}),
    "attention_general": (_attention_general, {"numpy_ref": None}),
    "attention_additive": (_attention_additive, {"numpy_ref": None}),
    "attention_no_weights": (_attention_no_weights, {"numpy_ref": None}),
    "attention_scores": (_attention_scores, {"numpy_ref": None, "kernels": None}),
    "masked_softmax": (_masked_softmax, {"numpy_ref": None}),
    "weighted_sum": (_weighted_sum, {"numpy_ref": None}),
    "additive_scores": (_additive_scores, {"numpy_ref": None}),
    "multihead": (_multihead, {"numpy_ref": None,
                               "kernels": ("query", "key", "value", "params['in_proj_weight']",
                                           "params['out_proj.weight']")}),
    "multihead_float_mask": (_multihead_float_mask, {"numpy_ref": None,
                                                     "kernels": ("query",)}),
    "embedding": (_embedding, {"numpy_ref": None, "kernels": None}),
    "linear": (_linear, {"numpy_ref": None, "kernels": None}),
    "cross_entropy": (_cross_entropy, {"numpy_ref": None}),
    "classifier": (_classifier, {"numpy_ref": None,
                                 "kernels": ("ids", "params['lstm.weight_ih_l0']",
                                             "params['lstm.weight_hh_l0_reverse']",
                                             "params['out.weight']")}),
    "luong": (_seq2seq("luong", ("src", "tgt", "attention", "params['decoder.attention.W']",
                                 "params['decoder.lstm.weight_hh_l0']",
                                 "params['encoder.weight_ih_l0']", "params['generator.weight']")),
              {"numpy_ref": None,
               "kernels": ("src", "tgt", "params['decoder.lstm.weight_hh_l0']",
                           "params['encoder.weight_ih_l0']", "params['generator.weight']")}),
    "bahdanau": (_seq2seq("bahdanau", ("params['decoder.attention.v']",
                                       "params['decoder.attention.W_query']",
                                       "params['decoder.attention.W_key']",
                                       "params['decoder.cell.weight_hh']", "tgt")),
                 {"numpy_ref": None,
                  "kernels": ("params['decoder.attention.W_query']",
                              "params['decoder.attention.W_key']",
                              "params['decoder.cell.weight_hh']", "tgt")}),
}


def _watched(case: str, backend: str) -> list[str]:
    make, by_backend = CASES[case]
    names = by_backend[backend]
    return list(make(BACKENDS[backend]).watched) if names is None else list(names)


CHECKED = [pytest.param(case, backend, name, id=f"{case}-{backend}-{name}")
           for case, (_, by_backend) in CASES.items() for backend in by_backend
           for name in _watched(case, backend)]


def _change_one(a: np.ndarray) -> None:
    i = tuple(n // 2 for n in a.shape)
    if a.dtype == np.bool_:
        a[i] = not a[i]
    elif a.dtype.kind in "iu":
        a[i] = 1 if a[i] == 0 else 0  # another valid id
    else:
        a[i] = a[i] + 0.5


def _permute(a: np.ndarray) -> None:
    before = a.copy()
    a[...] = a.reshape(-1)[::-1].reshape(a.shape)
    assert not np.array_equal(a, before), "the test's permutation must change the array"


def _grads_equal(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            _grads_equal(got[k], want[k])
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _grads_equal(g, w)
    elif want is None:
        assert got is None
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("change", [_change_one, _permute], ids=["one element", "permutation"])
@pytest.mark.parametrize(("case", "backend", "name"), CHECKED)
def test_a_changed_array_is_refused(case: str, backend: str, name: str, change) -> None:
    run = CASES[case][0](BACKENDS[backend])
    result = run.forward()
    change(run.watched[name](result))
    forward, backward = run.ops
    with pytest.raises(ValueError, match=re.escape(f"{name} changed between {forward} and "
                                                   f"{backward} (the cache holds a reference")):
        run.backward(result)


SILENT = [pytest.param(case, backend, id=f"{case}-{backend}")
          for case, (_, by_backend) in CASES.items() for backend in by_backend]


@pytest.mark.parametrize(("case", "backend"), SILENT)
def test_unchanged_arrays_pass_and_later_changes_are_not_checked(case: str, backend: str) -> None:
    """Forward, backward: the gradients of a fresh pair. Then every watched array changed
    after the backward (an optimizer's step): nothing raises, and a new forward's backward
    runs."""
    run = CASES[case][0](BACKENDS[backend])
    result = run.forward()
    grads = run.backward(result)
    _grads_equal(run.backward(result), grads)  # the check changes nothing, twice
    for get in run.watched.values():
        _change_one(get(result))
    run.backward(run.forward())


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_what_the_lstm_backward_does_not_read_may_change(backend: str) -> None:
    """The biases (added in the forward), h0 and c0 (copied into the cache), and x when the
    forward copied it (padding zeroed): changing them changes no gradient, and is no error."""
    m = BACKENDS[backend]
    rng = _rng(20)
    params = ref.init_lstm_params(3, 4, bidirectional=True, rng=rng)
    x, h0, c0 = rng.standard_normal((5, 2, 3)), rng.standard_normal((2, 2, 4)), \
        rng.standard_normal((2, 2, 4))
    d_out = rng.standard_normal((5, 2, 8))
    kw = dict(bidirectional=True, h0=h0, c0=c0, lengths=[5, 3])
    _, _, cache = m.lstm_forward(x, params, **kw)
    want = m.lstm_backward(d_out, cache)
    for a in (params["bias_ih_l0"], params["bias_hh_l0_reverse"], h0, c0, x):
        a += 1.0
    _grads_equal(m.lstm_backward(d_out, cache), want)


def test_attention_inputs_the_forward_copied_may_change() -> None:
    """Keys past every row's length are padding: the forward copies keys and values with
    those rows zeroed, so the caller's arrays are not read again, and may change."""
    rng = _rng(21)
    q, kv = rng.standard_normal((2, 3)), rng.standard_normal((2, 4, 3))
    dc = rng.standard_normal((2, 3))
    _, _, cache = ref.attention_forward(q, kv, kv, lengths=[2, 3])
    want = ref.attention_backward(dc, cache)
    kv += 1.0
    _grads_equal(ref.attention_backward(dc, cache), want)
    q += 1.0  # the query was not copied: refused
    with pytest.raises(ValueError, match=re.escape("query changed between attention_forward")):
        ref.attention_backward(dc, cache)


@pytest.mark.parametrize(("forward_by", "backward_by"), [("numpy_ref", "kernels"),
                                                         ("kernels", "numpy_ref")])
def test_either_lstm_backward_checks_either_forwards_cache(forward_by: str,
                                                           backward_by: str) -> None:
    rng = _rng(22)
    params = ref.init_lstm_params(3, 4, rng=rng)
    x, d_out = rng.standard_normal((5, 2, 3)), rng.standard_normal((5, 2, 4))
    _, _, cache = BACKENDS[forward_by].lstm_forward(x, params)
    BACKENDS[backward_by].lstm_backward(d_out, cache)
    params["weight_hh_l0"][0, 0] += 1.0
    with pytest.raises(ValueError, match=re.escape("params['weight_hh_l0'] changed between "
                                                   "lstm_forward and lstm_backward")):
        BACKENDS[backward_by].lstm_backward(d_out, cache)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_training_loop_updates_params_in_place_after_each_backward(backend: str) -> None:
    """Forward, backward, an optimizer's step (in place), again: the step comes after the
    backward, so nothing is refused, and the loss goes down."""
    m = BACKENDS[backend]
    rng = _rng(23)
    params = ref.init_bilstm_attention_params(9, 3, 4, 2, rng=rng)
    ids, labels = rng.integers(0, 9, (4, 5)), np.array([0, 1, 1, 0])
    optimizer = m.Adam(params, lr=0.05)
    losses = []
    for _ in range(5):
        logits, _, cache = ref.bilstm_attention_forward(ids, params, backend=m)
        loss, ce = m.cross_entropy_forward(logits, labels)
        grads = ref.bilstm_attention_backward(m.cross_entropy_backward(np.float64(1.0), ce),
                                              cache)
        optimizer.step(grads)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    params["out.weight"] += 1.0  # after the backward: nothing checks it
