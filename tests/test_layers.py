"""The layers (embedding, linear, cross-entropy) on every backend against torch.nn.functional,
under random cotangents, float64 and float32 (policy); finite differences; bad input.

Cross-entropy runs every option torch's has: reduction mean/sum/none, ignore_index (a row
ignored in most cases, all of them in one), label smoothing, class weights, class-index and
probability targets, [N, C], [N, C, d1, d2] and unbatched [C] logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from backends import BACKENDS
from hypothesis import given
from hypothesis import strategies as st

import numpy_ref as ref
from numpy_ref.testing import assert_allclose_named, assert_close_policy

over_backends = pytest.mark.parametrize("backend", list(BACKENDS))
DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])


TORCH_DTYPES = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}


def _check(name: str, ours, ref64, t32, dtype, grad: bool = False, scale=None) -> float:
    return assert_close_policy(name, ours, ref64, torch32=None if dtype == np.float64 else t32,
                               grad=grad, scale=scale)


def _check_cuda(name: str, ours, theirs, dtype, grad: bool = False) -> float:
    """Ours against torch on CUDA in the same dtype: float64 to the float64 rule, float32 to
    rtol = atol = 1e-3 (the CPU-vs-CUDA rule, TF32 off)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.dtype == theirs.dtype == dtype, (name, ours.dtype, theirs.dtype)
    if dtype == np.float64:
        return assert_close_policy(name, ours, theirs, grad=grad)
    return assert_allclose_named(name, ours, theirs, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# embedding


def torch_embedding(ids: np.ndarray, weight: np.ndarray, d_out: np.ndarray, padding_idx,
                    device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """F.embedding on `device` in weight's dtype and its autograd weight gradient.

    ids int [...], weight [V, E], d_out [..., E] -> (out [..., E], d_weight [V, E]).
    """
    w = torch.tensor(weight, device=device, requires_grad=True)
    t_out = F.embedding(torch.tensor(ids, device=device), w, padding_idx=padding_idx)
    (t_grad,) = torch.autograd.grad(t_out, w, torch.tensor(d_out, device=device))
    return t_out.detach().cpu().numpy(), t_grad.cpu().numpy()


@over_backends
@DTYPES
@given(shape=st.sampled_from([(5,), (3, 4), (2, 3, 2)]), V=st.integers(1, 9),
       E=st.integers(1, 6), padding=st.sampled_from([None, 0, -1, "some"]),
       seed=st.integers(0, 2**32 - 1))
def test_embedding_matches_torch(backend, dtype, shape, V, E, padding, seed) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, shape)
    padding_idx = int(ids.flat[0]) if padding == "some" else padding
    if padding_idx is not None and not -V <= padding_idx < V:
        padding_idx = None
    weight = rng.standard_normal((V, E)).astype(dtype)
    d_out = rng.standard_normal((*shape, E)).astype(dtype)
    mod = BACKENDS[backend]
    out, cache = mod.embedding_forward(ids, {"weight": weight}, padding_idx=padding_idx)
    d_weight = mod.embedding_backward(d_out, cache)["weight"]
    assert out.dtype == d_weight.dtype == dtype
    t_out, t_grad = torch_embedding(ids, weight, d_out, padding_idx)
    np.testing.assert_array_equal(out, t_out)  # a gather: exact
    # a scatter-add: the same sums, perhaps in another order
    np.testing.assert_allclose(d_weight, t_grad, rtol=1e-6 if dtype == np.float32
                               else 1e-14, atol=1e-6 if dtype == np.float32 else 1e-14)
    if padding_idx is not None:
        assert np.all(d_weight[padding_idx] == 0)


# ---------------------------------------------------------------------------------------------
# linear


def torch_linear(x: np.ndarray, params: dict, d_y: np.ndarray, tdtype: torch.dtype,
                 device: str = "cpu") -> list[np.ndarray]:
    """F.linear on `device` in tdtype and its autograd gradients.

    x [..., I], params {"weight": [O, I], optionally "bias": [O]}, d_y [..., O] ->
    [y [..., O], d_x [..., I], d_weight [O, I], (d_bias [O])].
    """
    tx = torch.tensor(x, dtype=tdtype, device=device, requires_grad=True)
    tp = {k: torch.tensor(v, dtype=tdtype, device=device, requires_grad=True)
          for k, v in params.items()}
    ty = F.linear(tx, tp["weight"], tp.get("bias"))
    grads = torch.autograd.grad(ty, [tx, *tp.values()],
                                torch.tensor(d_y, dtype=tdtype, device=device))
    return [t.detach().cpu().numpy() for t in (ty, *grads)]


@over_backends
@DTYPES
@given(lead=st.sampled_from([(), (4,), (2, 3), (1, 2, 3)]), I=st.integers(1, 7),
       O=st.integers(1, 7), bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_linear_matches_torch(backend, dtype, lead, I, O, bias, seed) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, I))
    params = {"weight": rng.standard_normal((O, I))}
    if bias:
        params["bias"] = rng.standard_normal(O)
    d_y = rng.standard_normal((*lead, O))
    mod = BACKENDS[backend]
    y, cache = mod.linear_forward(x.astype(dtype), {k: v.astype(dtype) for k, v in params.items()})
    d_x, d_params = mod.linear_backward(d_y.astype(dtype), cache)
    assert list(d_params) == list(params)

    def torch_run(tdtype):
        return torch_linear(x, params, d_y, tdtype)

    # the float64 reference is computed from our (possibly float32-rounded) inputs
    want = torch_run(torch.float64) if dtype == np.float64 else None
    if dtype == np.float32:
        x, d_y = x.astype(np.float32).astype(np.float64), d_y.astype(np.float32).astype(np.float64)
        params = {k: v.astype(np.float32).astype(np.float64) for k, v in params.items()}
        want = torch_run(torch.float64)
    t32 = torch_run(torch.float32) if dtype == np.float32 else [None] * len(want)
    names = ["y", "d_x", *(f"d_{k}" for k in params)]
    # Each result is a sum that can cancel far below its terms (d_bias sums d_y over the rows:
    # -0.13 from terms near 1 failed the plain floor once), so its float32 floor is relative to
    # the size of the summed terms, as the numerical policy says.
    ax, aw, ady = np.abs(x).reshape(-1, I), np.abs(params["weight"]), np.abs(d_y).reshape(-1, O)
    terms = {"y": (ax @ aw.T).max() + (np.abs(params["bias"]).max() if bias else 0.0),
             "d_x": (ady @ aw).max(), "d_weight": (ady.T @ ax).max(),
             "d_bias": ady.sum(axis=0).max()}
    for name, ours, w, t in zip(names, [y, d_x, *d_params.values()], want, t32, strict=True):
        _check(name, ours, w, t, dtype, grad=name != "y", scale=float(terms[name]))


