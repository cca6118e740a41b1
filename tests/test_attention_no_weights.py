"""Attention without the weights (``need_weights=False``): what the parametrized parity,
property, bad-input and reliability tests of the other attention files cannot show.

- Block remainders: sizes on either side of the blocks' edges (numpy_ref's blockwise path:
  128 query rows by 256 keys; the kernels' flash kernel: R = 16..256 rows by C = 512 keys,
  the backward splitting the keys over few (batch, kv head) pairs), Tq != Tk, heads with
  grouped kv heads, causal alone and every option together, against torch's
  `F.scaled_dot_product_attention` (float64, and float32 under the policy), with and
  without the weights. With Numba's JIT off the kernels run as Python, so those sizes are
  for the JIT run; a second set shrinks the blocks themselves (`small_blocks`) so that small
  problems cross the same edges, in either mode.
- ``cache.lse``, each query's log-sum-exp, against torch's ``logsumexp`` of the masked,
  scaled, biased scores, every layout and score, both backends, with and without the weights;
  -inf for a query that sees no key, NaN for a NaN row.
- Memory: a forward and backward whose weights would take 1 GiB allocate nothing near it.
- Determinism of the flash kernel without weights, the backward's key splits included.

The sizes and block edges come from numpy_ref/attention.py (BLOCK_QUERIES, BLOCK_KEYS) and
kernels/attention_flash.py (`block_rows`, `_C`, `key_splits`).
"""

from __future__ import annotations

import math
import tracemalloc

import numba
import numpy as np
import pytest
import torch
from backends import ATTENTION_BACKENDS as BACKENDS
from backends import BACKENDS as MODULES
from backends import has_weights
from hypothesis import given
from hypothesis import strategies as st
from test_attention_options import (
    LAYOUTS,
    Spec,
    cast,
    check,
    effective_scale,
    examples,
    from_heads,
    full_visibility,
    make_arrays,
    specs,
    to_heads,
    weights_shape,
)

import kernels
import kernels.attention
import kernels.attention_flash
import numpy_ref
import numpy_ref.attention
from numpy_ref.testing import assert_close_policy
from torch_impl import reference

JIT_OFF = bool(numba.config.DISABLE_JIT)
over_backends = pytest.mark.parametrize("backend", list(BACKENDS))
over_dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32],
                                      ids=["float64", "float32"])

