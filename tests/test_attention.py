"""numpy_ref's attention against torch written from the formulas, and against itself.

The torch reference below is the math of the module docstring spelled in torch ops: scores by
``bmm`` (or the additive tanh), a masked softmax (``masked_fill`` with a real -inf, then
``torch.softmax``), and the context by ``bmm``. Gradients are taken with
``torch.autograd.grad(outputs, inputs, grad_outputs)`` under random cotangents on the context
and, when the case says so, on the weights. When keys is values (the seed's call), torch runs
twice: once with ONE leaf tensor used as both, whose gradient must be our d_keys + d_values, and
once with two distinct leaves holding equal data, compared with d_keys and d_values apiece.

The discrete axes (score, one query or many, lengths, keys is values, d_weights) are
parametrized so that every combination runs; hypothesis draws the sizes and a seed, and the
arrays come from ``numpy.random.default_rng(seed)``.

Every test of `attention_forward` / `attention_backward` runs on each backend and again on
each without the weights (``numpy_ref-no-weights``, ``kernels-no-weights``: need_weights=False,
the backward without d_weights, and a torch reference without a cotangent on the weights);
what a test asserts about the weights applies to the variants that have them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from backends import ATTENTION_BACKENDS, has_weights
from backends import BACKENDS as MODULES
from error_report import record
from hypothesis import given
from hypothesis import strategies as st

import kernels.attention
import numpy_ref as ref
import numpy_ref.attention
from numpy_ref.attention import (
    SCORES,
    attention_forward,
    masked_softmax_backward,
    masked_softmax_forward,
)
from numpy_ref.testing import assert_allclose_named, assert_close_policy
from torch_impl import reference as torch_reference

# Every implementation of the attention API, and each without the weights (need_weights=False
# as its forward's default); tests parametrized by `backend` hold each to the same comparisons
# (kernels must match numpy_ref's signatures, checks and results).
BACKENDS = ATTENTION_BACKENDS
over_backends = pytest.mark.parametrize("backend", list(BACKENDS))


class Case(NamedTuple):
    score: str
    single: bool  # query [B, Hq] instead of [B, Tq, Hq]
    keys_is_values: bool  # values is the keys array object itself (so Hv == Hk)
    with_d_weights: bool  # a cotangent on the weights as well as on the context
    B: int
    Tq: int  # 1 when single
    Tk: int
    Hq: int
    Hk: int  # == Hq for dot and scaled_dot
    Hv: int  # == Hk when keys_is_values
    A: int  # additive width; 0 for the other scores
    lengths: tuple[int, ...] | None
    seed: int
    additive_bias: bool = True  # the additive score's optional b [A] (inside the tanh)


SIZES = st.sampled_from([1, 2, 3, 5, 7, 8])
BOOLS = [False, True]


@st.composite
def attention_cases(draw, score=None, single=None, keys_is_values=None, with_lengths=None,
                    with_d_weights=None) -> Case:
    """Sizes and a seed for one case; a discrete axis left as None is drawn too."""

    def axis(value):
        return draw(st.booleans()) if value is None else value

    score = draw(st.sampled_from(SCORES)) if score is None else score
    single, keys_is_values = axis(single), axis(keys_is_values)
    with_lengths, with_d_weights = axis(with_lengths), axis(with_d_weights)
    B, Tk = draw(st.integers(1, 5)), draw(st.integers(1, 9))
    Tq = 1 if single else draw(st.integers(1, 6))
    Hq, Hk, Hv = draw(SIZES), draw(SIZES), draw(SIZES)
    Hk = Hq if score in ("dot", "scaled_dot") else Hk
    Hv = Hk if keys_is_values else Hv
    A = draw(SIZES) if score == "additive" else 0
    lengths = None
    if with_lengths:  # unsorted; Tk itself drawn often
        one = st.one_of(st.just(Tk), st.integers(1, Tk))
        lengths = tuple(draw(st.lists(one, min_size=B, max_size=B)))
    return Case(score, single, keys_is_values, with_d_weights, B, Tq, Tk, Hq, Hk, Hv, A,
                lengths, draw(st.integers(0, 2**32 - 1)), draw(st.booleans()))


def _nonzero(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """Random signs times magnitudes in [0.25, 1.25], scaled by 1/sqrt(fan_in): never 0."""
    sign = rng.choice([-1.0, 1.0], size=shape)
    return sign * rng.uniform(0.25, 1.25, size=shape) / math.sqrt(fan_in)


def make_arrays(case: Case) -> dict:
    """float64 inputs, params and cotangents for a case (values IS keys when keys_is_values)."""
    rng = np.random.default_rng(case.seed)
    rows = (case.B,) if case.single else (case.B, case.Tq)
    keys = rng.standard_normal((case.B, case.Tk, case.Hk))
    params = {}
    if case.score == "general":
        params = {"W": _nonzero(rng, (case.Hq, case.Hk), case.Hq)}
    elif case.score == "additive":
        params = {"W_query": _nonzero(rng, (case.A, case.Hq), case.Hq),
                  "W_key": _nonzero(rng, (case.A, case.Hk), case.Hk),
                  "v": _nonzero(rng, (case.A,), 1) * 2.0}
        if case.additive_bias:
            params["b"] = _nonzero(rng, (case.A,), 1)
    return {
        "query": rng.standard_normal((*rows, case.Hq)),
        "keys": keys,
        "values": keys if case.keys_is_values else rng.standard_normal((case.B, case.Tk,
                                                                         case.Hv)),
        "params": params,
        "d_context": rng.standard_normal((*rows, case.Hv)),
        "d_weights": rng.standard_normal((*rows, case.Tk)) if case.with_d_weights else None,
    }


def cast(a: dict, dtype) -> dict:
    """Every array of `a` cast to dtype; keys-is-values stays one array object."""
    out = {k: None if v is None else v.astype(dtype) for k, v in a.items() if k != "params"}
    out["params"] = {k: v.astype(dtype) for k, v in a["params"].items()}
    if a["values"] is a["keys"]:
        out["values"] = out["keys"]
    return out


def _lengths(case: Case) -> np.ndarray | None:
    return None if case.lengths is None else np.array(case.lengths)


def without_d_weights(case: Case, backend: str) -> Case:
    """The case as a backend variant runs it: no cotangent on the weights without them."""
    return case if has_weights(backend) else case._replace(with_d_weights=False)


def run_ours(case: Case, a: dict, backend: str = "numpy_ref") -> dict[str, np.ndarray]:
    """Our forward and backward; named like `run_torch` (plus d_keys+d_values when shared).
    A no-weights variant runs need_weights=False and the backward without d_weights (a
    cotangent in `a` is not used); its result has no "weights"."""
    mod, need_weights = BACKENDS[backend], has_weights(backend)
    context, weights, cache = mod.attention_forward(a["query"], a["keys"], a["values"],
                                                    score=case.score,
                                                    params=a["params"] or None,
                                                    lengths=_lengths(case),
                                                    need_weights=need_weights)
    assert (weights is None) != need_weights, f"weights {type(weights).__name__}"
    d_query, d_keys, d_values, d_params = mod.attention_backward(
        a["d_context"], cache, d_weights=a["d_weights"] if need_weights else None)
    res = {"context": context, "weights": weights, "d_query": d_query, "d_keys": d_keys,
           "d_values": d_values}
    if not need_weights:
        del res["weights"]
    res.update({f"d_params[{k!r}]": v for k, v in d_params.items()})
    if a["values"] is a["keys"]:
        res["d_keys+d_values"] = d_keys + d_values
    return res


def run_torch(case: Case, a: dict, device: str = "cpu", *, shared: bool = False
              ) -> dict[str, np.ndarray]:
    """torch forward and autograd backward in the dtype of the arrays in `a`.

    shared=True (only when values is keys): ONE leaf tensor is passed as keys and values, and
    its gradient is returned as ``d_keys+d_values``. Otherwise keys and values are distinct
    leaves, even when they hold equal data.
    """
    def leaf(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x, device=device, requires_grad=True)

    query, keys = leaf(a["query"]), leaf(a["keys"])
    if shared:
        assert a["values"] is a["keys"]
        values = keys
        leaves = {"d_query": query, "d_keys+d_values": keys}
    else:
        values = leaf(a["values"])
        leaves = {"d_query": query, "d_keys": keys, "d_values": values}
    params = {k: leaf(v) for k, v in a["params"].items()}
    leaves.update({f"d_params[{k!r}]": p for k, p in params.items()})
    lengths = None if case.lengths is None else torch.tensor(case.lengths, device=device)
    context, weights = torch_reference.attention(query, keys, values, score=case.score,
                                           params=params, lengths=lengths)
    outputs, cotangents = [context], [torch.tensor(a["d_context"], device=device)]
    if a["d_weights"] is not None:
        outputs.append(weights)
        cotangents.append(torch.tensor(a["d_weights"], device=device))
    grads = torch.autograd.grad(outputs, list(leaves.values()), cotangents)
    res = {"context": context, "weights": weights, **dict(zip(leaves, grads, strict=True))}
    return {k: v.detach().cpu().numpy() for k, v in res.items()}


def softmax_vjp_cancellation(weights: np.ndarray, a64: dict) -> float:
    """max|w dw| / max|ds| for the case's softmax VJP ds = w (dw - sum_j w_j dw_j), in float64
    (dw = dc . v_j, plus the weights' cotangent): how far ds cancels below its terms. 1 when
    ds is exactly 0 (one key) or cancels less than that."""
    w = weights if weights.ndim == 3 else weights[:, None, :]  # [B, Tq, Tk]
    dc = a64["d_context"] if a64["d_context"].ndim == 3 else a64["d_context"][:, None, :]
    dw = dc @ a64["values"].transpose(0, 2, 1)
    if a64["d_weights"] is not None:
        dw = dw + a64["d_weights"].reshape(dw.shape)
    terms = np.abs(w * dw).max()
    ds = np.abs(w * (dw - np.sum(w * dw, axis=-1, keepdims=True))).max()
    return max(1.0, float(terms / ds)) if ds > 0 else 1.0


def check_case(case: Case, dtype=np.float64, device: str = "cpu",
               backend: str = "numpy_ref") -> dict[str, float]:
    """Compare numpy_ref with torch on `case` under the numerical policy; return the errors.

    The float64 reference is torch float64 on exactly our (possibly float32-rounded) inputs.
    A no-weights variant runs the case without a cotangent on the weights, torch too, and is
    compared on every result but the weights.
    """
    case = without_d_weights(case, backend)
    a = cast(make_arrays(case), dtype)
    ours = run_ours(case, a, backend)
    for name, value in ours.items():
        assert value.dtype == dtype, f"{name}: dtype {value.dtype}, expected {np.dtype(dtype)}"
    a64 = cast(a, np.float64)
    runs = [("", run_torch(case, a64),
             run_torch(case, a, device) if dtype == np.float32 else {})]
    if case.keys_is_values:
        runs.append((" (keys is values: one torch tensor)", run_torch(case, a64, shared=True),
                     run_torch(case, a, device, shared=True) if dtype == np.float32 else {}))
    errors: dict[str, float] = {}
    for label, reference, torch32 in runs:
        # Some gradients are sums that cancel to far below their terms: the additive score's
        # d_params['v'] with A = 1, or d_query with one key, exactly 0, which a kernel computing
        # delta = <c, dc> instead of sum_j w_j dw_j rounds to ~eps32 * |dw|. Their float32
        # floor is taken relative to the case's largest gradient, the size of those terms
        # (see policy.py, `scale`); the 2x/3x-torch term is unchanged.
        grad_scale = max(float(np.abs(v).max()) for k, v in reference.items()
                         if k.startswith("d_") and v.size)
        # Every gradient but d_values flows through ds = w (dw - sum_j w_j dw_j), the softmax's
        # VJP, which can cancel far below its terms w dw (one dominant key); its float32
        # rounding error, and so theirs, scales with the terms: the largest of those gradients
        # times that cancellation ratio (1 when ds does not cancel), when that exceeds the
        # case's largest gradient. Without it a two-key case failed numpy_ref itself, at
        # 16 eps32 relative error against a lucky torch one. (Not grad_scale times the ratio:
        # grad_scale may already be d_values, the size of the terms, and the product then made
        # some floors larger than the gradients they check.)
        ds_grads = [float(np.abs(v).max()) for k, v in reference.items()
                    if k.startswith("d_") and k != "d_values" and v.size]
        through_ds = max(grad_scale, softmax_vjp_cancellation(reference["weights"], a64)
                         * max(ds_grads, default=0.0))
        # Likewise the context is a weighted sum of values: its terms are as large as the
        # values, whatever the sum cancels to.
        scales = {"context": float(np.abs(a64["values"]).max())}
        for name, want in reference.items():
            if name not in ours:  # the weights, of a run without them
                continue
            grad = name.startswith("d_")
            scale = (scales.get(name) if not grad
                     else grad_scale if name == "d_values" else through_ds)
            err = assert_close_policy(name + label, ours[name], want, torch32=torch32.get(name),
                                      grad=grad, scale=scale)
            errors[name] = max(errors.get(name, 0.0), err)
    assert set(errors) == set(ours), sorted(set(errors) ^ set(ours))
    return errors


# ---------------------------------------------------------------------------------------------
# parity with torch


FLOAT64_TABLE = "attention properties (every backend), largest float64 |ours - torch| by score"



@pytest.mark.parametrize(("backend", "with_d_weights"), [  # no cotangent without weights
    pytest.param(b, dw, id=f"{'dc+dw' if dw else 'dc'}-{b}") for b in BACKENDS for dw in BOOLS
    if has_weights(b) or not dw])
@pytest.mark.parametrize("keys_is_values", BOOLS, ids=["values", "keys-is-values"])
@pytest.mark.parametrize("with_lengths", BOOLS, ids=["full", "lengths"])
@pytest.mark.parametrize("single", BOOLS, ids=["many-queries", "one-query"])
@pytest.mark.parametrize("score", SCORES)
@given(data=st.data())
def test_attention_forward_backward_matches_torch_float64(
    backend: str, score: str, single: bool, with_lengths: bool, keys_is_values: bool,
    with_d_weights: bool, data: st.DataObject,
) -> None:
    case = data.draw(attention_cases(score, single, keys_is_values, with_lengths,
                                     with_d_weights), label="case")
    errors = check_case(case, np.float64, backend=backend)
    record(FLOAT64_TABLE, score, max(errors.values()))


def run_torch_sdpa(case: Case, a: dict, device: str = "cpu") -> dict[str, np.ndarray]:
    """F.scaled_dot_product_attention on `device` in the arrays' dtype (the ``path="sdpa"``
    of `torch_reference.attention`) and its autograd gradients under d_context: {"context",
    "d_query", "d_keys", "d_values"} shaped like ours (NumPy arrays, back on the CPU). A
    scaled_dot case with distinct keys and values; the lengths become a boolean attn_mask.
    """
    q, k, v = (torch.tensor(a[n], device=device, requires_grad=True)
               for n in ("query", "keys", "values"))
    lengths = None if case.lengths is None else torch.tensor(case.lengths, device=device)
    context, _ = torch_reference.attention(q, k, v, score="scaled_dot", lengths=lengths,
                                           path="sdpa")
    grads = torch.autograd.grad(context, [q, k, v], torch.tensor(a["d_context"], device=device))
    return {name: t.detach().cpu().numpy() for name, t in
            zip(["context", "d_query", "d_keys", "d_values"], [context, *grads], strict=True)}


def check_sdpa_against_torch_on(device: str, case: Case, dtype) -> list[float]:
    """numpy_ref (on the CPU) against SDPA on `device` in dtype: float64 to the float64
    policy, float32 to rtol = atol = 1e-3 (the CPU-vs-CUDA rule, TF32 off); the errors."""
    a = cast(make_arrays(case), dtype)
    ours, theirs = run_ours(case, a), run_torch_sdpa(case, a, device)
    errors = []
    for name, want in theirs.items():
        assert ours[name].dtype == want.dtype == dtype, (name, ours[name].dtype, want.dtype)
        label = f"{name} (vs scaled_dot_product_attention)"
        if dtype == np.float64:
            errors.append(assert_close_policy(label, ours[name], want, grad=name != "context"))
        else:
            errors.append(assert_allclose_named(label, ours[name], want, rtol=1e-3, atol=1e-3))
    return errors


@pytest.mark.parametrize("with_lengths", BOOLS, ids=["full", "lengths"])
@pytest.mark.parametrize("single", BOOLS, ids=["many-queries", "one-query"])
@given(data=st.data())
def test_scaled_dot_matches_torch_scaled_dot_product_attention_float64(
    single: bool, with_lengths: bool, data: st.DataObject
) -> None:
    """torch's own fused op, mask as a boolean attn_mask with True = takes part."""
    case = data.draw(attention_cases("scaled_dot", single, False, with_lengths, False),
                     label="case")
    errors = check_sdpa_against_torch_on("cpu", case, np.float64)
    record(FLOAT64_TABLE, "scaled_dot (vs scaled_dot_product_attention)", max(errors))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_lengths", BOOLS, ids=["full", "lengths"])
