"""multihead_attention_forward/backward against torch.nn.MultiheadAttention itself.

The reference is the torch module built with the case's options (embed_dim, num_heads, bias,
kdim, vdim, batch_first), loaded with our params through ``load_state_dict(strict=True)`` (so
the params' names and shapes are the module's own), run forward and differentiated with
``torch.autograd.grad`` under random cotangents on the output and, when the case says so, on the
weights. Every parameter gradient and d_query/d_key/d_value is compared. When the case passes
one array for several inputs (self-attention: query is key is value; or key is value), torch
runs twice: with ONE leaf tensor there, whose gradient must be the sum of ours, and with
distinct leaves holding equal data, compared with ours apiece.

The mask kind is parametrized (every kind runs); hypothesis draws the sizes (1 and 7
included), the layout options and a seed, and the arrays come from
``numpy.random.default_rng(seed)``. In these properties one key (key 0 under is_causal) is
never masked, so every query sees a key: torch gives NaN for a query that sees none, we give
zeros, which `test_fully_masked_rows_*` checks on its own.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pytest
import torch
from backends import BACKENDS
from error_report import record
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
import numpy_ref
from numpy_ref.testing import assert_allclose_named, assert_close_policy

over_backends = pytest.mark.parametrize("backend", list(BACKENDS))

# Each example builds and differentiates a torch module (twice with shared inputs), and the
# float64 grid has 78 cells: an eighth of the profile's examples per cell there (3 under dev, 12
# under ci), a fifth per cell of the float32 one (5 under dev, 20 under ci).
GRID_EXAMPLES = settings(deadline=None, max_examples=max(3, settings.default.max_examples // 8))
EXAMPLES = settings(deadline=None, max_examples=max(4, settings.default.max_examples // 5))

# The mask options: (key_padding_mask kind, attn_mask kind, is_causal). Kinds: None, "bool",
# "float"; attn_mask kinds end in "2" ([Tq, Tk]) or "3" ([N*num_heads, Tq, Tk]).
MASKS = {
    "no-mask": (None, None, False),
    "kpm-bool": ("bool", None, False),
    "kpm-float": ("float", None, False),
    "attn2d-bool": (None, "bool2", False),
    "attn2d-float": (None, "float2", False),
    "attn3d-bool": (None, "bool3", False),
    "attn3d-float": (None, "float3", False),
    "kpm-bool+attn3d-bool": ("bool", "bool3", False),
    "kpm-float+attn2d-float": ("float", "float2", False),
    "kpm-bool+attn2d-float": ("bool", "float2", False),  # mixed kinds (torch: deprecated)
    "causal-bool": (None, "bool2", True),
    "causal-float": (None, "float2", True),
    "causal+kpm-bool": ("bool", "bool2", True),
}
LAYOUTS = ("batch-first", "seq-first", "unbatched")
SHARING = ("distinct", "key-is-value", "self-attention")


class Case(NamedTuple):
    masks: str  # a key of MASKS
    layout: str  # one of LAYOUTS
    N: int  # 1 when unbatched
    Tq: int
    Tk: int  # == Tq for self-attention
    num_heads: int
    head_dim: int
    kdim: int | None  # None: E (packed in_proj_weight); else kdim/vdim params
    vdim: int | None
    bias: bool
    sharing: str  # one of SHARING
    need_weights: bool
    average: bool
    d_weights: bool  # a cotangent on the weights too (only with need_weights)
    scale: float  # the inputs' magnitude
    mask_scale: float  # the float masks' magnitude
    seed: int

    @property
    def E(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def separate(self) -> bool:
        return self.kdim is not None

    def labels(self) -> list[str]:
        """The options this case exercises, for the report of the largest errors."""
        out = [self.masks, self.layout, self.sharing]
        out += ["kdim/vdim"] if self.separate else []
        out += [] if self.bias else ["bias=False"]
        out += [] if self.need_weights else ["need_weights=False"]
        out += [] if self.average or not self.need_weights else ["average_attn_weights=False"]
        out += ["d_weights"] if self.d_weights else []
        return out


SIZES = st.sampled_from([1, 2, 3, 7])


@st.composite
def cases(draw, masks: str, layout: str | None = None) -> Case:
    layout = draw(st.sampled_from(LAYOUTS)) if layout is None else layout
    N = 1 if layout == "unbatched" else draw(st.sampled_from([1, 2, 3, 7]))
    Tq, Tk = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    num_heads, head_dim = draw(st.sampled_from([1, 2, 3, 7])), draw(st.sampled_from([1, 2, 5]))
    E = num_heads * head_dim
    sharing = draw(st.sampled_from(SHARING))
    kdim = vdim = None
    if sharing == "self-attention":
        Tk = Tq
    elif draw(st.booleans()):  # kdim/vdim: at least one differs from E (else torch packs)
        kdim, vdim = draw(SIZES), draw(SIZES)
        if sharing == "key-is-value":
            vdim = kdim
        if kdim == vdim == E:
            kdim = vdim = E + 1
    need_weights = draw(st.booleans())
    return Case(masks, layout, N, Tq, Tk, num_heads, head_dim, kdim, vdim, draw(st.booleans()),
                sharing, need_weights, draw(st.booleans()),
                need_weights and draw(st.booleans()),
                draw(st.floats(0.25, 2.0, allow_nan=False, allow_infinity=False)),
                draw(st.floats(0.0, 4.0, allow_nan=False, allow_infinity=False)),
                draw(st.integers(0, 2**32 - 1)))


def _rows(case: Case, T: int) -> tuple[int, ...]:
    """The leading axes of an input with T steps in the case's layout."""
    return {"batch-first": (case.N, T), "seq-first": (T, case.N), "unbatched": (T,)}[case.layout]


def _mask(rng: np.random.Generator, kind: str, shape: tuple[int, ...], keep: int,
          mask_scale: float) -> np.ndarray:
    """A random mask of torch's meaning (bool True / float -inf = not allowed); key `keep`
    (the last axis) is never masked."""
    hidden = rng.random(shape) < 0.35
    hidden[..., keep] = False
    if kind == "bool":
        return hidden
    return np.where(hidden, -np.inf, mask_scale * rng.uniform(-1.0, 1.0, shape))


