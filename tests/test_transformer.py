"""The Transformer's ops against torch: layer norm (nn.LayerNorm, and the Annotated Transformer's
formula), ReLU and GELU, the feed-forward block, nn.TransformerEncoderLayer /
TransformerDecoderLayer, their stacks and nn.Transformer; finite differences, padding, the
params' names and bad input.

The torch reference is `torch_impl.reference` (the module of the case's options holding our
params, loaded strictly, dropout 0, in train mode: torch's regular path), run forward and
differentiated with ``torch.autograd.grad`` under a random cotangent; every parameter gradient
and every input gradient (d_memory too) is compared. The params are drawn at random, the layer
norms' weights and biases included (torch's init would leave them 1 and 0). Hypothesis draws
the sizes (E 12 with 3 heads, 8 with 2 or 4, 4 with 1; S and T from 1, 2, 3, 7, 33), the
options and every mask (`cases`); `SCENARIOS` runs each mask kind on each op that takes it.

Padding: a position marked in a key padding mask (True, or -inf in a float mask) is padding.
torch computes something at such a row of the output, we give 0; so the outputs are compared
at the real rows only, and the cotangents are 0 at padding rows, where torch's input gradients
are then 0 as ours, and its parameter gradients equal ours. nn.Transformer's
memory_key_padding_mask marks (at least) the source's padding: our encoder's output there is 0,
torch's whatever it computed, and the decoder may read it only where the mask lets it. The
masks keep one key visible to every query (key 0 under a causal mask): a query that sees no
key gets attention 0 here, and NaN or (with its SDPA's safe softmax) 0 in torch, which
`test_a_query_that_sees_no_key_is_finite_here_and_nan_or_the_same_in_torch` documents.

Every parity property runs on every backend (`backends.BACKENDS`) in float64 (torch.testing's
tolerances; ~1e-14 seen) and float32 (`numpy_ref.testing.assert_close_policy`: within 2x torch's
own float32 error, 3x for gradients, against torch float64 on the same inputs, plus a floor of
8 eps32 times a scale: the result's size, or the size of the terms it sums where they cancel,
or for the layers 3 times the move of the result under an eps32 perturbation of every input,
`rounding_scales`). Nothing here assumes Numba's JIT is on (CI reruns the kernels with
NUMBA_DISABLE_JIT=1).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from backends import BACKENDS
from error_report import record
from hypothesis import given, settings
from hypothesis import strategies as st

import numpy_ref
from numpy_ref.gradcheck import gradcheck
from numpy_ref.testing import EPS32, assert_close_policy
from torch_impl import reference

over_backends = pytest.mark.parametrize("backend", list(BACKENDS))
over_dtypes = pytest.mark.parametrize("dtype", [np.float64, np.float32],
                                      ids=["float64", "float32"])
KINDS = reference.transformer.KINDS  # encoder_layer, decoder_layer, encoder, decoder, transformer

# The layers' properties build and differentiate torch modules (five times per float32 example:
# float64, float32 and three perturbed runs): 2/5 of the profile's examples per cell of the
# float64 grid (40 under ci), 1/5 per cell of the float32 one (20); the ops, cheap, half.
LAYER_EXAMPLES = settings(deadline=None,
                          max_examples=max(4, 2 * settings.default.max_examples // 5))
LAYER32_EXAMPLES = settings(deadline=None, max_examples=max(3, settings.default.max_examples // 5))
OP_EXAMPLES = settings(deadline=None, max_examples=max(5, settings.default.max_examples // 2))

FLOATS = {"allow_nan": False, "allow_infinity": False}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """torch on one thread for these tiny problems: on a small machine its thread pool costs
    a hundred times the arithmetic (0.2 s instead of 2 ms per layer's backward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _t(x: Any, device: str = "cpu") -> Any:
    return torch.tensor(x, device=device) if isinstance(x, np.ndarray) else x


def _leaf(x: np.ndarray, device: str = "cpu") -> torch.Tensor:
    return torch.tensor(x, device=device, requires_grad=True)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def compare(ours: dict[str, np.ndarray], ref64: dict[str, np.ndarray],
            torch32: dict[str, np.ndarray] | None = None, *,
            scales: dict[str, float] | None = None) -> dict[str, float]:
    """Every result of `ref64` against ours under the policy of ours' dtype (torch32: torch's
    float32 results, for float32). A float32 floor is relative to max|ref64| (a value) or to
    the case's largest gradient (a gradient: a sum of terms that can cancel far below them),
    or to ``scales[name]`` where that is larger: where the caller knows the size of the terms a
    result is computed from, or how far float32 rounding moves it (`rounding_scales`).
    Returns the errors by name."""
    grads = [np.abs(v).max(initial=0.0) for k, v in ref64.items() if k.startswith("d_")]
    grad_scale = max(grads, default=0.0)
    scales = scales or {}
    errors = {}
    for name, want in ref64.items():
        grad = name.startswith("d_")
        scale = grad_scale if grad else float(np.abs(want).max(initial=0.0))
        errors[name] = assert_close_policy(
            name, ours[name], want, torch32=None if torch32 is None else torch32[name],
            grad=grad, scale=max(scale, scales.get(name, 0.0)))
    assert set(errors) == set(ours), sorted(set(errors) ^ set(ours))
    return errors


def perturbed(a: Any, rng: np.random.Generator) -> Any:
    """`a` (nested dicts) with every float array x as x (1 +- eps32), each entry's sign at
    random: every entry moved by the float32 spacing (twice its largest rounding error)."""
    if isinstance(a, dict):
        return {k: perturbed(v, rng) for k, v in a.items()}
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return a * (1 + EPS32 * rng.choice([-1.0, 1.0], a.shape))  # -inf stays -inf
    return a


def rounding_scales(run, a64: dict, ref64: dict[str, np.ndarray], seed: int,
                    tries: int = 3) -> dict[str, float]:
    """The float32 floor's scale each result needs: its sensitivity to float32 rounding.

    ``run(b)`` is torch float64 on arrays b; it runs `tries` times on `a64` with every input,
    parameter and mask entry moved by eps32 (`perturbed`), and the largest move of each result
    is what rounding the first op's operands does to it, whoever computes it; every later op
    rounds too, alike. In a layer's deep compositions (layer norms of a few features, a
    gradient through two attentions and three norms) that is far above 8 eps32 times the
    result, and torch's float32 is often much luckier (its fused kernels: 20 times closer than
    the move, where ours and a perturbed torch float64 are alike), so its error alone does not
    measure what float32 can do. Returned as the scale whose floor ``8 eps32 scale`` is 3
    times the largest move (the policy's factor for gradients; on the case that needed it,
    ours was within 1.6 times the median of 16 moves, under the largest of two)."""
    rng = np.random.default_rng(seed)
    moves: dict[str, float] = {}
    for _ in range(tries):
        moved = run(perturbed(a64, rng))
        for k, v in moved.items():
            moves[k] = max(moves.get(k, 0.0), float(np.abs(v - ref64[k]).max(initial=0.0)))
    return {k: 3 * v / (8 * EPS32) for k, v in moves.items()}


# =============================================================================================
# layer norm and the activations


class NormCase(NamedTuple):
    lead: tuple[int, ...]  # the leading axes (rows)
    E: int
    affine: bool  # elementwise_affine
    bias: bool  # (with affine) a bias too
    eps: float
    scale: float  # the rows' spread
    shift: float  # the rows' mean, in units of the spread
    seed: int


@st.composite
def norm_cases(draw, min_E: int = 1) -> NormCase:
    lead = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
    E = draw(st.sampled_from([e for e in (1, 2, 3, 7, 12, 33, 64) if e >= min_E]))
    affine = draw(st.booleans())
    return NormCase(lead, E, affine, affine and draw(st.booleans()),
                    draw(st.sampled_from([1e-5, 1e-6, 1e-3, 0.5])),
                    draw(st.floats(0.01, 100.0, **FLOATS)), draw(st.floats(-4.0, 4.0, **FLOATS)),
                    draw(st.integers(0, 2**32 - 1)))


def norm_arrays(case: NormCase) -> dict:
    rng = np.random.default_rng(case.seed)
    shape = (*case.lead, case.E)
    params = {}
    if case.affine:
        params["weight"] = rng.choice([-1.0, 1.0], case.E) * rng.uniform(0.5, 1.5, case.E)
        if case.bias:
            params["bias"] = rng.uniform(-1.0, 1.0, case.E)
    return {"x": case.scale * (rng.standard_normal(shape) + case.shift), "params": params,
            "d_y": rng.standard_normal(shape)}


def cast(a: Any, dtype) -> Any:
    """The float arrays in `a` (nested dicts) in dtype; bool arrays and the rest as they are."""
    if isinstance(a, dict):
        return {k: cast(v, dtype) for k, v in a.items()}
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return a.astype(dtype)
    return a


def run_norm_ours(a: dict, backend: str, eps: float, variant: str) -> dict[str, np.ndarray]:
    mod = BACKENDS[backend]
    y, cache = mod.layer_norm_forward(a["x"], a["params"], eps=eps, variant=variant)
    d_x, d_params = mod.layer_norm_backward(a["d_y"], cache)
    assert list(d_params) == list(a["params"])
    return {"y": y, "d_x": d_x, **{f"d_{k}": v for k, v in d_params.items()}}


def run_norm_torch(case: NormCase, a: dict, variant: str) -> dict[str, np.ndarray]:
    """nn.LayerNorm holding the params (torch's variant) or the Annotated Transformer's formula
    (`reference.layer_norm`), and autograd."""
    dtype = torch.float64 if a["x"].dtype == np.float64 else torch.float32
    x = _leaf(a["x"])
    if variant == "torch":
        module = torch.nn.LayerNorm(case.E, eps=case.eps, elementwise_affine=case.affine,
                                    bias=case.bias, dtype=dtype)
        module.load_state_dict({k: torch.tensor(v) for k, v in a["params"].items()},
                               strict=True)
        params = dict(module.named_parameters())
        y = module(x)
    else:
        params = {k: _leaf(v) for k, v in a["params"].items()}
        y = reference.layer_norm(x, params.get("weight"), params.get("bias"), eps=case.eps,
                                 variant="annotated")
    grads = torch.autograd.grad(y, [x, *params.values()], torch.tensor(a["d_y"]))
    names = ["d_x", *(f"d_{k}" for k in params)]
    return {"y": _np(y), **{n: _np(g) for n, g in zip(names, grads, strict=True)}}


def _norm_terms(a: dict, eps: float, variant: str) -> dict[str, float]:
    """The size of the terms each float32 result sums, in float64: its floor's scale.

    x^ = (x - mean) r is only as accurate as x - mean, whose rounding is relative to |x|, not
    to the row's spread 1/r: every result from x^ carries c = max(1, r max|x|) times its own
    size in rounding (a row with a large mean), whoever computes it. And d_x sums terms of size
    ``r |d_y weight|`` (the module docstring of `numpy_ref.layer_norm`) that cancel: a row of
    one or two features has d_x = 0 exactly (up to eps) from terms that are not small."""
    x = a["x"].astype(np.float64)
    centred = x - x.mean(axis=-1, keepdims=True)
    squares = (centred * centred).sum(axis=-1, keepdims=True)
    E = x.shape[-1]
    r = (1 / np.sqrt(squares / E + eps) if variant == "torch"
         else 1 / (np.sqrt(squares / (E - 1)) + eps))
    c = np.maximum(1.0, r * np.abs(x).max(axis=-1, keepdims=True))  # [..., 1]
    d_y = np.abs(a["d_y"].astype(np.float64))
    weight = np.abs(a["params"].get("weight", np.ones(E))).astype(np.float64)
    terms = {"y": float((c * weight).max(initial=0.0)),
             "d_x": float((r * c * d_y * weight).max(initial=0.0))}
    if "weight" in a["params"]:
        terms["d_weight"] = float((c * d_y).reshape(-1, E).sum(axis=0).max(initial=0.0))
    return terms


OPS_TITLE = "transformer ops, largest float64 |ours - torch| / max(1, max|torch|) per tensor"


def record_op(key: str, errors: dict[str, float], ref64: dict[str, np.ndarray]) -> None:
    """Record an op's worst float64 error relative to its tensor's size (at least 1): a layer
    norm's d_x is 1/sigma times d_y, 1e5 on a row of two nearly equal features."""
    record(OPS_TITLE, key, max(e / max(1.0, float(np.abs(ref64[k]).max(initial=0.0)))
                               for k, e in errors.items()))


def check_norm(case: NormCase, dtype, backend: str, variant: str) -> None:
    a = cast(norm_arrays(case), dtype)
    ours = run_norm_ours(a, backend, case.eps, variant)
    assert all(v.dtype == dtype for v in ours.values())
    ref64 = run_norm_torch(case, cast(a, np.float64), variant)
    if dtype == np.float64:
        key = "layer_norm" if variant == "torch" else "layer_norm annotated"
        record_op(f"{key} ({backend})", compare(ours, ref64), ref64)
    else:
        compare(ours, ref64, run_norm_torch(case, a, variant),
                scales=_norm_terms(a, case.eps, variant))


@over_backends
@over_dtypes
@OP_EXAMPLES
@given(data=st.data())
def test_layer_norm_matches_nn_layer_norm(backend: str, dtype, data) -> None:
    check_norm(data.draw(norm_cases(), label="case"), dtype, backend, "torch")


@over_backends
@over_dtypes
@OP_EXAMPLES
@given(data=st.data())
def test_annotated_layer_norm_matches_its_formula(backend: str, dtype, data) -> None:
    check_norm(data.draw(norm_cases(min_E=2), label="case"), dtype, backend, "annotated")


def test_the_two_layer_norms_differ() -> None:
    """The variant is not ignored: unbiased std and eps outside the root."""
    a = norm_arrays(NormCase((3,), 5, True, True, 1e-6, 1.0, 0.0, 1))
    one = numpy_ref.layer_norm_forward(a["x"], a["params"], eps=1e-6)[0]
    other = numpy_ref.layer_norm_forward(a["x"], a["params"], eps=1e-6, variant="annotated")[0]
    assert np.abs(one - other).max() > 1e-2


ACTIVATIONS = ("relu", "gelu-none", "gelu-tanh")


def _activation_ours(mod, name: str, x: np.ndarray, d_y: np.ndarray):
    if name == "relu":
        y, cache = mod.relu_forward(x)
        return y, mod.relu_backward(d_y, cache)
    y, cache = mod.gelu_forward(x, approximate=name.removeprefix("gelu-"))
    return y, mod.gelu_backward(d_y, cache)


def _activation_torch(name: str, x: np.ndarray, d_y: np.ndarray):
    xt = _leaf(x)
    y = F.relu(xt) if name == "relu" else F.gelu(xt, approximate=name.removeprefix("gelu-"))
    (d_x,) = torch.autograd.grad(y, [xt], torch.tensor(d_y))
    return _np(y), _np(d_x)


@over_backends
@over_dtypes
@pytest.mark.parametrize("name", ACTIVATIONS)
@OP_EXAMPLES
@given(shape=st.lists(st.integers(1, 9), min_size=0, max_size=3),
       scale=st.floats(0.01, 30.0, **FLOATS), seed=st.integers(0, 2**32 - 1))
def test_activations_match_torch(backend: str, dtype, name: str, shape, scale, seed) -> None:
    """relu / gelu (exact and tanh) and their gradients against F.relu / F.gelu; x holds exact
    zeros (relu's kink: gradient 0 there, as torch's)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(scale * rng.standard_normal(shape))
    x[rng.random(shape) < 0.1] = 0.0
    d_y = rng.standard_normal(shape)
    x, d_y = x.astype(dtype), d_y.astype(dtype)
    y, d_x = _activation_ours(BACKENDS[backend], name, x, d_y)
    assert y.dtype == d_x.dtype == dtype
    y64, dx64 = _activation_torch(name, x.astype(np.float64), d_y.astype(np.float64))
    y32, dx32 = _activation_torch(name, x, d_y) if dtype == np.float32 else (None, None)
    # y = x Phi(x) is computed from terms of size |x| (1 + erf cancels for x << 0), and
    # d_x = d_y (Phi(x) + x phi(x)) from terms of size |d_y| (|x phi(x)| < 0.25).
    terms = {"y": float(np.abs(x).max(initial=0.0)), "d_x": float(np.abs(d_y).max(initial=0.0))}
    ref64 = {"y": y64, "d_x": dx64}
    errors = compare({"y": y, "d_x": d_x}, ref64,
                     None if y32 is None else {"y": y32, "d_x": dx32}, scales=terms)
    if dtype == np.float64:
        record_op(f"{name} ({backend})", errors, ref64)


# =============================================================================================
# the feed-forward block


def _feed_forward_terms(a: dict) -> dict[str, float]:
    """The size of the terms each result of the block sums (|.| through every product; the
    activations' values and slopes are at most 1.13 times their input's): a float32 floor's
    scale, as an output of one or two entries can cancel far below its terms."""
    p = {k: np.abs(v) for k, v in a["params"].items()}
    x, d_y = np.abs(a["x"]).reshape(-1, a["x"].shape[-1]), np.abs(a["d_y"]).reshape(
        -1, a["x"].shape[-1])
    z = x @ p["linear1.weight"].T + p.get("linear1.bias", 0.0)
    act = 1.13 * z
    d_act = 1.13 * (d_y @ p["linear2.weight"])
    terms = {"y": act @ p["linear2.weight"].T + p.get("linear2.bias", 0.0),
             "d_x": d_act @ p["linear1.weight"],
             "d_params['linear1.weight']": d_act.T @ x, "d_params['linear1.bias']": d_act.sum(0),
             "d_params['linear2.weight']": d_y.T @ act, "d_params['linear2.bias']": d_y.sum(0)}
    return {k: float(v.max(initial=0.0)) for k, v in terms.items()}


@over_backends
@over_dtypes
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@OP_EXAMPLES
@given(lead=st.lists(st.integers(1, 5), max_size=2), E=st.integers(1, 12),
       Fd=st.integers(1, 24), bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_feed_forward_matches_torch(backend: str, dtype, activation: str, lead, E, Fd, bias,
                                    seed) -> None:
    rng = np.random.default_rng(seed)
    params = {"linear1.weight": rng.uniform(-1, 1, (Fd, E)),
              "linear1.bias": rng.uniform(-1, 1, Fd),
              "linear2.weight": rng.uniform(-1, 1, (E, Fd)),
              "linear2.bias": rng.uniform(-1, 1, E)}
    if not bias:
        params = {k: v for k, v in params.items() if k.endswith("weight")}
    a = cast({"x": rng.standard_normal((*lead, E)), "params": params,
              "d_y": rng.standard_normal((*lead, E))}, dtype)
    mod = BACKENDS[backend]
    y, cache = mod.feed_forward_forward(a["x"], a["params"], activation=activation)
    d_x, d_params = mod.feed_forward_backward(a["d_y"], cache)
    assert list(d_params) == list(params)
    ours = {"y": y, "d_x": d_x, **{f"d_params[{k!r}]": v for k, v in d_params.items()}}

    def run_torch(b: dict) -> dict[str, np.ndarray]:
        x = _leaf(b["x"])
        p = {k: _leaf(v) for k, v in b["params"].items()}
        out = reference.feed_forward(x, p, activation=activation)
        grads = torch.autograd.grad(out, [x, *p.values()], torch.tensor(b["d_y"]))
        names = ["d_x", *(f"d_params[{k!r}]" for k in p)]
        return {"y": _np(out), **{n: _np(g) for n, g in zip(names, grads, strict=True)}}

    ref64 = run_torch(cast(a, np.float64))
    errors = compare(ours, ref64, run_torch(a) if dtype == np.float32 else None,
                     scales=_feed_forward_terms(cast(a, np.float64)))
    if dtype == np.float64:
        record_op(f"feed_forward {activation} ({backend})", errors, ref64)


# =============================================================================================
# the layers, the stacks and nn.Transformer: cases

# A key padding mask's kind: "bool" / "float" (random positions; float: -inf there and a finite
# bias elsewhere), "lengths-bool" / "lengths-float" (unsorted lengths: the tail of each row;
# float: -inf and 0). An attn_mask's: "bool2" / "float2" ([Tq, Tk]), "bool3" / "float3"
# ([N*h, Tq, Tk]), "causal-bool" / "causal-float" (the causal mask [Tq, Tk], query i sees keys
# j <= i; the case's `hint` says whether the is_causal hint comes with it).
KPM_KINDS = ("bool", "float", "lengths-bool", "lengths-float")
ATTN_KINDS = ("bool2", "float2", "bool3", "float3", "causal-bool", "causal-float")

INPUTS = {"encoder_layer": ("src",), "encoder": ("src",), "decoder_layer": ("tgt", "memory"),
          "decoder": ("tgt", "memory"), "transformer": ("src", "tgt")}
OPS = {"encoder_layer": "transformer_encoder_layer", "encoder": "transformer_encoder",
       "decoder_layer": "transformer_decoder_layer", "decoder": "transformer_decoder",
       "transformer": "transformer"}
ENCODES = ("encoder_layer", "encoder", "transformer")  # the kinds with a source
DECODES = ("decoder_layer", "decoder", "transformer")  # the kinds with a target and memory


class Case(NamedTuple):
    kind: str  # one of KINDS
    E: int  # d_model
    nhead: int
    F: int  # dim_feedforward
    S: int  # source / memory steps
    T: int  # target steps
    N: int | None  # batch; None: unbatched
    batch_first: bool
    norm_first: bool
    activation: str
    bias: bool
    eps: float
    layers: int  # a stack's depth (nn.Transformer: 2 + 2 always)
    final_norm: bool  # a stack's final norm (nn.Transformer has both)
    src_mask: str | None = None  # an ATTN_KINDS (the encoder's self-attention)
    tgt_mask: str | None = None  # the decoder's self-attention
    memory_mask: str | None = None  # the decoder's cross-attention [T, S]
    src_kpm: str | None = None  # a KPM_KINDS
    tgt_kpm: str | None = None
    memory_kpm: str | None = None
    hint: bool | None = True  # is_causal with each causal mask (None: the stacks' default)
    scale: float = 1.0  # the inputs' magnitude
    mask_scale: float = 1.0  # the float masks' finite entries'
    seed: int = 0

    def labels(self) -> list[str]:
        """The options this case exercises, for the report of the largest errors."""
        out = [f"E{self.E}/h{self.nhead}", self.activation,
               "norm_first" if self.norm_first else "post-norm",
               "unbatched" if self.N is None else
               ("batch_first" if self.batch_first else "seq-first")]
        out += [] if self.bias else ["bias=False"]
        for name in ("src_mask", "tgt_mask", "memory_mask", "src_kpm", "tgt_kpm", "memory_kpm"):
            kind = getattr(self, name)
            if kind is not None:
                hinted = kind.startswith("causal") and self.hint
                out.append(f"{name}={kind}{'+is_causal' if hinted else ''}")
        return out


HEADS = [(12, 3), (8, 2), (8, 4), (4, 1)]
STEPS = st.sampled_from([1, 2, 3, 7, 33])


@st.composite
def cases(draw, kind: str) -> Case:
    E, nhead = draw(st.sampled_from(HEADS))
    stack = kind in ("encoder", "decoder")
    masks: dict[str, str | None] = {}
    maybe_attn = st.one_of(st.none(), st.sampled_from(ATTN_KINDS))
    maybe_kpm = st.one_of(st.none(), st.sampled_from(KPM_KINDS))
    if kind in ENCODES:
        masks |= {"src_mask": draw(maybe_attn), "src_kpm": draw(maybe_kpm)}
    if kind in DECODES:
        masks |= {"tgt_mask": draw(maybe_attn), "memory_mask": draw(maybe_attn),
                  "tgt_kpm": draw(maybe_kpm), "memory_kpm": draw(maybe_kpm)}
    hints = [True, False] + ([None] if kind not in ("encoder_layer", "decoder_layer") else [])
    return Case(kind, E, nhead, draw(st.sampled_from([1, 7, 16, 24])), draw(STEPS), draw(STEPS),
                draw(st.sampled_from([None, 1, 2, 3])), draw(st.booleans()), draw(st.booleans()),
                draw(st.sampled_from(["relu", "gelu"])), draw(st.sampled_from([True, True, False])),
                draw(st.sampled_from([1e-5, 1e-6, 1e-3])),
                2 if kind == "transformer" else draw(st.integers(1, 2)),
                stack and draw(st.booleans()), **masks, hint=draw(st.sampled_from(hints)),
                scale=draw(st.floats(0.25, 4.0, **FLOATS)),
                mask_scale=draw(st.floats(0.0, 4.0, **FLOATS)),
                seed=draw(st.integers(0, 2**32 - 1)))


def _rows(case: Case, L: int) -> tuple[int, ...]:
    """The leading axes of an input with L steps in the case's layout."""
    if case.N is None:
        return (L,)
    return (case.N, L) if case.batch_first else (L, case.N)


def _in_layout(case: Case, pad: np.ndarray) -> np.ndarray:
    """A key padding mask's [N, L] ([L] unbatched) as the input's leading axes."""
    return pad.T if case.N is not None and not case.batch_first else pad


def _padding(rng: np.random.Generator, kind: str, shape: tuple[int, ...], keep: int
             ) -> np.ndarray:
    """Which positions [N, L] ([L]) a key padding mask of `kind` marks; key `keep` never."""
    L = shape[-1]
    if kind.startswith("lengths"):  # unsorted lengths, each in keep+1..L
        lengths = rng.integers(keep + 1, L + 1, size=shape[:-1])
        return np.arange(L) >= np.asarray(lengths)[..., None]
    pad = rng.random(shape) < 0.35
    pad[..., keep] = False
    return pad


def _kpm(rng: np.random.Generator, kind: str, pad: np.ndarray, mask_scale: float) -> np.ndarray:
    """The key padding mask of `kind` marking `pad`."""
    if kind.endswith("bool"):
        return pad
    bias = (mask_scale * rng.uniform(-1.0, 1.0, pad.shape) if kind == "float"
            else np.zeros(pad.shape))
    return np.where(pad, -np.inf, bias)


def _attn(rng: np.random.Generator, kind: str, case: Case, Tq: int, Tk: int, keep: int
          ) -> np.ndarray:
    """An attn_mask of `kind` for Tq queries and Tk keys; key `keep` is never hidden."""
    if kind.startswith("causal"):
        hidden = np.triu(np.ones((Tq, Tk), dtype=bool), 1)
    else:
        heads = case.nhead if case.N is None else case.N * case.nhead
        shape = (Tq, Tk) if kind.endswith("2") else (heads, Tq, Tk)
        hidden = rng.random(shape) < 0.35
        hidden[..., keep] = False
    if "bool" in kind:
        return hidden
    bias = 0.0 if kind.startswith("causal") else case.mask_scale * rng.uniform(-1, 1, hidden.shape)
    return np.where(hidden, -np.inf, bias)


def _hint(case: Case, mask: str | None, *, layer_option: bool) -> bool | None:
    """The is_causal argument for a mask: the case's hint with a causal mask, else False (None
    for the stacks' own default, which detects a causal mask)."""
    if mask is not None and mask.startswith("causal"):
        return bool(case.hint) if layer_option else case.hint
    return False if layer_option else None


def _w(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """torch's xavier_uniform magnitudes for a matrix, U(-0.5, 0.5) for a vector."""
    if len(shape) == 1:
        return rng.uniform(-0.5, 0.5, shape)
    return rng.uniform(-1.0, 1.0, shape) * math.sqrt(6.0 / sum(shape))


def make_params(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float64 params with the torch module's names, shapes and order, drawn at random (a
    layer norm's weight +-U(0.5, 1.5), its bias U(-0.5, 0.5))."""
    template = reference.build_module(
        case.kind, case.E, case.nhead, case.F, num_layers=case.layers, norm=case.final_norm,
        norm_first=case.norm_first, activation=case.activation, eps=case.eps, bias=case.bias,
        batch_first=case.batch_first, dtype=torch.float64)
    params = {}
    for k, v in template.state_dict().items():
        shape = tuple(v.shape)
        if "norm" in k.rsplit(".", 2)[-2] and k.endswith("weight"):
            params[k] = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 1.5, shape)
        else:
            params[k] = _w(rng, shape)
    return params


def make_arrays(case: Case) -> dict:
    """float64 inputs, params, masks (by the op's keyword names) and cotangent (0 at padding
    rows) of a case, and which rows of the output are real (None: all)."""
    rng = np.random.default_rng(case.seed)
    a: dict[str, Any] = {"params": make_params(case, rng)}
    steps = {"src": case.S, "memory": case.S, "tgt": case.T}
    for name in INPUTS[case.kind]:
        a[name] = case.scale * rng.standard_normal((*_rows(case, steps[name]), case.E))
    batch = () if case.N is None else (case.N,)
    causal = {n: (getattr(case, n) or "").startswith("causal")
              for n in ("src_mask", "tgt_mask", "memory_mask")}
    # the key each query always sees: 0 under a causal mask (the memory's keys are the source's
    # positions in nn.Transformer: one for both)
    keep_s = 0 if causal["src_mask"] or causal["memory_mask"] else int(rng.integers(case.S))
    keep_t = 0 if causal["tgt_mask"] else int(rng.integers(case.T))
    masks: dict[str, Any] = {}
    pads: dict[str, np.ndarray] = {}
    used = (("src",) if case.kind in ENCODES else ()) + (
        ("tgt", "memory") if case.kind in DECODES else ())
    for name, L, keep in (("src", case.S, keep_s), ("tgt", case.T, keep_t),
                          ("memory", case.S, keep_s)):
        if name not in used:
            continue
        kind = getattr(case, f"{name}_kpm")
        if name == "memory" and case.kind == "transformer" and "src" in pads:
            kind = kind or case.src_kpm  # the source's padding, in the memory mask's kind
            pads["memory"] = pads["src"]
        elif kind is not None:
            pads[name] = _padding(rng, kind, (*batch, L), keep)
        if kind is not None:
            masks[f"{name}_key_padding_mask"] = _kpm(rng, kind, pads[name], case.mask_scale)
    for name, (Tq, Tk, keep) in {"src": (case.S, case.S, keep_s), "tgt": (case.T, case.T, keep_t),
                                 "memory": (case.T, case.S, keep_s)}.items():
        kind = getattr(case, f"{name}_mask")
        if kind is not None and name in used:
            masks[f"{name}_mask"] = _attn(rng, kind, case, Tq, Tk, keep)
    # the op's keyword names (the torch module's too)
    layer = case.kind.endswith("_layer")
    if case.kind in ENCODES:
        is_causal = _hint(case, case.src_mask, layer_option=layer)
        if case.kind == "transformer":
            masks["src_is_causal"] = is_causal
        else:
            masks["is_causal"] = is_causal
        if case.kind == "encoder" and "src_mask" in masks:
            masks["mask"] = masks.pop("src_mask")
    if case.kind in DECODES:
        masks["tgt_is_causal"] = _hint(case, case.tgt_mask, layer_option=layer)
        masks["memory_is_causal"] = bool(_hint(case, case.memory_mask, layer_option=True))
    a["masks"] = masks
    out_name = "src" if case.kind in ("encoder_layer", "encoder") else "tgt"
    d_out = rng.standard_normal((*_rows(case, steps[out_name]), case.E))
    real = None if out_name not in pads else ~_in_layout(case, pads[out_name])
    if real is not None:
        d_out[~real] = 0.0
    a["d_out"], a["real"] = d_out, real
    a["pads"] = {n: _in_layout(case, p) for n, p in pads.items()}
    return a


def run_ours(case: Case, a: dict, backend: str) -> dict[str, np.ndarray]:
    """Our forward and backward: "out", "d_<input>" and "d_params[<key>]"."""
    mod = BACKENDS[backend]
    op = OPS[case.kind]
    inputs = [a[n] for n in INPUTS[case.kind]]
    out, cache = getattr(mod, f"{op}_forward")(
        *inputs, a["params"], nhead=case.nhead, norm_first=case.norm_first,
        activation=case.activation, eps=case.eps, batch_first=case.batch_first, **a["masks"])
    *d_inputs, d_params = getattr(mod, f"{op}_backward")(a["d_out"], cache)
    assert list(d_params) == list(a["params"]), (list(d_params), list(a["params"]))
    res = {"out": out}
    res |= {f"d_{n}": d for n, d in zip(INPUTS[case.kind], d_inputs, strict=True)}
    res |= {f"d_params[{k!r}]": v for k, v in d_params.items()}
    return res


def run_torch(case: Case, a: dict, device: str = "cpu") -> dict[str, np.ndarray]:
    """The torch module of the case holding our params (`reference.transformer_module`),
    forward with the same masks, and autograd for the inputs and every parameter; in the
    arrays' dtype."""
    module = reference.transformer_module(
        a["params"], kind=case.kind, nhead=case.nhead, norm_first=case.norm_first,
        activation=case.activation, eps=case.eps, batch_first=case.batch_first, device=device)
    inputs = [_leaf(a[n], device) for n in INPUTS[case.kind]]
    masks = {k: _t(v, device) for k, v in a["masks"].items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Support for mismatched", UserWarning)
        out = module(*inputs, **masks)
    names, leaves = zip(*module.named_parameters(), strict=True)
    grads = torch.autograd.grad(out, [*inputs, *leaves], _t(a["d_out"], device))
    keys = [*(f"d_{n}" for n in INPUTS[case.kind]), *(f"d_params[{k!r}]" for k in names)]
    return {"out": _np(out), **{k: _np(g) for k, g in zip(keys, grads, strict=True)}}


def _real_rows(res: dict[str, np.ndarray], real: np.ndarray | None) -> dict[str, np.ndarray]:
    return res if real is None else {**res, "out": res["out"][real]}


def check_case(case: Case, dtype, backend: str) -> dict[str, float]:
    """Ours against torch under the policy of `dtype` (outputs at the real rows; every
    gradient everywhere); ours 0 at padding rows. Returns the errors by name, each divided by
    max(1, max|torch|) of its tensor (what `record` tabulates)."""
    a = cast(make_arrays(case), dtype)
    ours = run_ours(case, a, backend)
    for name, value in ours.items():
        assert value.dtype == dtype, f"{name}: dtype {value.dtype}, expected {np.dtype(dtype)}"
    if a["real"] is not None:
        assert np.all(ours["out"][~a["real"]] == 0), "out: not 0 at padding rows"
    for name, pad in a["pads"].items():
        if f"d_{name}" in ours:
            assert np.all(ours[f"d_{name}"][pad] == 0), f"d_{name}: not 0 at padding rows"
    a64 = cast(a, np.float64)
    ref64 = _real_rows(run_torch(case, a64), a["real"])
    if dtype == np.float64:
        errors = compare(_real_rows(ours, a["real"]), ref64)
    else:
        scales = rounding_scales(lambda b: _real_rows(run_torch(case, b), a["real"]), a64,
                                 ref64, case.seed)
        errors = compare(_real_rows(ours, a["real"]), ref64,
                         _real_rows(run_torch(case, a), a["real"]), scales=scales)
    return {k: e / max(1.0, float(np.abs(ref64[k]).max(initial=0.0))) for k, e in errors.items()}


def _record(case: Case, backend: str, errors: dict[str, float]) -> None:
    worst = max(errors.values())
    record("transformer layers, largest float64 |ours - torch| / max(1, max|torch|) by kind",
           f"{case.kind} ({backend})", worst)
    for label in case.labels():
        record("transformer layers (every kind and backend), largest float64 |ours - torch| / "
               "max(1, max|torch|) by option", label, worst)


# =============================================================================================
# the layers, the stacks and nn.Transformer against torch


@over_backends
@pytest.mark.parametrize("kind", KINDS)
@LAYER_EXAMPLES
@given(data=st.data())
def test_matches_torch_float64(backend: str, kind: str, data) -> None:
    case = data.draw(cases(kind), label="case")
    _record(case, backend, check_case(case, np.float64, backend))


@over_backends
@pytest.mark.parametrize("kind", KINDS)
@LAYER32_EXAMPLES
@given(data=st.data())
def test_float32_within_policy(backend: str, kind: str, data) -> None:
    check_case(data.draw(cases(kind), label="case"), np.float32, backend)


# Every mask kind on each op that takes it, with awkward sizes (E 12 with 3 heads, 33 and 7
# steps): (src_mask, tgt_mask, memory_mask, key padding masks' kind, hint).
SCENARIOS = {
    "no-mask": (None, None, None, None, True),
    "attn2d-bool": ("bool2", "bool2", "bool2", None, True),
    "attn2d-float": ("float2", "float2", "float2", None, True),
    "attn3d-bool": ("bool3", "bool3", "bool3", None, True),
    "attn3d-float": ("float3", "float3", "float3", None, True),
    "causal-bool+is_causal": ("causal-bool", "causal-bool", "causal-bool", None, True),
    "causal-float+is_causal": ("causal-float", "causal-float", "causal-float", None, True),
    "causal-float-no-hint": ("causal-float", "causal-float", None, None, False),
    "kpm-bool": (None, None, None, "bool", True),
    "kpm-float": (None, None, None, "float", True),
    "lengths-bool": (None, None, None, "lengths-bool", True),
    "lengths-float": (None, None, None, "lengths-float", True),
    "lengths-bool+causal+is_causal": ("causal-bool", "causal-float", None, "lengths-bool", True),
    "kpm-float+attn3d-bool": ("bool3", "bool3", "float3", "float", True),
    "kpm-bool+attn2d-float": ("float2", "float2", "float2", "bool", True),
}
SCENARIO_KINDS = ("encoder_layer", "decoder_layer", "transformer")


def scenario_case(kind: str, scenario: str, index: int) -> Case:
    src_mask, tgt_mask, memory_mask, kpm, hint = SCENARIOS[scenario]
    masks: dict[str, str | None] = {}
    if kind in ENCODES:
        masks |= {"src_mask": src_mask, "src_kpm": kpm}
    if kind in DECODES:
        masks |= {"tgt_mask": tgt_mask, "memory_mask": memory_mask, "tgt_kpm": kpm,
                  "memory_kpm": kpm}
    return Case(kind, E=12, nhead=3, F=7, S=33 if index % 2 else 7, T=7 if index % 2 else 33,
                N=(3, 2, None)[index % 3], batch_first=index % 4 < 2, norm_first=index % 2 == 0,
                activation=("relu", "gelu")[index % 5 % 2], bias=index % 7 != 3, eps=1e-5,
                layers=2, final_norm=True, **masks, hint=hint, scale=1.5, mask_scale=2.0,
                seed=1000 + index)


@over_backends
@pytest.mark.parametrize("kind", SCENARIO_KINDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_mask_kind_matches_torch(backend: str, kind: str, scenario: str) -> None:
    index = list(SCENARIOS).index(scenario) + 5 * SCENARIO_KINDS.index(kind)
    case = scenario_case(kind, scenario, index)
    _record(case, backend, check_case(case, np.float64, backend))


@over_backends
@pytest.mark.parametrize("kind", KINDS)
def test_float32_awkward_sizes_within_policy(backend: str, kind: str) -> None:
    """float32 at the largest sizes of the grid, with a mask of each family at once."""
    case = Case(kind, E=12, nhead=3, F=24, S=33, T=33, N=3, batch_first=kind != "encoder",
                norm_first=kind in ("decoder_layer", "transformer"), activation="gelu",
                bias=kind != "decoder", eps=1e-5, layers=2, final_norm=True,
                src_mask="float3", tgt_mask="causal-bool", memory_mask="bool2",
                src_kpm="lengths-float", tgt_kpm="lengths-bool", memory_kpm="bool",
                hint=True, scale=2.0, mask_scale=2.0, seed=7)
    check_case(case, np.float32, backend)


# =============================================================================================
# a query that sees no key


@over_backends
@pytest.mark.parametrize("kind", ["encoder_layer", "decoder_layer"])
def test_a_query_that_sees_no_key_is_finite_here_and_nan_or_the_same_in_torch(
        backend: str, kind: str) -> None:
    """An attn_mask that hides every key from query 2 (src_mask, or memory_mask for the
    decoder's cross-attention). Ours: attention 0 there, so the output and every gradient are
    finite, and the other queries are untouched. torch: nn.MultiheadAttention's explicit path
    (need_weights=True) takes the softmax of a row of -inf, NaN; the layers call it with
    need_weights=False, where torch's SDPA gives NaN in older releases and, in the ones with its
    safe softmax (2.13 when this was written), 0 attention as ours: then every result agrees
    with ours."""
    case = Case(kind, E=8, nhead=2, F=16, S=5, T=5, N=2, batch_first=True, norm_first=False,
                activation="relu", bias=True, eps=1e-5, layers=1, final_norm=False, seed=3)
    a = make_arrays(case)
    hidden = np.zeros((case.T, case.S), dtype=bool)
    hidden[2] = True
    a["masks"] = {"src_mask" if kind == "encoder_layer" else "memory_mask": hidden}
    ours, theirs = run_ours(case, a, backend), run_torch(case, a)
    assert all(np.isfinite(v).all() for v in ours.values())
    seen = np.arange(case.T) != 2
    np.testing.assert_allclose(ours["out"][:, seen], theirs["out"][:, seen], rtol=1e-7,
                               atol=1e-7)
    if np.isnan(theirs["out"][:, 2]).any():  # torch's softmax of -inf only
        assert np.isnan(theirs["d_params['linear1.weight']"]).any()
    else:  # torch's SDPA's safe softmax: 0 attention, as ours
        compare(ours, theirs)
    # the explicit path: NaN in torch's every release
    query = torch.tensor(a["src" if kind == "encoder_layer" else "tgt"])
    mha = torch.nn.MultiheadAttention(case.E, case.nhead, batch_first=True,
                                      dtype=torch.float64)
    out, _ = mha(query, query, query, attn_mask=torch.tensor(hidden), need_weights=True)
    assert torch.isnan(out[:, 2]).all() and not torch.isnan(out[:, seen]).any()


# =============================================================================================
# padding is not data


PADDED = {  # kind -> the inputs that have padding rows
    "encoder_layer": ("src",), "encoder": ("src",), "decoder_layer": ("tgt", "memory"),
    "decoder": ("tgt", "memory"), "transformer": ("src", "tgt")}


@over_backends
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fill", ["nan", "inf"])
@pytest.mark.parametrize("kpm", ["lengths-bool", "float"])
def test_padding_rows_change_nothing_bit_for_bit(backend: str, kind: str, fill: str,
                                                 kpm: str) -> None:
    """NaN or inf in the padding rows of src / tgt / memory, and in the cotangent's padding
    rows, give the results of zeros there bit for bit; out and the input gradients are 0
    there."""
    for seed in range(100):  # the first seed that pads some rows of every input, not all
        case = Case(kind, E=8, nhead=2, F=16, S=7, T=6, N=3, batch_first=kind != "decoder",
                    norm_first=kind == "encoder", activation="gelu", bias=True, eps=1e-5,
                    layers=2, final_norm=True, tgt_mask="causal-bool" if kind in DECODES else None,
                    src_kpm=kpm, tgt_kpm=kpm, memory_kpm=kpm, seed=seed)
        a = make_arrays(case)
        if all(a["pads"][n].any() and not a["pads"][n].all() for n in PADDED[kind]):
            break
    for name in PADDED[kind]:
        a[name][a["pads"][name]] = 0.0
    clean = run_ours(case, a, backend)
    value = {"nan": np.nan, "inf": np.inf}[fill]
    for name in PADDED[kind]:
        a[name][a["pads"][name]] = value
    a["d_out"][~a["real"]] = value
    dirty = run_ours(case, a, backend)
    for name, got in clean.items():
        np.testing.assert_array_equal(dirty[name], got, err_msg=name)
        assert np.isfinite(got).all(), name
    assert np.all(clean["out"][~a["real"]] == 0)
    for name in PADDED[kind]:
        assert np.all(clean[f"d_{name}"][a["pads"][name]] == 0), name


# =============================================================================================
# finite differences


def _fd_check(case: Case, a: dict) -> dict[str, float]:
    """numpy_ref's gradients of L = sum(d_out * out) against central differences, for every
    input and parameter."""
    analytic = run_ours(case, a, "numpy_ref")
    op = getattr(numpy_ref, f"{OPS[case.kind]}_forward")

    def loss() -> float:
        out, _ = op(*(a[n] for n in INPUTS[case.kind]), a["params"], nhead=case.nhead,
                    norm_first=case.norm_first, activation=case.activation, eps=case.eps,
                    batch_first=case.batch_first, **a["masks"])
        return float(np.sum(a["d_out"] * out))

    inputs = {f"d_{n}": a[n] for n in INPUTS[case.kind]}
    inputs |= {f"d_params[{k!r}]": v for k, v in a["params"].items()}
    return gradcheck(loss, inputs, analytic)


@pytest.mark.parametrize("kind", ["encoder_layer", "decoder_layer"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_layer_backward_matches_finite_differences(kind: str, norm_first: bool) -> None:
    case = Case(kind, E=4, nhead=2, F=5, S=3, T=3, N=2, batch_first=norm_first,
                norm_first=norm_first, activation="gelu" if norm_first else "relu", bias=True,
                eps=1e-5, layers=1, final_norm=False, src_mask="float2", tgt_mask="causal-float",
                memory_mask="bool3", src_kpm="lengths-bool", tgt_kpm="float",
                memory_kpm="lengths-float", hint=False, seed=11)
    errors = _fd_check(case, make_arrays(case))
    record("transformer finite differences, largest |analytic - numeric|", kind,
           max(errors.values()), bound=None)


@pytest.mark.parametrize("variant", ["torch", "annotated"])
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
def test_layer_norm_backward_matches_finite_differences(variant: str, affine: str) -> None:
    a = norm_arrays(NormCase((2, 3), 5, affine != "none", affine == "weight+bias", 1e-3, 1.5,
                             0.5, 12))

    def loss() -> float:
        y, _ = numpy_ref.layer_norm_forward(a["x"], a["params"], eps=1e-3, variant=variant)
        return float(np.sum(a["d_y"] * y))

    _, cache = numpy_ref.layer_norm_forward(a["x"], a["params"], eps=1e-3, variant=variant)
    d_x, d_params = numpy_ref.layer_norm_backward(a["d_y"], cache)
    gradcheck(loss, {"x": a["x"], **a["params"]}, {"x": d_x, **d_params})


# =============================================================================================
# torch's state_dicts as they are


def _torch_init_module(case: Case) -> torch.nn.Module:
    torch.manual_seed(case.seed)
    return reference.build_module(case.kind, case.E, case.nhead, case.F, num_layers=case.layers,
                                  norm=case.final_norm, norm_first=case.norm_first,
                                  activation=case.activation, eps=case.eps, bias=case.bias,
                                  batch_first=case.batch_first, dtype=torch.float64)


@over_backends
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_state_dicts_load_as_they_are(backend: str, kind: str, bias: bool) -> None:
    """The params are ``{k: v.detach().numpy() for k, v in module.state_dict().items()}``
    exactly (views of the module's tensors, torch's init); d_params has their keys in their
    order, and the results are torch's."""
    case = Case(kind, E=8, nhead=4, F=12, S=5, T=4, N=2, batch_first=False, norm_first=False,
                activation="relu", bias=bias, eps=1e-5, layers=2,
                final_norm=kind in ("encoder", "decoder"), seed=21)
    module = _torch_init_module(case)
    params = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    rng = np.random.default_rng(0)
    a = {"params": params, "masks": {}, "d_out": None}
    for n in INPUTS[kind]:
        a[n] = rng.standard_normal(((case.T if n == "tgt" else case.S), case.N, case.E))
    out_steps = case.T if kind in DECODES else case.S
    a["d_out"] = rng.standard_normal((out_steps, case.N, case.E))
    before = {k: v.copy() for k, v in params.items()}
    ours = run_ours(case, a, backend)  # asserts the keys' order
    theirs = run_torch(case, a)
    for name, want in theirs.items():
        assert_close_policy(name, ours[name], want, grad=name.startswith("d_"))
    for k, v in params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"params[{k!r}] was written")


@over_backends
@pytest.mark.parametrize("kind", KINDS)
def test_d_params_follow_the_callers_order(backend: str, kind: str) -> None:
    """A params dict in another order than torch's gets its gradients in that order."""
    case = Case(kind, E=4, nhead=2, F=6, S=3, T=2, N=2, batch_first=True, norm_first=True,
                activation="gelu", bias=True, eps=1e-5, layers=2, final_norm=False, seed=22)
    a = make_arrays(case)
    a["params"] = dict(reversed(a["params"].items()))
    run_ours(case, a, backend)  # asserts list(d_params) == list(params)


# =============================================================================================
# bad input


def _layer_params(kind: str = "encoder_layer", E: int = 12, nhead: int = 3,
                  bias: bool = True) -> dict[str, np.ndarray]:
    case = Case(kind, E=E, nhead=nhead, F=7, S=5, T=4, N=2, batch_first=False, norm_first=False,
                activation="relu", bias=bias, eps=1e-5, layers=2, final_norm=False)
    return make_params(case, np.random.default_rng(0))


def _enc(src=None, params=None, **kw):
    src = np.zeros((5, 2, 12)) if src is None else src
    params = _layer_params() if params is None else params
    return lambda m: m.transformer_encoder_layer_forward(src, params, **{"nhead": 3, **kw})


def _dec(tgt=None, memory=None, params=None, **kw):
    tgt = np.zeros((4, 2, 12)) if tgt is None else tgt
    memory = np.zeros((5, 2, 12)) if memory is None else memory
    params = _layer_params("decoder_layer") if params is None else params
    return lambda m: m.transformer_decoder_layer_forward(tgt, memory, params,
                                                         **{"nhead": 3, **kw})


def _without(params: dict, *keys: str) -> dict:
    return {k: v for k, v in params.items() if k not in keys}


def _encoder_backward_with(d_out: np.ndarray, cache_of: str):
    def call(m):
        _, cache = _enc()(m)
        if cache_of == "decoder":
            cache = _dec()(m)[1]
        return m.transformer_encoder_layer_backward(d_out, cache)
    return call


_P = _layer_params()
_STACK = {f"layers.{i}.{k}": v for i in (0, 2) for k, v in _P.items()}
BAD = [
    ("src rank 4", _enc(src=np.zeros((1, 5, 2, 12))), ValueError,
     r"src: expected a 2-D \[S, E\] or 3-D \[S, N, E\] array, got shape \(1, 5, 2, 12\)"),
    ("src rank 1", _enc(src=np.zeros(12)), ValueError, r"src: expected a 2-D"),
    ("memory rank differs", _dec(memory=np.zeros((5, 12))), ValueError,
     r"memory: expected 3-D like tgt"),
    ("src integer", _enc(src=np.zeros((5, 2, 12), int)), TypeError,
     r"src: expected dtype float32 or float64, got int64"),
    ("src float32, params float64", _enc(src=np.zeros((5, 2, 12), np.float32)), TypeError,
     r"params\['linear1.weight'\]: dtype float64 does not match the dtype of the layer's input "
     r"\(float32\)"),
    ("memory float32, tgt float64", _dec(memory=np.zeros((5, 2, 12), np.float32)), TypeError,
     r"memory: dtype float32 does not match the dtype of tgt"),
    ("params missing key", _enc(params=_without(_P, "linear2.weight")), ValueError,
     r"params: missing key 'linear2.weight' \(expected shape \[E, F\] = \(12, 7\)\)"),
    ("params unexpected key", _enc(params={**_P, "norm3.weight": np.ones(12)}), ValueError,
     r"params: unexpected keys \['norm3.weight'\]"),
    ("params a decoder layer's", _enc(params=_layer_params("decoder_layer")), ValueError,
     r"params: unexpected keys \['multihead_attn.in_proj_bias'"),
    ("params of an encoder layer for a decoder layer", _dec(params=_P), ValueError,
     r"params: missing key 'multihead_attn.in_proj_weight'"),
    ("a bias missing", _enc(params=_without(_P, "norm1.bias")), ValueError,
     r"params: missing key 'norm1.bias'"),
    ("biases without linear1.bias", _enc(params=_without(_P, "linear1.bias")), ValueError,
     r"params: unexpected keys \['linear2.bias', 'norm1.bias'.*bias=False: it holds no bias"),
    ("a bias in a bias=False layer",
     _enc(params={**_layer_params(bias=False), "norm2.bias": np.zeros(12)}), ValueError,
     r"params: unexpected keys \['norm2.bias'\]"),
    ("params wrong shape", _enc(params={**_P, "norm2.weight": np.ones(11)}), ValueError,
     r"params\['norm2.weight'\]: expected shape \[E\] = \(12,\), got \(11,\)"),
    ("params not a dict", _enc(params=[1, 2]), TypeError,
     r"params: expected a dict of arrays, got list"),
    ("bad activation", _enc(activation="tanh"), ValueError,
     r"activation: expected one of \('relu', 'gelu'\), got 'tanh'"),
    ("nhead not dividing E", _enc(nhead=5), ValueError,
     r"nhead: expected a positive divisor of d_model = 12"),
    ("nhead a bool", _enc(nhead=True), TypeError, r"nhead: expected an int, got bool"),
    ("norm_first not bool", _enc(norm_first=1), TypeError, r"norm_first: expected a bool"),
    ("batch_first not bool", _dec(batch_first="yes"), TypeError,
     r"batch_first: expected a bool"),
    ("eps zero", _enc(eps=0.0), ValueError, r"eps: expected a positive finite float"),
    ("is_causal without a mask", _enc(is_causal=True), ValueError,
     r"is_causal: torch needs attn_mask"),
    ("src_key_padding_mask transposed", _enc(src_key_padding_mask=np.zeros((5, 2), bool)),
     ValueError, r"key_padding_mask: expected shape \[N, Tk\] = \(2, 5\), got \(5, 2\)"),
    ("src_key_padding_mask integer", _enc(src_key_padding_mask=np.zeros((2, 5), int)),
     TypeError, r"key_padding_mask: expected dtype bool"),
    ("src_mask wrong shape", _enc(src_mask=np.zeros((5, 4), bool)), ValueError,
     r"attn_mask: expected shape \[Tq, Tk\] = \(5, 5\)"),
    ("stack missing layer",
     lambda m: m.transformer_encoder_forward(np.zeros((5, 2, 12)), _STACK, nhead=3),
     ValueError, r"params: the encoder has layers up to 2 but no 'layers.1.\*'"),
    ("stack no layer", lambda m: m.transformer_decoder_forward(
        np.zeros((4, 2, 12)), np.zeros((5, 2, 12)), {"norm.weight": np.ones(12)}, nhead=3),
     ValueError, r"params: the decoder holds no layer"),
    ("stack unexpected key", lambda m: m.transformer_encoder_forward(
        np.zeros((5, 2, 12)), {**{f"layers.0.{k}": v for k, v in _P.items()},
                               "final.weight": np.ones(12)}, nhead=3),
     ValueError, r"params: unexpected keys \['final.weight'\] in the encoder"),
    ("transformer unexpected key", lambda m: m.transformer_forward(
        np.zeros((5, 2, 12)), np.zeros((4, 2, 12)), {"generator.weight": np.ones(3)}, nhead=3),
     ValueError, r"params: unexpected keys \['generator.weight'\]"),
    ("encoder layer backward, decoder's cache", _encoder_backward_with(np.zeros((5, 2, 12)),
                                                                        "decoder"),
     TypeError, r"cache: expected the TransformerEncoderLayerCache returned by "
     r"transformer_encoder_layer_forward, got TransformerDecoderLayerCache"),
    ("encoder layer backward, d_out shape", _encoder_backward_with(np.zeros((1, 2, 12)),
                                                                    "encoder"),
     ValueError, r"d_out: expected shape like the layer's output = \(5, 2, 12\)"),
    ("encoder layer backward, d_out float32",
     _encoder_backward_with(np.zeros((5, 2, 12), np.float32), "encoder"), TypeError,
     r"d_out: dtype float32 does not match"),
    ("transformer backward, a layer's cache",
     lambda m: m.transformer_backward(np.zeros((5, 2, 12)), _enc()(m)[1]), TypeError,
     r"cache: expected the TransformerCache"),
    ("feed_forward a layer's params",
     lambda m: m.feed_forward_forward(np.zeros((5, 12)), _P), ValueError,
     r"params: unexpected keys \['norm1.bias'.*the block takes linear1.\* and linear2.\*"),
    ("feed_forward bad activation", lambda m: m.feed_forward_forward(
        np.zeros((5, 12)), {k: v for k, v in _P.items() if k.startswith("linear")},
        activation="silu"), ValueError, r"activation: expected one of"),
    ("layer_norm bad variant", lambda m: m.layer_norm_forward(np.zeros((3, 4)), {},
                                                              variant="pytorch"),
     ValueError, r"variant: expected one of \('torch', 'annotated'\), got 'pytorch'"),
    ("layer_norm x integer", lambda m: m.layer_norm_forward(np.zeros((3, 4), int), {}),
     TypeError, r"x: expected dtype float32 or float64, got int64"),
    ("layer_norm x scalar", lambda m: m.layer_norm_forward(np.float64(1.0), {}),
     (TypeError, ValueError), r"x: expected"),
    ("layer_norm weight float32", lambda m: m.layer_norm_forward(
        np.zeros((3, 4)), {"weight": np.ones(4, np.float32)}), TypeError,
     r"params\['weight'\]: dtype float32 does not match the dtype of x"),
    ("layer_norm weight wrong shape", lambda m: m.layer_norm_forward(
        np.zeros((3, 4)), {"weight": np.ones(5)}), ValueError,
     r"params\['weight'\]: expected shape \[E\] = \(4,\), got \(5,\)"),
    ("layer_norm unexpected key", lambda m: m.layer_norm_forward(
        np.zeros((3, 4)), {"gamma": np.ones(4)}), ValueError,
     r"params: unexpected keys \['gamma'\]"),
    ("layer_norm annotated E 1", lambda m: m.layer_norm_forward(np.zeros((3, 1)), {},
                                                                variant="annotated"),
     ValueError, r"x: the annotated variant's unbiased std needs E >= 2"),
    ("layer_norm eps negative", lambda m: m.layer_norm_forward(np.zeros((3, 4)), {}, eps=-1.0),
     ValueError, r"eps: expected a positive finite float, got -1.0"),
    ("layer_norm backward, gelu's cache", lambda m: m.layer_norm_backward(
        np.zeros(3), m.gelu_forward(np.zeros(3))[1]), TypeError,
     r"cache: expected the \w*LayerNormCache returned by (kernels\.)?layer_norm_forward, got "
     r"\w*GeluCache"),
    ("layer_norm backward, d_y shape", lambda m: m.layer_norm_backward(
        np.zeros((3, 5)), m.layer_norm_forward(np.zeros((3, 4)), {})[1]), ValueError,
     r"d_y: expected shape"),
    ("gelu bad approximate", lambda m: m.gelu_forward(np.zeros(3), approximate="fast"),
     ValueError, r"approximate: expected one of \('none', 'tanh'\), got 'fast'"),
    ("relu integer", lambda m: m.relu_forward(np.zeros(3, int)), TypeError,
     r"x: expected dtype float32 or float64, got int64"),
    ("relu backward, gelu's cache", lambda m: m.relu_backward(
        np.zeros(3), m.gelu_forward(np.zeros(3))[1]), TypeError,
     r"cache: expected the \w*ReluCache returned by (kernels\.)?relu_forward, got \w*GeluCache"),
    ("gelu backward, relu's cache", lambda m: m.gelu_backward(
        np.zeros(3), m.relu_forward(np.zeros(3))[1]), TypeError,
     r"cache: expected the \w*GeluCache returned by (kernels\.)?gelu_forward, got \w*ReluCache"),
]


@over_backends
@pytest.mark.parametrize(("call", "exc", "message"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(backend: str, call, exc, message) -> None:
    with pytest.raises(exc, match=message):
        call(BACKENDS[backend])
