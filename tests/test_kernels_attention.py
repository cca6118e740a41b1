"""What the kernels must do beyond matching numpy_ref through the public API.

The public `kernels.attention_*` functions run through every parity, property and bad-input
test of test_attention.py and test_attention_bad_input.py (parametrized by backend). Here:
the single-query cores on their own (called directly, on awkward sizes), bitwise determinism,
and cores (the single-query and the flash ones) that stay in bounds whatever lengths they are
handed. Everything here also runs
with NUMBA_DISABLE_JIT=1, which executes the kernels' Python source line by line (CI does
that run).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_attention import Case, check_case

import kernels
import numpy_ref
from kernels import attention_flash as kaf
from kernels import attention_single as ka
from kernels import softmax as ksm
from numpy_ref.testing import assert_allclose_named, assert_close_policy

JIT_OFF = bool(numba.config.DISABLE_JIT)


def run_core(q, k, v, lengths, dc, dW=None, scale=1.0):
    """The single-query cores, forward then backward, on contiguous inputs.

    The gradient outputs start as NaN: every entry, padding included, must be written.
    """
    B, T, _ = k.shape
    dtype = q.dtype
    context64, context = np.empty((B, v.shape[2])), np.empty((B, v.shape[2]), dtype)
    weights, stats = np.empty((B, T), dtype), np.empty((B, 2))
    scale = dtype.type(scale)
    visible = np.broadcast_to(np.True_, (B, T))  # what the wrapper passes without a mask
    bias = np.broadcast_to(dtype.type(0), (B, T))
    no_cap = dtype.type(0)  # softcap 0: none
    ka._single_forward(q, k, v, lengths, False, visible, bias, scale, no_cap, context64, context,
                       weights, stats, True)
    d_q, d_k, d_v = (np.full_like(a, np.nan) for a in (q, k, v))
    dW = np.zeros((0, 0), dtype) if dW is None else dW
    ka._single_backward(q, k, v, lengths, False, visible, bias, scale, no_cap, stats, context64,
                        dc.astype(np.float64), dW, weights, True, False, d_q, d_k, d_v,
                        np.empty((0, 0), dtype))
    return {"context": context, "weights": weights, "d_query": d_q, "d_keys": d_k,
            "d_values": d_v}


def reference(q, k, v, lengths, dc, dW=None, scale_dot=False):
    context, weights, cache = numpy_ref.attention_forward(
        q, k, v, score="scaled_dot" if scale_dot else "dot", lengths=lengths)
    d_q, d_k, d_v, _ = numpy_ref.attention_backward(dc, cache, d_weights=dW)
    return {"context": context, "weights": weights, "d_query": d_q, "d_keys": d_k,
            "d_values": d_v}


def single_inputs(B: int, T: int, H: int, Hv: int, seed: int, dtype, keys_is_values: bool):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, T, H)).astype(dtype)
    v = k if keys_is_values else rng.standard_normal((B, T, Hv)).astype(dtype)
    q = rng.standard_normal((B, H)).astype(dtype)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    dc = rng.standard_normal((B, v.shape[2])).astype(dtype)
    dW = rng.standard_normal((B, T)).astype(dtype)
    return q, k, v, lengths, dc, dW


# (2, 2 * ka._BLOCK + 37, ...): three blocks of keys, so the running max is rescaled across them
AWKWARD = [(1, 1, 1, 1), (3, 7, 5, 2), (2, 97, 59, 59), (5, 59, 7, 97), (4, 6, 1, 3),
           (2, 2 * ka._BLOCK + 37, 9, 4)]


@pytest.mark.parametrize("with_dw", [False, True], ids=["dc", "dc+dw"])
@pytest.mark.parametrize("keys_is_values", [False, True], ids=["values", "keys-is-values"])
@pytest.mark.parametrize("size", AWKWARD, ids=[f"B{b}-T{t}-H{h}-Hv{v}" for b, t, h, v in AWKWARD])
def test_kernels_single_query_cores_match_numpy_ref_float64(size, keys_is_values,
                                                            with_dw) -> None:
    B, T, H, Hv = size
    q, k, v, lengths, dc, dW = single_inputs(B, T, H, Hv, 0, np.float64, keys_is_values)
    dW = dW if with_dw else None
    got = run_core(q, k, v, lengths, dc, dW, scale=1 / np.sqrt(H))
    want = reference(q, k, v, lengths, dc, dW, scale_dot=True)
    for name in want:
        assert_close_policy(name, got[name], want[name], grad=name.startswith("d_"))


@pytest.mark.parametrize("size", AWKWARD, ids=[f"B{b}-T{t}-H{h}-Hv{v}" for b, t, h, v in AWKWARD])
def test_kernels_single_query_cores_float32_as_accurate_as_numpy_ref(size) -> None:
    """The cores sum in another order than numpy_ref; they must be as close to float64."""
    B, T, H, Hv = size
    q, k, v, lengths, dc, dW = single_inputs(B, T, H, Hv, 1, np.float32, False)
    want = reference(*(a.astype(np.float64) for a in (q, k, v)), lengths,
                     dc.astype(np.float64), dW.astype(np.float64))
    numpy32 = reference(q, k, v, lengths, dc, dW)
    got = run_core(q, k, v, lengths, dc, dW)
    for name in want:
        assert_close_policy(name, got[name], want[name], torch32=numpy32[name],
                            grad=name.startswith("d_"))


AWKWARD_CASES = [
    Case("dot", True, True, True, B=3, Tq=1, Tk=97, Hq=59, Hk=59, Hv=59, A=0,
         lengths=(97, 1, 50), seed=21),
    Case("general", True, False, False, B=7, Tq=1, Tk=59, Hq=7, Hk=97, Hv=1, A=0,
         lengths=None, seed=22),
    Case("scaled_dot", False, True, True, B=2, Tq=59, Tk=97, Hq=7, Hk=7, Hv=7, A=0,
         lengths=(3, 97), seed=23),
    Case("additive", False, False, True, B=2, Tq=7, Tk=59, Hq=5, Hk=3, Hv=97, A=59,
         lengths=(59, 2), seed=24),
]


@pytest.mark.parametrize("backend", ["kernels", "kernels-no-weights"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", AWKWARD_CASES, ids=[c.score for c in AWKWARD_CASES])
def test_kernels_awkward_sizes_match_torch(case: Case, dtype, backend: str) -> None:
    """With the weights and without (need_weights=False: no cotangent on the weights)."""
    check_case(case, dtype, backend=backend)


@given(B=st.integers(1, 5), Tq=st.integers(1, 4), Tk=st.integers(1, 9),
       seed=st.integers(0, 2**32 - 1), use_lengths=st.booleans(), squeeze=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_kernels_masked_softmax_matches_numpy_ref(B, Tq, Tk, seed, use_lengths, squeeze,
                                                  dtype) -> None:
    rng = np.random.default_rng(seed)
    shape = (B, Tk) if squeeze else (B, Tq, Tk)
    scores = (rng.standard_normal(shape) * 5).astype(dtype)
    dw = rng.standard_normal(shape).astype(dtype)
    lengths = rng.integers(1, Tk + 1, B) if use_lengths else None
    w, cache = kernels.masked_softmax_forward(scores, lengths)
    w_ref, cache_ref = numpy_ref.masked_softmax_forward(scores, lengths)
    ds = kernels.masked_softmax_backward(dw, cache)
    ds_ref = numpy_ref.masked_softmax_backward(dw, cache_ref)
    assert w.dtype == ds.dtype == dtype and w.shape == ds.shape == shape
    tol = 1e-13 if dtype == np.float64 else 2e-6
    assert_allclose_named("weights", w, w_ref, rtol=tol, atol=tol)
    assert_allclose_named("d_scores", ds, ds_ref, rtol=tol, atol=tol * np.abs(dw).max())
    np.testing.assert_array_equal(w == 0, w_ref == 0)  # the same exact zeros


def _determinism_inputs(score: str, single: bool):
    B, Tq, Tk, H = (4, 3, 9, 5) if JIT_OFF else (64, 16, 128, 64)
    rng = np.random.default_rng(30)
    q = rng.standard_normal((B, H) if single else (B, Tq, H)).astype(np.float32)
    k = rng.standard_normal((B, Tk, H)).astype(np.float32)
    params = None
    if score == "general":
        params = {"W": rng.standard_normal((H, H)).astype(np.float32)}
    elif score == "additive":
        params = {"W_query": rng.standard_normal((7, H)).astype(np.float32),
                  "W_key": rng.standard_normal((7, H)).astype(np.float32),
                  "v": rng.standard_normal(7).astype(np.float32)}
    lengths = rng.integers(1, Tk + 1, B)
    dc_shape = (B, H) if single else (B, Tq, H)
    return q, k, params, lengths, rng.standard_normal(dc_shape).astype(np.float32)


@pytest.mark.parametrize(("score", "single"), [("dot", True), ("general", True),
                                               ("scaled_dot", False), ("additive", False),
                                               ("additive", True)])
def test_kernels_are_bitwise_deterministic_over_20_calls(score: str, single: bool) -> None:
    q, k, params, lengths, dc = _determinism_inputs(score, single)

    def once():
        context, weights, cache = kernels.attention_forward(q, k, k, score=score,
                                                            params=params, lengths=lengths)
        d_q, d_k, d_v, d_p = kernels.attention_backward(dc, cache)
        return [context, weights, d_q, d_k, d_v, *d_p.values()]

    first = once()
    for _ in range(19):
        for i, (a, b) in enumerate(zip(first, once(), strict=True)):
            np.testing.assert_array_equal(a, b, err_msg=f"output {i} changed between calls")


@pytest.mark.parametrize("bad", [0, -5, 10**6], ids=["zero", "negative", "huge"])
def test_kernels_cores_clamp_lengths_instead_of_leaving_bounds(bad: int) -> None:
    """Called directly (past the validating wrapper), a core clamps lengths into 1..T."""
    q, k, v, _, dc, _ = single_inputs(3, 8, 4, 4, 2, np.float64, True)
    bad_lengths = np.array([bad, 3, bad])
    clamped = np.clip(bad_lengths, 1, 8)
    got = run_core(q, k, v, bad_lengths, dc)
    want = run_core(q, k, v, clamped, dc)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    s = np.ones((3, 1, 2, 8))
    stats = np.empty((3, 1, 2, 2))
    ksm._softmax_rows(s, bad_lengths, False, np.broadcast_to(np.True_, s.shape), stats)
    np.testing.assert_allclose(s.sum(axis=-1), 1.0)


def run_flash(q, k, v, lengths, dc, *, causal: bool, with_weights: bool, R: int = 4,
              C: int = 4, splits: int = 1) -> dict[str, np.ndarray]:
    """The flash cores, forward then backward, called directly as the wrapper calls them for
    one head ([B, 1, Tq, D]), the dot score, scale 1, no mask or bias; blocks of R rows and C
    keys, the backward's keys in `splits` ranges (1 with weights). Every output starts as NaN:
    every entry must be written."""
    B, _, Tq, D = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    dtype = q.dtype
    shape = (B, 1, Tq, Tk)
    visible = np.broadcast_to(np.True_, shape)
    bias = np.broadcast_to(dtype.type(0), shape)
    u = np.empty(0, dtype)
    context = np.full((B, 1, Tq, Dv), np.nan, dtype)
    context64, stats = np.full((B, 1, Tq, Dv), np.nan), np.full((B, 1, Tq, 2), np.nan)
    weights = np.full(shape, np.nan, dtype) if with_weights else np.empty((0, 0, 0, 0), dtype)
    no_cap = dtype.type(0)  # softcap 0: none
    kaf._flash_forward(q, k, v, Tq, lengths, causal, False, visible, False, bias, no_cap, False,
                       u, R, C, with_weights, context, context64, weights, stats)
    d_q, d_k, d_v = (np.full_like(x, np.nan) for x in (q, k, v))
    d_q_parts = (np.full((splits, B, 1, Tq, D), np.nan, dtype) if splits > 1
                 else np.empty((0, 0, 0, 0, 0), dtype))
    delta = (np.empty((0, 0, 0)) if with_weights else
             np.einsum("bhix,bhix->bhi", context64, dc.astype(np.float64)))
    kaf._flash_backward(q, k, v, Tq, lengths, causal, False, visible, False, bias, no_cap, False,
                        u, R, C, splits, with_weights, weights, np.empty((0, 0, 0, 0), dtype),
                        stats, delta, dc, d_q, d_q_parts, d_k, d_v, np.empty((0, 0)),
                        np.zeros((0, 0, 0, 0), dtype))
    if splits > 1:
        d_q = d_q_parts.sum(axis=0)
    out = {"context": context, "stats": stats, "d_query": d_q, "d_keys": d_k, "d_values": d_v}
    if with_weights:
        out["weights"] = weights
    return out


@pytest.mark.parametrize("with_weights", [False, True], ids=["no-weights", "weights"])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("bad", [0, -5, 10**6], ids=["zero", "negative", "huge"])
def test_kernels_flash_cores_clamp_lengths_instead_of_leaving_bounds(bad: int, causal: bool,
                                                                     with_weights: bool) -> None:
    """Called directly (past the validating wrapper), the flash cores clamp lengths into 1..Tk:
    the results of the clamped lengths, every entry written, with blocks of 4 rows and 4 keys
    (9 keys make 3 blocks) and, without weights, the backward's keys in 3 splits; and those
    are numpy_ref's (so the direct call is the wrapper's)."""
    rng = np.random.default_rng(3)
    B, Tq, Tk, D, Dv = 3, 5, 9, 4, 3
    q, k = rng.standard_normal((B, 1, Tq, D)), rng.standard_normal((B, 1, Tk, D))
    v, dc = rng.standard_normal((B, 1, Tk, Dv)), rng.standard_normal((B, 1, Tq, Dv))
    bad_lengths = np.array([bad, 6, bad])
    options = {"causal": causal, "with_weights": with_weights,
               "splits": 1 if with_weights else 3}
    got = run_flash(q, k, v, bad_lengths, dc, **options)
    want = run_flash(q, k, v, np.clip(bad_lengths, 1, Tk), dc, **options)
    for name in want:
        assert not np.isnan(want[name]).any(), f"{name}: an entry left unwritten"
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    context, weights, cache = numpy_ref.attention_forward(
        q[:, 0], k[:, 0], v[:, 0], lengths=np.clip(bad_lengths, 1, Tk), causal=causal)
    reference = dict(zip(["d_query", "d_keys", "d_values"],
                         numpy_ref.attention_backward(dc[:, 0], cache)[:3], strict=True),
                     context=context, weights=weights)
    for name in [n for n in want if n != "stats"]:
        assert_close_policy(f"{name} (vs numpy_ref)", want[name][:, 0], reference[name],
                            grad=name.startswith("d_"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n", [1, 2, 7, 16, 17, 59, 97, 256])
def test_kernels_max_prefix_is_the_float_max(n: int, dtype) -> None:
    """`max_prefix` (the softmax's max, taken over the floats' bits as integers) equals
    np.max on the prefix, for finite values of both signs, subnormals, infinities, NaN of
    either sign, and signed zeros; it reads nothing past row[n - 1]."""
    from kernels._util import max_prefix

    max_jit = numba.njit(lambda row, n: max_prefix(row, n))
    rng = np.random.default_rng(n)
    row = (rng.standard_normal(n + 3) * 10.0 ** rng.integers(-30, 30, n + 3)).astype(dtype)
    row[n:] = np.inf  # beyond the prefix: must not be read
    tiny = np.finfo(dtype).smallest_subnormal
    cases = {"mixed": row, "negative": -np.abs(row),
             "subnormal": (rng.integers(-3, 4, n + 3) * tiny).astype(dtype)}
    negative_nan = -np.abs(np.array(np.nan, dtype))  # sign bit set, as x86's inf - inf gives
    assert np.isnan(negative_nan) and np.signbit(negative_nan)
    for name, special in [("inf", np.inf), ("-inf", -np.inf), ("nan", np.nan),
                          ("-nan", negative_nan)]:
        r = -np.abs(row)
        r[rng.integers(0, n)] = special
        cases[name] = r
    cases["all -inf"] = np.full(n + 3, -np.inf, dtype)
    for name, r in cases.items():
        r[n:] = np.inf
        want = np.max(r[:n])
        for got in (max_prefix(r, n), max_jit(r, n)):
            np.testing.assert_equal(got, want, err_msg=name)
    zeros = np.array([-0.0] * n + [np.inf], dtype)
    assert np.signbit(max_jit(zeros, n)) and np.signbit(max_prefix(zeros, n))
    zeros[n - 1] = 0.0
    assert not np.signbit(max_jit(zeros, n)) and not np.signbit(max_prefix(zeros, n))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_kernels_single_query_extreme_scores_match_numpy_ref(dtype) -> None:
    """Scores the online softmax must not mishandle: a first block (or more) of -inf scores
    (the running max starts at -inf), and scores so large that m + log(sum) rounds to m
    (the weights are kept as exp((s - m) - log sum), not exp(s - lse))."""
    B, T, H = 2, 2 * ka._BLOCK + 5, 4
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((B, T, H)).astype(dtype)
    keys[0, :ka._BLOCK + 3] = -np.inf  # row 0: the first block and three more keys are -inf
    keys[1, : ka._BLOCK] = -np.inf
    q = np.ones((B, H), dtype)
    lengths = np.array([T, ka._BLOCK + 2])
    values = rng.standard_normal((B, T, 3)).astype(dtype)
    want_c, want_w, _ = numpy_ref.attention_forward(q, keys, values, lengths=lengths)
    got_c, got_w, _ = kernels.attention_forward(q, keys, values, lengths=lengths)
    assert np.all(np.isfinite(want_c)) and np.all(got_w[:, :ka._BLOCK] == 0)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(got_c, want_c, rtol=tol, atol=tol)
    np.testing.assert_allclose(got_w, want_w, rtol=tol, atol=tol)

    big = dtype(1e15 if dtype == np.float32 else 1e100)  # scores ~ big**2: 1e30, 1e200
    keys = np.full((B, 3, H), big, dtype)
    keys[:, 2] = big / 2  # weights (1/2, 1/2, 0) up to exp(-huge)
    keys[1, 1] = big * dtype(0.999)
    values = rng.standard_normal((B, 3, 5)).astype(dtype)
    q = np.full((B, H), big, dtype)
    dc = rng.standard_normal((B, 5)).astype(dtype)
    ref = numpy_ref.attention_forward(q, keys, values)
    ours = kernels.attention_forward(q, keys, values)
    np.testing.assert_array_equal(ours[1][0], [0.5, 0.5, 0.0])
    for name, got, want in zip(["context", "weights"], ours[:2], ref[:2], strict=True):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)
    got = dict(zip(["d_query", "d_keys", "d_values"], kernels.attention_backward(dc, ours[2])[:3],
                   strict=True))
    want = dict(zip(got, numpy_ref.attention_backward(dc, ref[2])[:3], strict=True))
    # d_query = sum_j ds_j k_j cancels exactly between the tied keys (ds_0 = -ds_1, k_0 = k_1):
    # what is left is rounding, measured against the terms ds_j k_j (= d_keys here, q = k_j)
    scales = {name: np.abs(want[name]).max() for name in want}
    scales["d_query"] = scales["d_keys"]
    for name in want:
        np.testing.assert_allclose(got[name] / scales[name], want[name] / scales[name], rtol=0,
                                   atol=tol, err_msg=name)
