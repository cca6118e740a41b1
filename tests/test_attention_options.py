"""The attention options (mask, causal, scale, bias, grouped-query heads, with lengths) against
torch, as properties.

The reference for the dot-product scores is torch's own `F.scaled_dot_product_attention`:

- ``mask`` is SDPA's bool ``attn_mask`` (True = attend), ``bias`` its float ``attn_mask``
  (our d_params["bias"] is torch's gradient of that float mask, reduced to its shape by
  autograd's broadcasting), ``causal`` its ``is_causal`` (top-left aligned, Tq != Tk drawn),
  ``scale`` its ``scale``, and keys/values with h_kv heads its ``enable_gqa``.
- ``lengths`` has no SDPA argument: the test builds the equivalent bool mask. SDPA refuses
  ``is_causal`` together with ``attn_mask``, so when causal meets another condition torch gets
  one combined mask (the causal triangle included); causal alone goes through ``is_causal``.
  A mask or bias alone, in the heads layout, is handed to torch in its own broadcast shape
  (a [Tk] one as [1, Tk]: SDPA refuses 1-D masks).
- ``general`` is SDPA applied to ``q W`` (autograd gives d_W); ``additive`` has no SDPA form
  and is spelled out in torch ops (the tanh layer, then the same masking as below).

SDPA returns no weights: the weights (and, where a cotangent on them is drawn, their
gradient) come from the same scores written in torch ops, ``masked_fill`` with a real -inf at
the keys a query does not see, ``torch.softmax``, and a query that sees no key set to 0.
torch 2.13's SDPA (math and flash CPU kernels) already returns 0 context and 0 gradients for
a query that sees no key; the comparisons still skip any entry torch gives as NaN and require
our own values there to be exact zeros.

float64: the policy's rule (`torch.testing.assert_close`'s defaults); the worst error per
option is printed at the end of the module. float32: the policy's rule against torch float64
on the same float32-rounded inputs, torch float32 as the comparison, with the floors of
test_attention.py (a context is a sum as large as the values; a gradient through the softmax
VJP scales with the terms that VJP cancels).

Every test is parametrized by backend (``numpy_ref``, ``kernels``) and, where it runs
`attention_forward`, also by each without the weights (``numpy_ref-no-weights``,
``kernels-no-weights``: need_weights=False, no cotangent on the weights, and every result
compared but the weights; see test_attention_reliability.py). CI also runs the kernels ones
with NUMBA_DISABLE_JIT=1, so sizes stay small except for one awkward axis now and then.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import error_report
import numpy as np
import pytest
import torch
from backends import BACKENDS as MODULES
from backends import has_weights, with_no_weights
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_reliability import run

from numpy_ref.testing import assert_allclose_named, assert_close_policy
from torch_impl import reference
from torch_impl.reference import from_heads, to_heads

over_modules = pytest.mark.parametrize("backend", list(MODULES))
BACKENDS = with_no_weights(MODULES)
over_backends = pytest.mark.parametrize("backend", list(BACKENDS))
LAYOUTS = ("single", "steps", "heads")
SCORES = ("dot", "scaled_dot", "general", "additive")


def examples(fraction: float):
    """A fraction of the loaded profile's examples (ci: 100): these properties run two
    implementations and torch per example."""
    return settings(max_examples=max(3, int(settings.default.max_examples * fraction)),
                    deadline=None)


# ---------------------------------------------------------------------------------------------
# one case: sizes, options and a seed


class Spec(NamedTuple):
    layout: str  # "single" query [B, Hq], "steps" [B, Tq, Hq], "heads" [B, h, Tq, Hq]
    score: str
    B: int
    h: int  # query heads (1 unless heads)
    h_kv: int  # key/value heads, divides h
    Tq: int  # 1 for single
    Tk: int
    Hq: int
    Hk: int
    Hv: int
    A: int  # additive width (0 otherwise)
    lengths: tuple[int, ...] | None
    mask_shape: tuple[int, ...] | None  # broadcastable to the weights' shape
    bias_shape: tuple[int, ...] | None
    bias_ninf: bool  # -inf entries in the bias
    causal: bool
    scale: float | None
    d_weights: bool  # a cotangent on the weights too
    seed: int


def weights_shape(s: Spec) -> tuple[int, ...]:
    return {"single": (s.B, s.Tk), "steps": (s.B, s.Tq, s.Tk),
            "heads": (s.B, s.h, s.Tq, s.Tk)}[s.layout]


def broadcast_shapes(layout: str, B: int, h: int, Tq: int, Tk: int) -> list[tuple[int, ...]]:
    """Shapes a mask or bias may have: each broadcasts to the weights' shape."""
    if layout == "single":
        return [(Tk,), (B, Tk), (B, 1), (1, Tk)]
    if layout == "steps":
        return [(Tk,), (Tq, Tk), (B, 1, Tk), (B, Tq, Tk), (Tq, 1), (1, Tq, Tk)]
    return [(Tk,), (Tq, Tk), (B, 1, 1, Tk), (1, h, Tq, Tk), (B, h, Tq, Tk), (h, 1, Tk),
            (B, 1, Tq, 1)]