# ---------------------------------------------------------------------------------------------
# cross-entropy


SHAPES = [(5, 7), (3, 4, 3, 2), (6,)]


def _ce_inputs(rng, shape, probabilities, ignore, weighted, ignore_index=-100):
    """logits, targets and class weights; `ignore` ("none", "one", "some" or "all") sets that
    many class-index targets to `ignore_index` (a valid class id or not: targets drawn from
    0..C-1 may equal it too)."""
    C = shape[0] if len(shape) == 1 else shape[1]
    logits = rng.standard_normal(shape) * 3
    if probabilities:
        rows = rng.dirichlet(np.ones(C) * 0.5, size=int(np.prod(shape)) // C)  # [M, C]
        if len(shape) == 1:
            targets = rows[0]
        else:
            targets = np.moveaxis(rows.reshape(*shape[:1], *shape[2:], C), -1, 1)
    else:
        targets = rng.integers(0, C, shape[:1] + shape[2:] if len(shape) > 1 else ())
        if ignore == "one" and targets.ndim:
            targets.flat[0] = ignore_index
        elif ignore == "some":
            targets = np.where(rng.random(targets.shape) < 0.4, ignore_index, targets)
        elif ignore == "all":
            targets = np.full_like(targets, ignore_index)
    weight = rng.uniform(0.2, 2.0, C) if weighted else None
    return logits, targets, weight


def torch_cross_entropy(logits: np.ndarray, targets: np.ndarray, weight: np.ndarray | None,
                        d_loss, tdtype: torch.dtype, device: str = "cpu", **kw
                        ) -> tuple[np.ndarray, np.ndarray]:
    """F.cross_entropy on `device` (float arrays in tdtype, class indices as int64) and its
    autograd gradient under the cotangent d_loss (the loss' shape).

    logits [N, C, d...] or [C], targets [N, d...] indices or logits-shaped probabilities,
    weight [C] or None; kw: reduction, label_smoothing -> (loss, d_logits like logits).
    """
    def t(a):
        if a is None:
            return None
        a = np.asarray(a)
        return torch.tensor(a, dtype=tdtype if a.dtype.kind == "f" else None, device=device)

    z = t(logits).requires_grad_()
    tl = F.cross_entropy(z, t(targets), weight=t(weight), **kw)
    (tg,) = torch.autograd.grad(tl, z, t(d_loss))
    return tl.detach().cpu().numpy(), tg.cpu().numpy()


def _target_mass(logits, targets, weight, ls, reduction, d_loss, ignore_index=-100) -> float:
    """max over rows of |d_row| sum_c q_c: the size of the terms d_logits is a difference of."""
    C = logits.shape[0] if logits.ndim == 1 else logits.shape[1]
    w = np.ones(C) if weight is None else weight
    if targets.dtype.kind == "f":
        P = targets[None] if logits.ndim == 1 else np.moveaxis(targets, 1, -1).reshape(-1, C)
        q_sum = (w * ((1 - ls) * P + ls / C)).sum(axis=1)
        denominator = len(P)
    else:
        t = targets.reshape(-1)
        kept = t != ignore_index
        q_sum = np.where(kept, (1 - ls) * w[np.where(kept, t, 0)] + ls / C * w.sum(), 0.0)
        denominator = kept.sum() if weight is None else w[t[kept]].sum()
    d_rows = np.abs(np.reshape(d_loss, -1) if reduction == "none"
                    else np.full(q_sum.shape, float(d_loss)))
    if reduction == "mean":
        d_rows = d_rows / max(denominator, 1e-300)
    return float((d_rows.reshape(-1) * q_sum).max())


@over_backends
@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=["[N, C]", "[N, C, d1, d2]", "[C]"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
@given(label_smoothing=st.sampled_from([0.0, 0.1, 1.0]), weighted=st.booleans(),
       ignore=st.sampled_from(["none", "one", "some"]),
       ignore_index=st.just(-100) | st.integers(-3, 8), seed=st.integers(0, 2**32 - 1))
def test_cross_entropy_matches_torch(backend, dtype, shape, reduction, probabilities,
                                     label_smoothing, weighted, ignore, ignore_index,
                                     seed) -> None:
    """ignore_index is torch's default -100, a negative one, a valid class id (0..C-1: the
    rows of that class are ignored, the others kept) or one past the classes (C = 4, 6, 7:
    indices up to 8); `ignore` sets targets to it, and drawn targets may equal it. torch
    refuses any other than -100 with probability targets ("ignore_index is not supported for
    floating point target"), so those keep -100."""
    if probabilities:
        ignore_index = -100
    rng = np.random.default_rng(seed)
    logits, targets, weight = _ce_inputs(rng, shape, probabilities, ignore, weighted,
                                         ignore_index)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index)
    def cast(a):
        return a if a is None or a.dtype.kind != "f" else a.astype(dtype)

    mod = BACKENDS[backend]
    loss, cache = mod.cross_entropy_forward(cast(logits), cast(targets), weight=cast(weight),
                                            **kw)
    d_loss = rng.standard_normal(np.shape(loss))
    d_logits = mod.cross_entropy_backward(cast(d_loss) if reduction == "none"
                                          else dtype(d_loss), cache)
    assert np.asarray(loss).dtype == d_logits.dtype == dtype
    assert d_logits.shape == logits.shape

    def torch_run(tdtype):  # on our (possibly float32-rounded) inputs
        return torch_cross_entropy(cast(logits), cast(targets), cast(weight),
                                   cast(np.asarray(d_loss)), tdtype, **kw)

    want_loss, want_grad = torch_run(torch.float64)
    t_loss, t_grad = torch_run(torch.float32) if dtype == np.float32 else (None, None)
    _check("loss", np.asarray(loss), want_loss, t_loss, dtype)
    # d_logits = d_row (p sum(q) - q) cancels at the target class (p_t sum(q) ~ q_t when p_t
    # is large); its float32 floor is relative to those terms, |d_row| sum(q).
    _check("d_logits", d_logits, want_grad, t_grad, dtype, grad=True,
           scale=_target_mass(logits, targets, weight, label_smoothing, reduction, d_loss,
                              ignore_index))


@over_backends
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_with_every_row_ignored_is_nan_with_zero_gradient(backend,
                                                                        label_smoothing) -> None:
    """As torch: the mean over no rows is NaN, and no gradient flows."""
    logits = np.random.default_rng(0).standard_normal((3, 4))
    targets = np.full(3, -100)
    mod = BACKENDS[backend]
    loss, cache = mod.cross_entropy_forward(logits, targets, label_smoothing=label_smoothing)
    t_loss = F.cross_entropy(torch.tensor(logits), torch.tensor(targets),
                             label_smoothing=label_smoothing)
    assert np.isnan(loss) and torch.isnan(t_loss)
    np.testing.assert_array_equal(mod.cross_entropy_backward(np.float64(1), cache), 0)
    sum_loss, _ = mod.cross_entropy_forward(logits, targets, reduction="sum")
    assert sum_loss == 0


@over_backends
def test_cross_entropy_is_finite_for_logits_of_1e4_and_nan_propagates(backend) -> None:
    mod = BACKENDS[backend]
    logits = np.array([[1e4, -1e4, 0.0], [3.0, 1e4, 1e4]])
    loss, cache = mod.cross_entropy_forward(logits, np.array([1, 0]), reduction="none")
    t = F.cross_entropy(torch.tensor(logits), torch.tensor([1, 0]), reduction="none")
    np.testing.assert_allclose(loss, t.numpy(), rtol=1e-15)
    assert np.all(np.isfinite(mod.cross_entropy_backward(np.ones(2), cache)))
    logits[1, 0] = np.nan
    loss, _ = mod.cross_entropy_forward(logits, np.array([1, 0]), reduction="none")
    assert np.isfinite(loss[0]) and np.isnan(loss[1])


# ---------------------------------------------------------------------------------------------
# torch on CUDA: ours (on the CPU) against torch on the GPU in the same dtype


CUDA_DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32],
                                      ids=["float64", "float32"])