@pytest.mark.parametrize("single", BOOLS, ids=["many-queries", "one-query"])
def test_scaled_dot_matches_torch_scaled_dot_product_attention_cuda(
    single: bool, with_lengths: bool, dtype
) -> None:
    """numpy_ref against SDPA's CUDA kernels (whichever torch picks for the dtype)."""
    case = Case("scaled_dot", single, False, False, B=5, Tq=1 if single else 7, Tk=23, Hq=16,
                Hk=16, Hv=9, A=0, lengths=(23, 3, 17, 23, 1) if with_lengths else None, seed=21)
    check_sdpa_against_torch_on("cuda", case, dtype)


@over_backends
@pytest.mark.parametrize("single", BOOLS, ids=["many-queries", "one-query"])
@pytest.mark.parametrize("score", SCORES)
@given(data=st.data())
def test_attention_float32_within_policy(backend: str, score: str, single: bool, device: str,
                                         data: st.DataObject) -> None:
    case = data.draw(attention_cases(score, single), label="case")
    check_case(case, np.float32, device, backend=backend)


_CUDA_CASE = dict(single=False, keys_is_values=False, with_d_weights=True, B=5, Tq=7, Tk=59,
                  Hq=17, Hk=17, Hv=33, lengths=(59, 3, 40, 59, 1), seed=3)