# the blocks `small_blocks` sets: numpy_ref's query rows and keys, the kernels' R and C
SMALL_BLOCKS = {"BLOCK_QUERIES": 4, "BLOCK_KEYS": 8, "R": 4, "C": 8}


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows and keys, so that small problems cross the blocks' edges.

    numpy_ref reads BLOCK_QUERIES and BLOCK_KEYS when it runs; the kernels take R and C as
    arguments, which `kernels.attention` reads from its `block_rows` and `_C` when it runs
    (and `key_splits` from `kernels.attention_flash._C`). Each name must exist (monkeypatch
    raises otherwise), so a rename fails here instead of leaving the real blocks in place.
    """
    monkeypatch.setattr(numpy_ref.attention, "BLOCK_QUERIES", SMALL_BLOCKS["BLOCK_QUERIES"])
    monkeypatch.setattr(numpy_ref.attention, "BLOCK_KEYS", SMALL_BLOCKS["BLOCK_KEYS"])
    monkeypatch.setattr(kernels.attention, "_C", SMALL_BLOCKS["C"])
    monkeypatch.setattr(kernels.attention_flash, "_C", SMALL_BLOCKS["C"])
    monkeypatch.setattr(kernels.attention, "block_rows",
                        lambda rows, causal, pairs, threads: SMALL_BLOCKS["R"])


# ---------------------------------------------------------------------------------------------
# block remainders against torch's SDPA


def remainder_spec(Tq: int, Tk: int, options: str) -> Spec:
    """Heads layout with grouped kv heads (h 4, h_kv 2), scaled_dot, Dv != D. options: "causal"
    (SDPA's is_causal alone; one batch row, so the backward splits the keys) or "all"
    (lengths, a bool mask with holes, a bias with -inf, causal and a scale, two rows)."""
    every = options == "all"
    B = 2 if every else 1
    return Spec("heads", "scaled_dot", B=B, h=4, h_kv=2, Tq=Tq, Tk=Tk, Hq=8, Hk=8, Hv=5, A=0,
                lengths=(Tk, max(1, 2 * Tk // 3)) if every else None,
                mask_shape=(B, 1, Tq, Tk) if every else None,
                bias_shape=(1, 4, Tq, Tk) if every else None, bias_ninf=every, causal=True,
                scale=0.7 if every else None, d_weights=False, seed=1000 * Tq + Tk)


# around the real blocks: 63/65 (R = 64), 97, 511/513 (C = 512; numpy_ref: 2 x 256 keys,
# 4 x 128 rows), and Tq != Tk either way
REAL_SIZES = [(1, 1), (63, 63), (65, 65), (97, 97), (511, 511), (513, 513), (65, 513),
              (513, 97), (1, 513)]
# the same edges for SMALL_BLOCKS (rows of 4, keys of 8)
SMALL_SIZES = [(1, 1), (3, 3), (5, 5), (7, 7), (9, 9), (15, 15), (17, 17), (5, 17), (17, 7),
               (1, 17)]


def _remainder_params():
    sizes = [("small-blocks", tq, tk) for tq, tk in SMALL_SIZES]
    if not JIT_OFF:  # interpreted kernels at 513 x 513 take minutes
        sizes = [("real-blocks", tq, tk) for tq, tk in REAL_SIZES] + sizes
    for blocks, tq, tk in sizes:
        for options in ("causal", "all"):
            yield pytest.param(blocks, tq, tk, options, id=f"{blocks}-Tq{tq}-Tk{tk}-{options}")


@over_backends
@over_dtypes
@pytest.mark.parametrize(("blocks", "Tq", "Tk", "options"), list(_remainder_params()))
def test_block_remainders_match_sdpa(backend: str, blocks: str, Tq: int, Tk: int,
                                     options: str, dtype, request) -> None:
    """Context and every gradient (d_bias included) against SDPA, forward and backward, with
    the weights against torch's softmax where the variant has them (`check` of
    test_attention_options: float64 to torch.testing's rule, float32 to the policy)."""
    if blocks == "small-blocks":
        request.getfixturevalue("small_blocks")
    check(backend, remainder_spec(Tq, Tk, options), dtype, use_sdpa=True)


def test_small_blocks_reach_the_kernels(small_blocks) -> None:
    """The premise of the small-block cases: with `small_blocks`, the wrapper hands the kernels
    R and C of SMALL_BLOCKS and splits the keys of few pairs into blocks of C."""
    assert kernels.attention.block_rows(64, False, 1, 2) == SMALL_BLOCKS["R"]
    assert kernels.attention._C == SMALL_BLOCKS["C"]
    assert kernels.attention_flash.key_splits(1, 17, False) == 3  # 17 keys: blocks of 8


# ---------------------------------------------------------------------------------------------
# cache.lse against torch's logsumexp


def torch_scores(s: Spec, a: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked, scaled, biased scores [B, h, Tq, Tk] in torch ops on `a`'s arrays (-inf at
    the keys a query does not see), and the magnitude of the terms each is a sum of (the same
    products over absolute values), for the float32 floor."""
    q = to_heads(torch.tensor(a["query"]), s.layout)
    k = torch.tensor(a["keys"] if s.layout == "heads" else a["keys"][:, None])
    k = k.repeat_interleave(s.h // s.h_kv, dim=1)
    p = {n: torch.tensor(x) for n, x in a["params"].items()}
    scores = reference.attention_scores(q, k, score=s.score, params=p, scale=s.scale)
    if s.score == "additive":
        terms = torch.full_like(scores, float(p["v"].abs().sum()))  # |tanh| <= 1
    else:
        general = s.score == "general"
        core_abs = q.abs() @ p["W"].abs() if general else q.abs()
        terms = (core_abs @ k.abs().transpose(-1, -2)) * abs(effective_scale(s))
    if a["bias"] is not None:
        bias = to_heads(torch.tensor(np.broadcast_to(a["bias"], weights_shape(s))), s.layout)
        scores = scores + bias
        terms = terms + torch.where(bias == -math.inf, 0.0, bias.abs())
    visible = torch.tensor(full_visibility(s, a))
    return scores.masked_fill(~visible, -math.inf), torch.where(visible, terms, 0.0)


def lse_of(backend: str, s: Spec, a: dict) -> np.ndarray:
    """The variant's cache.lse for the spec's forward."""
    mod = BACKENDS[backend]
    _, _, cache = mod.attention_forward(
        a["query"], a["keys"], a["values"], score=s.score, params=a["params"] or None,
        lengths=None if s.lengths is None else np.array(s.lengths), mask=a["mask"],
        causal=s.causal, scale=s.scale, bias=a["bias"], need_weights=has_weights(backend))
    return cache.lse


def check_lse(backend: str, s: Spec, dtype) -> None:
    """Ours against torch.logsumexp of the float64 scores on the same (rounded) inputs: float64
    to torch.testing's rule, float32 to the policy with torch's float32 logsumexp as the
    trusted result and the floor relative to the largest visible score's terms (lse is about
    as large as a row's largest score, whose rounding scales with its terms). -inf where a
    query sees no key, in both."""
    a = cast(make_arrays(s), dtype)
    got = lse_of(backend, s, a)
    assert got.dtype == dtype, f"lse: dtype {got.dtype}, expected {np.dtype(dtype)}"
    assert got.shape == weights_shape(s)[:-1], f"lse: shape {got.shape}"
    scores64, terms = torch_scores(s, cast(a, np.float64))
    want = from_heads(torch.logsumexp(scores64, dim=-1)[..., None], s.layout)[..., 0].numpy()
    dead = ~from_heads(full_visibility(s, a).any(axis=-1)[..., None], s.layout)[..., 0]
    np.testing.assert_array_equal(got[dead], -np.inf, err_msg="lse of a query that sees no key")
    if dtype == np.float64:
        assert_close_policy("lse", got, want)
        return
    scores32, _ = torch_scores(s, a)
    torch32 = from_heads(torch.logsumexp(scores32, dim=-1)[..., None], s.layout)[..., 0]
    assert_close_policy("lse", got, want, torch32=torch32.numpy(),
                        scale=max(float(terms.max()), float(np.abs(want[~dead]).max(initial=0))))


@over_backends
@over_dtypes
@pytest.mark.parametrize("layout", LAYOUTS)
@examples(0.3)
@given(data=st.data())
def test_lse_matches_torch_logsumexp(backend: str, layout: str, dtype,
                                     data: st.DataObject) -> None:
    """Every score and option (lengths, mask, causal, bias with -inf, scale, grouped heads)."""
    check_lse(backend, data.draw(specs(layout), label="spec"), dtype)


@over_backends
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("score", ["dot", "additive"])
def test_lse_is_minus_inf_where_a_query_sees_no_key_and_nan_in_a_nan_row(
    backend: str, layout: str, score: str
) -> None:
    """One query's mask row all False (lse -inf), another's bias row all -inf (-inf), a third's
    query NaN (NaN); every other query's lse is torch's."""
    s = Spec(layout, score, B=3, h=4 if layout == "heads" else 1,
             h_kv=2 if layout == "heads" else 1, Tq=1 if layout == "single" else 5, Tk=6,
             Hq=4, Hk=4, Hv=3, A=5 if score == "additive" else 0, lengths=(6, 4, 2),
             mask_shape=None, bias_shape=None, bias_ninf=False, causal=False, scale=None,
             d_weights=False, seed=51)
    s = s._replace(mask_shape=weights_shape(s), bias_shape=weights_shape(s))
    a = make_arrays(s)
    a["mask"][...] = True
    a["bias"] = np.random.default_rng(52).standard_normal(weights_shape(s))
    rows = {"single": [(0,), (1,), (2,)], "steps": [(0, 1), (1, 4), (2, 0)],
            "heads": [(0, 1, 1), (1, 3, 4), (2, 0, 0)]}[layout]
    no_mask, no_bias, nan = rows
    a["mask"][no_mask] = False
    a["bias"][no_bias] = -np.inf
    a["query"][nan] = np.nan
    got = lse_of(backend, s, a)
    assert got[no_mask] == -np.inf, f"lse of a query whose mask hides every key: {got[no_mask]}"
    assert got[no_bias] == -np.inf, f"lse of a query whose bias is all -inf: {got[no_bias]}"
    assert np.isnan(got[nan]), f"lse of a NaN query: {got[nan]}"
    scores, _ = torch_scores(s, a)
    want = from_heads(torch.logsumexp(scores, dim=-1)[..., None], s.layout)[..., 0].numpy()
    others = np.ones(got.shape, bool)
    for row in rows:
        others[row] = False
    assert_close_policy("lse (the other queries)", got[others], want[others])


# ---------------------------------------------------------------------------------------------
# memory


@pytest.mark.parametrize("backend", ["numpy_ref", "kernels"])
def test_no_weights_allocates_nothing_of_tq_by_tk(backend: str) -> None:
    """need_weights=False, forward and backward with lengths and causal at B = h = 1,
    Tq = Tk = 16384, D = 4, float32: the weights would take 1 GiB; the peak of the NumPy
    allocations during both calls stays under 1/8 of that (below even a bool Tq x Tk array,
    1/4 GiB), while the inputs take 256 KiB each. Measured: about 8 MiB for either backend.

    tracemalloc sees NumPy's allocations (the wrappers', and all of numpy_ref's) but not the
    ones Numba makes inside a jitted kernel (its per-block buffers); the kernels' wrapper
    allocates every array that outlives a call, the weights included when they are asked
    for. A control at Tq = Tk = 2048 with need_weights=True must peak above its weights
    (16 MiB), so the measurement does see them. numpy_ref's blockwise path loops over
    128 x 256 blocks in Python: about 5 s for this size here. With Numba's JIT off the
    kernels would take hours: skipped."""
    if backend == "kernels" and JIT_OFF:
        pytest.skip("the interpreted flash kernel at 16384 x 16384 takes hours")
    mod = MODULES[backend]
    rng = np.random.default_rng(60)

    def peak(T: int, need_weights: bool) -> int:
        q, k, v, dc = (rng.standard_normal((1, 1, T, 4)).astype(np.float32) for _ in range(4))
        lengths = np.array([T - 3])
        mod.attention_backward(dc[:, :, :8], mod.attention_forward(
            q[:, :, :8], k[:, :, :8], v[:, :, :8], need_weights=need_weights)[2])  # compiled
        tracemalloc.start()
        try:
            _, _, cache = mod.attention_forward(q, k, v, lengths=lengths, causal=True,
                                                need_weights=need_weights)
            mod.attention_backward(dc, cache)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    control = 2048 * 2048 * 4
    assert peak(2048, True) > control, "tracemalloc does not see the weights of a control"
    weights_bytes = 16384 * 16384 * 4
    got = peak(16384, False)
    assert got < weights_bytes / 8, (f"peak {got / 2**20:.1f} MiB with need_weights=False, "
                                     f"weights would be {weights_bytes / 2**20:.0f} MiB")


# ---------------------------------------------------------------------------------------------
# determinism of the flash kernel without weights


def _determinism_cases():
    """(id, layout, B, h, h_kv, Tq, Tk, score, options): few (batch, kv head) pairs and more
    than one block of keys, so that the backward splits the keys; and many pairs, no split."""
    if JIT_OFF:  # with small_blocks: keys of 8
        return [("split-heads", "heads", 1, 4, 2, 9, 37, "scaled_dot", True),
                ("split-additive", "steps", 2, 1, 1, 5, 19, "additive", True),
                ("many-pairs", "steps", 9, 1, 1, 6, 11, "general", False)]
    return [("split-heads", "heads", 1, 4, 2, 65, 1100, "scaled_dot", True),
            ("split-additive", "steps", 2, 1, 1, 33, 600, "additive", True),
            ("many-pairs", "steps", 64, 1, 1, 16, 128, "general", False)]


DETERMINISM = _determinism_cases()


@pytest.mark.parametrize(("layout", "B", "h", "h_kv", "Tq", "Tk", "score", "options"),
                         [pytest.param(*c[1:], id=c[0]) for c in DETERMINISM])
def test_kernels_no_weights_are_bitwise_deterministic_over_20_calls(
    layout: str, B: int, h: int, h_kv: int, Tq: int, Tk: int, score: str, options: bool,
    request
) -> None:
    """Context, lse and every gradient, bit for bit over 20 calls (float32, lengths, and with
    options a mask, a bias and causal). The split partial d_query are summed in split order:
    the same bits whatever the thread that ran each split. With Numba's JIT off the blocks are
    SMALL_BLOCKS, so small problems split too."""
    if JIT_OFF:
        request.getfixturevalue("small_blocks")
    splits = kernels.attention_flash.key_splits(B * h_kv, Tk, False)
    assert (splits > 1) == options, f"{splits} key splits"
    rng = np.random.default_rng(61)
    s = Spec(layout, score, B=B, h=h, h_kv=h_kv, Tq=Tq, Tk=Tk, Hq=16, Hk=16, Hv=8,
             A=7 if score == "additive" else 0, lengths=tuple(rng.integers(Tk // 2, Tk + 1, B)),
             mask_shape=weights_shape_of(layout, B, h, Tq, Tk) if options else None,
             bias_shape=weights_shape_of(layout, B, h, Tq, Tk) if options else None,
             bias_ninf=options, causal=options, scale=None, d_weights=False, seed=62)
    a = cast(make_arrays(s), np.float32)

    def once() -> list[np.ndarray]:
        context, weights, cache = kernels.attention_forward(
            a["query"], a["keys"], a["values"], score=score, params=a["params"] or None,
            lengths=np.array(s.lengths), mask=a["mask"], causal=s.causal, bias=a["bias"],
            need_weights=False)
        assert weights is None
        d_q, d_k, d_v, d_p = kernels.attention_backward(a["d_context"], cache)
        return [context, cache.lse, d_q, d_k, d_v, *d_p.values()]

    names = ["context", "lse", "d_query", "d_keys", "d_values",
             *[f"d_params[{k!r}]" for k in (*a["params"], *(["bias"] if options else []))]]
    first = once()
    assert len(first) == len(names)
    for call in range(2, 21):
        for name, x, y in zip(names, first, once(), strict=True):
            np.testing.assert_array_equal(y, x, err_msg=f"{name} changed on call {call}")


def weights_shape_of(layout: str, B: int, h: int, Tq: int, Tk: int) -> tuple[int, ...]:
    return {"single": (B, Tk), "steps": (B, Tq, Tk), "heads": (B, h, Tq, Tk)}[layout]
