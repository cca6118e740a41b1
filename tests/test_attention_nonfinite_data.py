"""NaN and inf in real data propagate quietly: no RuntimeWarning, NaN where torch has NaN.

The policy (docs/design.md, "Padding is not data"): NaN or inf in a query, key or value row
that is data (not padding) propagates as NaN to the rows it reaches, never an exception nor a
warning, as in torch. inf - inf and 0 * inf are IEEE's invalid operations: numpy warns about
them (``RuntimeWarning: invalid value encountered in matmul``), and the project's pytest
configuration turns RuntimeWarnings into errors, so every test here fails on a warning.

- Both backends' attention, every layout, score and option, with and without the weights: no
  warning, and the batch rows without the bad value are bit for bit the clean run's. (With
  NUMBA_DISABLE_JIT=1, CI's second pass, the kernels' Python source computes with numpy
  scalars, which warn where the compiled code does not: there the kernels run under
  ``np.errstate(invalid="ignore")``.)
- The heads layout against ``F.scaled_dot_product_attention`` (float64, no mask: a hidden key
  is where the two differ on purpose, torch's softmax backward giving it ``0 * NaN``): NaN and
  inf exactly where torch has them, in the context and every gradient, and the finite entries
  within the float64 policy.
- Multi-head attention against ``nn.MultiheadAttention``, likewise.

torch runs its math backend (``SDPBackend.MATH``), the softmax as written. Its CPU flash kernel,
the default where q, k and v have one head size, disagrees with it in one place: a query whose
scores are all NaN (a NaN query) gets context 0 there (its row max skips the NaN, so the row
looks fully masked), NaN in the math backend and here; its gradients are NaN in both.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from backends import ATTENTION_BACKENDS as BACKENDS
from backends import BACKENDS as MODULES
from backends import has_weights
from test_attention_reliability import (
    LAYOUTS,
    SCORES,
    inputs,
    kv_lead,
    query_lead,
    run,
    weights_shape,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
import numpy_ref
from numpy_ref.testing import assert_close_policy

KINDS = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}
WHERE = ("query", "keys", "values")
BAD_ROW = 1  # the batch row that gets the bad value


def _options(layout: str, option: str, seed: int = 3) -> dict:
    """One of the visibility options, hiding keys of batch rows 0 and 2 (never key 0)."""
    rng = np.random.default_rng(seed)
    shape = weights_shape(layout)
    if option == "lengths":
        return {"lengths": np.array([4, 7, 5])}
    if option == "mask":
        mask = rng.random(shape) < 0.7
        mask[..., 0] = True
        return {"mask": mask}
    if option == "bias":
        bias = np.where(rng.random(shape) < 0.3, -np.inf, rng.standard_normal(shape))
        bias[..., 0] = 0.5
        return {"bias": bias}
    if option == "causal":
        return {"causal": True}
    return {}


OPTIONS = ("none", "lengths", "mask", "bias", "causal")


def _no_warning(backend: str):
    """Any warning is an error; but the kernels' Python source (NUMBA_DISABLE_JIT=1) warns on
    inf - inf in numpy scalars, which their compiled code does not: it runs quietly."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("error")  # any warning, not only RuntimeWarning
    if backend.startswith("kernels") and numba.config.DISABLE_JIT:
        stack.enter_context(np.errstate(invalid="ignore"))
    return stack
QUIET_CASES = list(itertools.product(BACKENDS, SCORES))