SMALL = st.sampled_from([1, 2, 3, 5, 7])
AWKWARD = st.sampled_from([59, 97])


@st.composite
def specs(draw, layout: str, scores=SCORES, d_weights: bool | None = False) -> Spec:
    score = draw(st.sampled_from(scores))
    big = draw(st.sampled_from([None, None, None, None, "Tq", "Tk", "H"]))
    if layout == "single" and big == "Tq":
        big = None
    B = draw(st.integers(1, 2 if big else 3))
    h_kv = h = 1
    if layout == "heads":
        h_kv = draw(st.integers(1, 2))
        h = h_kv * draw(st.integers(1, 1 if big else 3))

    def size(axis: str) -> int:
        return draw(AWKWARD) if big == axis else draw(SMALL)

    Tq = 1 if layout == "single" else size("Tq")
    Tk = size("Tk")
    Hq = size("H")
    Hk = Hq if score in ("dot", "scaled_dot") else draw(SMALL)
    Hv = draw(SMALL)
    A = draw(SMALL) if score == "additive" else 0
    lengths = None
    if draw(st.booleans()):
        lengths = tuple(draw(st.lists(st.one_of(st.just(Tk), st.integers(1, Tk)),
                                      min_size=B, max_size=B)))
    shapes = st.sampled_from(broadcast_shapes(layout, B, h, Tq, Tk))
    mask_shape = draw(st.one_of(st.none(), shapes))
    bias_shape = draw(st.one_of(st.none(), shapes))
    scale = None
    if score != "additive":
        scale = draw(st.one_of(st.none(), st.floats(-2.5, 2.5, allow_nan=False,
                                                    allow_infinity=False)))
    return Spec(layout, score, B, h, h_kv, Tq, Tk, Hq, Hk, Hv, A, lengths, mask_shape,
                bias_shape, draw(st.booleans()), draw(st.booleans()), scale,
                draw(st.booleans()) if d_weights is None else d_weights,
                draw(st.integers(0, 2**32 - 1)))


def make_arrays(s: Spec) -> dict:
    """float64 inputs, params, options and cotangents of a spec."""
    rng = np.random.default_rng(s.seed)
    lead_q = {"single": (s.B,), "steps": (s.B, s.Tq), "heads": (s.B, s.h, s.Tq)}[s.layout]
    lead_kv = (s.B, s.h_kv, s.Tk) if s.layout == "heads" else (s.B, s.Tk)
    params: dict[str, np.ndarray] = {}
    if s.score == "general":
        params = {"W": rng.standard_normal((s.Hq, s.Hk)) / math.sqrt(s.Hq)}
    elif s.score == "additive":
        params = {"W_query": rng.standard_normal((s.A, s.Hq)) / math.sqrt(s.Hq),
                  "W_key": rng.standard_normal((s.A, s.Hk)) / math.sqrt(s.Hk),
                  "v": rng.standard_normal(s.A), "b": rng.standard_normal(s.A) * 0.5}
    mask = None if s.mask_shape is None else rng.random(s.mask_shape) < 0.75  # with holes
    bias = None
    if s.bias_shape is not None:
        bias = rng.standard_normal(s.bias_shape) * 1.5
        if s.bias_ninf:
            bias[rng.random(s.bias_shape) < 0.25] = -np.inf
    return {
        "query": rng.standard_normal((*lead_q, s.Hq)),
        "keys": rng.standard_normal((*lead_kv, s.Hk)),
        "values": rng.standard_normal((*lead_kv, s.Hv)),
        "params": params,
        "mask": mask,
        "bias": bias,
        "d_context": rng.standard_normal((*lead_q, s.Hv)),
        "d_weights": rng.standard_normal(weights_shape(s)) if s.d_weights else None,
    }