@over_backends
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("score", SCORES)
def test_attention_matches_torch_cuda(backend: str, score: str, dtype) -> None:
    """numpy_ref against torch on CUDA: float64 to the float64 policy, float32 to 1e-3."""
    case = Case(score=score, A=11 if score == "additive" else 0, **_CUDA_CASE)
    case = without_d_weights(case, backend)
    a = cast(make_arrays(case), dtype)
    ours, cuda = run_ours(case, a, backend), run_torch(case, a, "cuda")
    assert set(ours) | {"weights"} == set(cuda), sorted(set(ours) ^ set(cuda))
    for name, value in cuda.items():
        if name not in ours:  # the weights, of a run without them
            continue
        if dtype == np.float64:
            assert_close_policy(name, ours[name], value, grad=name.startswith("d_"))
        else:
            assert_allclose_named(name, ours[name], value, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# the seed's attention_net, replayed in torch


def seed_attention_net(lstm_output: torch.Tensor, final_state: torch.Tensor, n_hidden: int):
    """The seed's code, line for line.

    lstm_output [B, T, 2H], final_state h_n [2, B, H] -> context [B, 2H], weights [B, T].
    Correct only for B = 1: the view reads h_n's memory row by row.
    """
    hidden = final_state.view(-1, n_hidden * 2, 1)
    attn_weights = torch.bmm(lstm_output, hidden).squeeze(2)
    soft_attn_weights = F.softmax(attn_weights, 1)
    context = torch.bmm(lstm_output.transpose(1, 2), soft_attn_weights.unsqueeze(2)).squeeze(2)
    return context, soft_attn_weights


def concat_attention_net(lstm_output: torch.Tensor, final_state: torch.Tensor):
    """The seed's attention with the correct query concat(h_n[-2], h_n[-1]) [B, 2H].

    lstm_output [B, T, 2H], final_state h_n [2, B, H] -> context [B, 2H], weights [B, T].
    """
    query = torch.cat([final_state[-2], final_state[-1]], 1)  # [B, 2H]
    attn_weights = torch.bmm(lstm_output, query.unsqueeze(2)).squeeze(2)  # [B, T]
    soft_attn_weights = F.softmax(attn_weights, 1)
    context = torch.bmm(lstm_output.transpose(1, 2), soft_attn_weights.unsqueeze(2)).squeeze(2)
    return context, soft_attn_weights


def _bilstm(B: int, T: int, H: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 bidirectional LSTM run: lstm_output [B, T, 2H] (as the seed permutes it), h_n."""
    torch.manual_seed(seed)
    lstm = torch.nn.LSTM(3, H, bidirectional=True, dtype=torch.float64)
    with torch.no_grad():
        output, (h_n, _) = lstm(torch.randn(T, B, 3, dtype=torch.float64))
    return output.permute(1, 0, 2), h_n


def _ours_with_concat_query(lstm_output: torch.Tensor, h_n: torch.Tensor):
    out, h = lstm_output.numpy(), h_n.numpy()
    context, weights, _ = attention_forward(np.concatenate([h[-2], h[-1]], axis=1), out, out,
                                            score="dot")
    return context, weights


@pytest.mark.parametrize("T", [1, 6, 11])
def test_attention_dot_equals_the_seeds_attention_net_for_one_row(T: int) -> None:
    lstm_output, h_n = _bilstm(1, T, 5, seed=T)
    context, weights = _ours_with_concat_query(lstm_output, h_n)
    seed_context, seed_weights = seed_attention_net(lstm_output, h_n, 5)
    assert_close_policy("context (vs the seed)", context, seed_context.numpy())
    assert_close_policy("weights (vs the seed)", weights, seed_weights.numpy())


@pytest.mark.parametrize(("B", "T"), [(1, 4), (2, 7), (5, 3)])
def test_attention_dot_equals_the_seeds_attention_net_with_the_concat_query(B, T) -> None:
    lstm_output, h_n = _bilstm(B, T, 4, seed=10 * B + T)
    context, weights = _ours_with_concat_query(lstm_output, h_n)
    want_context, want_weights = concat_attention_net(lstm_output, h_n)
    assert_close_policy("context (vs concat query)", context, want_context.numpy())
    assert_close_policy("weights (vs concat query)", weights, want_weights.numpy())


@pytest.mark.parametrize("B", [2, 3])
def test_seed_view_query_mixes_batch_rows_when_batch_exceeds_one(B: int) -> None:
    """Regression fact: ``h_n.view(-1, 2H, 1)`` is not concat(h_n[-2], h_n[-1]) for B > 1.

    Row b of the view is h_n's flat memory [2*B*H] cut into 2H pieces: it pairs the states
    of two different (direction, row) slots, e.g. row 0 = (forward of row 0, forward of row 1).
    """
    H = 4
    lstm_output, h_n = _bilstm(B, 5, H, seed=B)
    view_query = h_n.view(-1, 2 * H, 1).squeeze(2).numpy()  # [B, 2H]
    slots = h_n.numpy().reshape(2 * B, H)  # slot d*B + b holds direction d of row b
    np.testing.assert_array_equal(view_query, slots.reshape(B, 2 * H))
    np.testing.assert_array_equal(view_query[0], np.concatenate([h_n[0, 0], h_n[0, 1]]))
    concat_query = torch.cat([h_n[-2], h_n[-1]], 1).numpy()
    assert not np.allclose(view_query[0], concat_query[0])
    seed_context, _ = seed_attention_net(lstm_output, h_n, H)
    context, _ = _ours_with_concat_query(lstm_output, h_n)
    assert not np.allclose(seed_context.numpy(), context)


def test_seed_view_query_is_the_concat_query_for_one_row() -> None:
    _, h_n = _bilstm(1, 5, 4, seed=0)
    np.testing.assert_array_equal(h_n.view(-1, 8, 1).squeeze(2).numpy(),
                                  torch.cat([h_n[-2], h_n[-1]], 1).numpy())


# ---------------------------------------------------------------------------------------------
# properties of our own, no torch involved


def _valid(case: Case) -> np.ndarray:
    """Boolean [B, Tk] (or [B, Tq, Tk]): True where the key takes part."""
    lengths = np.full(case.B, case.Tk) if case.lengths is None else np.array(case.lengths)
    valid = np.arange(case.Tk)[None, :] < lengths[:, None]
    return valid if case.single else np.broadcast_to(valid[:, None, :],
                                                     (case.B, case.Tq, case.Tk))


@over_backends
@pytest.mark.parametrize("score", SCORES)
@given(data=st.data())
def test_attention_weights_sum_to_one_and_are_exactly_zero_beyond_lengths(
    backend: str, score: str, data: st.DataObject
) -> None:
    """The weights (where there are) sum to 1 and are exact zeros past lengths; the keys and
    values there get exact-zero gradients (every variant)."""
    case = data.draw(attention_cases(score, with_lengths=True), label="case")
    got = run_ours(case, make_arrays(case), backend)
    valid = _valid(case)
    if has_weights(backend):
        np.testing.assert_allclose(got["weights"].sum(axis=-1), 1.0, rtol=0, atol=1e-13)
        assert np.all(got["weights"][~valid] == 0)
    key_masked = ~valid if case.single else ~valid[:, 0, :]  # [B, Tk]
    assert np.all(got["d_keys"][key_masked] == 0) and np.all(got["d_values"][key_masked] == 0)


@over_backends
@pytest.mark.parametrize("score", SCORES)
def test_attention_ignores_keys_and_values_beyond_lengths(backend: str, score: str) -> None:
    case = Case(score, False, False, True, B=4, Tq=3, Tk=7, Hq=3, Hk=3, Hv=5,
                A=4 if score == "additive" else 0, lengths=(7, 2, 5, 1), seed=11)
    a = make_arrays(case)
    base = run_ours(case, a, backend)
    padded = ~_valid(case)[:, 0, :]  # [B, Tk]
    noisy = dict(a, keys=a["keys"].copy(), values=a["values"].copy(),
                 d_weights=a["d_weights"].copy())
    noisy["keys"][padded] = 1e3
    noisy["values"][padded] = -7.0
    noisy["d_weights"][~_valid(case)] = 5.0
    got = run_ours(case, noisy, backend)
    for name in base:
        np.testing.assert_array_equal(got[name], base[name], err_msg=name)


@pytest.mark.parametrize("shape", [(4, 7), (3, 2, 7)], ids=["[B, Tk]", "[B, Tq, Tk]"])
@given(seed=st.integers(0, 2**32 - 1), use_lengths=st.booleans())
def test_masked_softmax_ignores_a_constant_added_to_each_row(shape, seed: int,
                                                             use_lengths: bool) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal(shape) * 3
    constants = rng.uniform(-50, 50, (*shape[:-1], 1))
    lengths = rng.integers(1, shape[-1] + 1, shape[0]) if use_lengths else None
    want, _ = masked_softmax_forward(scores, lengths)
    got, _ = masked_softmax_forward(scores + constants, lengths)
    assert_allclose_named("weights (shifted scores)", got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got == 0, want == 0)


@over_backends
@pytest.mark.parametrize("single", BOOLS, ids=["many-queries", "one-query"])
@given(data=st.data())
def test_attention_dot_ignores_a_constant_added_to_each_score_row(backend: str, single: bool,
                                                                  data: st.DataObject) -> None:
    """s' = [q, c] . [k, 1] = s + c: one more query feature c[b, i], one more key feature 1.

    Weights (where there are), context, d_values and the original columns of d_query are
    unchanged; the gradient of c is sum_j ds = 0 (the softmax VJP sums to zero).
    """
    case = data.draw(attention_cases("dot", single, False, True, True), label="case")
    a = make_arrays(case)
    base = run_ours(case, a, backend)
    rng = np.random.default_rng(case.seed + 1)
    c = rng.uniform(-20, 20, (*a["query"].shape[:-1], 1))
    shifted = dict(a, query=np.concatenate([a["query"], c], axis=-1),
                   keys=np.concatenate([a["keys"], np.ones((case.B, case.Tk, 1))], axis=-1))
    got = run_ours(case, shifted, backend)
    for name in ("weights", "context", "d_values") if has_weights(backend) else ("context",
                                                                                "d_values"):
        assert_allclose_named(f"{name} (shifted scores)", got[name], base[name], rtol=1e-10,
                              atol=1e-11)
    assert_allclose_named("d_query (shifted scores)", got["d_query"][..., :-1], base["d_query"],
                          rtol=1e-10, atol=1e-11)
    assert_allclose_named("d_keys (shifted scores)", got["d_keys"][..., :-1], base["d_keys"],
                          rtol=1e-10, atol=1e-11)
    assert_allclose_named("d_c", got["d_query"][..., -1], np.zeros(c.shape[:-1]), rtol=0,
                          atol=1e-11)


@over_backends
@pytest.mark.parametrize("score", SCORES)
@given(data=st.data())
def test_attention_permuting_keys_with_values_permutes_weights_only(backend: str, score: str,
                                                                    data: st.DataObject) -> None:
    """Permute each row's valid keys (and values, d_weights) by the same permutation.

    Weights, d_keys, d_values and d_weights follow the permutation; context, d_query and
    d_params do not change. (Without the weights, d_weights is not used.)
    """
    case = data.draw(attention_cases(score, keys_is_values=False, with_d_weights=True),
                     label="case")
    a = make_arrays(case)
    base = run_ours(case, a, backend)
    rng = np.random.default_rng(case.seed + 2)
    lengths = case.lengths or (case.Tk,) * case.B
    perm = np.stack([np.concatenate([rng.permutation(n), np.arange(n, case.Tk)])
                     for n in lengths])  # [B, Tk]; identity on the padding

    def along_keys(x: np.ndarray, axis: int) -> np.ndarray:
        index = perm.reshape(case.B, *([1] * (axis - 1)), case.Tk, *([1] * (x.ndim - axis - 1)))
        return np.take_along_axis(x, index, axis=axis)

    last = 1 if case.single else 2  # the Tk axis of weights and d_weights
    permuted = dict(a, keys=along_keys(a["keys"], 1), values=along_keys(a["values"], 1),
                    d_weights=along_keys(a["d_weights"], last))
    got = run_ours(case, permuted, backend)
    for name, want in base.items():
        if name in ("weights", "d_keys", "d_values"):
            want = along_keys(want, last if name == "weights" else 1)
        assert_allclose_named(f"{name} (permuted keys)", got[name], want, rtol=1e-12,
                              atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(3, 9), (2, 4, 9)], ids=["[B, Tk]", "[B, Tq, Tk]"])
def test_masked_softmax_is_finite_for_logits_up_to_1e4(shape, dtype) -> None:
    rng = np.random.default_rng(12)
    scores = rng.uniform(-1e4, 1e4, shape).astype(dtype)
    scores[..., 0] = 1e4  # a tie at the top
    scores[..., 1] = 1e4
    scores[..., -1] = -1e4
    lengths = np.array([9, 1, 5][: shape[0]])
    w, cache = masked_softmax_forward(scores, lengths)
    d_scores = masked_softmax_backward(rng.standard_normal(shape).astype(dtype) * 1e4, cache)
    assert w.dtype == d_scores.dtype == dtype
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(d_scores))
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=0, atol=1e-6)
    valid = np.arange(9)[None, :] < lengths[:, None]  # [B, Tk]
    valid = valid if len(shape) == 2 else valid[:, None, :]
    assert np.all(np.broadcast_to(~valid, shape) <= (w == 0))
    assert np.all(np.broadcast_to(~valid, shape) <= (d_scores == 0))


@over_backends
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("score", ["dot", "scaled_dot", "general"])
def test_attention_is_finite_for_scores_up_to_1e4(backend: str, score: str, dtype) -> None:
    case = Case(score, False, False, True, B=3, Tq=2, Tk=6, Hq=4, Hk=4, Hv=3, A=0,
                lengths=(6, 1, 4), seed=13)
    a = make_arrays(case)
    a = dict(a, query=a["query"] * 50, keys=a["keys"] * 50)  # |s| up to ~1e4
    got = run_ours(case, cast(a, dtype), backend)
    for name, value in got.items():
        assert np.all(np.isfinite(value)), name
    if has_weights(backend):
        np.testing.assert_allclose(got["weights"].sum(axis=-1), 1.0, rtol=0, atol=1e-6)


def _tiny_case(score: str, single: bool, keys_is_values: bool) -> Case:
    return Case(score, single, keys_is_values, True, B=3, Tq=1 if single else 2, Tk=4, Hq=3,
                Hk=3, Hv=3 if keys_is_values else 2, A=2 if score == "additive" else 0,
                lengths=(4, 1, 3), seed=14)


@pytest.mark.parametrize("backend", ["numpy_ref", "numpy_ref-no-weights"])
@pytest.mark.parametrize("keys_is_values", BOOLS, ids=["values", "keys-is-values"])
@pytest.mark.parametrize("single", BOOLS, ids=["many-queries", "one-query"])
@pytest.mark.parametrize("score", SCORES)
def test_attention_backward_matches_finite_differences(score: str, single: bool,
                                                       keys_is_values: bool,
                                                       backend: str) -> None:
    """numpy_ref's gradients against central differences of the loss <c, dc> (+ <w, dW> with
    the weights), the forward run as the variant runs it (blockwise without the weights)."""
    case = without_d_weights(_tiny_case(score, single, keys_is_values), backend)
    a = make_arrays(case)
    lengths = _lengths(case)
    need_weights = has_weights(backend)

    def loss() -> float:
        context, weights, _ = attention_forward(a["query"], a["keys"], a["values"], score=score,
                                                params=a["params"] or None, lengths=lengths,
                                                need_weights=need_weights)
        on_weights = np.sum(weights * a["d_weights"]) if need_weights else 0.0
        return float(np.sum(context * a["d_context"]) + on_weights)

    ours = run_ours(case, a, backend)
    inputs = {"d_query": a["query"], "d_keys": a["keys"]}
    if keys_is_values:  # perturbing keys perturbs values: the two gradients add
        inputs = {"d_query": a["query"], "d_keys+d_values": a["keys"]}
    else:
        inputs["d_values"] = a["values"]
    inputs.update({f"d_params[{k!r}]": v for k, v in a["params"].items()})
    errors = ref.gradcheck(loss, inputs, {k: ours[k] for k in inputs}, rtol=1e-6, atol=1e-8)
    assert max(errors.values()) < 1e-7


@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 5)], ids=["[B, Tk]", "[B, Tq, Tk]"])
def test_masked_softmax_backward_matches_finite_differences(shape) -> None:
    rng = np.random.default_rng(15)
    scores, g = rng.standard_normal(shape) * 2, rng.standard_normal(shape)
    lengths = np.array([5, 1, 3])

    def loss() -> float:
        return float(np.sum(masked_softmax_forward(scores, lengths)[0] * g))

    _, cache = masked_softmax_forward(scores, lengths)
    errors = ref.gradcheck(loss, {"d_scores": scores},
                           {"d_scores": masked_softmax_backward(g, cache)})
    assert errors["d_scores"] < 1e-7


@over_backends
@pytest.mark.parametrize("score", SCORES)
def test_attention_backward_twice_on_one_cache_gives_the_same_gradients(
    backend: str, score: str
) -> None:
    case = without_d_weights(_tiny_case(score, False, False), backend)
    a = make_arrays(case)
    mod = BACKENDS[backend]  # a no-weights variant: need_weights=False
    _, _, cache = mod.attention_forward(a["query"], a["keys"], a["values"], score=score,
                                        params=a["params"] or None, lengths=_lengths(case))
    first = mod.attention_backward(a["d_context"], cache, d_weights=a["d_weights"])
    second = mod.attention_backward(a["d_context"], cache, d_weights=a["d_weights"])
    for name, x, y in zip(["d_query", "d_keys", "d_values"], first[:3], second[:3],
                          strict=True):
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert first[3].keys() == second[3].keys()
    for k in first[3]:
        np.testing.assert_array_equal(first[3][k], second[3][k], err_msg=k)


@over_backends
@pytest.mark.parametrize("single", BOOLS, ids=["many-queries", "one-query"])
@pytest.mark.parametrize("score", SCORES)
def test_attention_float32_in_float32_out(backend: str, score: str, single: bool) -> None:
    case = _tiny_case(score, single, False)
    got = run_ours(case, cast(make_arrays(case), np.float32), backend)
    wrong = {name: str(v.dtype) for name, v in got.items() if v.dtype != np.float32}
    assert not wrong, f"float32 inputs gave other dtypes: {wrong}"


@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 5)], ids=["[B, Tk]", "[B, Tq, Tk]"])
def test_masked_softmax_float32_in_float32_out(shape) -> None:
    scores = np.random.default_rng(16).standard_normal(shape).astype(np.float32)
    w, cache = masked_softmax_forward(scores, np.array([5, 1, 3]))
    assert w.dtype == masked_softmax_backward(scores, cache).dtype == np.float32


def _strided(x: np.ndarray) -> np.ndarray:
    """x's values in an array that is every other column of a wider one."""
    wide = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


@over_backends
@pytest.mark.parametrize("score", SCORES)
def test_attention_noncontiguous_and_fortran_inputs_give_the_same_answer(
    backend: str, score: str
) -> None:
    case = Case(score, False, False, True, B=4, Tq=3, Tk=6, Hq=5, Hk=5, Hv=3,
                A=3 if score == "additive" else 0, lengths=(6, 2, 5, 1), seed=17)
    a = make_arrays(case)
    expected = run_ours(case, a, backend)
    for layout, convert in [("strided", _strided), ("fortran", np.asfortranarray)]:
        changed = {k: convert(v) for k, v in a.items() if k != "params"}
        changed["params"] = {k: convert(v) for k, v in a["params"].items()}
        assert not changed["keys"].flags.c_contiguous
        got = run_ours(case, changed, backend)
        for name in expected:
            assert_allclose_named(f"{name} ({layout})", got[name], expected[name], rtol=1e-13,
                                  atol=1e-13)


# ---------------------------------------------------------------------------------------------
# the composing pairs on their own: additive scores from projections, the weighted sum


PAIR_BACKENDS = MODULES
TORCH_DTYPES = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}


