"""Every bad input to attention and the masked softmax gets a clear ValueError/TypeError.

Each message must name the argument, what was expected and what was received. Every case of
`attention_forward` / `attention_backward` also runs without the weights (the variants
``numpy_ref-no-weights`` and ``kernels-no-weights``: need_weights=False), where the same
message must come; the cases of the masked softmax, of d_weights and of need_weights itself
run once per module.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from backends import ATTENTION_BACKENDS, has_weights

# The two implementations of the attention API: kernels must reject exactly what numpy_ref does;
# and each without the weights (need_weights=False as its forward's default).
BACKENDS = ATTENTION_BACKENDS

B, Tq, Tk, H, Hv, A = 3, 2, 5, 4, 6, 7
rng = np.random.default_rng(0)
Q = rng.standard_normal((B, Tq, H))  # [B, Tq, Hq]
K = rng.standard_normal((B, Tk, H))  # [B, Tk, Hk]
V = rng.standard_normal((B, Tk, Hv))  # [B, Tk, Hv]
GENERAL = {"W": rng.standard_normal((H, H))}
ADDITIVE = {"W_query": rng.standard_normal((A, H)), "W_key": rng.standard_normal((A, H)),
            "v": rng.standard_normal(A)}
S = rng.standard_normal((B, Tk))  # scores [B, Tk]


def without(params: dict, key: str) -> dict:
    return {k: v for k, v in params.items() if k != key}


def replaced(params: dict, key: str, value) -> dict:
    return {**params, key: value}


def forward(m, **kw):
    """m.attention_forward with the defaults above, `kw` overriding them (m: a backend)."""
    args = {"query": Q, "keys": K, "values": V, **kw}
    return m.attention_forward(args.pop("query"), args.pop("keys"), args.pop("values"), **args)


def general(m, **kw):
    return forward(m, score="general", params=kw.pop("params", GENERAL), **kw)


def additive(m, **kw):
    return forward(m, score="additive", params=kw.pop("params", ADDITIVE), **kw)


def backward(m, d_context=None, *, single=False, **kw):
    context, _, cache = m.attention_forward(Q[:, 0] if single else Q, K, V)
    return m.attention_backward(context if d_context is None else d_context, cache, **kw)


def softmax_backward(m, d_weights):
    _, cache = m.masked_softmax_forward(S)
    return m.masked_softmax_backward(d_weights, cache)


MIXED = r"does not match the dtype of query \(float64\)"

CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # ranks and types of query, keys, values
    ("query rank 1", lambda m: forward(m, query=Q[0, 0]), ValueError,
     r"query: expected a 2-D \[B, Hq\] or 3-D \[B, Tq, Hq\] or 4-D \[B, h, Tq, D\] array, "
     r"got shape \(4,\)"),
    ("query rank 5", lambda m: forward(m, query=Q[None, None]), ValueError,
     r"query: expected a 2-D .* array, got shape \(1, 1, 3, 2, 4\)"),
    ("heads query with 3-D keys", lambda m: forward(m, query=Q[:, None]), ValueError,
     r"keys: expected a 4-D array \[B, h_kv, Tk, D\], got shape \(3, 5, 4\)"),
    ("keys rank 2", lambda m: forward(m, keys=K[0]), ValueError,
     r"keys: expected a 3-D array \[B, Tk, Hk\], got shape \(5, 4\)"),
    ("keys rank 4", lambda m: forward(m, keys=K[None]), ValueError,
     r"keys: expected a 3-D array \[B, Tk, Hk\], got shape \(1, 3, 5, 4\)"),
    ("values rank 2", lambda m: forward(m, values=V[0]), ValueError,
     r"values: expected a 3-D array \[B, Tk, Hv\], got shape \(5, 6\)"),
    ("query list", lambda m: forward(m, query=Q.tolist()), TypeError,
     r"query: expected a numpy.ndarray \[B, Hq\], got list"),
    ("keys list", lambda m: forward(m, keys=K.tolist()), TypeError,
     r"keys: expected a numpy.ndarray \[B, Tk, Hk\], got list"),
    ("query integer", lambda m: forward(m, query=Q.astype(np.int64)), TypeError,
     r"query: expected dtype float32 or float64, got int64"),
    ("keys integer", lambda m: forward(m, keys=K.astype(np.int32)), TypeError,
     r"keys: expected dtype float32 or float64, got int32"),
    ("values integer", lambda m: forward(m, values=V.astype(np.int64)), TypeError,
     r"values: expected dtype float32 or float64, got int64"),
    ("query float16", lambda m: forward(m, query=Q.astype(np.float16)), TypeError,
     # numpy_ref takes float16 but not next to float64 keys; the kernels take neither
     r"query: expected dtype float32 or float64, got float16|keys has dtype float64, but query "
     r"is float16"),
    # sizes that do not fit together
    ("query batch mismatch", lambda m: forward(m, query=Q[:2]), ValueError,
     r"query: batch 2 does not match keys' batch 3 \(query \(2, 2, 4\), keys \(3, 5, 4\)\)"),
    ("one query, batch mismatch", lambda m: forward(m, query=Q[:2, 0]), ValueError,
     r"query: batch 2 does not match keys' batch 3"),
    ("values batch mismatch", lambda m: forward(m, values=V[:2]), ValueError,
     r"values: expected shape \[B, Tk, Hv\] with \(B, Tk\) = \(3, 5\) from keys, "
     r"got \(2, 5, 6\)"),
    ("values Tk mismatch", lambda m: forward(m, values=V[:, :4]), ValueError,
     r"values: expected shape \[B, Tk, Hv\] with \(B, Tk\) = \(3, 5\) from keys, "
     r"got \(3, 4, 6\)"),
    ("no keys", lambda m: forward(m, keys=K[:, :0], values=V[:, :0]), ValueError,
     r"keys: expected at least one key and one row, got shape \(3, 0, 4\)"),
    ("empty batch", lambda m: forward(m, query=Q[:0], keys=K[:0], values=V[:0]), ValueError,
     r"keys: expected at least one key and one row, got shape \(0, 5, 4\)"),
    ("no query steps", lambda m: forward(m, query=Q[:, :0]), ValueError,
     r"query: expected at least one query step, got shape \(3, 0, 4\)"),
    ("no features", lambda m: forward(m, query=Q[..., :0], keys=K[..., :0]), ValueError,
     r"query/keys/values: every axis must be non-empty"),
    ("dot with Hq != Hk", lambda m: forward(m, query=Q[..., :3]), ValueError,
     r"query: the 'dot' score needs Hq == Hk, got query \(3, 2, 3\) and keys \(3, 5, 4\)"),
    ("scaled_dot with Hq != Hk", lambda m: forward(m, query=Q[:, 0, :3], score="scaled_dot"),
     ValueError, r"query: the 'scaled_dot' score needs Hq == Hk, got query \(3, 3\)"),
    # score and params
    ("unknown score", lambda m: forward(m, score="cosine"), ValueError,
     r"score: expected one of \('dot', 'scaled_dot', 'general', 'additive'\), got 'cosine'"),
    ("score None", lambda m: forward(m, score=None), ValueError,
     r"score: expected one of .*, got None"),
    ("params not a dict", lambda m: general(m, params=[GENERAL["W"]]), TypeError,
     r"params: expected a dict of arrays, got list"),
    ("params to dot", lambda m: forward(m, params=GENERAL), ValueError,
     r"params: unexpected keys \['W'\]; the 'dot' score takes no params"),
    ("params to scaled_dot", lambda m: forward(m, score="scaled_dot", params=ADDITIVE), ValueError,
     r"params: unexpected keys \['W_key', 'W_query', 'v'\]; the 'scaled_dot' score takes "
     r"no params"),
    ("general without params", lambda m: general(m, params=None), ValueError,
     r"params: missing key 'W' \(expected shape \[Hq, Hk\] = \(4, 4\)\)"),
    ("general W transposed", lambda m: general(m, query=Q[..., :3], params={"W": np.zeros((4, 3))}),
     ValueError, r"params\['W'\]: expected shape \[Hq, Hk\] = \(3, 4\), got \(4, 3\)"),
    ("general W rank 1", lambda m: general(m, params={"W": np.zeros(16)}), ValueError,
     r"params\['W'\]: expected shape \[Hq, Hk\] = \(4, 4\), got \(16,\)"),
    ("general W list", lambda m: general(m, params={"W": GENERAL["W"].tolist()}), TypeError,
     r"params\['W'\]: expected a numpy.ndarray, got list"),
    ("general W integer", lambda m: general(m, params={"W": np.zeros((4, 4), np.int64)}),
     TypeError, r"params\['W'\]: expected dtype float32 or float64, got int64"),
    ("general W float32", lambda m: general(m, params={"W": GENERAL["W"].astype(np.float32)}),
     TypeError, r"params\['W'\]: dtype float32 " + MIXED),
    ("general unexpected key", lambda m: general(m, params=replaced(GENERAL, "b", np.zeros(4))),
     ValueError, r"params: unexpected keys \['b'\]; the 'general' score takes \['W'\]"),
    ("additive without params", lambda m: additive(m, params=None), ValueError,
     r"params: missing key 'W_query' \(expected shape \[A, Hq\]\)"),
    ("additive missing W_query", lambda m: additive(m, params=without(ADDITIVE, "W_query")),
     ValueError, r"params: missing key 'W_query' \(expected shape \[A, Hq\]\)"),
    ("additive W_query rank 1", lambda m: additive(m, params=replaced(ADDITIVE, "W_query",
                                                                 np.zeros(A))),
     ValueError, r"params\['W_query'\]: expected shape \[A, Hq\], got \(7,\)"),
    ("additive W_query with A = 0", lambda m: additive(m, params=replaced(ADDITIVE, "W_query",
                                                                     np.zeros((0, H)))),
     ValueError, r"params\['W_query'\]: expected shape \[A, Hq\], got \(0, 4\)"),
    ("additive W_query wrong Hq", lambda m: additive(m, params=replaced(ADDITIVE, "W_query",
                                                                   np.zeros((A, H + 1)))),
     ValueError, r"params\['W_query'\]: expected shape \[A, Hq\] = \(7, 4\), got \(7, 5\)"),
    ("additive W_query list", lambda m: additive(m, params=replaced(ADDITIVE, "W_query", [[0.0]])),
     TypeError, r"params\['W_query'\]: expected a numpy.ndarray, got list"),
    ("additive W_query integer", lambda m: additive(m, params=replaced(ADDITIVE, "W_query",
                                                                  np.zeros((A, H), np.int64))),
     TypeError, r"params\['W_query'\]: expected dtype float32 or float64, got int64"),
    ("additive W_query float32", lambda m: additive(m, params=replaced(
        ADDITIVE, "W_query", ADDITIVE["W_query"].astype(np.float32))), TypeError,
     r"params\['W_query'\]: dtype float32 " + MIXED),
    ("additive missing W_key", lambda m: additive(m, params=without(ADDITIVE, "W_key")), ValueError,
     r"params: missing key 'W_key' \(expected shape \[A, Hk\] = \(7, 4\)\)"),
    ("additive W_key wrong A", lambda m: additive(m, params=replaced(ADDITIVE, "W_key",
                                                                np.zeros((A - 1, H)))),
     ValueError, r"params\['W_key'\]: expected shape \[A, Hk\] = \(7, 4\), got \(6, 4\)"),
    ("additive W_key wrong Hk", lambda m: additive(m, params=replaced(ADDITIVE, "W_key",
                                                                 np.zeros((A, H - 1)))),
     ValueError, r"params\['W_key'\]: expected shape \[A, Hk\] = \(7, 4\), got \(7, 3\)"),
    ("additive W_key float32", lambda m: additive(m, params=replaced(
        ADDITIVE, "W_key", ADDITIVE["W_key"].astype(np.float32))), TypeError,
     r"params\['W_key'\]: dtype float32 " + MIXED),
    ("additive missing v", lambda m: additive(m, params=without(ADDITIVE, "v")), ValueError,
     r"params: missing key 'v' \(expected shape \[A\] = \(7,\)\)"),
    ("additive v wrong A", lambda m: additive(m, params=replaced(ADDITIVE, "v", np.zeros(A + 1))),
     ValueError, r"params\['v'\]: expected shape \[A\] = \(7,\), got \(8,\)"),
    ("additive v column", lambda m: additive(m, params=replaced(ADDITIVE, "v", np.zeros((A, 1)))),
     ValueError, r"params\['v'\]: expected shape \[A\] = \(7,\), got \(7, 1\)"),
    ("additive v float32", lambda m: additive(m, params=replaced(
        ADDITIVE, "v", ADDITIVE["v"].astype(np.float32))), TypeError,
     r"params\['v'\]: dtype float32 " + MIXED),
    ("additive v list", lambda m: additive(m, params=replaced(ADDITIVE, "v", [0.0] * A)),
     TypeError, r"params\['v'\]: expected a numpy.ndarray, got list"),
    ("additive b misshaped", lambda m: additive(m, params=replaced(ADDITIVE, "b", np.zeros(A + 1))),
     ValueError, r"params\['b'\]: expected shape \[A\] = \(7,\), got \(8,\)"),
    ("additive b float32", lambda m: additive(m, params=replaced(
        ADDITIVE, "b", np.zeros(A, np.float32))), TypeError,
     r"params\['b'\]: dtype float32 " + MIXED),
    ("additive unexpected key", lambda m: additive(m, params=replaced(ADDITIVE, "bias",
                                                                         np.zeros(A))),
     ValueError, r"params: unexpected keys \['bias'\]; the 'additive' score takes "
                 r"\['W_query', 'W_key', 'v'\] and optionally 'b'"),
    # mixed precision
    ("keys float32", lambda m: forward(m, keys=K.astype(np.float32)), TypeError,
     r"keys: dtype float32 " + MIXED),
    ("values float32", lambda m: forward(m, values=V.astype(np.float32)), TypeError,
     r"values: dtype float32 " + MIXED),
    ("query float32, keys float64", lambda m: forward(m, query=Q.astype(np.float32)), TypeError,
     r"keys: dtype float64 does not match the dtype of query \(float32\)"),
    # lengths
    ("lengths zero", lambda m: forward(m, lengths=np.array([5, 0, 2])), ValueError,
     r"lengths: every length must be in 1..5, got min 0 and max 5"),
    ("lengths beyond Tk", lambda m: forward(m, lengths=np.array([6, 1, 2])), ValueError,
     r"lengths: every length must be in 1..5, got min 1 and max 6"),
    ("lengths negative", lambda m: forward(m, lengths=[-1, 1, 2]), ValueError,
     r"lengths: every length must be in 1..5, got min -1 and max 2"),
    ("lengths float", lambda m: forward(m, lengths=np.array([5.0, 1.0, 2.0])), TypeError,
     r"lengths: expected integers, got dtype float64"),
    ("lengths bool", lambda m: forward(m, lengths=np.array([True, True, True])), TypeError,
     r"lengths: expected integers, got dtype bool"),
    ("lengths wrong shape", lambda m: forward(m, lengths=np.array([5, 1])), ValueError,
     r"lengths: expected shape \[B\] = \(3,\), got \(2,\)"),
    ("lengths 2-D", lambda m: forward(m, lengths=np.array([[5, 1, 2]])), ValueError,
     r"lengths: expected shape \[B\] = \(3,\), got \(1, 3\)"),
    ("lengths scalar", lambda m: forward(m, lengths=5), ValueError,
     r"lengths: expected shape \[B\] = \(3,\), got \(\)"),
    # masked softmax
    ("scores rank 1", lambda m: m.masked_softmax_forward(S[0]), ValueError,
     r"scores: expected a 2-D \[B, Tk\] or 3-D \[B, Tq, Tk\] or 4-D \[B, h, Tq, Tk\] array, "
     r"got shape \(5,\)"),
    ("scores rank 5", lambda m: m.masked_softmax_forward(S[None, None, None]), ValueError,
     r"scores: expected a 2-D .* array, got shape \(1, 1, 1, 3, 5\)"),
    ("scores integer", lambda m: m.masked_softmax_forward(S.astype(np.int64)), TypeError,
     r"scores: expected dtype float32 or float64, got int64"),
    ("scores list", lambda m: m.masked_softmax_forward(S.tolist()), TypeError,
     r"scores: expected a numpy.ndarray \[B, Tk\], got list"),
    ("softmax lengths zero", lambda m: m.masked_softmax_forward(S, np.array([5, 0, 1])),
     ValueError, r"lengths: every length must be in 1..5, got min 0 and max 5"),
    ("softmax lengths beyond Tk", lambda m: m.masked_softmax_forward(S, np.array([6, 1, 1])),
     ValueError, r"lengths: every length must be in 1..5, got min 1 and max 6"),
    ("softmax lengths float", lambda m: m.masked_softmax_forward(S, np.array([5.0, 1.0, 1.0])),
     TypeError, r"lengths: expected integers, got dtype float64"),
    ("softmax lengths wrong shape", lambda m: m.masked_softmax_forward(S, np.array([5, 1])),
     ValueError, r"lengths: expected shape \[B\] = \(3,\), got \(2,\)"),
    ("softmax d_weights wrong shape", lambda m: softmax_backward(m, np.zeros((B, Tk - 1))),
     ValueError, r"d_weights: expected shape like the weights = \(3, 5\), got \(3, 4\)"),
    ("softmax d_weights wrong rank", lambda m: softmax_backward(m, np.zeros((B, 1, Tk))),
     ValueError, r"d_weights: expected shape like the weights = \(3, 5\), got \(3, 1, 5\)"),
    ("softmax d_weights float32", lambda m: softmax_backward(m, np.zeros((B, Tk), np.float32)),
     TypeError, r"d_weights: dtype float32 does not match the dtype of scores \(float64\)"),
    ("softmax d_weights integer", lambda m: softmax_backward(m, np.zeros((B, Tk), np.int64)),
     TypeError, r"d_weights: expected dtype float32 or float64, got int64"),
    # backward
    ("d_context wrong Hv", lambda m: backward(m, np.zeros((B, Tq, Hv + 1))), ValueError,
     r"d_context: expected shape \[B, Tq, Hv\] = \(3, 2, 6\), got \(3, 2, 7\)"),
    ("d_context wrong Tq", lambda m: backward(m, np.zeros((B, Tq + 1, Hv))), ValueError,
     r"d_context: expected shape \[B, Tq, Hv\] = \(3, 2, 6\), got \(3, 3, 6\)"),
    ("d_context rank 3 for one query", lambda m: backward(m, np.zeros((B, 1, Hv)), single=True),
     ValueError, r"d_context: expected a 2-D array \[B, Hv\], got shape \(3, 1, 6\)"),
    ("d_context rank 2 for many queries", lambda m: backward(m, np.zeros((B, Hv))), ValueError,
     r"d_context: expected a 3-D array \[B, Tq, Hv\], got shape \(3, 6\)"),
    ("d_context float32", lambda m: backward(m, np.zeros((B, Tq, Hv), np.float32)), TypeError,
     r"d_context: dtype float32 " + MIXED),
    ("d_context integer", lambda m: backward(m, np.zeros((B, Tq, Hv), np.int32)), TypeError,
     r"d_context: expected dtype float32 or float64, got int32"),
    ("d_context list", lambda m: backward(m, np.zeros((B, Tq, Hv)).tolist()), TypeError,
     r"d_context: expected a numpy.ndarray \[B, Tq, Hv\], got list"),
    ("d_weights wrong Tk", lambda m: backward(m, d_weights=np.zeros((B, Tq, Tk - 1))), ValueError,
     r"d_weights: expected shape \[B, Tq, Tk\] = \(3, 2, 5\), got \(3, 2, 4\)"),
    ("d_weights rank 3 for one query", lambda m: backward(m, single=True,
                                                        d_weights=np.zeros((B, 1, Tk))),
     ValueError, r"d_weights: expected a 2-D array \[B, Tk\], got shape \(3, 1, 5\)"),
    ("d_weights float32", lambda m: backward(m, d_weights=np.zeros((B, Tq, Tk), np.float32)),
     TypeError, r"d_weights: dtype float32 " + MIXED),
    ("d_weights integer", lambda m: backward(m, d_weights=np.zeros((B, Tq, Tk), np.int64)),
     TypeError, r"d_weights: expected dtype float32 or float64, got int64"),
    # need_weights
    ("d_weights after need_weights=False", lambda m: m.attention_backward(
        np.zeros((B, Tq, Hv)), m.attention_forward(Q, K, V, need_weights=False)[2],
        d_weights=np.zeros((B, Tq, Tk))), ValueError,
     r"d_weights: the forward ran with need_weights=False, so there are no weights to take a "
     r"cotangent of; pass d_weights=None"),
    ("d_weights after need_weights=False, one query", lambda m: m.attention_backward(
        np.zeros((B, Hv)), m.attention_forward(Q[:, 0], K, V, need_weights=False)[2],
        d_weights=np.zeros((B, Tk))), ValueError,
     r"d_weights: the forward ran with need_weights=False"),
    ("need_weights int", lambda m: forward(m, need_weights=1), TypeError,
     r"need_weights: expected a bool, got int"),
    ("need_weights None", lambda m: forward(m, need_weights=None), TypeError,
     r"need_weights: expected a bool, got NoneType"),
    ("need_weights string", lambda m: forward(m, need_weights="False"), TypeError,
     r"need_weights: expected a bool, got str"),
    ("need_weights array", lambda m: forward(m, need_weights=np.array([False])), TypeError,
     r"need_weights: expected a bool, got ndarray"),
]

# The cases about the weights themselves (the masked softmax, d_weights, need_weights): once per
# module; every other case on every backend variant.
ABOUT_THE_WEIGHTS = ("scores ", "softmax ", "d_weights ", "need_weights ")


def _params():
    for name, call, exc, message in CASES:
        for backend in BACKENDS:
            if has_weights(backend) or not name.startswith(ABOUT_THE_WEIGHTS):
                yield pytest.param(call, exc, message, backend, id=f"{name}-{backend}")


@pytest.mark.parametrize(("call", "exc", "message", "backend"), list(_params()))
def test_attention_bad_input_raises_a_clear_error(call, exc, message, backend: str) -> None:
    with pytest.raises(exc, match=message):
        call(BACKENDS[backend])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if has_weights(b)])
def test_masked_softmax_with_no_keys_raises_a_clear_error(backend: str) -> None:
    """A [B, 0] score array has no softmax; the error must name `scores`, not numpy's max."""
    with pytest.raises(ValueError, match=r"scores: .*\(3, 0\)"):
        BACKENDS[backend].masked_softmax_forward(np.zeros((B, 0)))