def cast(a: dict, dtype) -> dict:
    """Float arrays of `a` cast to dtype (the mask stays bool)."""
    out = {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
           for k, v in a.items() if k != "params"}
    out["params"] = {k: v.astype(dtype) for k, v in a["params"].items()}
    return out


def run_ours(backend: str, s: Spec, a: dict) -> dict[str, np.ndarray]:
    """Forward and backward of the spec's options; every result by name."""
    return run(backend, s.score, a, lengths=None if s.lengths is None else np.array(s.lengths),
               mask=a["mask"], causal=s.causal, scale=s.scale, bias=a["bias"])


# ---------------------------------------------------------------------------------------------
# which keys each query sees, in the heads layout [B, h, Tq, Tk]


def full_visibility(s: Spec, a: dict) -> np.ndarray:
    """Which keys each query sees: lengths AND mask AND causal AND bias != -inf, as a full
    [B, h, Tq, Tk] bool array."""
    visible = np.ones((s.B, s.h, s.Tq, s.Tk), bool)
    if s.lengths is not None:
        visible = visible & (np.arange(s.Tk) < np.array(s.lengths)[:, None])[:, None, None]
    if a["mask"] is not None:
        visible = visible & to_heads(np.broadcast_to(a["mask"], weights_shape(s)), s.layout)
    if s.causal:
        visible = visible & (np.arange(s.Tk)[None, :] <= np.arange(s.Tq)[:, None])
    if a["bias"] is not None:
        visible = visible & to_heads(np.broadcast_to(a["bias"], weights_shape(s)) != -np.inf,
                                     s.layout)
    return visible


def effective_scale(s: Spec) -> float:
    if s.scale is not None:
        return s.scale
    return 1.0 / math.sqrt(s.Hk) if s.score == "scaled_dot" else 1.0


# ---------------------------------------------------------------------------------------------
# torch


def torch_run(s: Spec, a: dict, use_sdpa: bool, device: str = "cpu") -> dict[str, np.ndarray]:
    """torch forward and autograd backward on `device`, in the dtype of `a`'s arrays, named
    like ours (NumPy arrays, back on the CPU), from `torch_impl.reference.attention`.

    use_sdpa: the context from its ``path="sdpa"`` (`F.scaled_dot_product_attention`; dot,
    scaled_dot, general); otherwise from the scores spelled out in torch ops. The weights
    always come from the latter (SDPA returns none); with use_sdpa the spec must not ask for
    d_weights.
    """
    assert not (use_sdpa and s.d_weights)

    def leaf(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x, device=device, requires_grad=True)

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x, device=device)

    leaves = {"d_query": leaf(a["query"]), "d_keys": leaf(a["keys"]),
              "d_values": leaf(a["values"])}
    params = {k: leaf(v) for k, v in a["params"].items()}
    leaves.update({f"d_params[{k!r}]": p for k, p in params.items()})
    bias = None
    if a["bias"] is not None:
        bias = leaves["d_params['bias']"] = leaf(a["bias"])
    options = {"score": s.score, "params": params, "causal": s.causal, "scale": s.scale,
               "bias": bias, "lengths": None if s.lengths is None else t(np.array(s.lengths)),
               "mask": None if a["mask"] is None else t(a["mask"])}
    args = (leaves["d_query"], leaves["d_keys"], leaves["d_values"])
    context, weights = reference.attention(*args, **options)
    if use_sdpa:
        context, _ = reference.attention(*args, **options, path="sdpa")
    outputs, cotangents = [context], [t(a["d_context"])]
    if s.d_weights:
        outputs.append(weights)
        cotangents.append(t(a["d_weights"]))
    grads = torch.autograd.grad(outputs, list(leaves.values()), cotangents, allow_unused=True)
    res = {"context": context, "weights": weights}
    for (name, x), g in zip(leaves.items(), grads, strict=True):
        res[name] = torch.zeros_like(x) if g is None else g
    return {n: x.detach().cpu().numpy() for n, x in res.items()}