def check_embedding_against_torch_on(device: str, dtype, padding_idx) -> None:
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 7, (3, 4))
    ids[0, :2] = ids[1, 0]  # a repeated id: its gradient rows are summed
    weight = rng.standard_normal((7, 5)).astype(dtype)
    d_out = rng.standard_normal((3, 4, 5)).astype(dtype)
    out, cache = ref.embedding_forward(ids, {"weight": weight}, padding_idx=padding_idx)
    d_weight = ref.embedding_backward(d_out, cache)["weight"]
    t_out, t_grad = torch_embedding(ids, weight, d_out, padding_idx, device)
    np.testing.assert_array_equal(out, t_out)  # a gather: exact on any device
    if dtype == np.float64:  # the CPU test's float64 tolerance
        np.testing.assert_allclose(d_weight, t_grad, rtol=1e-14, atol=1e-14)
    else:
        _check_cuda("d_weight", d_weight, t_grad, dtype, grad=True)


@pytest.mark.cuda
@CUDA_DTYPES
@pytest.mark.parametrize("padding_idx", [None, 0, -1])
def test_embedding_matches_torch_cuda(dtype, padding_idx) -> None:
    check_embedding_against_torch_on("cuda", dtype, padding_idx)


def check_linear_against_torch_on(device: str, dtype, lead: tuple[int, ...], bias: bool) -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((*lead, 6)).astype(dtype)
    params = {"weight": rng.standard_normal((5, 6)).astype(dtype)}
    if bias:
        params["bias"] = rng.standard_normal(5).astype(dtype)
    d_y = rng.standard_normal((*lead, 5)).astype(dtype)
    y, cache = ref.linear_forward(x, params)
    d_x, d_params = ref.linear_backward(d_y, cache)
    theirs = torch_linear(x, params, d_y, TORCH_DTYPES[np.dtype(dtype)], device)
    names = ["y", "d_x", *(f"d_{k}" for k in params)]
    for name, ours, t in zip(names, [y, d_x, *d_params.values()], theirs, strict=True):
        _check_cuda(name, ours, t, dtype, grad=name != "y")


