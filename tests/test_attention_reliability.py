"""Attention when the data misbehave, and when the caller does: NaN and inf in the inputs,
padding that is not data, scores far from zero, queries that see nothing, wrong caches, the
gradient buffers (sum_kv, out=), bad options, and repeatability.

Every test runs on both backends (``numpy_ref``, ``kernels``) in every layout (query [B, H],
[B, Tq, H], [B, h, Tq, D] with grouped kv heads) and, where a score matters, every score. The
sizes are small so that CI's ``NUMBA_DISABLE_JIT=1 pytest -k kernels`` run stays quick.

Every test of `attention_forward` / `attention_backward` also runs without the weights: the
variants ``numpy_ref-no-weights`` and ``kernels-no-weights`` call the forward with
need_weights=False (numpy_ref's blockwise path, the kernels' flash kernel forming no weights)
and the backward without d_weights; their results have no "weights", and what a test asserts
about the weights applies to the variants that have them. Tests of the composing pairs (the
masked softmax, the weighted sum, the scores) run once per module.

Conventions. "Bit for bit" is `np.array_equal` (a -0.0 equals 0.0). A query is named by its
index in the caller's layout: (b,) for [B, H], (b, i) for [B, Tq, H], (b, hh, i) for heads; a
key/value row by (b,) or (b, kv) plus the key index.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
from backends import ATTENTION_BACKENDS, has_weights, module_name
from backends import BACKENDS as MODULES

import kernels
import numpy_ref

over_modules = pytest.mark.parametrize("backend", list(MODULES))
BACKENDS = ATTENTION_BACKENDS
over_backends = pytest.mark.parametrize("backend", list(BACKENDS))
LAYOUTS = ("single", "steps", "heads")
SCORES = ("dot", "scaled_dot", "general", "additive")
over_layouts = pytest.mark.parametrize("layout", LAYOUTS)
over_scores = pytest.mark.parametrize("score", SCORES)

B, H, H_KV, TQ, TK, D, DV, A = 3, 4, 2, 3, 7, 4, 3, 5
GROUP = H // H_KV


def weights_shape(layout: str) -> tuple[int, ...]:
    return {"single": (B, TK), "steps": (B, TQ, TK), "heads": (B, H, TQ, TK)}[layout]


def query_lead(layout: str) -> tuple[int, ...]:
    return {"single": (B,), "steps": (B, TQ), "heads": (B, H, TQ)}[layout]


def kv_lead(layout: str) -> tuple[int, ...]:
    return (B, H_KV, TK) if layout == "heads" else (B, TK)


def inputs(layout: str, score: str, seed: int = 0, *, d_weights: bool = True) -> dict:
    """float64 query, keys, values, params and cotangents (no options)."""
    rng = np.random.default_rng(seed)
    params = {}
    if score == "general":
        params = {"W": rng.standard_normal((D, D)) / 2}
    elif score == "additive":
        params = {"W_query": rng.standard_normal((A, D)) / 2,
                  "W_key": rng.standard_normal((A, D)) / 2,
                  "v": rng.standard_normal(A), "b": rng.standard_normal(A) / 2}
    return {
        "query": rng.standard_normal((*query_lead(layout), D)),
        "keys": rng.standard_normal((*kv_lead(layout), D)),
        "values": rng.standard_normal((*kv_lead(layout), DV)),
        "params": params,
        "d_context": rng.standard_normal((*query_lead(layout), DV)),
        "d_weights": rng.standard_normal(weights_shape(layout)) if d_weights else None,
    }


def run(backend: str, score: str, a: dict, **options) -> dict[str, np.ndarray]:
    """Forward and backward; every result by name (d_params as d_params[...]). A no-weights
    variant runs the forward with need_weights=False and the backward without d_weights (a
    cotangent in `a` is not used), and its result has no "weights"."""
    mod, need_weights = BACKENDS[backend], has_weights(backend)
    context, weights, cache = mod.attention_forward(a["query"], a["keys"], a["values"],
                                                    score=score, params=a["params"] or None,
                                                    need_weights=need_weights, **options)
    assert (weights is None) != need_weights, f"weights {type(weights).__name__}"
    d_query, d_keys, d_values, d_params = mod.attention_backward(
        a["d_context"], cache, d_weights=a["d_weights"] if need_weights else None)
    res = {"context": context, "weights": weights, "d_query": d_query, "d_keys": d_keys,
           "d_values": d_values}
    if not need_weights:
        del res["weights"]
    res.update({f"d_params[{k!r}]": v for k, v in d_params.items()})
    return res


def assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} ({what})")


def to_heads(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "single":
        return x[:, None, None]
    return x[:, None] if layout == "steps" else x


def kv_to_heads(x: np.ndarray, layout: str) -> np.ndarray:
    return x if layout == "heads" else x[:, None]


def seen_by_some_query(visible: np.ndarray) -> np.ndarray:
    """visible [B, h, Tq, Tk] -> [B, h_kv, Tk]: some query of the kv head's group sees key j."""
    h = visible.shape[1]
    h_kv = h // GROUP if h == H else 1
    return visible.any(axis=2).reshape(B, h_kv, -1, visible.shape[3]).any(axis=2)


# ---------------------------------------------------------------------------------------------
# NaN or inf in one query


POISONED = {"single": (1,), "steps": (1, 1), "heads": (1, 1, 1)}  # the query that gets it
HIDDEN_FROM_IT = 3  # a key within row 1's length that the mask hides from that query only
LENGTHS = np.array([7, 5, 6])