def _causal(kind: str, Tq: int, Tk: int) -> np.ndarray:
    """The causal mask in torch's meaning: query i may not see keys j > i."""
    future = np.triu(np.ones((Tq, Tk), dtype=bool), 1)
    return future if kind == "bool" else np.where(future, -np.inf, 0.0)


def make_arrays(case: Case) -> dict:
    """float64 inputs, params, masks and cotangents for a case (shared inputs are one array)."""
    rng = np.random.default_rng(case.seed)
    E, h = case.E, case.num_heads
    kdim = case.kdim or E
    vdim = case.vdim or E
    query = case.scale * rng.standard_normal((*_rows(case, case.Tq), E))
    key = case.scale * rng.standard_normal((*_rows(case, case.Tk), kdim))
    value = case.scale * rng.standard_normal((*_rows(case, case.Tk), vdim))
    if case.sharing == "self-attention":
        key = value = query
    elif case.sharing == "key-is-value":
        value = key

    def w(*shape):  # xavier-like magnitudes, never all small
        return rng.uniform(-1.0, 1.0, shape) * math.sqrt(6.0 / sum(shape))

    params = ({"in_proj_weight": w(3 * E, E)} if not case.separate else
              {"q_proj_weight": w(E, E), "k_proj_weight": w(E, kdim), "v_proj_weight": w(E, vdim)})
    if case.bias:
        params["in_proj_bias"] = rng.uniform(-0.5, 0.5, 3 * E)
    params["out_proj.weight"] = w(E, E)
    if case.bias:
        params["out_proj.bias"] = rng.uniform(-0.5, 0.5, E)
    kpm_kind, attn_kind, causal = MASKS[case.masks]
    keep = 0 if causal else int(rng.integers(case.Tk))
    batched = case.layout != "unbatched"
    kpm = attn = None
    if kpm_kind:
        kpm = _mask(rng, kpm_kind, (case.N, case.Tk) if batched else (case.Tk,), keep,
                    case.mask_scale)
    if attn_kind:
        kind, rank = attn_kind[:-1], attn_kind[-1]
        if causal:
            attn = _causal(kind, case.Tq, case.Tk)
        elif rank == "2":
            attn = _mask(rng, kind, (case.Tq, case.Tk), keep, case.mask_scale)
        else:
            attn = _mask(rng, kind, (case.N * h, case.Tq, case.Tk) if batched else
                         (h, case.Tq, case.Tk), keep, case.mask_scale)
    out_shape = (*_rows(case, case.Tq), E)
    w_shape = ((case.Tq, case.Tk) if case.average else (h, case.Tq, case.Tk))
    w_shape = (case.N, *w_shape) if batched else w_shape
    return {"query": query, "key": key, "value": value, "params": params,
            "key_padding_mask": kpm, "attn_mask": attn,
            "d_output": rng.standard_normal(out_shape),
            "d_weights": rng.standard_normal(w_shape) if case.d_weights else None}


def cast(a: dict, dtype) -> dict:
    """The float arrays of `a` in dtype (bool masks as they are); shared inputs stay shared."""
    def c(x):
        return x if x is None or x.dtype == np.bool_ else x.astype(dtype)

    out = {k: c(v) for k, v in a.items() if k != "params"}
    out["params"] = {k: v.astype(dtype) for k, v in a["params"].items()}
    if a["key"] is a["query"]:
        out["key"] = out["query"]
    if a["value"] is a["key"]:
        out["value"] = out["key"]
    return out


def run_ours(case: Case, a: dict, backend: str, *, is_causal: bool | None = None
             ) -> dict[str, np.ndarray]:
    """Our forward and backward; named like `run_torch` (plus the sums of shared inputs)."""
    mod = BACKENDS[backend]
    is_causal = MASKS[case.masks][2] if is_causal is None else is_causal
    output, weights, cache = mod.multihead_attention_forward(
        a["query"], a["key"], a["value"], a["params"], num_heads=case.num_heads,
        key_padding_mask=a["key_padding_mask"], attn_mask=a["attn_mask"],
        is_causal=is_causal, need_weights=case.need_weights,
        average_attn_weights=case.average, batch_first=case.layout != "seq-first")
    d_query, d_key, d_value, d_params = mod.multihead_attention_backward(
        a["d_output"], cache, d_weights=a["d_weights"])
    assert list(d_params) == list(a["params"]), (list(d_params), list(a["params"]))
    res = {"output": output, "d_query": d_query, "d_key": d_key, "d_value": d_value}
    if case.need_weights:
        res["weights"] = weights
    else:
        assert weights is None
    res.update({f"d_params[{k!r}]": v for k, v in d_params.items()})
    if case.sharing == "self-attention":
        res["d_query+d_key+d_value"] = d_query + d_key + d_value
    elif case.sharing == "key-is-value":
        res["d_key+d_value"] = d_key + d_value
    return res


def torch_module(case: Case, params: dict, dtype: torch.dtype, device: str = "cpu"):
    """nn.MultiheadAttention with the case's options, loaded with `params` (strict)."""
    m = torch.nn.MultiheadAttention(case.E, case.num_heads, bias=case.bias, kdim=case.kdim,
                                    vdim=case.vdim, batch_first=case.layout != "seq-first",
                                    device=device, dtype=dtype)
    m.load_state_dict({k: torch.tensor(v, device=device) for k, v in params.items()},
                      strict=True)
    return m