@pytest.mark.parametrize(("backend", "score"), QUIET_CASES,
                         ids=[f"{b}-{s}" for b, s in QUIET_CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", WHERE)
def test_nan_and_inf_in_real_data_propagate_without_a_warning(backend: str, score: str,
                                                              layout: str, where: str) -> None:
    """NaN, +inf or -inf in one feature of a real query / key / value of batch row 1, under
    every option: forward and backward raise no warning (an error under the pytest settings),
    and the other batch rows are bit for bit the clean run's."""
    for kind, option in itertools.product(KINDS, OPTIONS):
        if option == "causal" and layout == "single":
            continue  # one query per row: no causal option
        a = inputs(layout, score, seed=5, d_weights=has_weights(backend))
        options = _options(layout, option)
        clean = run(backend, score, a, **options)
        bad = dict(a, **{where: a[where].copy()})
        lead = query_lead(layout) if where == "query" else kv_lead(layout)
        bad[where][(BAD_ROW, *(0 for _ in lead))] = KINDS[kind]  # (head 0,) query/key 0
        with _no_warning(backend):
            got = run(backend, score, bad, **options)
        assert got.keys() == clean.keys()
        for name, value in got.items():
            if name.startswith("d_params"):  # sums over the batch
                continue
            others = np.arange(value.shape[0]) != BAD_ROW
            np.testing.assert_array_equal(value[others], clean[name][others],
                                          err_msg=f"{name}: {kind} in {where}, {option}")
        if kind == "nan":
            assert np.isnan(got["context"][BAD_ROW]).any(), f"NaN in {where} ({option})"


def _sdpa(a: dict, group: int) -> dict[str, np.ndarray]:
    """F.scaled_dot_product_attention forward and autograd backward (float64)."""
    leaves = [torch.tensor(a[n], requires_grad=True) for n in ("query", "keys", "values")]
    with sdpa_kernel(SDPBackend.MATH):
        context = F.scaled_dot_product_attention(*leaves, enable_gqa=group > 1)
    grads = torch.autograd.grad(context, leaves, torch.tensor(a["d_context"]))
    return {"context": context.detach().numpy(),
            **{n: g.numpy() for n, g in zip(("d_query", "d_keys", "d_values"), grads,
                                            strict=True)}}


SDPA_BACKENDS = {"numpy_ref": (numpy_ref, True), "numpy_ref-no-weights": (numpy_ref, False),
                 "kernels": (kernels, True), "kernels-no-weights": (kernels, False)}


@pytest.mark.parametrize("backend", list(SDPA_BACKENDS))
@pytest.mark.parametrize("group", [1, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("kind", list(KINDS))
def test_nan_and_inf_in_real_data_match_sdpa(backend: str, group: int, where: str,
                                             kind: str) -> None:
    """The heads layout, scaled_dot, float64, no mask: one bad feature in a real query / key /
    value (two positions) gives NaN and inf where torch's SDPA gives them, in the context and
    every gradient, and the same finite values elsewhere; no warning."""
    mod, need_weights = SDPA_BACKENDS[backend]
    B, h, Tq, Tk, D, Dv = 2, 4, 3, 5, 4, 4
    rng = np.random.default_rng(11)
    for index in ((0, 1, 2, 0), (1, 0, 0, 3)):
        a = {"query": rng.standard_normal((B, h, Tq, D)),
             "keys": rng.standard_normal((B, h // group, Tk, D)),
             "values": rng.standard_normal((B, h // group, Tk, Dv)),
             "d_context": rng.standard_normal((B, h, Tq, Dv))}
        a[where][(*index[:3], index[3] % a[where].shape[3])] = KINDS[kind]
        with _no_warning(backend):
            context, _, cache = mod.attention_forward(a["query"], a["keys"], a["values"],
                                                      score="scaled_dot",
                                                      need_weights=need_weights)
            d_query, d_keys, d_values, _ = mod.attention_backward(a["d_context"], cache)
        ours = {"context": context, "d_query": d_query, "d_keys": d_keys, "d_values": d_values}
        want = _sdpa(a, group)
        assert any(not np.isfinite(v).all() for v in want.values())
        for name, value in want.items():
            assert_close_policy(f"{name} ({kind} in {where} at {index})", ours[name], value,
                                grad=name != "context")


@pytest.mark.parametrize("backend", ["numpy_ref", "kernels"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_nan_and_inf_in_multihead_attention_match_torch(backend: str, need_weights: bool,
                                                        where: str, kind: str) -> None:
    """One bad feature in a real query / key / value row of nn.MultiheadAttention (kdim/vdim
    projections, no mask): no warning, and every result (the weights and the parameters'
    gradients included) NaN and inf where torch's are, the same finite values elsewhere."""
    mod = MODULES[backend]
    N, L, S, E, h, kdim, vdim = 2, 3, 4, 6, 2, 5, 4
    rng = np.random.default_rng(13)
    params = {"q_proj_weight": rng.uniform(-0.5, 0.5, (E, E)),
              "k_proj_weight": rng.uniform(-0.5, 0.5, (E, kdim)),
              "v_proj_weight": rng.uniform(-0.5, 0.5, (E, vdim)),
              "in_proj_bias": rng.uniform(-0.5, 0.5, 3 * E),
              "out_proj.weight": rng.uniform(-0.5, 0.5, (E, E)),
              "out_proj.bias": rng.uniform(-0.5, 0.5, E)}
    m = torch.nn.MultiheadAttention(E, h, kdim=kdim, vdim=vdim, batch_first=True,
                                    dtype=torch.float64)
    m.load_state_dict({k: torch.tensor(v) for k, v in params.items()}, strict=True)
    a = {"query": rng.standard_normal((N, L, E)), "key": rng.standard_normal((N, S, kdim)),
         "value": rng.standard_normal((N, S, vdim)), "d_output": rng.standard_normal((N, L, E))}
    a[where][1, 2, 0] = KINDS[kind]
    with _no_warning(backend):
        output, weights, cache = mod.multihead_attention_forward(
            a["query"], a["key"], a["value"], params, num_heads=h, need_weights=need_weights)
        d_query, d_key, d_value, d_params = mod.multihead_attention_backward(a["d_output"],
                                                                             cache)
    ours = {"output": output, "weights": weights, "d_query": d_query, "d_key": d_key,
            "d_value": d_value, **{f"d_params[{k!r}]": v for k, v in d_params.items()}}
    leaves = {n: torch.tensor(a[n], requires_grad=True) for n in ("query", "key", "value")}
    with sdpa_kernel(SDPBackend.MATH):  # need_weights=False runs SDPA
        out, w = m(leaves["query"], leaves["key"], leaves["value"], need_weights=need_weights)
    names = [f"d_{n}" for n in leaves] + [f"d_params[{k!r}]" for k, _ in m.named_parameters()]
    grads = torch.autograd.grad(out, [*leaves.values(), *m.parameters()],
                                torch.tensor(a["d_output"]))
    want = {"output": out, **dict(zip(names, grads, strict=True))}
    if need_weights:
        want["weights"] = w
    assert not np.isfinite(want["output"].detach().numpy()).all()
    for name, value in want.items():
        assert_close_policy(f"{name} ({kind} in {where})", ours[name],
                            value.detach().numpy(), grad=name.startswith("d_"))