def pair_arrays(single: bool, B: int, Tq: int, Tk: int, A: int, Hv: int, seed: int) -> dict:
    """float64 inputs of the two pairs: qa [B, (Tq,) A], ka [B, Tk, A], v [A] and ds [B, (Tq,)
    Tk] for the additive scores; w [B, (Tq,) Tk] (rows on the simplex), values [B, Tk, Hv] and
    dc [B, (Tq,) Hv] for the weighted sum."""
    rng = np.random.default_rng(seed)
    rows = (B,) if single else (B, Tq)
    return {"qa": rng.standard_normal((*rows, A)), "ka": rng.standard_normal((B, Tk, A)),
            "v": rng.standard_normal(A), "ds": rng.standard_normal((*rows, Tk)),
            "w": rng.dirichlet(np.ones(Tk), size=rows), "values": rng.standard_normal((B, Tk, Hv)),
            "dc": rng.standard_normal((*rows, Hv))}


def run_ours_pairs(backend: str, a: dict) -> dict[str, np.ndarray]:
    """A backend's additive_scores and weighted_sum forward and backward on `pair_arrays`:
    {"scores", "d_qa", "d_ka", "d_v", "context", "d_w", "d_values"}."""
    mod = PAIR_BACKENDS[backend]
    s, cache = mod.additive_scores_forward(a["qa"], a["ka"], a["v"])
    ours = {"scores": s}
    ours.update(zip(["d_qa", "d_ka", "d_v"], mod.additive_scores_backward(a["ds"], cache),
                    strict=True))
    c, cache = mod.weighted_sum_forward(a["w"], a["values"])
    ours["context"] = c
    ours.update(zip(["d_w", "d_values"], mod.weighted_sum_backward(a["dc"], cache), strict=True))
    return ours