# ---------------------------------------------------------------------------------------------
# comparison


def tags(s: Spec) -> list[str]:
    """The options a spec exercises, for the error report."""
    out = [s.score]
    if s.lengths is not None:
        out.append("lengths")
    if s.mask_shape is not None:
        out.append("bool mask")
    if s.bias_shape is not None:
        out.append("float mask (bias)" + (" with -inf" if s.bias_ninf else ""))
    if s.causal:
        out.append("causal" + (" Tq!=Tk" if s.Tq != s.Tk else ""))
    if s.scale is not None:
        out.append("scale")
    if s.h != s.h_kv:
        out.append("gqa")
    if s.layout == "heads":
        out.append("heads layout")
    if max(s.Tq, s.Tk, s.Hq) > 50:
        out.append("awkward size")
    if len(out) == 1:
        out.append("no option")
    return out


def _table(backend: str) -> str:
    return f"attention options ({backend}), largest float64 |ours - torch| by option"


def record(backend: str, s: Spec, errors: dict[str, float]) -> None:
    """File this float64 case's worst error under each of its options (`error_report`)."""
    title = _table(backend)
    worst = max(errors.values())
    for tag in tags(s):
        error_report.record(title, tag, worst)
    if "d_params['bias']" in errors:
        error_report.record(title, "d_bias", errors["d_params['bias']"])


def assert_dead_rows_are_zero(s: Spec, a: dict, ours: dict) -> None:
    """A query that sees no key: context, weights (when ours has them) and d_query exactly 0."""
    dead = from_heads(~full_visibility(s, a).any(axis=-1), s.layout)  # the query's lead axes
    if not dead.any():
        return
    for name in [n for n in ("context", "weights", "d_query") if n in ours]:
        assert np.all(ours[name][dead] == 0), f"{name}: a query that sees no key is not 0"


def compare(s: Spec, a: dict, ours: dict, reference: dict, torch32: dict | None) -> dict:
    """Every output of ours under the policy; entries torch gives as NaN are skipped (see the
    module docstring), ours must be finite wherever torch is. Ours has every result torch has
    but the weights when it ran without them. Returns the errors."""
    assert_dead_rows_are_zero(s, a, ours)
    assert set(ours) | {"weights"} == set(reference), sorted(set(ours) ^ set(reference))
    errors = {}
    scales: dict[str, float | None] = {}
    if torch32 is not None:  # the float32 floors (see test_attention.check_case)
        a64 = cast(a, np.float64)
        grads = {n: finite_max(x) for n, x in reference.items() if n.startswith("d_") and x.size}
        grad_scale = max(grads.values())
        ratio, size = vjp_cancellation(s, a64, reference["weights"])
        through_ds = max(grad_scale, ratio * max(v for n, v in grads.items()
                                                 if n != "d_values"))
        scales = {n: through_ds for n in grads}
        scales["d_values"] = grad_scale
        if "d_params['bias']" in reference:
            # a sum over the axes the bias was broadcast along of ds entries, each rounded
            # relative to its own terms: the floor scales with the summed terms' size
            summed = finite_max(reduce_to(size, a["bias"].shape))
            scales["d_params['bias']"] = max(through_ds, summed)
        scales["context"] = finite_max(a64["values"])
        scales["weights"] = None
    for name, want in reference.items():
        if name not in ours:  # the weights, of a run without them
            continue
        got = ours[name]
        assert got.shape == want.shape, f"{name}: shape {got.shape} != torch's {want.shape}"
        keep = ~np.isnan(want)
        if torch32 is not None:
            keep &= ~np.isnan(torch32[name])
        errors[name] = assert_close_policy(
            name, got[keep], want[keep],
            torch32=None if torch32 is None else torch32[name][keep],
            grad=name.startswith("d_"), scale=scales.get(name))
    return errors


def finite_max(x: np.ndarray) -> float:
    """max|x| over the entries that are not NaN (torch's NaN entries are skipped, see compare):
    a NaN there would make the float32 floor NaN, which fails every comparison."""
    return float(np.abs(x[~np.isnan(x)]).max(initial=0.0))