def run_torch(case: Case, a: dict, device: str = "cpu", *, shared: bool = False,
              need_weights: bool | None = None) -> dict[str, np.ndarray]:
    """torch forward and autograd backward in the dtype of the arrays in `a`.

    shared=True (only when the case shares inputs): ONE leaf tensor for the shared inputs, its
    gradient returned under the name of our sum. Otherwise every input is its own leaf.
    """
    dtype = torch.float64 if a["query"].dtype == np.float64 else torch.float32
    m = torch_module(case, a["params"], dtype, device)

    def t(x):
        return None if x is None else torch.tensor(x, device=device)

    def leaf(x):
        return torch.tensor(x, device=device, requires_grad=True)

    query = leaf(a["query"])
    if shared and case.sharing == "self-attention":
        key = value = query
        leaves = {"d_query+d_key+d_value": query}
    elif shared:
        key = value = leaf(a["key"])
        leaves = {"d_query": query, "d_key+d_value": key}
    else:
        key, value = leaf(a["key"]), leaf(a["value"])
        leaves = {"d_query": query, "d_key": key, "d_value": value}
    leaves.update({f"d_params[{k!r}]": p for k, p in m.named_parameters()})
    need = case.need_weights if need_weights is None else need_weights
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Support for mismatched", UserWarning)
        output, weights = m(query, key, value, key_padding_mask=t(a["key_padding_mask"]),
                            attn_mask=t(a["attn_mask"]), need_weights=need,
                            average_attn_weights=case.average, is_causal=MASKS[case.masks][2])
    outputs, cotangents = [output], [t(a["d_output"])]
    if a["d_weights"] is not None:
        outputs.append(weights)
        cotangents.append(t(a["d_weights"]))
    grads = torch.autograd.grad(outputs, list(leaves.values()), cotangents)
    res = {"output": output, **dict(zip(leaves, grads, strict=True))}
    if need:
        res["weights"] = weights
    return {k: v.detach().cpu().numpy() for k, v in res.items()}


def check_case(case: Case, dtype, backend: str, device: str = "cpu") -> dict[str, float]:
    """Compare ours with torch under the numerical policy; return the errors by name.

    The float64 reference is torch float64 on exactly our (possibly float32-rounded) inputs.
    """
    a = cast(make_arrays(case), dtype)
    ours = run_ours(case, a, backend)
    for name, value in ours.items():
        assert value.dtype == dtype, f"{name}: dtype {value.dtype}, expected {np.dtype(dtype)}"
    a64 = cast(a, np.float64)
    runs = [("", run_torch(case, a64), run_torch(case, a, device) if dtype == np.float32
             else {})]
    if case.sharing != "distinct":
        runs.append((" (one torch leaf)", run_torch(case, a64, shared=True),
                     run_torch(case, a, device, shared=True) if dtype == np.float32 else {}))
    errors: dict[str, float] = {}
    for label, reference, torch32 in runs:
        # A gradient is a sum that can cancel far below its terms; its float32 floor is taken
        # relative to the case's largest gradient (policy.py, `scale`), the size of the terms.
        grad_scale = max(float(np.abs(v).max()) for k, v in reference.items()
                         if k.startswith("d_"))
        for name, want in reference.items():
            grad = name.startswith("d_")
            err = assert_close_policy(name + label, ours[name], want,
                                      torch32=torch32.get(name), grad=grad,
                                      scale=grad_scale if grad else None)
            errors[name] = max(errors.get(name, 0.0), err)
    assert set(errors) == set(ours), sorted(set(errors) ^ set(ours))
    return errors


# ---------------------------------------------------------------------------------------------
# parity with torch.nn.MultiheadAttention

@over_backends
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("masks", list(MASKS))
@GRID_EXAMPLES
@given(data=st.data())
def test_multihead_attention_matches_torch_float64(backend: str, masks: str, layout: str,
                                                   data: st.DataObject) -> None:
    case = data.draw(cases(masks, layout), label="case")
    worst = max(check_case(case, np.float64, backend).values())
    for label in case.labels():
        record("multi-head attention properties (every backend), largest float64 "
               "|ours - torch| by option", label, worst)


@over_backends
@pytest.mark.parametrize("masks", list(MASKS))
@EXAMPLES
@given(data=st.data())
def test_multihead_attention_float32_within_policy(backend: str, masks: str, device: str,
                                                   data: st.DataObject) -> None:
    check_case(data.draw(cases(masks), label="case"), np.float32, backend, device)


# ---------------------------------------------------------------------------------------------
# torch on CUDA