def run_torch_pairs(a: dict, single: bool, tdtype: torch.dtype, device: str = "cpu"
                    ) -> dict[str, np.ndarray]:
    """The two pairs in torch ops on `device` in tdtype, gradients by autograd; named like
    `run_ours_pairs` (NumPy arrays, back on the CPU)."""
    t = {k: torch.tensor(x, dtype=tdtype, device=device, requires_grad=True)
         for k, x in a.items()}
    q = t["qa"].unsqueeze(-2)  # [B, (Tq,) 1, A]
    k = t["ka"] if single else t["ka"].unsqueeze(1)  # [B, (1,) Tk, A]
    scores = torch.tanh(q + k) @ t["v"]  # [B, (Tq,) Tk]
    grads = torch.autograd.grad(scores, [t["qa"], t["ka"], t["v"]], t["ds"])
    w = t["w"].unsqueeze(1) if single else t["w"]
    context = torch.bmm(w, t["values"])
    context = context.squeeze(1) if single else context
    d_w, d_values = torch.autograd.grad(context, [t["w"], t["values"]], t["dc"])
    out = dict(zip(["scores", "d_qa", "d_ka", "d_v", "context", "d_w", "d_values"],
                   [scores, *grads, context, d_w, d_values], strict=True))
    return {n: x.detach().cpu().numpy() for n, x in out.items()}