@pytest.mark.cuda
@CUDA_DTYPES
@pytest.mark.parametrize(("lead", "bias"), [((), True), ((4,), False), ((2, 3), True)],
                         ids=["[I]-bias", "[4, I]", "[2, 3, I]-bias"])
def test_linear_matches_torch_cuda(dtype, lead, bias) -> None:
    check_linear_against_torch_on("cuda", dtype, lead, bias)


def check_cross_entropy_against_torch_on(device: str, dtype, shape: tuple[int, ...],
                                         reduction: str, probabilities: bool) -> None:
    """Class weights, label smoothing and (for class indices) an ignored row, all at once."""
    rng = np.random.default_rng(9)
    logits, targets, weight = _ce_inputs(rng, shape, probabilities, "one", True)
    kw = dict(reduction=reduction, label_smoothing=0.1)

    def cast(a):
        return a if a is None or a.dtype.kind != "f" else a.astype(dtype)

    logits, targets, weight = cast(logits), cast(targets), cast(weight)
    loss, cache = ref.cross_entropy_forward(logits, targets, weight=weight, **kw)
    d_loss = cast(np.asarray(rng.standard_normal(np.shape(loss))))
    d_logits = ref.cross_entropy_backward(d_loss if reduction == "none" else dtype(d_loss),
                                          cache)
    t_loss, t_grad = torch_cross_entropy(logits, targets, weight, d_loss,
                                         TORCH_DTYPES[np.dtype(dtype)], device, **kw)
    _check_cuda("loss", loss, t_loss, dtype)
    _check_cuda("d_logits", d_logits, t_grad, dtype, grad=True)