def vjp_cancellation(s: Spec, a64: dict, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """The softmax VJP ds = w (dw - delta), delta = sum_j w_j dw_j, of the case in float64:
    (max|w dw| / max|ds|, how far ds cancels below its terms (1 when it does not); the terms'
    size |w dw| + |w delta| per entry, in the caller's layout of the weights)."""
    w = to_heads(weights, s.layout)
    dc = to_heads(a64["d_context"], s.layout)
    v = a64["values"] if s.layout == "heads" else a64["values"][:, None]
    dw = dc @ np.repeat(v, s.h // s.h_kv, axis=1).swapaxes(-1, -2)
    if a64["d_weights"] is not None:
        dw = dw + to_heads(a64["d_weights"], s.layout)
    delta = np.sum(w * dw, axis=-1, keepdims=True)
    terms = finite_max(w * dw)
    ds = finite_max(w * (dw - delta))
    size = from_heads(np.abs(w * dw) + np.abs(w * delta), s.layout)
    return (max(1.0, terms / ds) if ds > 0 else 1.0), size


def reduce_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum x over the axes an array of `shape` was broadcast along to x's shape."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True)


def check(backend: str, s: Spec, dtype, use_sdpa: bool) -> dict[str, float]:
    a = cast(make_arrays(s), dtype)
    ours = run_ours(backend, s, a)
    for name, value in ours.items():
        assert value.dtype == dtype, f"{name}: dtype {value.dtype}, expected {np.dtype(dtype)}"
    reference = torch_run(s, cast(a, np.float64), use_sdpa)
    torch32 = torch_run(s, a, use_sdpa) if dtype == np.float32 else None
    return compare(s, a, ours, reference, torch32)


# ---------------------------------------------------------------------------------------------
# the properties


SDPA_SCORES = ("dot", "scaled_dot", "general")


@over_backends
@pytest.mark.parametrize("layout", LAYOUTS)
@examples(1.0)
@given(data=st.data())
def test_options_match_sdpa_float64(backend: str, layout: str, data: st.DataObject) -> None:
    s = data.draw(specs(layout, SDPA_SCORES), label="spec")
    record(backend, s, check(backend, s, np.float64, use_sdpa=True))


@over_backends
@pytest.mark.parametrize("layout", LAYOUTS)
@examples(0.6)
@given(data=st.data())
def test_options_match_sdpa_float32(backend: str, layout: str, data: st.DataObject) -> None:
    s = data.draw(specs(layout, SDPA_SCORES), label="spec")
    check(backend, s, np.float32, use_sdpa=True)


@over_backends
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("layout", LAYOUTS)
@examples(0.3)
@given(data=st.data())
def test_every_score_with_the_options_matches_torch(backend: str, layout: str, score: str,
                                                    dtype, data: st.DataObject) -> None:
    """All four scores (general and additive against torch ops, with autograd), every option,
    and a cotangent on the weights drawn too (where there are weights)."""
    s = data.draw(specs(layout, (score,), d_weights=None if has_weights(backend) else False),
                  label="spec")
    errors = check(backend, s, dtype, use_sdpa=False)
    if dtype == np.float64:
        record(backend, s, errors)


def _awkward(layout: str, score: str, **kw) -> Spec:
    base = dict(layout=layout, score=score, B=2, h=1, h_kv=1, Tq=1, Tk=97, Hq=7, Hk=7, Hv=59,
                A=0, lengths=(97, 40), mask_shape=None, bias_shape=None, bias_ninf=False,
                causal=False, scale=None, d_weights=False, seed=59)
    if layout == "steps":
        base.update(Tq=59, Tk=7, Hq=97, Hk=97, Hv=1, lengths=(7, 1),
                    mask_shape=(59, 7), causal=True)
    if layout == "heads":
        base.update(h=2, h_kv=1, Tq=7, Tk=59, Hq=1, Hk=1, Hv=97, lengths=(59, 7),
                    bias_shape=(1, 2, 7, 59), bias_ninf=True, scale=0.7)
    if layout == "single":
        base.update(mask_shape=(97,), bias_shape=(2, 97))
    base.update(kw)
    return Spec(**base)


AWKWARD_SPECS = [_awkward(layout, score) for layout in LAYOUTS
                 for score in ("dot", "scaled_dot", "general")]


@over_backends
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("spec", AWKWARD_SPECS,
                         ids=[f"{s.layout}-{s.score}-Tq{s.Tq}-Tk{s.Tk}-H{s.Hq}-Hv{s.Hv}"
                              for s in AWKWARD_SPECS])
def test_awkward_sizes_match_sdpa(backend: str, spec: Spec, dtype) -> None:
    """Sizes 1, 7, 59 and 97 on every axis somewhere, each layout with some options."""
    errors = check(backend, spec, dtype, use_sdpa=True)
    if dtype == np.float64:
        record(backend, spec, errors)


@over_backends
@pytest.mark.parametrize("sdpa_backend", ["math", "default"])
def test_a_query_that_sees_no_key_matches_sdpa(backend: str, sdpa_backend: str) -> None:
    """Heads layout, one query whose mask row is all False and one whose bias row is all
    -inf. torch 2.13's SDPA gives those rows context 0 and gradients 0 (math kernel and the
    default CPU kernel alike; older releases gave NaN, which this test also accepts from
    torch): ours are exact zeros, and everything else matches torch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = Spec("heads", "scaled_dot", B=2, h=2, h_kv=1, Tq=3, Tk=4, Hq=3, Hk=3, Hv=2, A=0,
             lengths=None, mask_shape=(2, 2, 3, 4), bias_shape=(2, 2, 3, 4), bias_ninf=False,
             causal=False, scale=None, d_weights=False, seed=31)
    a = make_arrays(s)
    a["mask"][...] = True
    a["mask"][0, 1, 2] = False
    a["bias"][1, 0, 0] = -np.inf
    ours = run_ours(backend, s, a)
    with sdpa_kernel(SDPBackend.MATH) if sdpa_backend == "math" else contextlib.nullcontext():
        reference = torch_run(s, a, use_sdpa=True)
    for name in ("context", "d_query"):
        for row in ((0, 1, 2), (1, 0, 0)):
            torch_row = reference[name][row]
            assert np.all(torch_row == 0) or np.all(np.isnan(torch_row)), (name, torch_row)
    errors = compare(s, a, ours, reference, None)
    record(backend, s, errors)


# ---------------------------------------------------------------------------------------------
# torch on CUDA


def _cuda_spec(layout: str, score: str, options: str, d_weights: bool) -> Spec:
    """A small fixed spec per layout. options: "plain" (none), "causal" (is_causal alone, SDPA's
    own flag) or "all" (lengths, a bool mask with holes, a bias with -inf, causal where there
    are query steps, a scale). The heads layout has grouped-query heads (h 4, h_kv 2) but for
    "plain"."""
    every = options == "all"
    Hk = 5 if score in ("dot", "scaled_dot") else 4
    base = dict(layout=layout, score=score, B=3, h=1, h_kv=1, Tq=1, Tk=9, Hq=5, Hk=Hk, Hv=6,
                A=4 if score == "additive" else 0, lengths=None, mask_shape=None,
                bias_shape=None, bias_ninf=every, causal=options != "plain" and layout != "single",
                scale=0.7 if every and score != "additive" else None, d_weights=d_weights,
                seed=41)
    if layout == "single" and every:
        base.update(lengths=(9, 2, 6), mask_shape=(3, 9), bias_shape=(1, 9))
    if layout == "steps":
        base.update(Tq=6)
        if every:
            base.update(lengths=(9, 2, 6), mask_shape=(6, 9), bias_shape=(3, 6, 9))
    if layout == "heads":
        base.update(B=2, h=4, h_kv=4 if options == "plain" else 2, Tq=5, Tk=7)
        if every:
            base.update(lengths=(7, 3), mask_shape=(2, 1, 1, 7), bias_shape=(1, 4, 5, 7))
    return Spec(**base)


def _cuda_cases():
    for layout in LAYOUTS:
        for options in ("plain", "causal", "all"):
            if layout == "single" and options == "causal":
                continue
            for score in SCORES:
                routes = ["sdpa", "torch-ops"] if score in SDPA_SCORES else ["torch-ops"]
                for route in routes:
                    yield pytest.param(layout, score, options, route,
                                       id=f"{layout}-{score}-{options}-{route}")


def check_against_torch_on(device: str, backend: str, s: Spec, dtype,
                           use_sdpa: bool) -> dict[str, float]:
    """Ours (on the CPU) against torch on `device` in the same dtype: float64 to the float64
    rule, float32 to rtol = atol = 1e-3 (the CPU-vs-CUDA rule, TF32 off); entries torch gives
    as NaN are skipped as in `compare`, and ours must be exact zeros at queries that see no
    key. Returns the errors."""
    a = cast(make_arrays(s), dtype)
    ours = run_ours(backend, s, a)
    theirs = torch_run(s, a, use_sdpa, device)
    if dtype == np.float64:
        return compare(s, a, ours, theirs, None)
    assert_dead_rows_are_zero(s, a, ours)
    assert set(ours) | {"weights"} == set(theirs), sorted(set(ours) ^ set(theirs))
    errors = {}
    for name, want in theirs.items():
        if name not in ours:  # the weights, of a run without them
            continue
        got = ours[name]
        assert got.dtype == want.dtype == np.float32, (name, got.dtype, want.dtype)
        assert got.shape == want.shape, f"{name}: shape {got.shape} != torch's {want.shape}"
        keep = ~np.isnan(want)
        errors[name] = assert_allclose_named(name, got[keep], want[keep], rtol=1e-3, atol=1e-3)
    return errors


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("layout", "score", "options", "route"), list(_cuda_cases()))
def test_options_match_torch_cuda(layout: str, score: str, options: str, route: str,
                                  dtype) -> None:
    """numpy_ref against torch on CUDA, every layout and score, without options, with causal
    alone and with every option together (grouped-query heads included): through SDPA (its
    CUDA kernels) for the dot-product scores, and through the scores in torch ops with a
    cotangent on the weights for all four."""
    use_sdpa = route == "sdpa"
    s = _cuda_spec(layout, score, options, d_weights=not use_sdpa)
    check_against_torch_on("cuda", "numpy_ref", s, dtype, use_sdpa)


# ---------------------------------------------------------------------------------------------
# the scores pair on its own


@over_modules
@pytest.mark.parametrize("heads", [False, True], ids=["[B, Tq, H]", "[B, h, Tq, H]"])
@pytest.mark.parametrize("score", SCORES)
@examples(0.3)
@given(B=st.integers(1, 3), h=st.integers(1, 3), Tq=SMALL, Tk=SMALL, Hq=SMALL, Hk=SMALL,
       A=SMALL, seed=st.integers(0, 2**32 - 1),
       scale=st.one_of(st.none(), st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)))
def test_attention_scores_pair_matches_torch_float64(backend, score, heads, B, h, Tq, Tk, Hq,
                                                     Hk, A, seed, scale) -> None:
    """``attention_scores_forward/backward``: s = scale * score(q, k), and its VJP."""
    mod = BACKENDS[backend]
    s = Spec("heads" if heads else "steps", score, B, h if heads else 1, h if heads else 1, Tq,
             Tk, Hq, Hq if score in ("dot", "scaled_dot") else Hk, 1, A if score == "additive"
             else 0, None, None, None, False, False, None if score == "additive" else scale,
             False, seed)
    a = make_arrays(s)
    rng = np.random.default_rng(seed + 1)
    q, k = a["query"], a["keys"]
    scores, cache = mod.attention_scores_forward(q, k, score=score, params=a["params"] or None,
                                                 scale=s.scale)
    d_scores = rng.standard_normal(scores.shape)
    d_q, d_k, d_p = mod.attention_scores_backward(d_scores, cache)

    tq, tk = torch.tensor(q, requires_grad=True), torch.tensor(k, requires_grad=True)
    tp = {n: torch.tensor(x, requires_grad=True) for n, x in a["params"].items()}
    ts = reference.attention_scores(tq, tk, score=score, params=tp, scale=s.scale)
    grads = torch.autograd.grad(ts, [tq, tk, *tp.values()], torch.tensor(d_scores))
    want = {"scores": ts, "d_query": grads[0], "d_keys": grads[1],
            **{f"d_params[{n!r}]": g for n, g in zip(tp, grads[2:], strict=True)}}
    got = {"scores": scores, "d_query": d_q, "d_keys": d_k,
           **{f"d_params[{n!r}]": g for n, g in d_p.items()}}
    assert set(got) == set(want)
    errors = {n: assert_close_policy(n, got[n], t.detach().numpy(), grad=n != "scores")
              for n, t in want.items()}
    error_report.record(_table(backend), "scores pair", max(errors.values()))


# ---------------------------------------------------------------------------------------------
# strided inputs: the same bits as contiguous copies


def _every_other(x: np.ndarray) -> np.ndarray:
    wide = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def _transposed(x: np.ndarray) -> np.ndarray:
    """x's values as a view of an array stored with its last two axes swapped."""
    return np.swapaxes(np.ascontiguousarray(np.swapaxes(x, -1, -2)), -1, -2)


def _bthd(x: np.ndarray) -> np.ndarray:
    """[B, h, T, D] as the usual view of a [B, T, h, D] projection (`.transpose(1, 2)`)."""
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


VIEWS = {"transposed": _transposed, "every-other": _every_other,
         "fortran": np.asfortranarray, "bthd": _bthd}


def _strided_spec(layout: str, score: str, options: bool) -> Spec:
    return Spec(layout, score, B=3, h=4 if layout == "heads" else 1,
                h_kv=2 if layout == "heads" else 1, Tq=1 if layout == "single" else 5, Tk=6,
                Hq=5, Hk=5, Hv=3, A=4 if score == "additive" else 0,
                lengths=(6, 2, 4) if options else None,
                mask_shape=weights_shape_of(layout, 3, 4, 5, 6) if options else None,
                bias_shape=weights_shape_of(layout, 3, 4, 5, 6) if options else None,
                bias_ninf=options, causal=options and layout != "single",
                scale=0.8 if options and score != "additive" else None, d_weights=True,
                seed=23)


def weights_shape_of(layout: str, B: int, h: int, Tq: int, Tk: int) -> tuple[int, ...]:
    return {"single": (B, Tk), "steps": (B, Tq, Tk), "heads": (B, h, Tq, Tk)}[layout]


def _strided_cases():
    for layout in LAYOUTS:
        for view in VIEWS:
            if view == "bthd" and layout != "heads":
                continue
            for score in SCORES:
                for options in (False, True):
                    yield layout, view, score, options


STRIDED = list(_strided_cases())


def _strided_param(backend: str, layout: str, view: str, score: str, options: bool):
    marks: list = []
    return pytest.param(backend, layout, view, score, options, marks=marks,
                        id=f"{backend}-{layout}-{view}-{score}-"
                           f"{'options' if options else 'plain'}")


@pytest.mark.parametrize(("backend", "layout", "view", "score", "options"),
                         [_strided_param(b, *c) for b in BACKENDS for c in STRIDED])
def test_strided_inputs_give_the_bits_of_contiguous_copies(backend: str, layout: str,
                                                           view: str, score: str,
                                                           options: bool) -> None:
    """Transposed and otherwise non-contiguous query/keys/values (and, with options, mask and
    bias as non-contiguous views too) give exactly the result of contiguous copies."""
    s = _strided_spec(layout, score, options)
    a = make_arrays(s)
    if s.mask_shape is not None:  # holes that leave every query some key
        a["mask"][..., 0] = True
        a["bias"][..., 0] = 0.5
    want = run_ours(backend, s, a)
    convert = VIEWS[view]
    strided = dict(a, query=convert(a["query"]), keys=convert(a["keys"]),
                   values=convert(a["values"]))
    if options:
        strided["mask"], strided["bias"] = _transposed(a["mask"]), _every_other(a["bias"])
    assert not strided["keys"].flags.c_contiguous
    got = run_ours(backend, s, strided)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} ({view})")


@pytest.mark.parametrize(("backend", "layout"), [
    pytest.param(b, lay, id=f"{b}-{lay}")
    for b in BACKENDS for lay in ("steps", "heads")])
def test_transposed_keys_with_one_query_step_give_the_bits_of_contiguous_keys(
    backend: str, layout: str
) -> None:
    """As above, with Tq = 1 in the many-query layouts (and h = h_kv = 1: grouped kv heads are
    repeated into a contiguous copy): one query step is what matters, not the layout."""
    s = _strided_spec(layout, "dot", False)._replace(Tq=1, h=1, h_kv=1)  # no kv copy
    a = make_arrays(s)
    want = run_ours(backend, s, a)
    got = run_ours(backend, s, dict(a, keys=_transposed(a["keys"])))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