@pytest.mark.parametrize("backend", list(PAIR_BACKENDS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("single", BOOLS, ids=["many-queries", "one-query"])
@given(B=st.integers(1, 4), Tq=st.integers(1, 4), Tk=st.integers(1, 7), A=SIZES, Hv=SIZES,
       seed=st.integers(0, 2**32 - 1))
def test_additive_scores_and_weighted_sum_match_torch(backend, dtype, single, B, Tq, Tk, A, Hv,
                                                      seed) -> None:
    a64 = pair_arrays(single, B, Tq, Tk, A, Hv, seed)
    a = {k: x.astype(dtype) for k, x in a64.items()}
    ours = run_ours_pairs(backend, a)

    def torch_run(tdtype):  # on our (possibly float32-rounded) inputs
        return run_torch_pairs(a, single, tdtype)

    want = torch_run(torch.float64)
    t32 = torch_run(torch.float32) if dtype == np.float32 else {}
    # Each output is a sum that may cancel far below its terms (A = 1: one tanh per score);
    # its float32 floor is taken relative to the sum of the terms' magnitudes (|tanh| <= 1).
    ds, dc = np.abs(a64["ds"]), np.abs(a64["dc"])
    ds3 = ds[:, None] if single else ds  # [B, Tq, Tk]
    terms = {"scores": np.abs(a64["v"]).sum(),
             "d_qa": np.abs(a64["v"]).max() * ds3.sum(axis=2).max(),
             "d_ka": np.abs(a64["v"]).max() * ds3.sum(axis=1).max(),
             "d_v": ds.sum(), "context": np.abs(a64["values"]).max(),
             "d_w": (dc.reshape(B, -1, Hv) @ np.abs(a64["values"]).transpose(0, 2, 1)).max()}
    for name, value in ours.items():
        assert value.dtype == dtype, name
        assert_close_policy(name, value, want[name], torch32=t32.get(name),
                            grad=name.startswith("d_"), scale=terms.get(name))


def check_pairs_against_torch_on(device: str, backend: str, dtype, single: bool) -> None:
    """The two pairs of a backend (on the CPU) against torch ops on `device` in the same
    dtype, on fixed sizes: float64 to the float64 policy, float32 to rtol = atol = 1e-3 (the
    CPU-vs-CUDA rule, TF32 off)."""
    a = {k: x.astype(dtype) for k, x in pair_arrays(single, 4, 5, 11, 7, 6, seed=22).items()}
    ours = run_ours_pairs(backend, a)
    theirs = run_torch_pairs(a, single, TORCH_DTYPES[np.dtype(dtype)], device)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    for name, want in theirs.items():
        assert ours[name].dtype == want.dtype == dtype, (name, ours[name].dtype, want.dtype)
        if dtype == np.float64:
            assert_close_policy(name, ours[name], want, grad=name.startswith("d_"))
        else:
            assert_allclose_named(name, ours[name], want, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", list(PAIR_BACKENDS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("single", BOOLS, ids=["many-queries", "one-query"])
def test_additive_scores_and_weighted_sum_match_torch_cuda(backend, dtype, single) -> None:
    check_pairs_against_torch_on("cuda", backend, dtype, single)


def test_kernels_offer_numpy_refs_whole_op_surface() -> None:
    """Every op pair numpy_ref exports (the models compose them) exists in kernels with the
    same parameters, so a model runs on ``backend=kernels`` without fallbacks."""
    import inspect

    ops = [n for n in ref.__all__ if n.endswith(("_forward", "_backward"))
           and not n.startswith(("bilstm_attention", "seq2seq", "transformer_seq2seq"))]
    missing = [n for n in ops if not hasattr(kernels, n)]
    assert not missing, f"kernels lacks {missing}"
    for n in ops:
        ours = list(inspect.signature(getattr(kernels, n)).parameters)
        theirs = list(inspect.signature(getattr(ref, n)).parameters)
        assert ours == theirs, f"{n}: kernels {ours} vs numpy_ref {theirs}"
