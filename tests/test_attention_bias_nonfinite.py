"""A bias of NaN or +inf is data, not a hidden key: only -inf hides a key (heads layout).

The attention contract hides a key from a query by `mask`, `lengths`, `causal`, or a `bias`
of exactly -inf (`bias != -inf`). A NaN or +inf in the bias is a score like any other, and
the query's row becomes NaN, as torch's `F.scaled_dot_product_attention(q, k, v,
attn_mask=bias)` gives it: the softmax of a row with a NaN score is NaN, and a +inf score makes
its max +inf and ``exp(inf - inf)`` NaN. Treating every non-finite bias as hidden
(``np.isfinite(bias)``) would instead give those rows finite values, and a key whose bias is
NaN for every query of its group zero gradients. These tests put NaN, +inf and -inf at chosen
entries and require ours, on both backends with and without the weights, to be NaN exactly
where torch (float64) is NaN, and within the float64 policy of test_attention_options.py
elsewhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from backends import BACKENDS as MODULES
from backends import has_weights, with_no_weights
from test_attention_reliability import run

from numpy_ref.testing import assert_close_policy

BACKENDS = with_no_weights(MODULES)
over_backends = pytest.mark.parametrize("backend", list(BACKENDS))

B, H, TQ, TK, D, DV = 2, 2, 5, 5, 3, 2


def case(bias_shape: tuple[int, ...], h_kv: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """float64 heads-layout inputs with NaN, +inf and -inf in the bias; (arrays, where) with
    `where` naming the entries that hold them."""
    rng = np.random.default_rng(7)
    bias = rng.standard_normal(bias_shape)
    if len(bias_shape) == 4:  # [B, h, Tq, Tk]
        nan, pinf, ninf, no_finite = (0, 0, 1, 2), (1, 0, 0, 4), (0, 1, 2, 0), (0, 1, 3)
        bias[1, 1, :, 3] = np.nan  # one key NaN for every query of its (batch, head)
    else:  # [Tq, Tk], shared by every batch and head
        nan, pinf, ninf, no_finite = (1, 2), (0, 4), (2, 0), (3,)
    bias[nan] = np.nan
    bias[pinf] = np.inf
    bias[ninf] = -np.inf  # a hidden key, for contrast: its row stays finite
    bias[no_finite] = [np.nan, np.inf, np.nan, np.nan, np.inf]  # a row with no finite score
    a = {
        "query": rng.standard_normal((B, H, TQ, D)),
        "keys": rng.standard_normal((B, h_kv, TK, D)),
        "values": rng.standard_normal((B, h_kv, TK, DV)),
        "params": {},
        "bias": bias,
        "d_context": rng.standard_normal((B, H, TQ, DV)),
        "d_weights": None,  # SDPA returns no weights: the cotangent is on the context alone
    }
    return a, {"nan": nan, "+inf": pinf, "-inf": ninf, "no finite": no_finite}


def torch_sdpa(a: dict[str, Any]) -> dict[str, np.ndarray]:
    """torch float64: SDPA's context and its autograd gradients (d_bias is the gradient of the
    float attn_mask, reduced to its shape), and the weights softmax(q k^T / sqrt(D) + bias)."""
    q, k, v, bias = (torch.tensor(a[n], requires_grad=True)
                     for n in ("query", "keys", "values", "bias"))
    group = H // k.shape[1]
    bias_arg = bias[None] if bias.ndim == 1 else bias
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_arg, enable_gqa=group > 1)
    grads = torch.autograd.grad(context, (q, k, v, bias), torch.tensor(a["d_context"]))
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) / D ** 0.5 + bias
    weights = torch.softmax(scores, dim=-1)
    out = {"context": context, "weights": weights}
    out.update(zip(("d_query", "d_keys", "d_values", "d_params['bias']"), grads, strict=True))
    return {n: x.detach().numpy() for n, x in out.items()}


def run_quietly(backend: str, a: dict[str, Any]) -> dict[str, np.ndarray]:
    """Ours with the bias, forward and backward. +inf - +inf is IEEE's invalid operation: the
    kernels' Python source (CI runs it with NUMBA_DISABLE_JIT=1) warns on it, and the project's
    pytest configuration turns RuntimeWarnings into errors (as test_attention_reliability's
    `_ignore_invalid`)."""
    with np.errstate(invalid="ignore"):
        return run(backend, "scaled_dot", a, bias=a["bias"])


def assert_like_torch(ours: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """NaN exactly where torch has NaN, no infinity, and the float64 policy elsewhere."""
    assert set(ours) | {"weights"} == set(want), sorted(set(ours) ^ set(want))
    for name, got in ours.items():
        ref = want[name]
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        nan = np.isnan(ref)
        assert not np.isinf(ref).any(), f"torch's {name} has an infinity: the case is off"
        where = np.argwhere(np.isnan(got) != nan)
        assert where.size == 0, (
            f"{name}: NaN where torch has none, or a value where torch has NaN, at "
            f"{[tuple(int(i) for i in j) for j in where[:6]]} (ours {got[tuple(where[0])]}, "
            f"torch {ref[tuple(where[0])]})")
        assert not np.isinf(got).any(), f"{name}: an infinity"
        assert_close_policy(name, got[~nan], ref[~nan], grad=name.startswith("d_"))


@over_backends
@pytest.mark.parametrize(("bias_shape", "h_kv"), [((B, H, TQ, TK), H), ((TQ, TK), 1)],
                         ids=["bias-B-h-Tq-Tk", "bias-Tq-Tk-gqa"])
def test_a_nan_or_inf_bias_gives_torchs_nan_rows(backend: str, bias_shape: tuple[int, ...],
                                                 h_kv: int) -> None:
    a, where = case(bias_shape, h_kv)
    want = torch_sdpa(a)
    ours = run_quietly(backend, a)
    # the case is what it claims: torch's rows with a NaN or +inf are NaN, a -inf alone is not
    for kind, entry in where.items():
        query = entry[:3] if len(bias_shape) == 4 else (slice(None), slice(None), entry[0])
        assert np.isnan(want["context"][query]).all() == (kind != "-inf"), (kind, entry)
    assert_like_torch(ours, want)
    if has_weights(backend):
        # (NaN rows: compared above) a key hidden by -inf from a finite row weighs exactly 0
        hidden = np.broadcast_to(a["bias"], want["weights"].shape) == -np.inf
        finite_rows = ~np.isnan(want["weights"]).any(axis=-1, keepdims=True)
        assert np.all(ours["weights"][hidden & finite_rows] == 0)


@over_backends
def test_a_minus_inf_bias_in_a_nan_row_stays_hidden_where_torch_gives_nan(backend: str) -> None:
    """Where ours and torch part, by design (design.md, "Padding is not data": a NaN among a
    row's visible scores makes its weights NaN at its visible keys and leaves its hidden keys
    at 0). torch's softmax of a row holding NaN or +inf is NaN at every key, -inf ones included,
    so its weights and d_bias there are NaN, and every key of the group gets a NaN gradient;
    ours keeps a key hidden by -inf hidden from that row: weight 0, d_bias 0, and no gradient
    from that row. Everything else is torch's, NaN for NaN."""
    a, _ = case((B, H, TQ, TK), H)
    bias = a["bias"]
    bias[0, 1, 3] = [np.nan, np.inf, -np.inf, np.nan, np.inf]  # -inf in a NaN row
    bias[1, 0, 4] = [0.5, -np.inf, np.inf, -np.inf, 1.0]  # and in a +inf row
    want = torch_sdpa(a)
    ours = run_quietly(backend, a)
    visible = bias != -np.inf  # [B, h, Tq, Tk] (h_kv = h: a key's group is its head)
    nan_rows = (np.isnan(bias) | (bias == np.inf)).any(axis=-1, keepdims=True)
    assert np.array_equal(np.isnan(want["context"]), np.broadcast_to(nan_rows, (B, H, TQ, DV)))
    expected_nan = {  # the rule: a NaN row reaches exactly the keys it sees
        "weights": nan_rows & visible, "d_params['bias']": nan_rows & visible,
        "d_keys": (nan_rows & visible).any(axis=2)[..., None].repeat(D, -1),
        "d_values": (nan_rows & visible).any(axis=2)[..., None].repeat(DV, -1)}
    for name, got in ours.items():
        nan = expected_nan.get(name, np.isnan(want[name]))
        assert np.array_equal(np.isnan(got), nan), name
        assert not np.isinf(got).any(), name
        torch_nan = np.isnan(want[name])
        assert np.all(torch_nan[nan]), f"{name}: NaN where torch has none"
        assert_close_policy(name, got[~torch_nan], want[name][~torch_nan],
                            grad=name.startswith("d_"))
    hidden_in_nan_row = nan_rows & ~visible
    assert hidden_in_nan_row.sum() == 3  # the -inf entries of those two rows
    assert np.isnan(want["d_params['bias']"][hidden_in_nan_row]).all()  # torch: NaN
    assert np.all(ours["d_params['bias']"][hidden_in_nan_row] == 0)  # ours: hidden, 0
    if has_weights(backend):
        assert np.isnan(want["weights"][hidden_in_nan_row]).all()
        assert np.all(ours["weights"][hidden_in_nan_row] == 0)