def _cuda_case(i: int, masks: str) -> Case:
    """The i-th fixed case: the layouts, the sharings, kdim/vdim, bias=False, need_weights,
    per-head weights and a weights cotangent each turn up across the mask kinds."""
    layout, sharing = LAYOUTS[i % 3], SHARING[(i // 3) % 3]
    separate = sharing != "self-attention" and i % 2 == 1
    kdim = 4 if separate else None
    vdim = (kdim if sharing == "key-is-value" else 7) if separate else None
    need_weights = i % 4 != 3
    return Case(masks, layout, N=1 if layout == "unbatched" else 3, Tq=5,
                Tk=5 if sharing == "self-attention" else 6, num_heads=2, head_dim=3, kdim=kdim,
                vdim=vdim, bias=i % 5 != 4, sharing=sharing, need_weights=need_weights,
                average=i % 2 == 0, d_weights=need_weights and i % 3 != 2, scale=1.0,
                mask_scale=2.0, seed=100 + i)


CUDA_CASES = [_cuda_case(i, masks) for i, masks in enumerate(MASKS)]


def check_against_torch_on(device: str, case: Case, dtype, backend: str = "numpy_ref"
                           ) -> dict[str, float]:
    """Ours (on the CPU) against nn.MultiheadAttention on `device` in the same dtype (with one
    torch leaf for shared inputs too): float64 to the float64 rule, float32 to rtol = atol =
    1e-3 (the CPU-vs-CUDA rule, TF32 off). Returns the errors by name."""
    a = cast(make_arrays(case), dtype)
    ours = run_ours(case, a, backend)
    runs = [("", run_torch(case, a, device))]
    if case.sharing != "distinct":
        runs.append((" (one torch leaf)", run_torch(case, a, device, shared=True)))
    errors: dict[str, float] = {}
    for label, theirs in runs:
        for name, want in theirs.items():
            assert ours[name].dtype == want.dtype == dtype, (name, ours[name].dtype, want.dtype)
            if dtype == np.float64:
                err = assert_close_policy(name + label, ours[name], want,
                                          grad=name.startswith("d_"))
            else:
                err = assert_allclose_named(name + label, ours[name], want, rtol=1e-3,
                                            atol=1e-3)
            errors[name] = max(errors.get(name, 0.0), err)
    assert set(errors) == set(ours), sorted(set(errors) ^ set(ours))
    return errors


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CUDA_CASES,
                         ids=[f"{c.masks}-{c.layout}-{c.sharing}" for c in CUDA_CASES])
def test_multihead_attention_matches_torch_cuda(case: Case, dtype) -> None:
    """numpy_ref against nn.MultiheadAttention on CUDA, every mask kind once."""
    check_against_torch_on("cuda", case, dtype)


# ---------------------------------------------------------------------------------------------
# a query that sees no key: NaN in torch (need_weights=True), zeros here


def _fully_masked_case(layout: str, **kw) -> Case:
    base = dict(masks="kpm-bool+attn3d-bool", layout=layout, N=1 if layout == "unbatched" else 3,
                Tq=5, Tk=4, num_heads=2, head_dim=3, kdim=None, vdim=None, bias=True,
                sharing="distinct", need_weights=True, average=False, d_weights=False,
                scale=1.0, mask_scale=1.0, seed=11)
    return Case(**{**base, **kw})


def _nle(x: np.ndarray, layout: str) -> np.ndarray:
    """An output [N, Tq, E], [Tq, N, E] or [Tq, E] (the layout's) as [N, Tq, E]."""
    return {"batch-first": x, "seq-first": x.swapaxes(0, 1), "unbatched": x[None]}[layout]


@over_backends
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fully_masked_rows_are_zero_where_torch_gives_nan(backend: str, layout: str) -> None:
    """Rows that see a key agree with torch; a (row, head, query) that sees none has weights 0,
    and a query none of whose heads sees a key has output out_proj.bias. torch's need_weights
    path gives NaN there; its need_weights=False path (SDPA) gives what we give, gradients
    included.
    """
    case = _fully_masked_case(layout)
    a = make_arrays(case)
    N, Tq, Tk, h = case.N, case.Tq, case.Tk, case.num_heads
    kpm = np.zeros((N, Tk), bool)
    attn = np.zeros((N * h, Tq, Tk), bool)
    attn[-1, 1] = True  # the last row's last head: query 1 sees no key
    if layout == "unbatched":
        kpm[0, [0, 3]] = True
        attn[:, 3, 1:3] = True  # with the kpm: query 3 sees no key in any head
        a["key_padding_mask"], a["attn_mask"] = kpm[0], attn
    else:
        kpm[0] = True  # batch row 0 sees no key at all
        a["key_padding_mask"], a["attn_mask"] = kpm, attn
    blind = (kpm[:, None, None, :] | attn.reshape(N, h, Tq, Tk)).all(axis=-1)  # [N, h, Tq]
    some_head, every_head = blind.any(axis=1), blind.all(axis=1)  # [N, Tq]
    assert every_head.any() and not some_head.all() and (some_head != every_head).any()
    ours, want = run_ours(case, a, backend), run_torch(case, a)
    weights = ours["weights"].reshape(N, h, Tq, Tk)
    torch_weights = want["weights"].reshape(N, h, Tq, Tk)
    assert np.isnan(torch_weights[blind]).all()  # the documented difference
    assert (weights[blind] == 0).all()
    assert_close_policy("weights (rows that see a key)", weights[~blind], torch_weights[~blind])
    out, torch_out = _nle(ours["output"], layout), _nle(want["output"], layout)
    assert np.isnan(torch_out[some_head]).all()
    assert_close_policy("output (queries that see a key)", out[~some_head],
                        torch_out[~some_head])
    bias = a["params"]["out_proj.bias"]
    np.testing.assert_array_equal(out[every_head], np.broadcast_to(bias, out[every_head].shape))
    # torch's SDPA path gives zeros there too: everything agrees, gradients included
    sdpa = run_torch(case, a, need_weights=False)
    for name, value in sdpa.items():
        assert np.isfinite(value).all(), name
        assert_close_policy(name + " (vs need_weights=False)", ours[name], value,
                            grad=name.startswith("d_"))


# ---------------------------------------------------------------------------------------------
# is_causal, torch's hint


@over_backends
@pytest.mark.parametrize("need_weights", [False, True], ids=["no-weights", "weights"])
@pytest.mark.parametrize("with_kpm", [False, True], ids=["attn-only", "with-kpm"])
def test_is_causal_with_a_wrong_hint_does_what_torch_does(backend: str, need_weights: bool,
                                                          with_kpm: bool) -> None:
    """is_causal=True with an attn_mask that is NOT causal: torch uses the causal mask where it
    hands the hint to SDPA (no key_padding_mask, need_weights False) and the attn_mask
    elsewhere; so do we (and the two differ here, so the test tells them apart)."""
    case = _fully_masked_case("batch-first", masks="causal+kpm-bool" if with_kpm else
                              "causal-bool", need_weights=need_weights, Tq=4, Tk=6, average=True)
    a = make_arrays(case)
    a["attn_mask"] = np.random.default_rng(5).random((case.Tq, case.Tk)) < 0.4
    a["attn_mask"][:, -1] = False  # every query sees the last key under it (not causally)
    if with_kpm:
        a["key_padding_mask"] = np.zeros((case.N, case.Tk), bool)
        a["key_padding_mask"][:, 2] = True
    ours, want = run_ours(case, a, backend), run_torch(case, a)
    for name, value in want.items():
        assert_close_policy(name, ours[name], value, grad=name.startswith("d_"))
    as_given = run_ours(case, a, backend, is_causal=False)  # the attn_mask, no hint
    uses_causal = not with_kpm and not need_weights
    assert np.allclose(as_given["output"], ours["output"]) != uses_causal


@over_backends
def test_is_causal_needs_attn_mask_as_in_torch(backend: str) -> None:
    case = _fully_masked_case("batch-first", masks="no-mask")
    a = make_arrays(case)
    with pytest.raises(ValueError, match=r"is_causal: torch needs attn_mask"):
        BACKENDS[backend].multihead_attention_forward(a["query"], a["key"], a["value"],
                                                      a["params"], num_heads=2, is_causal=True)
    m = torch_module(case, a["params"], torch.float64)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        m(*(torch.tensor(a[n]) for n in ("query", "key", "value")), is_causal=True)


# ---------------------------------------------------------------------------------------------
# the cache, dtypes


@over_backends
def test_backward_twice_on_one_cache_gives_the_same(backend: str) -> None:
    case = _fully_masked_case("seq-first", masks="kpm-float+attn2d-float", d_weights=True,
                              average=True)
    a = make_arrays(case)
    mod = BACKENDS[backend]
    _, _, cache = mod.multihead_attention_forward(
        a["query"], a["key"], a["value"], a["params"], num_heads=2, batch_first=False,
        key_padding_mask=a["key_padding_mask"], attn_mask=a["attn_mask"])
    first = mod.multihead_attention_backward(a["d_output"], cache, d_weights=a["d_weights"])
    second = mod.multihead_attention_backward(a["d_output"], cache, d_weights=a["d_weights"])
    for x, y in zip(first[:3], second[:3], strict=True):
        np.testing.assert_array_equal(x, y)
    for k in first[3]:
        np.testing.assert_array_equal(first[3][k], second[3][k])
    assert isinstance(cache, numpy_ref.MultiheadAttentionCache)
    assert cache.backend is mod


def test_kernels_wrappers_default_to_kernels() -> None:
    a = make_arrays(_fully_masked_case("batch-first", masks="no-mask"))
    _, _, cache = kernels.multihead_attention_forward(a["query"], a["key"], a["value"],
                                                      a["params"], num_heads=2)
    assert cache.backend is kernels
    assert isinstance(cache.attention, kernels.KernelAttentionCache)
    _, _, cache = numpy_ref.multihead_attention_forward(a["query"], a["key"], a["value"],
                                                        a["params"], num_heads=2)
    assert cache.backend is numpy_ref
    assert kernels.MultiheadAttentionCache is numpy_ref.MultiheadAttentionCache


# ---------------------------------------------------------------------------------------------
# bad input: a clear ValueError/TypeError naming the argument, the same on every backend

_N, _L, _S, _E, _H = 2, 3, 4, 6, 2
_rng = np.random.default_rng(0)
Q = _rng.standard_normal((_N, _L, _E))
K = _rng.standard_normal((_N, _S, _E))
V = _rng.standard_normal((_N, _S, _E))
P = {"in_proj_weight": _rng.standard_normal((3 * _E, _E)), "in_proj_bias": np.zeros(3 * _E),
     "out_proj.weight": _rng.standard_normal((_E, _E)), "out_proj.bias": np.zeros(_E)}
SEP = {"q_proj_weight": np.zeros((_E, _E)), "k_proj_weight": np.zeros((_E, 5)),
       "v_proj_weight": np.zeros((_E, 7)), "out_proj.weight": np.zeros((_E, _E))}


def _without(params: dict, key: str) -> dict:
    return {k: v for k, v in params.items() if k != key}


def forward(m, **kw):
    """m.multihead_attention_forward with the defaults above, `kw` overriding them."""
    args = {"query": Q, "key": K, "value": V, "params": P, "num_heads": _H, **kw}
    return m.multihead_attention_forward(args.pop("query"), args.pop("key"), args.pop("value"),
                                         args.pop("params"), **args)


def backward(m, d_output=None, *, forward_kw=None, **kw):
    output, _, cache = forward(m, **(forward_kw or {}))
    return m.multihead_attention_backward(output if d_output is None else d_output, cache, **kw)


BAD = [
    # inputs
    ("query rank 1", lambda m: forward(m, query=Q[0, 0]), ValueError,
     r"query: expected a 2-D \[Tq, E\] or 3-D \[N, Tq, E\] array, got shape \(6,\)"),
    ("query rank 4", lambda m: forward(m, query=Q[None]), ValueError,
     r"query: expected a 2-D \[Tq, E\] or 3-D \[N, Tq, E\] array, got shape \(1, 2, 3, 6\)"),
    ("query list", lambda m: forward(m, query=Q.tolist()), TypeError,
     r"query: expected a numpy.ndarray \[Tq, E\], got list"),
    ("query integer", lambda m: forward(m, query=Q.astype(np.int64)), TypeError,
     r"query: expected dtype float32 or float64, got int64"),
    ("key 2-D with a batched query", lambda m: forward(m, key=K[0]), ValueError,
     r"key: a batched \(3-D\) query needs a 3-D key \[N, Tk, kdim\] \(query \(2, 3, 6\)\), got "
     r"shape \(4, 6\)"),
    ("value 3-D with an unbatched query", lambda m: forward(m, query=Q[0], key=K[0]), ValueError,
     r"value: an unbatched \(2-D\) query needs a 2-D value \[Tk, vdim\]"),
    ("key float32", lambda m: forward(m, key=K.astype(np.float32)), TypeError,
     r"key: dtype float32 does not match the dtype of query \(float64\)"),
    ("key batch", lambda m: forward(m, key=K[:1], value=V[:1]), ValueError,
     r"key/value: batch N = 2 of query \[N, Tq, E\] = \(2, 3, 6\) must be theirs"),
    ("value steps", lambda m: forward(m, value=V[:, :3]), ValueError,
     r"value: expected the key's Tk = 4 steps \(key \(2, 4, 6\)\), got shape \(2, 3, 6\)"),
    ("no query steps", lambda m: forward(m, query=Q[:, :0]), ValueError,
     r"query/key/value: every axis must be non-empty"),
    ("wrong E", lambda m: forward(m, query=Q[..., :5]), ValueError,
     r"query: expected the embedding size E = 6 of params\['out_proj.weight'\] \[E, E\] as "
     r"its last axis, got shape \(2, 3, 5\)"),
    ("wrong E, unbatched", lambda m: forward(m, query=Q[0, :, :4], key=K[0], value=V[0]),
     ValueError, r"query: expected the embedding size E = 6 .* got shape \(3, 4\)"),
    ("packed with kdim != E", lambda m: forward(m, key=K[..., :5], value=V[..., :5]), ValueError,
     r"key/value: 'in_proj_weight' \[3E, E\] needs kdim == vdim == E = 6, got kdim 5 and "
     r"vdim 5"),
    # num_heads
    ("num_heads not dividing E", lambda m: forward(m, num_heads=4), ValueError,
     r"num_heads: must be a positive divisor of the embedding size E = 6, got 4"),
    ("num_heads 0", lambda m: forward(m, num_heads=0), ValueError,
     r"num_heads: must be a positive divisor of the embedding size E = 6, got 0"),
    ("num_heads float", lambda m: forward(m, num_heads=2.0), TypeError,
     r"num_heads: expected an int, got float"),
    ("num_heads bool", lambda m: forward(m, num_heads=True), TypeError,
     r"num_heads: expected an int, got bool"),
    # params
    ("params not a dict", lambda m: forward(m, params=list(P.values())), TypeError,
     r"params: expected a dict of arrays \(nn.MultiheadAttention's state_dict names\), got list"),
    ("missing in_proj_weight", lambda m: forward(m, params=_without(P, "in_proj_weight")),
     ValueError, r"params: missing key 'in_proj_weight' \(expected shape \[3E, E\] = \(18, 6\)\)"
     r", or 'q_proj_weight', 'k_proj_weight' and 'v_proj_weight'"),
    ("missing out_proj.weight", lambda m: forward(m, params=_without(P, "out_proj.weight")),
     ValueError, r"params: missing key 'out_proj.weight' \(expected shape \[E, E\]\)"),
    ("missing out_proj.bias", lambda m: forward(m, params=_without(P, "out_proj.bias")),
     ValueError, r"params: missing key 'out_proj.bias' \('in_proj_bias' is given: torch's "
     r"bias=True has both"),
    ("missing in_proj_bias", lambda m: forward(m, params=_without(P, "in_proj_bias")),
     ValueError, r"params: missing key 'in_proj_bias' \('out_proj.bias' is given"),
    ("missing v_proj_weight",
     lambda m: forward(m, key=K[..., :5], value=_rng.standard_normal((_N, _S, 7)),
                       params=_without(SEP, "v_proj_weight")), ValueError,
     r"params: missing key 'v_proj_weight' \(expected shape \[E, vdim\] = \(6, 7\)\)"),
    ("k_proj_weight for another kdim",
     lambda m: forward(m, key=K[..., :4], value=_rng.standard_normal((_N, _S, 7)), params=SEP),
     ValueError, r"params\['k_proj_weight'\]: expected shape \[E, kdim\] = \(6, 4\), got \(6, 5\)"),
    ("in_proj_weight misshaped",
     lambda m: forward(m, params={**P, "in_proj_weight": np.zeros((3 * _E, 5))}), ValueError,
     r"params\['in_proj_weight'\]: expected shape \[3E, E\] = \(18, 6\), got \(18, 5\)"),
    ("in_proj_bias misshaped", lambda m: forward(m, params={**P, "in_proj_bias": np.zeros(6)}),
     ValueError, r"params\['in_proj_bias'\]: expected shape \[3E\] = \(18,\), got \(6,\)"),
    ("packed and separate", lambda m: forward(m, params={**P, "q_proj_weight": np.zeros((6, 6))}),
     ValueError, r"params: both 'in_proj_weight' and \['q_proj_weight'\] given"),
    ("extra key", lambda m: forward(m, params={**P, "out_proj.weight_extra": np.zeros(1)}),
     ValueError, r"params: unexpected keys \['out_proj.weight_extra'\]"),
    ("bias_k (add_bias_kv)",
     lambda m: forward(m, params={**P, "bias_k": np.zeros((1, 1, 6)),
                                  "bias_v": np.zeros((1, 1, 6))}),
     ValueError, r"params: key 'bias_k' is not supported \(nn.MultiheadAttention's "
     r"add_bias_kv=True\)"),
    ("param float32", lambda m: forward(m, params={**P, "out_proj.weight":
                                                   P["out_proj.weight"].astype(np.float32)}),
     TypeError, r"params\['out_proj.weight'\]: dtype float32 does not match the dtype of query"),
    ("param list", lambda m: forward(m, params={**P, "in_proj_bias": [0.0] * 18}), TypeError,
     r"params\['in_proj_bias'\]: expected a numpy.ndarray, got list"),
    # masks
    ("key_padding_mask shape", lambda m: forward(m, key_padding_mask=np.zeros((2, 5), bool)),
     ValueError, r"key_padding_mask: expected shape \[N, Tk\] = \(2, 4\), got \(2, 5\)"),
    ("key_padding_mask [Tk] when batched",
     lambda m: forward(m, key_padding_mask=np.zeros(4, bool)), ValueError,
     r"key_padding_mask: expected shape \[N, Tk\] = \(2, 4\), got \(4,\)"),
    ("key_padding_mask [N, Tk] when unbatched",
     lambda m: forward(m, query=Q[0], key=K[0], value=V[0],
                       key_padding_mask=np.zeros((1, 4), bool)), ValueError,
     r"key_padding_mask: expected shape \[Tk\] = \(4,\), got \(1, 4\)"),
    ("key_padding_mask integer", lambda m: forward(m, key_padding_mask=np.zeros((2, 4), int)),
     TypeError, r"key_padding_mask: expected dtype bool \(True = not allowed to attend\) or a "
     r"float dtype \(added to the scores\), got int64"),
    ("key_padding_mask list", lambda m: forward(m, key_padding_mask=[[False] * 4] * 2),
     TypeError, r"key_padding_mask: expected a bool or float numpy.ndarray \[N, Tk\] = \(2, 4\), "
     r"got list"),
    ("key_padding_mask float32",
     lambda m: forward(m, key_padding_mask=np.zeros((2, 4), np.float32)), TypeError,
     r"key_padding_mask: dtype float32 does not match the dtype of query \(float64\)"),
    ("attn_mask 2-D shape", lambda m: forward(m, attn_mask=np.zeros((4, 3), bool)), ValueError,
     r"attn_mask: expected shape \[Tq, Tk\] = \(3, 4\) or \[N\*num_heads, Tq, Tk\] = \(4, 3, 4\), "
     r"got \(4, 3\)"),
    ("attn_mask 3-D without heads", lambda m: forward(m, attn_mask=np.zeros((2, 3, 4), bool)),
     ValueError, r"attn_mask: expected shape .* \[N\*num_heads, Tq, Tk\] = \(4, 3, 4\), got "
     r"\(2, 3, 4\)"),
    ("attn_mask 4-D", lambda m: forward(m, attn_mask=np.zeros((2, 2, 3, 4), bool)), ValueError,
     r"attn_mask: expected shape \[Tq, Tk\] = \(3, 4\) or .*, got \(2, 2, 3, 4\)"),
    ("attn_mask 3-D unbatched", lambda m: forward(m, query=Q[0], key=K[0], value=V[0],
                                                  attn_mask=np.zeros((4, 3, 4), bool)),
     ValueError, r"attn_mask: expected shape \[Tq, Tk\] = \(3, 4\) or \[num_heads, Tq, Tk\] = "
     r"\(2, 3, 4\), got \(4, 3, 4\)"),
    ("attn_mask integer", lambda m: forward(m, attn_mask=np.zeros((3, 4), np.int8)), TypeError,
     r"attn_mask: expected dtype bool .* got int8"),
    ("is_causal without attn_mask", lambda m: forward(m, is_causal=True), ValueError,
     r"is_causal: torch needs attn_mask with the is_causal hint"),
    # flags
    ("need_weights not a bool", lambda m: forward(m, need_weights="yes"), TypeError,
     r"need_weights: expected a bool, got str"),
    ("batch_first not a bool", lambda m: forward(m, batch_first=1), TypeError,
     r"batch_first: expected a bool, got int"),
    ("is_causal not a bool", lambda m: forward(m, is_causal=None), TypeError,
     r"is_causal: expected a bool, got NoneType"),
    ("average_attn_weights not a bool", lambda m: forward(m, average_attn_weights=0),
     TypeError, r"average_attn_weights: expected a bool, got int"),
    # backward
    ("wrong cache", lambda m: m.multihead_attention_backward(
        Q, m.attention_forward(Q, K, V)[2]), TypeError,
     r"cache: expected the MultiheadAttentionCache returned by multihead_attention_forward, "
     r"got \w*AttentionCache"),
    ("d_output shape", lambda m: backward(m, Q[:, :2]), ValueError,
     r"d_output: expected shape like the output \[N, Tq, E\] = \(2, 3, 6\), got \(2, 2, 6\)"),
    ("d_output batch-first after a seq-first forward",
     lambda m: backward(m, Q, forward_kw={"batch_first": False, "query": Q.swapaxes(0, 1),
                                          "key": K.swapaxes(0, 1), "value": V.swapaxes(0, 1)}),
     ValueError, r"d_output: expected shape like the output \[Tq, N, E\] = \(3, 2, 6\), got "
     r"\(2, 3, 6\)"),
    ("d_output float32", lambda m: backward(m, Q.astype(np.float32)), TypeError,
     r"d_output: dtype float32 does not match the dtype of query \(float64\)"),
    ("d_output list", lambda m: backward(m, Q.tolist()), TypeError,
     r"d_output: expected a numpy.ndarray \[N, Tq, E\], got list"),
    ("d_weights without weights",
     lambda m: backward(m, d_weights=np.zeros((2, 3, 4)), forward_kw={"need_weights": False}),
     ValueError, r"d_weights: the forward ran with need_weights=False"),
    ("d_weights shape", lambda m: backward(m, d_weights=np.zeros((2, 2, 3, 4))), ValueError,
     r"d_weights: expected a 3-D array \[N, Tq, Tk\], got shape \(2, 2, 3, 4\)"),
    ("d_weights per head shape",
     lambda m: backward(m, d_weights=np.zeros((2, 3, 3, 4)),
                        forward_kw={"average_attn_weights": False}), ValueError,
     r"d_weights: expected shape like the weights \[N, num_heads, Tq, Tk\] = \(2, 2, 3, 4\), got "
     r"\(2, 3, 3, 4\)"),
]


@over_backends
@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_input_is_a_clear_error(backend: str, call, error, message) -> None:
    with pytest.raises(error, match=message):
        call(BACKENDS[backend])


# ---------------------------------------------------------------------------------------------
# padding is not data: key/value rows no query of any head may see, query rows that see no key


def _padding_case(layout: str, separate: bool, need_weights: bool, masks: str) -> Case:
    return Case(masks, layout, N=1 if layout == "unbatched" else 3, Tq=4, Tk=6, num_heads=2,
                head_dim=3, kdim=4 if separate else None, vdim=5 if separate else None,
                bias=True, sharing="distinct", need_weights=need_weights,
                average=layout != "seq-first", d_weights=need_weights, scale=1.0,
                mask_scale=1.0, seed=23)


def _padding_masks(case: Case, rng: np.random.Generator, *, blind_query: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(key_padding_mask [N, Tk], attn_mask [N*h, Tq, Tk], both bool in torch's meaning, and the
    padding: the keys [N, Tk] no query of any head may see, the queries [N, Tq] that may see no
    key in any head). Key 2 is seen by every query unless `blind_query`: then query 1 of the
    last batch row sees no key in any head, and query 2 of row 0 none in head 0 only (data)."""
    N, Tq, Tk, h = case.N, case.Tq, case.Tk, case.num_heads
    kpm = np.zeros((N, Tk), bool)
    kpm[0, 4:] = True  # padding by key_padding_mask
    kpm[-1, 0] = True
    attn = rng.random((N, h, Tq, Tk)) < 0.25
    attn[..., 2] = False
    attn[-1, :, :, 3] = True  # padding by attn_mask alone: every query of every head
    attn[0, 0, :, 1] = True  # hidden from every query of head 0 only: data
    attn[0, 1, :, 1] = False
    if blind_query:
        attn[-1, :, 1] = True
        attn[0, 0, 2] = True
    hidden = kpm[:, None, None, :] | attn
    keys, queries = hidden.all(axis=(1, 2)), hidden.all(axis=(1, 3))
    assert keys[0, 4:].all() and keys[-1, [0, 3]].all() and not keys[0, 1]
    assert queries.any() == blind_query and not queries[0, 2]
    return kpm, attn.reshape(N * h, Tq, Tk), keys, queries


def _in_layout(case: Case, x: np.ndarray) -> np.ndarray:
    """[N, T, ...] (batch first) -> the case's layout, C-contiguous."""
    return np.ascontiguousarray({"batch-first": x, "seq-first": x.swapaxes(0, 1),
                                 "unbatched": x[0]}[case.layout])


def _padded(case: Case, kind: str, blind_query: bool = False) -> tuple[dict, np.ndarray,
                                                                        np.ndarray]:
    """float64 arrays of the case with the masks of `_padding_masks` (bool, or float: -inf
    where hidden, random finite elsewhere) and zeros in the padding rows of key and value (and
    of the query); (arrays, padding keys [N, Tk], padding queries [N, Tq])."""
    a = make_arrays(case)
    rng = np.random.default_rng(case.seed + 1)
    kpm, attn, keys, queries = _padding_masks(case, rng, blind_query=blind_query)
    if kind == "float":
        kpm = np.where(kpm, -np.inf, rng.uniform(-1.0, 1.0, kpm.shape))
        attn = np.where(attn, -np.inf, rng.uniform(-1.0, 1.0, attn.shape))
    unbatched = case.layout == "unbatched"
    a["key_padding_mask"] = kpm[0] if unbatched else kpm
    a["attn_mask"] = attn
    for name, pad in (("query", queries), ("key", keys), ("value", keys)):
        a[name] = _in_layout(case, np.where(pad[..., None], 0.0, _nle(a[name], case.layout)))
    return a, keys, queries


def _filled(case: Case, a: dict, keys: np.ndarray, queries: np.ndarray, fill: float) -> dict:
    """`a` with `fill` in every padding row (every feature) of key, value and query."""
    out = dict(a)
    for name, pad in (("query", queries), ("key", keys), ("value", keys)):
        out[name] = _in_layout(case, np.where(pad[..., None], a[name].dtype.type(fill),
                                              _nle(a[name], case.layout)))
    return out


def _assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} ({what})")


FILLS = (np.nan, np.inf, -np.inf, 1e30)


def _unchanged_by_what_the_padding_holds(case, a: dict, keys, queries, backend: str) -> dict:
    """Our results with zeros in the padding rows, after checking that every fill of `FILLS`
    there gives the same bits and that every result is finite."""
    clean = run_ours(case, a, backend)
    for fill in FILLS:
        got = run_ours(case, _filled(case, a, keys, queries, fill), backend)
        _assert_bitwise(got, clean, f"{fill} in the padding")
    for name, value in clean.items():
        assert np.isfinite(value).all(), name
    return clean


@over_backends
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("separate", [False, True], ids=["in_proj", "kdim-vdim"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_padding_keys_and_values_are_not_data(backend: str, dtype, need_weights: bool,
                                              separate: bool, layout: str, kind: str) -> None:
    """NaN, +-inf or garbage in the key/value rows that the masks hide from every query of
    every head (by key_padding_mask, or by attn_mask alone) changes no output and no gradient,
    bit for bit against zeros there: d_params (k_proj_weight / in_proj_weight, whose
    ``d_W_k = d_k^T key`` sums 0 * those rows) included; every result is finite, d_key and
    d_value are 0 in those rows, and the zero-padded run agrees with nn.MultiheadAttention. A
    key hidden from one head only is data (not tested here for NaN: it would reach the
    results)."""
    case = _padding_case(layout, separate, need_weights,
                         "kpm-float+attn2d-float" if kind == "float" else "kpm-bool+attn3d-bool")
    a, keys, queries = _padded(case, kind)
    a = cast(a, dtype)
    clean = _unchanged_by_what_the_padding_holds(case, a, keys, queries, backend)
    for name in ("d_key", "d_value"):
        np.testing.assert_array_equal(_nle(clean[name], layout)[keys], 0, err_msg=name)
    a64 = cast(a, np.float64)
    reference = run_torch(case, a64)
    torch32 = run_torch(case, a) if dtype == np.float32 else {}
    grad_scale = max(float(np.abs(v).max()) for k, v in reference.items() if k.startswith("d_"))
    for name, want in reference.items():
        grad = name.startswith("d_")
        assert_close_policy(name, clean[name], want, torch32=torch32.get(name), grad=grad,
                            scale=grad_scale if grad else None)


@over_backends
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("separate", [False, True], ids=["in_proj", "kdim-vdim"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_query_that_sees_no_key_is_not_data(backend: str, dtype, need_weights: bool,
                                              separate: bool, layout: str) -> None:
    """NaN or inf in a query row that may see no key in any head changes nothing, bit for bit
    against zeros there (its output is out_proj.bias either way; q_proj_weight's
    ``d_W_q = d_q^T query`` sums 0 * that row), and its d_query row is 0. A query blind in one
    head only is data. The zero-padded run agrees with torch's need_weights=False path (SDPA),
    which, unlike its need_weights=True path, gives no NaN there."""
    case = _padding_case(layout, separate, need_weights, "kpm-bool+attn3d-bool")
    a, keys, queries = _padded(case, "bool", blind_query=True)
    a = cast(a, dtype)
    clean = _unchanged_by_what_the_padding_holds(case, a, keys, queries, backend)
    np.testing.assert_array_equal(_nle(clean["d_query"], layout)[queries], 0)
    case, a = case._replace(d_weights=False), {**a, "d_weights": None}  # SDPA has no weights
    ours = run_ours(case, a, backend)
    reference = run_torch(case, cast(a, np.float64), need_weights=False)
    torch32 = run_torch(case, a, need_weights=False) if dtype == np.float32 else {}
    grad_scale = max(float(np.abs(v).max()) for k, v in reference.items() if k.startswith("d_"))
    for name, want in reference.items():
        grad = name.startswith("d_")
        assert_close_policy(name, ours[name], want, torch32=torch32.get(name), grad=grad,
                            scale=grad_scale if grad else None)
