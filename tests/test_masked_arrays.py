"""A numpy.ma.MaskedArray is refused, never silently unmasked (contract.checks.not_masked).

A masked array is an ndarray subclass, so it used to pass every check and each op computed on
its data, masked entries included, dropping the mask. Every entry point of every op family
(LSTM, attention, multi-head attention, the layers, the models, the optimizers) refuses one
with a `TypeError` naming the argument and saying how to express the mask instead, on both
backends (the kernels call the same contract). Each case first runs with plain arrays, so a
refusal cannot come from anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from backends import BACKENDS

import numpy_ref as ref

Wrap = Callable[[np.ndarray], Any]


def masked(a: np.ndarray) -> np.ma.MaskedArray:
    """`a` with its first entry masked: what a user who means "leave this one out" passes."""
    mask = np.zeros(a.shape, bool)
    mask.flat[0] = True
    return np.ma.masked_array(a, mask=mask)


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def lstm_x(be: ModuleType, w: Wrap) -> Any:
    return be.lstm_forward(w(_rng().standard_normal((4, 2, 3))), ref.init_lstm_params(3, 5, rng=0))


def lstm_param(be: ModuleType, w: Wrap) -> Any:
    p = ref.init_lstm_params(3, 5, rng=0)
    return be.lstm_forward(_rng().standard_normal((4, 2, 3)),
                           {**p, "weight_hh_l0": w(p["weight_hh_l0"])})


def lstm_lengths(be: ModuleType, w: Wrap) -> Any:
    return be.lstm_forward(_rng().standard_normal((4, 2, 3)), ref.init_lstm_params(3, 5, rng=0),
                           lengths=w(np.array([4, 2])))


def lstm_h0(be: ModuleType, w: Wrap) -> Any:
    return be.lstm_forward(_rng().standard_normal((4, 2, 3)), ref.init_lstm_params(3, 5, rng=0),
                           h0=w(np.zeros((1, 2, 5))), c0=np.zeros((1, 2, 5)))


def lstm_d_output(be: ModuleType, w: Wrap) -> Any:
    out, _, cache = be.lstm_forward(_rng().standard_normal((4, 2, 3)),
                                    ref.init_lstm_params(3, 5, rng=0))
    return be.lstm_backward(w(np.ones_like(out)), cache)


def _qk() -> tuple[np.ndarray, np.ndarray]:
    rng = _rng()
    return rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 5, 4))  # heads layout


def attention_query(be: ModuleType, w: Wrap) -> Any:
    q, k = _qk()
    return be.attention_forward(w(q), k, k)


def attention_values(be: ModuleType, w: Wrap) -> Any:
    q, k = _qk()
    return be.attention_forward(q, k, w(k.copy()))


def attention_lengths(be: ModuleType, w: Wrap) -> Any:
    q, k = _qk()
    return be.attention_forward(q, k, k, lengths=w(np.array([5, 2])))


def attention_bias(be: ModuleType, w: Wrap) -> Any:
    q, k = _qk()
    return be.attention_forward(q, k, k, bias=w(np.zeros((3, 5))))


def attention_mask(be: ModuleType, w: Wrap) -> Any:
    q, k = _qk()
    return be.attention_forward(q, k, k, mask=w(np.ones((3, 5), bool)))


def attention_params(be: ModuleType, w: Wrap) -> Any:
    q = _rng().standard_normal((2, 4))
    k = _rng().standard_normal((2, 5, 4))
    return be.attention_forward(q, k, k, score="general", params={"W": w(np.eye(4))})


def attention_d_context(be: ModuleType, w: Wrap) -> Any:
    q, k = _qk()
    context, _, cache = be.attention_forward(q, k, k)
    return be.attention_backward(w(np.ones_like(context)), cache)


def _mha() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng, E = _rng(), 4
    params = {"in_proj_weight": rng.standard_normal((3 * E, E)), "in_proj_bias": np.zeros(3 * E),
              "out_proj.weight": rng.standard_normal((E, E)), "out_proj.bias": np.zeros(E)}
    return rng.standard_normal((2, 3, E)), params


def mha_key(be: ModuleType, w: Wrap) -> Any:
    x, p = _mha()
    return be.multihead_attention_forward(x, w(x.copy()), x, p, num_heads=2)


def mha_param(be: ModuleType, w: Wrap) -> Any:
    x, p = _mha()
    return be.multihead_attention_forward(x, x, x, {**p, "in_proj_bias": w(p["in_proj_bias"])},
                                          num_heads=2)


def mha_key_padding_mask(be: ModuleType, w: Wrap) -> Any:
    x, p = _mha()
    return be.multihead_attention_forward(x, x, x, p, num_heads=2,
                                          key_padding_mask=w(np.zeros((2, 3), bool)))


def mha_attn_mask(be: ModuleType, w: Wrap) -> Any:
    x, p = _mha()
    return be.multihead_attention_forward(x, x, x, p, num_heads=2,
                                          attn_mask=w(np.zeros((3, 3))))


def embedding_ids(be: ModuleType, w: Wrap) -> Any:
    return be.embedding_forward(w(np.array([[0, 1], [2, 1]])),
                                {"weight": _rng().standard_normal((3, 2))})


def embedding_d_out(be: ModuleType, w: Wrap) -> Any:
    out, cache = be.embedding_forward(np.array([[0, 1], [2, 1]]),
                                      {"weight": _rng().standard_normal((3, 2))})
    return be.embedding_backward(w(np.ones_like(out)), cache)


def linear_x(be: ModuleType, w: Wrap) -> Any:
    return be.linear_forward(w(_rng().standard_normal((2, 3))),
                             {"weight": _rng().standard_normal((4, 3))})


def linear_bias(be: ModuleType, w: Wrap) -> Any:
    return be.linear_forward(_rng().standard_normal((2, 3)),
                             {"weight": _rng().standard_normal((4, 3)), "bias": w(np.zeros(4))})


def cross_entropy_logits(be: ModuleType, w: Wrap) -> Any:
    return be.cross_entropy_forward(w(_rng().standard_normal((3, 4))), np.array([0, 3, 1]))


def cross_entropy_targets(be: ModuleType, w: Wrap) -> Any:
    return be.cross_entropy_forward(_rng().standard_normal((3, 4)), w(np.array([0, 3, 1])))


def cross_entropy_probabilities(be: ModuleType, w: Wrap) -> Any:
    return be.cross_entropy_forward(_rng().standard_normal((3, 4)), w(np.full((3, 4), 0.25)))


def cross_entropy_weight(be: ModuleType, w: Wrap) -> Any:
    return be.cross_entropy_forward(_rng().standard_normal((3, 4)), np.array([0, 3, 1]),
                                    weight=w(np.ones(4)))


IDS = np.array([[0, 1, 2], [3, 4, 0]])


def classifier_ids(be: ModuleType, w: Wrap) -> Any:
    p = ref.init_bilstm_attention_params(5, 2, 3, 2, rng=0)
    return ref.bilstm_attention_forward(w(IDS), p, lengths=np.array([3, 2]), backend=be)


def classifier_lengths(be: ModuleType, w: Wrap) -> Any:
    p = ref.init_bilstm_attention_params(5, 2, 3, 2, rng=0)
    return ref.bilstm_attention_forward(IDS, p, lengths=w(np.array([3, 2])), backend=be)


def classifier_param(be: ModuleType, w: Wrap) -> Any:
    p = ref.init_bilstm_attention_params(5, 2, 3, 2, rng=0)
    return ref.bilstm_attention_forward(IDS, {**p, "out.weight": w(p["out.weight"])},
                                        backend=be)


def seq2seq_tgt(be: ModuleType, w: Wrap) -> Any:
    return ref.seq2seq_forward(IDS, w(IDS), ref.init_seq2seq_params(5, 6, 2, 3, rng=0),
                               backend=be)


def seq2seq_src(be: ModuleType, w: Wrap) -> Any:
    return ref.seq2seq_forward(w(IDS), IDS, ref.init_seq2seq_params(5, 6, 2, 3, rng=0),
                               backend=be)


def greedy_decode_src(be: ModuleType, w: Wrap) -> Any:
    return ref.greedy_decode(w(IDS), ref.init_seq2seq_params(5, 6, 2, 3, rng=0), max_len=3,
                             bos=1, eos=2, backend=be)


def sgd_params(be: ModuleType, w: Wrap) -> Any:
    return be.SGD({"w": w(np.zeros(3))}, lr=0.1)


def clip_grads(be: ModuleType, w: Wrap) -> Any:
    return be.clip_grad_norm({"w": w(np.ones(3))}, 1.0)


# (the argument the message names, the call)
CASES: list[Any] = [
    ("x", lstm_x),
    ("params['weight_hh_l0']", lstm_param),
    ("lengths", lstm_lengths),
    ("h0", lstm_h0),
    ("d_output", lstm_d_output),
    ("query", attention_query),
    ("values", attention_values),
    ("lengths", attention_lengths),
    ("bias", attention_bias),
    ("mask", attention_mask),
    ("params['W']", attention_params),
    ("d_context", attention_d_context),
    ("key", mha_key),
    ("params['in_proj_bias']", mha_param),
    ("key_padding_mask", mha_key_padding_mask),
    ("attn_mask", mha_attn_mask),
    ("ids", embedding_ids),
    ("d_out", embedding_d_out),
    ("x", linear_x),
    ("params['bias']", linear_bias),
    ("logits", cross_entropy_logits),
    ("targets", cross_entropy_targets),
    ("targets", cross_entropy_probabilities),
    ("weight", cross_entropy_weight),
    ("ids", classifier_ids),
    ("lengths", classifier_lengths),
    ("params['out.weight']", classifier_param),
    ("tgt", seq2seq_tgt),
    ("src", seq2seq_src),
    ("src", greedy_decode_src),
    ("params['w']", sgd_params),
    ("params['w']", clip_grads),
]


def _case_id(case: Any) -> str:
    return case.id if hasattr(case, "id") else case[1].__name__


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(("arg", "call"), CASES, ids=[_case_id(c) for c in CASES])
def test_a_masked_array_is_refused_naming_the_argument(backend: str, arg: str,
                                                       call: Callable[..., Any]) -> None:
    be = BACKENDS[backend]
    call(be, lambda a: a)  # the same call with plain arrays is valid
    with pytest.raises(TypeError) as info:
        call(be, masked)
    message = str(info.value)
    assert message.startswith(f"{arg}: masked arrays (numpy.ma.MaskedArray) are not accepted, "
                              "their mask would be ignored; pass a plain numpy.ndarray"), message


def test_the_message_says_how_to_express_the_mask_instead() -> None:
    x = masked(np.zeros((4, 2, 3)))
    with pytest.raises(TypeError) as info:
        ref.lstm_forward(x, ref.init_lstm_params(3, 5, rng=0))
    message = str(info.value)
    for hint in ("lengths=", "mask=", "key_padding_mask=", "ignore_index", "np.ma.filled"):
        assert hint in message, (hint, message)


def test_a_masked_array_with_nothing_masked_is_refused_too() -> None:
    """The type is refused, not the mask's content: nomask is no exception."""
    with pytest.raises(TypeError, match=r"^logits: masked arrays"):
        ref.cross_entropy_forward(np.ma.masked_array(np.zeros((3, 4))), np.array([0, 3, 1]))