@pytest.mark.cuda
@CUDA_DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=["[N, C]", "[N, C, d1, d2]", "[C]"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probabilities", [False, True], ids=["indices", "probabilities"])
def test_cross_entropy_matches_torch_cuda(dtype, shape, reduction, probabilities) -> None:
    check_cross_entropy_against_torch_on("cuda", dtype, shape, reduction, probabilities)


# ---------------------------------------------------------------------------------------------
# finite differences


def test_layers_backward_match_finite_differences() -> None:
    rng = np.random.default_rng(1)
    x, params = rng.standard_normal((2, 3, 4)), {"weight": rng.standard_normal((5, 4)),
                                                 "bias": rng.standard_normal(5)}
    g = rng.standard_normal((2, 3, 5))
    _, cache = ref.linear_forward(x, params)
    d_x, d_params = ref.linear_backward(g, cache)

    def linear_loss() -> float:
        return float(np.sum(ref.linear_forward(x, params)[0] * g))

    ref.gradcheck(linear_loss, {"x": x, **params}, {"x": d_x, **d_params})
    for probabilities in (False, True):
        logits, targets, weight = _ce_inputs(rng, (4, 5, 2), probabilities, "one", True)

        def ce_loss(logits=logits, targets=targets, weight=weight) -> float:
            return float(ref.cross_entropy_forward(logits, targets, weight=weight,
                                                   label_smoothing=0.3)[0])

        _, cache = ref.cross_entropy_forward(logits, targets, weight=weight, label_smoothing=0.3)
        ref.gradcheck(ce_loss, {"logits": logits},
                      {"logits": ref.cross_entropy_backward(np.float64(1), cache)})


# ---------------------------------------------------------------------------------------------
# bad input


W = np.random.default_rng(2).standard_normal((6, 3))
LOGITS = np.random.default_rng(3).standard_normal((4, 5))


def _emb(m, ids, **kw):
    return m.embedding_forward(ids, {"weight": W}, **kw)


def _lin(m, x=None, **params):
    p = {"weight": np.zeros((2, 3)), "bias": np.zeros(2)}
    p.update(params)
    return m.linear_forward(np.zeros((4, 3)) if x is None else x,
                            {k: v for k, v in p.items() if v is not None})


TARGETS = np.array([0, 1, 2, 3])


def _ce(m, logits=LOGITS, targets=TARGETS, **kw):
    return m.cross_entropy_forward(logits, targets, **kw)


def _ce_backward(m, d_loss, reduction="mean"):
    _, cache = _ce(m, reduction=reduction)
    return m.cross_entropy_backward(d_loss, cache)


BAD = [
    ("negative id", lambda m: _emb(m, np.array([0, -1, 2])), ValueError,
     r"ids: every id must be in 0..5 .* got 1 outside it, e\.g\. -1"),
    ("id too large", lambda m: _emb(m, np.array([[0, 6]])), ValueError,
     r"ids: every id must be in 0..5 .* e\.g\. 6"),
    ("float ids", lambda m: _emb(m, np.array([0.0, 1.0])), TypeError,
     r"ids: expected integer token ids, got dtype float64"),
    ("padding_idx out of range", lambda m: _emb(m, np.array([0]), padding_idx=6), ValueError,
     r"padding_idx: expected an integer in -6..5 or None"),
    ("embedding extra key", lambda m: m.embedding_forward(np.array([0]), {"weight": W,
                                                                           "bias": W[0]}),
     ValueError, r"params: unexpected keys \['bias'\]"),
    ("embedding weight 1-D", lambda m: m.embedding_forward(np.array([0]), {"weight": W[0]}),
     ValueError, r"params\['weight'\]: expected shape \[V, E\], got \(3,\)"),
    ("embedding d_out misshaped", lambda m: m.embedding_backward(
        np.zeros((2, 4)), _emb(m, np.array([0, 1]))[1]), ValueError,
     r"d_out: expected shape like the embedding output = \(2, 3\), got \(2, 4\)"),
    ("linear x last axis", lambda m: _lin(m, np.zeros((4, 2))), ValueError,
     r"params\['weight'\]: expected shape \[O, I\] = \(2, 2\), got \(2, 3\)"),
    ("linear bias misshaped", lambda m: _lin(m, bias=np.zeros(3)), ValueError,
     r"params\['bias'\]: expected shape \[O\] = \(2,\), got \(3,\)"),
    ("linear float32 weight", lambda m: _lin(m, weight=np.zeros((2, 3), np.float32)), TypeError,
     r"params\['weight'\]: dtype float32 does not match the dtype of x"),
    ("linear integer x", lambda m: _lin(m, np.zeros((4, 3), int)), TypeError,
     r"x: expected dtype float32 or float64, got int64"),
    ("linear 0-d x", lambda m: _lin(m, np.float64(1.0)), TypeError, r"x: expected a numpy.ndarray"),
    ("linear missing weight", lambda m: m.linear_forward(np.zeros((1, 3)), {"bias": np.zeros(2)}),
     ValueError, r"params: missing key 'weight'"),
    ("ignore_index with probabilities", lambda m: _ce(
        m, targets=np.full(LOGITS.shape, 1 / LOGITS.shape[1]), ignore_index=2), ValueError,
     r"ignore_index: 2 with class-probability targets; they have no class index to ignore"),
    ("target out of range", lambda m: _ce(m, targets=np.array([0, 1, 5, 3])), ValueError,
     r"targets: every class index must be in 0..4 or ignore_index \(-100\), got 5"),
    ("negative target", lambda m: _ce(m, targets=np.array([0, -1, 2, 3])), ValueError,
     r"targets: every class index must be in 0..4 or ignore_index \(-100\), got -1"),
    ("target shape", lambda m: _ce(m, targets=np.array([0, 1, 2])), ValueError,
     r"targets: expected shape \[N, d...\] .* = \(4,\), got \(3,\)"),
    ("probabilities misshaped", lambda m: _ce(m, targets=np.zeros((4, 4))), ValueError,
     r"targets: expected shape like logits \(class probabilities\) = \(4, 5\), got \(4, 4\)"),
    ("bool targets", lambda m: _ce(m, targets=np.ones(4, bool)), TypeError,
     r"targets: expected integer class indices or float probabilities, got dtype bool"),
    ("reduction", lambda m: _ce(m, reduction="avg"), ValueError,
     r"reduction: expected one of \('mean', 'sum', 'none'\), got 'avg'"),
    ("label smoothing", lambda m: _ce(m, label_smoothing=1.5), ValueError,
     r"label_smoothing: expected a float in \[0, 1\], got 1.5"),
    ("class weight misshaped", lambda m: _ce(m, weight=np.ones(4)), ValueError,
     r"weight: expected shape \[C\] = \(5,\), got \(4,\)"),
    ("integer logits", lambda m: _ce(m, logits=np.zeros((4, 5), int)), TypeError,
     r"logits: expected dtype float32 or float64, got int64"),
    ("d_loss not scalar", lambda m: _ce_backward(m, np.ones(4)), ValueError,
     r"d_loss: expected a float scalar for reduction 'mean', got float64 array of shape \(4,\)"),
    ("d_loss misshaped (none)", lambda m: _ce_backward(m, np.ones(3), "none"), ValueError,
     r"d_loss: expected shape like the per-row loss = \(4,\), got \(3,\)"),
    ("cross-entropy wrong cache", lambda m: m.cross_entropy_backward(np.float64(1), "cache"),
     TypeError, r"cache: expected the .*CrossEntropyCache returned by .*cross_entropy_forward, "
                r"got str"),
    ("linear wrong cache", lambda m: m.linear_backward(np.zeros((1, 2)), _emb(m, np.array([0]))[1]),
     TypeError, r"cache: expected the LinearCache returned by linear_forward, got EmbeddingCache"),
]


@over_backends
@pytest.mark.parametrize(("call", "error", "message"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_layer_bad_input_raises_a_clear_error(backend, call, error, message) -> None:
    with pytest.raises(error, match=message):
        call(BACKENDS[backend])