def nan_query_case(layout: str, score: str, kind: str):
    """(clean inputs, poisoned inputs, options, the poisoned query's kv row index, and the
    keys it sees [Tk]).

    Row 1 has length 5; the mask hides key 3 from the poisoned query only (in the [B, H] layout
    the row has no other query, so there key 3 is padding); key 0 is seen by it.
    """
    a = inputs(layout, score, seed=1)
    mask = np.ones(weights_shape(layout), bool)
    mask[(*POISONED[layout], HIDDEN_FROM_IT)] = False
    poisoned = dict(a, query=a["query"].copy())
    kv = (1, POISONED[layout][1] // GROUP) if layout == "heads" else (1,)
    if kind == "nan":
        poisoned["query"][(*POISONED[layout], 0)] = np.nan
    else:  # +inf times the sign of key 0's first feature: the score of key 0 is +inf
        poisoned["query"][(*POISONED[layout], 0)] = np.inf * np.sign(a["keys"][(*kv, 0, 0)])
    sees = (np.arange(TK) < LENGTHS[1]) & (np.arange(TK) != HIDDEN_FROM_IT)
    return a, poisoned, {"lengths": LENGTHS, "mask": mask}, kv, sees


def _ignore_invalid(kind: str):
    # inf - inf and 0 * inf are IEEE's invalid operations: numpy warns, and the project's
    # pytest configuration turns RuntimeWarnings into errors. NaN in, NaN out warns nowhere.
    return np.errstate(invalid="ignore") if kind == "inf" else np.errstate()


@over_backends
@over_layouts
@over_scores
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nan_or_inf_in_one_query_stays_in_that_querys_rows(backend: str, layout: str,
                                                            score: str, kind: str) -> None:
    """No exception; every row the query does not reach is bit for bit the clean run's. With
    NaN (and with +inf under dot/scaled_dot, where key 0's score is +inf and the row's softmax
    is inf - inf): NaN in the whole context and d_query rows of that query, in its weights at
    the keys it sees (exact 0 at the others), and in the d_keys/d_values rows of those keys.
    (With +inf, ``general`` mixes +inf and -inf in q W, and ``additive``'s tanh saturates to a
    finite value: only the untouched rows are asserted.) The d_keys rows of the keys it does not
    see: the next test. Without the weights, the same for every other result: the backward
    that recomputes the weights must give NaN, not 0, at a key the query sees whose score is
    -inf by the data (the +inf feature times a key feature of the other sign)."""
    a, poisoned, options, kv, sees = nan_query_case(layout, score, kind)
    clean = run(backend, score, a, **options)
    with _ignore_invalid(kind):
        got = run(backend, score, poisoned, **options)
    p = POISONED[layout]
    weights = has_weights(backend)
    for name in ("context", "weights", "d_query") if weights else ("context", "d_query"):
        touched = np.zeros(got[name].shape[:-1], bool)
        touched[p] = True
        np.testing.assert_array_equal(got[name][~touched], clean[name][~touched], err_msg=name)
    for name in ("d_keys", "d_values"):
        touched = np.zeros(got[name].shape[:-1], bool)
        touched[kv] = True  # that query's row (and kv head)
        np.testing.assert_array_equal(got[name][~touched], clean[name][~touched], err_msg=name)
        if name == "d_values":  # the keys it does not see: w = 0 there
            np.testing.assert_array_equal(got[name][kv][~sees], clean[name][kv][~sees],
                                          err_msg=name)
    if weights:
        np.testing.assert_array_equal(got["weights"][p][~sees], 0,
                                      err_msg="weights (hidden keys)")
    if kind == "inf" and score in ("general", "additive"):
        return
    assert np.isnan(got["context"][p]).all(), "context of the poisoned query"
    assert np.isnan(got["d_query"][p]).all(), "d_query of the poisoned query"
    for name in ("d_keys", "d_values"):
        assert np.isnan(got[name][kv][sees]).all(), f"{name} of the keys the query sees"
    if kind == "nan" and weights:
        assert np.isnan(got["weights"][p][sees]).all(), "weights of the keys the query sees"


@over_backends
@over_layouts
@over_scores
def test_nan_in_one_query_does_not_reach_padding_rows_of_d_keys(backend: str, layout: str,
                                                                score: str) -> None:
    """Keys no query sees (past lengths; in the [B, H] layout also the key the mask hides from
    the row's only query) get no gradient: their d_keys and d_values rows stay exact zeros, the
    clean run's, even though d_keys = ds^T q sums 0 * NaN there. A key hidden from the NaN
    query but seen by others is data: the product may carry the NaN into it, as torch's."""
    a, poisoned, options, kv, _ = nan_query_case(layout, score, "nan")
    clean = run(backend, score, a, **options)
    got = run(backend, score, poisoned, **options)
    padding = np.arange(TK) >= LENGTHS[1]
    if layout == "single":
        padding |= np.arange(TK) == HIDDEN_FROM_IT
    for name in ("d_keys", "d_values"):
        np.testing.assert_array_equal(got[name][kv][padding], 0, err_msg=name)
        np.testing.assert_array_equal(got[name][kv][padding], clean[name][kv][padding],
                                      err_msg=name)


@over_backends
@over_layouts
def test_an_infinite_query_under_the_additive_score_saturates_the_tanh(backend: str,
                                                                      layout: str) -> None:
    """+inf in one query feature makes every entry of W_query q + b infinite, so
    tanh(q_a + k_a) = +-1 at every key: equal scores, uniform weights over the keys it sees,
    context = their mean value, d_query = 0 (1 - tanh^2 = 0). Finite, as IEEE arithmetic
    gives."""
    a, poisoned, options, kv, sees = nan_query_case(layout, "additive", "inf")
    with np.errstate(invalid="ignore"):  # 0 * inf in d_W_query = d_qa^T q
        got = run(backend, "additive", poisoned, **options)
    p = POISONED[layout]
    np.testing.assert_allclose(got["context"][p], a["values"][kv][sees].mean(axis=0),
                               rtol=1e-12, atol=1e-14)
    if has_weights(backend):
        np.testing.assert_allclose(got["weights"][p][sees], 1 / sees.sum(), rtol=1e-12)
    np.testing.assert_array_equal(got["d_query"][p], 0)


@over_modules
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_masked_softmax_backward_is_zero_where_the_weight_is_zero_in_a_nan_row(
    backend: str, rank: int
) -> None:
    """A visible NaN score makes its row's weights NaN at the keys it sees and 0 elsewhere; the
    backward is 0 wherever the weight is 0 (numpy_ref's docstring: "0 where w is 0, even when
    the row's sum is NaN"), and the other rows are the clean run's."""
    mod = BACKENDS[backend]
    rng = np.random.default_rng(3)
    shape = {2: (3, 6), 3: (2, 3, 6), 4: (2, 3, 2, 6)}[rank]
    scores = rng.standard_normal(shape)
    mask = np.ones(shape, bool)
    row = (1,) * (rank - 1)
    mask[(*row, 2)] = False
    lengths = np.array([6, 5, 4][: shape[0]])
    d_w = rng.standard_normal(shape)
    w0, c0 = mod.masked_softmax_forward(scores, lengths, mask=mask)
    clean = mod.masked_softmax_backward(d_w, c0)
    scores[(*row, 0)] = np.nan
    w, cache = mod.masked_softmax_forward(scores, lengths, mask=mask)
    d_scores = mod.masked_softmax_backward(d_w, cache)
    seen = mask[row] & (np.arange(6) < lengths[1])
    assert np.isnan(w[row][seen]).all() and np.all(w[row][~seen] == 0)
    np.testing.assert_array_equal(d_scores[row][~seen], 0, err_msg="d_scores where w == 0")
    assert np.isnan(d_scores[row][seen]).all()
    others = np.ones(shape[:-1], bool)
    others[row] = False
    np.testing.assert_array_equal(w[others], w0[others])
    np.testing.assert_array_equal(d_scores[others], clean[others])


@over_modules
def test_weighted_sum_forward_does_not_read_its_uninitialised_output(backend: str) -> None:
    """One query per row: the context is sum_j w_j v_j whatever the freed memory np.empty hands
    back held (numpy recycles small blocks: freed NaN arrays of the context's size come
    back)."""
    mod = BACKENDS[backend]
    w = np.full((3, 5), 0.2)
    values = np.ones((3, 5, 4))
    for _ in range(8):
        garbage = [np.full((3, 4), np.nan) for _ in range(16)]
        del garbage
        context, _ = mod.weighted_sum_forward(w, values)
        np.testing.assert_allclose(context, 1.0, rtol=1e-15)


@over_modules
def test_weighted_sum_backward_nan_in_one_row_stays_in_that_row(backend: str) -> None:
    mod = BACKENDS[backend]
    rng = np.random.default_rng(4)
    w, values = rng.dirichlet(np.ones(5), size=3), rng.standard_normal((3, 5, 4))
    dc = rng.standard_normal((3, 4))
    _, cache = mod.weighted_sum_forward(w, values)
    clean = mod.weighted_sum_backward(dc, cache)
    dc[0, 0] = np.nan
    got = mod.weighted_sum_backward(dc, cache)
    for name, x, y in zip(("d_weights", "d_values"), got, clean, strict=True):
        np.testing.assert_array_equal(x[1:], y[1:], err_msg=f"{name}: rows without the NaN")
        assert np.isnan(x[0]).any(), name


# ---------------------------------------------------------------------------------------------
# padding is not data


def padding_case(layout: str, where: str) -> tuple[dict, np.ndarray]:
    """(options, the visibility [B, h, Tq, Tk] they give) for keys hidden from every query:
    past lengths, masked, above the causal diagonal (Tk > Tq), or with bias -inf. In the heads
    layout the mask and the bias also hide key 4 from kv group 0's query heads only, so that
    key is padding for kv head 0 and data for kv head 1."""
    shape4 = (B, H if layout == "heads" else 1, 1 if layout == "single" else TQ, TK)
    visible = np.ones(shape4, bool)
    options: dict = {}
    if where == "lengths":
        options["lengths"] = np.array([7, 4, 2])
        visible &= np.arange(TK) < options["lengths"][:, None, None, None]
    elif where == "causal":
        options["causal"] = True
        visible &= np.arange(TK)[None, :] <= np.arange(shape4[2])[:, None]
    else:
        hide = np.ones((B, shape4[1], 1, TK), bool)  # per row (and head), for every query
        hide[1, :, :, [2, 5]] = False
        hide[0, :, :, 6] = False
        if layout == "heads":
            hide[:, :GROUP, :, 4] = False
        visible &= hide
        user = {"single": hide[:, 0, 0], "steps": hide[:, 0], "heads": hide}[layout]
        if where == "mask":
            options["mask"] = user
        else:
            rng = np.random.default_rng(5)
            options["bias"] = np.where(user, rng.standard_normal(user.shape), -np.inf)
    return options, visible


@over_backends
@over_layouts
@over_scores
@pytest.mark.parametrize("where", ["lengths", "mask", "causal", "bias"])
def test_padding_is_not_data(backend: str, layout: str, score: str, where: str) -> None:
    """NaN, +inf or -inf in the keys and values no query sees change nothing: every result
    (context, weights, d_query, d_keys, d_values, d_params with d_bias) is bit for bit the one
    with zero padding, no warning is raised (nothing reads them), and the padding rows of
    d_keys and d_values are exact zeros."""
    options, visible = padding_case(layout, where)
    padding = ~seen_by_some_query(visible)  # [B, h_kv, Tk]
    assert padding.any() and not padding.all()
    a = inputs(layout, score, seed=6)
    for x in ("keys", "values"):
        kv_to_heads(a[x], layout)[padding] = 0.0
    clean = run(backend, score, a, **options)
    for name in ("d_keys", "d_values"):
        np.testing.assert_array_equal(kv_to_heads(clean[name], layout)[padding], 0,
                                      err_msg=f"{name}: padding rows")
    for value in (np.nan, np.inf, -np.inf):
        noisy = dict(a, keys=a["keys"].copy(), values=a["values"].copy())
        for x in ("keys", "values"):
            kv_to_heads(noisy[x], layout)[padding] = value
        assert_same(run(backend, score, noisy, **options), clean, f"{value} in the padding")


@over_backends
@pytest.mark.parametrize("layout", ["steps", "heads"])
@over_scores
def test_a_key_hidden_from_only_some_queries_is_data(backend: str, layout: str,
                                                     score: str) -> None:
    """Key 2 of row 0 is masked for query 0 (query head 0 in the heads layout) but seen by
    query 1 (query head 1 of the same kv group): a NaN there is data, and reaches the context
    and d_query (and weights) of the queries that see it."""
    a = inputs(layout, score, seed=7)
    mask = np.ones(weights_shape(layout), bool)
    if layout == "steps":
        mask[0, 0, 2] = False
        sees, kv = (0, 1), (0,)
    else:
        mask[0, 0, :, 2] = False
        sees, kv = (0, 1, 1), (0, 0)
    noisy = dict(a, keys=a["keys"].copy(), values=a["values"].copy())
    noisy["keys"][(*kv, 2)] = np.nan
    noisy["values"][(*kv, 2)] = np.nan
    got = run(backend, score, noisy, mask=mask)
    assert np.isnan(got["context"][sees]).all()
    assert np.isnan(got["d_query"][sees]).all()
    if has_weights(backend):
        assert np.isnan(got["weights"][sees]).all()


# ---------------------------------------------------------------------------------------------
# scores far below zero


def _offsets(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/1024 in [-3, 3]: -1e12 + offset is exact in float64 (ulp 2^-13)."""
    return rng.integers(-3072, 3073, shape) / 1024.0


def _softmax(o: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """The softmax over the visible entries (NaN in a row that has none)."""
    o = np.where(visible, o, -np.inf)
    with np.errstate(invalid="ignore"):
        e = np.exp(o - o.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


def _assert_near_exact(got: np.ndarray, want: np.ndarray, visible: np.ndarray,
                       scores: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(got[~np.broadcast_to(visible, got.shape)], 0)
    # the test's own power: a -1e9 sentinel at the hidden keys puts the weight there
    sentinel = _softmax(np.where(visible, scores, -1e9) + 1e12, np.ones_like(visible))
    assert not np.allclose(sentinel, want, rtol=1e-3, atol=1e-3)


@over_modules
@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("hidden_by", ["lengths", "mask", "both"])
def test_masked_softmax_of_scores_near_minus_1e12_is_exact(backend: str, rank: int,
                                                           hidden_by: str) -> None:
    """Valid scores -1e12 + small offsets: the weights are the softmax of the offsets to
    rtol 1e-12, exactly 0 at hidden keys (whose scores are larger, -1e12 + 5 to 0)."""
    mod = BACKENDS[backend]
    rng = np.random.default_rng(rank)
    shape = {2: (3, 7), 3: (3, 2, 7), 4: (3, 2, 2, 7)}[rank]
    o = _offsets(rng, shape)
    visible = np.ones(shape, bool)
    lengths = mask = None
    if hidden_by in ("lengths", "both"):
        lengths = np.array([7, 3, 1])
        visible &= (np.arange(7) < lengths.reshape((3,) + (1,) * (rank - 1)))
    if hidden_by in ("mask", "both"):
        mask = rng.random(shape) < 0.7
        mask[..., 0] = True
        visible &= mask
    scores = np.where(visible, -1e12 + o, rng.uniform(-1e12 + 5, 0, shape))
    w, _ = mod.masked_softmax_forward(scores, lengths, mask=mask)
    _assert_near_exact(w, _softmax(o, visible), visible, scores)


@over_backends
@over_layouts
@pytest.mark.parametrize("through", ["bias", "scores"])
def test_attention_with_scores_near_minus_1e12_is_exact(backend: str, layout: str,
                                                        through: str) -> None:
    """The same through attention_forward: s = bias (query 0, so every dot score is exactly 0)
    or s = q . k with q = 1, k_j = -1e12 + offset (one feature), lengths and a mask hiding
    keys; context = w v to rtol 1e-12 (and, with the weights, the weights as above)."""
    mod = BACKENDS[backend]
    rng = np.random.default_rng(8)
    wshape = weights_shape(layout)
    o = _offsets(rng, wshape if through == "bias" else (*kv_lead(layout), 1))
    lengths = np.array([7, 3, 1])
    mask = rng.random(wshape) < 0.7
    mask[..., 0] = True
    visible4 = to_heads(mask, layout) & (np.arange(TK) < lengths[:, None, None, None])
    visible = {"single": visible4[:, 0, 0], "steps": visible4[:, 0], "heads": visible4}[layout]
    values = rng.standard_normal((*kv_lead(layout), DV))
    if through == "bias":
        query = np.zeros((*query_lead(layout), 2))
        keys = rng.standard_normal((*kv_lead(layout), 2))
        bias = np.where(visible, -1e12 + o, rng.uniform(-1e12 + 5, 0, wshape))
        scores, offsets = bias, o
    else:
        query = np.ones((*query_lead(layout), 1))
        keys = -1e12 + o
        bias = None
        k4 = np.repeat(kv_to_heads(keys[..., 0], layout), GROUP if layout == "heads" else 1,
                       axis=1)[:, :, None, :]  # [B, h, 1, Tk]
        full = np.broadcast_to(k4, (*k4.shape[:2], TQ, TK))  # [B, h, Tq, Tk]
        full = {"single": full[:, 0, 0], "steps": full[:, 0], "heads": full}[layout]
        scores, offsets = full, full + 1e12
    context, weights, _ = mod.attention_forward(query, keys, values, lengths=lengths,
                                                mask=mask, bias=bias,
                                                need_weights=has_weights(backend))
    want = _softmax(offsets, visible)
    if has_weights(backend):
        _assert_near_exact(weights, want, visible, scores)
    v4 = np.repeat(kv_to_heads(values, layout), GROUP if layout == "heads" else 1, axis=1)
    want_context = to_heads(want, layout) @ v4
    want_context = {"single": want_context[:, 0, 0], "steps": want_context[:, 0],
                    "heads": want_context}[layout]
    np.testing.assert_allclose(context, want_context, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# a query that sees no key


@over_backends
@over_layouts
@over_scores
@pytest.mark.parametrize("how", ["mask", "bias"])
def test_a_query_that_sees_no_key_gets_zeros(backend: str, layout: str, score: str,
                                             how: str) -> None:
    """Query P's mask row all False, or its bias row all -inf: its context, weights (where
    there are), d_query (and d_bias row) are exact zeros, and every other gradient is bit for
    bit the one where P's cotangents are 0."""
    a = inputs(layout, score, seed=9)
    rng = np.random.default_rng(10)
    p = POISONED[layout]
    shape = weights_shape(layout)
    options: dict = {"lengths": LENGTHS}
    if how == "mask":
        options["mask"] = rng.random(shape) < 0.8
        options["mask"][..., 0] = True
        options["mask"][p] = False
    else:
        options["bias"] = rng.standard_normal(shape)
        options["bias"][p] = -np.inf
    got = run(backend, score, a, **options)
    for name in ("context", "weights", "d_query") if has_weights(backend) else ("context",
                                                                                "d_query"):
        np.testing.assert_array_equal(got[name][p], 0, err_msg=name)
    if how == "bias":
        np.testing.assert_array_equal(got["d_params['bias']"][p], 0, err_msg="d_bias")
    quiet = dict(a, d_context=a["d_context"].copy(), d_weights=a["d_weights"].copy())
    quiet["d_context"][p] = 0
    quiet["d_weights"][p] = 0
    assert_same(got, run(backend, score, quiet, **options), "P's cotangents zeroed")


@over_modules
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_masked_softmax_of_a_row_that_sees_nothing_is_zero(backend: str, rank: int) -> None:
    """A row whose mask is all False, and a row whose visible scores are all -inf: weights 0
    and d_scores 0 there; the other rows are the softmax of their visible scores."""
    mod = BACKENDS[backend]
    rng = np.random.default_rng(21)
    shape = {2: (3, 6), 3: (2, 3, 6), 4: (2, 2, 3, 6)}[rank]
    scores = rng.standard_normal(shape)
    mask = rng.random(shape) < 0.7
    mask[..., 0] = True
    dead_mask, dead_inf = (0,) * (rank - 1), (1,) * (rank - 1)
    mask[dead_mask] = False
    scores[dead_inf] = np.where(mask[dead_inf], -np.inf, scores[dead_inf])
    w, cache = mod.masked_softmax_forward(scores, mask=mask)
    d_scores = mod.masked_softmax_backward(rng.standard_normal(shape), cache)
    for row in (dead_mask, dead_inf):
        np.testing.assert_array_equal(w[row], 0)
        np.testing.assert_array_equal(d_scores[row], 0)
    live = np.ones(shape[:-1], bool)
    live[dead_mask] = live[dead_inf] = False
    np.testing.assert_allclose(w[live], _softmax(scores, mask)[live], rtol=1e-13, atol=1e-16)


# ---------------------------------------------------------------------------------------------
# the wrong cache


def _cache_names(backend: str) -> dict[str, str]:
    if module_name(backend) == "kernels":
        return {"attention": "KernelAttentionCache returned by kernels.attention_forward",
                "softmax": "KernelMaskedSoftmaxCache returned by kernels.masked_softmax_forward"}
    return {"attention": "AttentionCache returned by attention_forward",
            "softmax": "MaskedSoftmaxCache returned by masked_softmax_forward"}


def _caches(backend: str) -> dict[str, object]:
    """The caches a test hands to the wrong backward; the attention ones from the variant's
    forward (need_weights=False for a no-weights variant), and the other module's alike."""
    name = module_name(backend)
    mod = MODULES[name]
    other = MODULES["kernels" if name == "numpy_ref" else "numpy_ref"]
    need_weights = has_weights(backend)
    a = inputs("steps", "dot")
    s = np.random.default_rng(0).standard_normal((B, TQ, TK))
    return {
        "a string": "cache",
        "None": None,
        "a tuple": (),
        "own attention": mod.attention_forward(a["query"], a["keys"], a["values"],
                                               need_weights=need_weights)[2],
        "other backend's attention": other.attention_forward(a["query"], a["keys"],
                                                             a["values"],
                                                             need_weights=need_weights)[2],
        "own masked softmax": mod.masked_softmax_forward(s)[1],
        "other backend's masked softmax": other.masked_softmax_forward(s)[1],
        "scores": mod.attention_scores_forward(a["query"], a["keys"])[1],
    }


WRONG = [  # (op, cache given)
    ("attention", "a string"), ("attention", "None"), ("attention", "a tuple"),
    ("attention", "own masked softmax"), ("attention", "other backend's attention"),
    ("attention", "scores"),
    ("softmax", "a string"), ("softmax", "None"), ("softmax", "own attention"),
    ("softmax", "other backend's masked softmax"),
    ("scores", "a string"), ("scores", "own attention"), ("scores", "own masked softmax"),
]


@over_backends
@pytest.mark.parametrize(("op", "given"), WRONG, ids=[f"{o}-got-{g}" for o, g in WRONG])
def test_a_cache_of_the_wrong_kind_is_a_type_error_naming_the_cache_expected(
    backend: str, op: str, given: str
) -> None:
    mod = MODULES[module_name(backend)]
    cache = _caches(backend)[given]
    got_type = type(cache).__name__
    if op == "attention":
        call = lambda: mod.attention_backward(np.zeros((B, TQ, D)), cache)  # noqa: E731
        expected = _cache_names(backend)["attention"]
    elif op == "softmax":
        call = lambda: mod.masked_softmax_backward(np.zeros((B, TQ, TK)), cache)  # noqa: E731
        expected = _cache_names(backend)["softmax"]
    else:
        call = lambda: mod.attention_scores_backward(np.zeros((B, TQ, TK)), cache)  # noqa: E731
        expected = "AttentionScoresCache returned by attention_scores_forward"
    with pytest.raises(TypeError, match=re.escape(f"cache: expected the {expected}, got "
                                                  f"{got_type}")):
        call()


# ---------------------------------------------------------------------------------------------
# sum_kv and out=


def _grad_case(layout: str, score: str, same: bool, d_weights: bool = True):
    """(inputs, options) with lengths and a mask; values is keys when `same`, else an equal-
    shaped distinct array (so sum_kv applies); a cotangent on the weights when `d_weights`."""
    a = inputs(layout, score, seed=11, d_weights=d_weights)
    if same:
        a["values"] = a["keys"]
    else:
        a["values"] = np.random.default_rng(12).standard_normal(a["keys"].shape)
    a["d_context"] = np.random.default_rng(13).standard_normal((*query_lead(layout), D))
    mask = np.random.default_rng(14).random(weights_shape(layout)) < 0.7
    mask[..., 0] = True
    return a, {"lengths": LENGTHS, "mask": mask}


def _fused(backend: str, layout: str, score: str) -> bool:
    """The kernels' single-query fused path, which forms d_keys + d_values per element."""
    return module_name(backend) == "kernels" and layout == "single" and score != "additive"


@over_backends
@over_layouts
@over_scores
@pytest.mark.parametrize("same", [True, False], ids=["keys-is-values", "equal-shapes"])
def test_sum_kv_is_d_keys_plus_d_values(backend: str, layout: str, score: str,
                                        same: bool) -> None:
    """sum_kv=True: d_keys + d_values of the default call in the d_keys slot (bit for bit, or
    within 3 ulps of the larger term on the kernels' fused path, which forms the sum per
    element), None as d_values, d_query and d_params unchanged."""
    mod = BACKENDS[backend]
    a, options = _grad_case(layout, score, same, d_weights=has_weights(backend))
    _, _, cache = mod.attention_forward(a["query"], a["keys"], a["values"], score=score,
                                        params=a["params"] or None, **options)
    dq, dk, dv, dp = mod.attention_backward(a["d_context"], cache, d_weights=a["d_weights"])
    sq, s_kv, s_none, sp = mod.attention_backward(a["d_context"], cache,
                                                  d_weights=a["d_weights"], sum_kv=True)
    assert s_none is None
    np.testing.assert_array_equal(sq, dq)
    assert sp.keys() == dp.keys()
    for k in dp:
        np.testing.assert_array_equal(sp[k], dp[k], err_msg=k)
    if _fused(backend, layout, score):
        # g q_j + w_j dc as one fused multiply-add: the product g q_j is not rounded on its
        # own, and the sum may round into the next binade (2 ulps of the larger term measured)
        ulp = np.spacing(np.maximum(np.abs(dk), np.abs(dv)))
        excess = np.abs(s_kv - (dk + dv)) / ulp
        assert excess.max() <= 3, f"{excess.max()} ulps of the larger term"
        # the hidden rows are exact zeros in either form
        np.testing.assert_array_equal(s_kv[(dk == 0) & (dv == 0)], 0)
    else:
        np.testing.assert_array_equal(s_kv, dk + dv)


OUTS = ["all", "d_query", "d_keys", "sum_kv"]


@over_backends
@over_layouts
@over_scores
@pytest.mark.parametrize("which", OUTS)
def test_out_buffers_are_written_and_returned(backend: str, layout: str, score: str,
                                              which: str) -> None:
    """out=(d_query, d_keys, d_values) buffers (None entries allowed), prefilled with NaN: the
    returned gradients are those very objects and hold the default call's result bit for bit
    (padding rows included: every entry is written)."""
    mod = BACKENDS[backend]
    a, options = _grad_case(layout, score, same=which == "sum_kv",
                            d_weights=has_weights(backend))
    _, _, cache = mod.attention_forward(a["query"], a["keys"], a["values"], score=score,
                                        params=a["params"] or None, **options)
    sum_kv = which == "sum_kv"
    want = mod.attention_backward(a["d_context"], cache, d_weights=a["d_weights"],
                                  sum_kv=sum_kv)
    shapes = (a["query"].shape, a["keys"].shape, a["values"].shape)
    chosen = {"all": (0, 1, 2), "d_query": (0,), "d_keys": (1,), "sum_kv": (0, 1)}[which]
    out = tuple(np.full(shapes[i], np.nan) if i in chosen else None for i in range(3))
    got = mod.attention_backward(a["d_context"], cache, d_weights=a["d_weights"],
                                 sum_kv=sum_kv, out=out)
    for i, name in enumerate(("d_query", "d_keys", "d_values")):
        if out[i] is not None:
            assert got[i] is out[i], f"{name}: not the buffer given"
        if want[i] is None:
            assert got[i] is None, name
        else:
            np.testing.assert_array_equal(got[i], want[i], err_msg=name)
    for k in want[3]:
        np.testing.assert_array_equal(got[3][k], want[3][k], err_msg=k)


def _bad_out_cases(layout: str) -> list[tuple[str, Callable, type, str]]:
    q_shape, kv_shape = (*query_lead(layout), D), (*kv_lead(layout), D)
    wide = np.zeros((*kv_shape[:-1], 2 * D))
    readonly = np.zeros(kv_shape)
    readonly.flags.writeable = False
    v_shape, other_values = (*kv_lead(layout), DV), (*kv_lead(layout), DV + 1)
    q1 = "out[0] (d_query)"
    return [
        ("wrong shape", lambda: (np.zeros((*q_shape[:-1], D + 1)), None, None), ValueError,
         re.escape(f"{q1}: expected shape like the gradient = {q_shape}, got "
                   f"{(*q_shape[:-1], D + 1)}")),
        ("wrong dtype", lambda: (None, np.zeros(kv_shape, np.float32), None), TypeError,
         re.escape("out[1] (d_keys): dtype float32 does not match the dtype of query "
                   "(float64)")),
        ("non-contiguous", lambda: (None, wide[..., ::2], None), ValueError,
         re.escape("out[1] (d_keys): expected a C-contiguous, writeable array")),
        ("fortran", lambda: (None, None, np.asfortranarray(np.zeros(v_shape))), ValueError,
         re.escape("out[2] (d_values): expected a C-contiguous, writeable array")),
        ("read-only", lambda: (None, readonly, None), ValueError,
         re.escape("out[1] (d_keys): expected a C-contiguous, writeable array")),
        ("a list", lambda: (np.zeros(q_shape).tolist(), None, None), TypeError,
         re.escape(f"{q1}: expected a numpy.ndarray or None, got list")),
        ("two entries", lambda: (None, None), TypeError,
         re.escape("out: expected a tuple (d_query, d_keys, d_values) of arrays or None")),
        ("values shape", lambda: (None, None, np.zeros(other_values)), ValueError,
         re.escape(f"out[2] (d_values): expected shape like the gradient = {v_shape}, got "
                   f"{other_values}")),
    ]


BAD_OUT_IDS = ["wrong shape", "wrong dtype", "non-contiguous", "fortran", "read-only",
               "a list", "two entries", "values shape"]


@over_backends
@over_layouts
@pytest.mark.parametrize("case", BAD_OUT_IDS)
def test_bad_out_buffers_raise_a_clear_error_and_stay_untouched(backend: str, layout: str,
                                                                case: str) -> None:
    mod = BACKENDS[backend]
    a = inputs(layout, "dot", seed=15)
    _, _, cache = mod.attention_forward(a["query"], a["keys"], a["values"], lengths=LENGTHS)
    make, exc, message = {c[0]: c[1:] for c in _bad_out_cases(layout)}[case]
    out = make()
    before = [None if isinstance(x, list) or x is None else x.copy() for x in out]
    with pytest.raises(exc, match=message):
        mod.attention_backward(a["d_context"], cache, out=out)
    for x, y in zip(out, before, strict=True):
        if y is not None:
            np.testing.assert_array_equal(x, y, err_msg="a buffer changed before the error")


@over_backends
@over_layouts
def test_bad_sum_kv_raises_a_clear_error(backend: str, layout: str) -> None:
    mod = BACKENDS[backend]
    a = inputs(layout, "dot", seed=16)  # values' last size DV != D: sum_kv does not apply
    _, _, cache = mod.attention_forward(a["query"], a["keys"], a["values"])
    with pytest.raises(ValueError, match=re.escape(
            "sum_kv: d_keys + d_values needs keys and values of one shape, got keys "
            f"{a['keys'].shape} and values {a['values'].shape}")):
        mod.attention_backward(a["d_context"], cache, sum_kv=True)
    with pytest.raises(TypeError, match=re.escape("sum_kv: expected a bool, got int")):
        mod.attention_backward(a["d_context"], cache, sum_kv=1)
    a, options = _grad_case(layout, "dot", same=True)
    _, _, cache = mod.attention_forward(a["query"], a["keys"], a["values"], **options)
    out = (None, np.zeros(a["keys"].shape), np.zeros(a["values"].shape))
    with pytest.raises(ValueError, match=re.escape(
            "out[2]: with sum_kv=True the sum goes to out[1] and out[2] must be None")):
        mod.attention_backward(a["d_context"], cache, sum_kv=True, out=out)


# ---------------------------------------------------------------------------------------------
# bad options


def _forward(mod, layout: str = "steps", score: str = "dot", **kw):
    a = inputs(layout, score, seed=17, d_weights=False)
    args = {"query": a["query"], "keys": a["keys"], "values": a["values"],
            "params": a["params"] or None, "score": score, **kw}
    return mod.attention_forward(args.pop("query"), args.pop("keys"), args.pop("values"),
                                 **args)


S_WEIGHTS = f"[B, Tq, Tk] = {(B, TQ, TK)}"
BAD_OPTIONS: list[tuple[str, Callable, type, str]] = [
    ("mask float", lambda m: _forward(m, mask=np.ones(TK)), TypeError,
     r"mask: expected dtype bool \(True = attend\), got float64; a float mask is passed as "
     r"bias="),
    ("mask int", lambda m: _forward(m, mask=np.ones(TK, np.int64)), TypeError,
     r"mask: expected dtype bool \(True = attend\), got int64"),
    ("mask list", lambda m: _forward(m, mask=[True] * TK), TypeError,
     r"mask: expected a bool numpy.ndarray broadcastable to \[B, Tq, Tk\], got list"),
    ("mask not broadcastable", lambda m: _forward(m, mask=np.ones(TK + 1, bool)), ValueError,
     r"mask: shape \(8,\) does not broadcast to the weights' shape " + re.escape(S_WEIGHTS)),
    ("mask too many axes", lambda m: _forward(m, mask=np.ones((1, B, TQ, TK), bool)),
     ValueError, r"mask: shape \(1, 3, 3, 7\) does not broadcast to the weights' shape"),
    ("mask heads", lambda m: _forward(m, "heads", mask=np.ones((B, H + 1, 1, TK), bool)),
     ValueError, re.escape(f"mask: shape {(B, H + 1, 1, TK)} does not broadcast to the "
                           f"weights' shape [B, h, Tq, Tk] = {(B, H, TQ, TK)}")),
    ("mask single", lambda m: _forward(m, "single", mask=np.ones((B, 1, TK), bool)),
     ValueError, re.escape(f"mask: shape {(B, 1, TK)} does not broadcast to the weights' "
                           f"shape [B, Tk] = {(B, TK)}")),
    ("bias int", lambda m: _forward(m, bias=np.zeros(TK, np.int64)), TypeError,
     r"bias: expected dtype float32 or float64 \(a bool mask is passed as mask=\), got int64"),
    ("bias bool", lambda m: _forward(m, bias=np.ones(TK, bool)), TypeError,
     r"bias: expected dtype float32 or float64 \(a bool mask is passed as mask=\), got bool"),
    ("bias float32", lambda m: _forward(m, bias=np.zeros(TK, np.float32)), TypeError,
     r"bias: dtype float32 does not match the dtype of query \(float64\)"),
    ("bias list", lambda m: _forward(m, bias=[0.0] * TK), TypeError,
     r"bias: expected a float numpy.ndarray broadcastable to \[B, Tq, Tk\], got list"),
    ("bias not broadcastable", lambda m: _forward(m, bias=np.zeros((TQ + 1, TK))), ValueError,
     r"bias: shape \(4, 7\) does not broadcast to the weights' shape " + re.escape(S_WEIGHTS)),
    ("scale with additive", lambda m: _forward(m, score="additive", scale=0.5), ValueError,
     r"scale: the 'additive' score takes no scale \(it has its own weights\); pass "
     r"scale=None"),
    ("scale string", lambda m: _forward(m, scale="0.5"), TypeError,
     r"scale: expected a finite real number or None, got '0.5'"),
    ("scale bool", lambda m: _forward(m, scale=True), TypeError,
     r"scale: expected a finite real number or None, got True"),
    ("scale nan", lambda m: _forward(m, scale=float("nan")), TypeError,
     r"scale: expected a finite real number or None, got nan"),
    ("scale inf", lambda m: _forward(m, scale=float("inf")), TypeError,
     r"scale: expected a finite real number or None, got inf"),
    ("scale array", lambda m: _forward(m, scale=np.array([0.5])), TypeError,
     r"scale: expected a finite real number or None, got array"),
    ("causal int", lambda m: _forward(m, causal=1), TypeError,
     r"causal: expected a bool, got int"),
    ("causal string", lambda m: _forward(m, causal="yes"), TypeError,
     r"causal: expected a bool, got str"),
    ("causal None", lambda m: _forward(m, causal=None), TypeError,
     r"causal: expected a bool, got NoneType"),
    ("causal array", lambda m: _forward(m, causal=np.array([True, False])), TypeError,
     r"causal: expected a bool, got ndarray"),
    ("heads not a multiple", lambda m: m.attention_forward(
        np.zeros((B, 3, TQ, D)), np.zeros((B, 2, TK, D)), np.zeros((B, 2, TK, D))), ValueError,
     r"keys: the query's 3 heads must be a multiple of the keys' 2 heads"),
    ("more kv heads", lambda m: m.attention_forward(
        np.zeros((B, 2, TQ, D)), np.zeros((B, 4, TK, D)), np.zeros((B, 4, TK, D))), ValueError,
     r"keys: the query's 2 heads must be a multiple of the keys' 4 heads"),
    ("softmax mask float", lambda m: m.masked_softmax_forward(np.zeros((B, TK)),
                                                              mask=np.ones(TK)), TypeError,
     r"mask: expected dtype bool \(True = attend\), got float64"),
    ("softmax mask not broadcastable", lambda m: m.masked_softmax_forward(
        np.zeros((B, TQ, TK)), mask=np.ones((2, 1, TK), bool)), ValueError,
     re.escape(f"mask: shape (2, 1, {TK}) does not broadcast to the weights' shape like the "
               f"scores = {(B, TQ, TK)}")),
    ("scores pair scale with additive", lambda m: m.attention_scores_forward(
        np.zeros((B, TQ, D)), np.zeros((B, TK, D)), score="additive",
        params=inputs("steps", "additive")["params"], scale=1.0), ValueError,
     r"scale: the 'additive' score takes no scale"),
]

# the cases that call a composing pair, not attention_forward: once per module
PAIR_OPTIONS = {"softmax mask float", "softmax mask not broadcastable",
                "scores pair scale with additive"}


@pytest.mark.parametrize(("backend", "call", "exc", "message"), [
    pytest.param(b, *c[1:], id=f"{c[0]}-{b}") for c in BAD_OPTIONS for b in BACKENDS
    if has_weights(b) or c[0] not in PAIR_OPTIONS])
def test_a_bad_option_raises_a_clear_error(backend: str, call, exc, message: str) -> None:
    with pytest.raises(exc, match=message):
        call(BACKENDS[backend])


@over_backends
def test_good_option_types_are_accepted(backend: str) -> None:
    """numpy scalars for scale and causal, a read-only or non-contiguous mask and bias."""
    mask = np.ones((TQ, 2 * TK), bool)[:, ::2]
    mask.flags.writeable = False
    bias = np.asfortranarray(np.zeros((B, TQ, TK)))
    _forward(BACKENDS[backend], scale=np.float64(0.5), causal=np.True_, mask=mask, bias=bias)
    _forward(BACKENDS[backend], scale=np.float32(2.0), causal=False)
    _forward(BACKENDS[backend], scale=3)


# ---------------------------------------------------------------------------------------------
# repeatability


@over_backends
@over_layouts
@over_scores
def test_repeated_calls_are_bitwise_equal(backend: str, layout: str, score: str) -> None:
    """With lengths, a mask, a bias with -inf, causal and grouped heads: ten calls, one
    answer (the parallel kernels have no race and no order-dependent sum)."""
    a = inputs(layout, score, seed=18)
    rng = np.random.default_rng(19)
    shape = weights_shape(layout)
    mask = rng.random(shape) < 0.8
    bias = np.where(rng.random(shape) < 0.1, -np.inf, rng.standard_normal(shape))
    options = {"lengths": LENGTHS, "mask": mask, "bias": bias, "causal": layout != "single",
               "scale": None if score == "additive" else 0.7}
    first = run(backend, score, a, **options)
    for i in range(9):
        assert_same(run(backend, score, a, **options), first, f"call {i + 2}")


@over_backends
@pytest.mark.parametrize("layout", ["single", "steps"])
@pytest.mark.parametrize("score", ["dot", "additive"])
def test_threaded_cores_are_bitwise_repeatable_on_a_wide_batch(backend: str, layout: str,
                                                                 score: str) -> None:
    """64 batch rows (the single-query and additive kernels split rows across threads), a
    mask and lengths: five calls, one answer."""
    rng = np.random.default_rng(20)
    b, tq, tk, d = 64, 2, 9, 6
    lead = (b,) if layout == "single" else (b, tq)
    q, k = rng.standard_normal((*lead, d)), rng.standard_normal((b, tk, d))
    params = None
    if score == "additive":
        params = {"W_query": rng.standard_normal((A, d)), "W_key": rng.standard_normal((A, d)),
                  "v": rng.standard_normal(A)}
    mask = rng.random((*lead, tk)) < 0.8
    lengths = rng.integers(1, tk + 1, b)
    dc = rng.standard_normal((*lead, d))
    mod = BACKENDS[backend]

    def once():
        context, weights, cache = mod.attention_forward(q, k, k, score=score, params=params,
                                                        lengths=lengths, mask=mask)
        d_q, d_kv, _, d_p = mod.attention_backward(dc, cache, sum_kv=True)
        assert (weights is None) != has_weights(backend)
        return [context, *([weights] if has_weights(backend) else []), d_q, d_kv,
                *d_p.values()]

    first = once()
    for i in range(4):
        for j, (x, y) in enumerate(zip(once(), first, strict=True)):
            np.testing.assert_array_equal(x, y, err_msg=f"output {j}, call {i + 2}")


@over_backends
@pytest.mark.parametrize("score", ["dot", "general", "additive"])
@pytest.mark.parametrize("single", [True, False], ids=["one-query", "many-queries"])
def test_a_query_that_sees_no_key_is_not_data(backend: str, score: str, single: bool) -> None:
    """NaN in a query row the mask hides every key from changes nothing, bit for bit, not even
    the score's weight gradients (general's d_W = q^T d_q' reads every query row)."""
    mod = BACKENDS[backend]
    rng = np.random.default_rng(11)
    B, Tq, Tk, H, A = 3, 2, 5, 4, 3
    q = rng.standard_normal((B, H) if single else (B, Tq, H))
    k = rng.standard_normal((B, Tk, H))
    params = {"general": {"W": rng.standard_normal((H, H))}, "dot": None,
              "additive": {"W_query": rng.standard_normal((A, H)),
                           "W_key": rng.standard_normal((A, H)), "v": rng.standard_normal(A)}}
    mask = np.ones((*q.shape[:-1], Tk), bool)
    mask[1] = False  # row 1 (every query of it) sees no key
    results = []
    for fill in (0.0, np.nan):
        qq = q.copy()
        qq[1] = fill
        context, weights, cache = mod.attention_forward(qq, k, k, score=score,
                                                        params=params[score], mask=mask)
        d_q, d_k, d_v, d_p = mod.attention_backward(np.ones_like(context), cache)
        assert (weights is None) != has_weights(backend)
        results.append([context, *([weights] if has_weights(backend) else []), d_q, d_k, d_v,
                        *d_p.values()])
    for got, want in zip(*results, strict=True):
        np.testing.assert_array_equal(got, want)


@over_backends
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["single", "steps", "heads"])
def test_huge_finite_scores_give_finite_weights(backend: str, dtype, layout: str) -> None:
    """Scores near 1e10 (float32) or 1e19 (float64), scaled: the weights are a finite one-hot,
    as numpy_ref's (exp of the scaled score minus a max formed from other roundings would
    be exp(+-ulp(max)) = exp(+-1024) there), and the context is finite and numpy_ref's (the
    one the no-weights variants are held to)."""
    rng = np.random.default_rng(12)
    magnitude = 1e10 if dtype == np.float32 else 1e19
    lead = {"single": (2,), "steps": (2, 3), "heads": (2, 3, 4)}[layout]
    kv_lead = (2, 3) if layout == "heads" else (2,)
    q = rng.standard_normal((*lead, 8)).astype(dtype)
    k = (rng.standard_normal((*kv_lead, 5, 8)) * magnitude).astype(dtype)
    v = rng.standard_normal((*kv_lead, 5, 8)).astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        want_c, want, _ = numpy_ref.attention_forward(q, k, v, score="scaled_dot")
        got_c, got, _ = BACKENDS[backend].attention_forward(q, k, v, score="scaled_dot")
    if has_weights(backend):
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, want)
    assert np.isfinite(got_c).all(), "context"
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got_c, want_c, rtol=tol, atol=tol, err_msg="context")


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("shift", [1e12, 1e14])
def test_kernels_gradients_under_a_large_bias_are_numpy_refs(shift: float,
                                                             need_weights: bool) -> None:
    """A large bias per row (the fused single-query backward must use the forward's weights:
    recomputed under fast-math, exp((q.k s + bias) - m) drifted from them by 2e-5 at 1e12 and
    0.4 at 1e16) gives numpy_ref's gradients; without the weights too, where the backward
    has only the forward's statistics to recompute them from."""
    rng = np.random.default_rng(13)
    q, k = rng.standard_normal((3, 4)), rng.standard_normal((3, 6, 4))
    bias = shift + rng.standard_normal((3, 6))
    dc = rng.standard_normal((3, 4))
    want = numpy_ref.attention_backward(dc, numpy_ref.attention_forward(q, k, k, bias=bias)[2])
    got = kernels.attention_backward(dc, kernels.attention_forward(
        q, k, k, bias=bias, need_weights=need_weights)[2])
    for name, g, w in zip(("d_query", "d_keys", "d_values"), got, want, strict=False):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * np.abs(w).max(), err_msg=name)
    np.testing.assert_allclose(got[3]["bias"], want[3]["bias"], rtol=1e-9, atol=1e-12)


@over_backends
def test_gradient_buffers_that_overlap_are_refused(backend: str) -> None:
    """out buffers may not alias the forward's inputs, the cotangents, or each other: a kernel
    reads those while it writes the buffers."""
    mod = BACKENDS[backend]
    rng = np.random.default_rng(14)
    q, kv, dc = rng.standard_normal((3, 4)), rng.standard_normal((3, 6, 4)), np.ones((3, 4))
    cache = mod.attention_forward(q, kv, kv)[2]
    b = np.empty_like(kv)
    for out, message in [((q, None, None), r"out\[0\] \(d_query\): overlaps the memory of query"),
                         ((dc, None, None), r"overlaps the memory of d_context"),
                         ((None, b, b), r"out\[1\] \(d_keys\): overlaps the memory of out\[2\]"),
                         ((None, kv, None), r"overlaps the memory of keys")]:
        with pytest.raises(ValueError, match=message):
            mod.attention_backward(dc, cache, out=out)
