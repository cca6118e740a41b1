"""The optimizers and gradient clipping against torch.optim / torch.nn.utils, step for step;
kernels' fused Adam bit for bit against numpy_ref's; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels
import numpy_ref as ref

SHAPES = {"w": (3, 4), "b": (5,), "s": (1,)}
OPTIMIZERS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1)),
    ("Adam", dict()),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict()),
    ("AdamW", dict(lr=0.01, weight_decay=0.3, amsgrad=True)),
]
over_optimizers = pytest.mark.parametrize(("name", "kw"), OPTIMIZERS,
                                          ids=[f"{n}{kw}" for n, kw in OPTIMIZERS])


def _run(name: str, kw: dict, module, dtype, steps: int, seed: int):
    """(ours, torch's) params after `steps` steps of the same random gradients."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    ours = {k: v.copy() for k, v in params.items()}
    theirs = [torch.tensor(v.copy(), requires_grad=True) for v in params.values()]
    opt, t_opt = getattr(module, name)(ours, **kw), getattr(torch.optim, name)(theirs, **kw)
    for _ in range(steps):
        grads = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
        opt.step(grads)
        for t, g in zip(theirs, grads.values(), strict=True):
            t.grad = torch.tensor(g)
        t_opt.step()
    return ours, {k: t.detach().numpy() for k, t in zip(SHAPES, theirs, strict=True)}


@pytest.mark.parametrize("module", [ref, kernels], ids=["numpy_ref", "kernels"])
@over_optimizers
@given(seed=st.integers(0, 2**32 - 1))
def test_optimizer_matches_torch_step_for_step(module, name: str, kw: dict, seed: int) -> None:
    for dtype, tol in ((np.float64, 1e-13), (np.float32, 2e-6)):
        ours, theirs = _run(name, kw, module, dtype, 25, seed)
        for k in SHAPES:
            assert ours[k].dtype == dtype
            np.testing.assert_allclose(ours[k], theirs[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_kernels_fused_adam_is_bit_for_bit_numpy_refs(name: str, dtype) -> None:
    for kw in (dict(lr=0.01), dict(lr=0.01, weight_decay=0.2, amsgrad=True)):
        ours, _ = _run(name, kw, kernels, dtype, 40, seed=3)
        reference, _ = _run(name, kw, ref, dtype, 40, seed=3)
        for k in SHAPES:
            np.testing.assert_array_equal(ours[k], reference[k], err_msg=k)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_clip_grad_norm_matches_torch(norm_type, max_norm, dtype) -> None:
    rng = np.random.default_rng(4)
    grads = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    before = {k: g.copy() for k, g in grads.items()}
    tensors = [torch.tensor(g.copy(), requires_grad=True) for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = torch.tensor(g.copy())
    total = ref.clip_grad_norm(grads, max_norm, norm_type)
    t_total = torch.nn.utils.clip_grad_norm_(tensors, max_norm, norm_type)
    tol = 1e-15 if dtype == np.float64 else 1e-6
    assert np.asarray(total).dtype == dtype
    np.testing.assert_allclose(total, t_total.item(), rtol=tol)
    for g, t in zip(grads.values(), tensors, strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=tol, atol=tol)
    if max_norm > 1e2:  # not clipped: multiplied by 1, exactly
        for k, g in grads.items():
            np.testing.assert_array_equal(g, before[k], err_msg=k)
    else:
        assert all(np.abs(grads[k]).max() < np.abs(before[k]).max() for k in grads)


P = {"w": np.zeros((2, 2))}
BAD = [
    ("not a dict", lambda: ref.Adam([np.zeros(2)]), TypeError,
     r"params: expected a dict of arrays, got list"),
    ("empty", lambda: ref.SGD({}), ValueError, r"params: expected at least one parameter"),
    ("integer param", lambda: ref.SGD({"w": np.zeros(2, int)}), TypeError,
     r"params\['w'\]: expected dtype float32 or float64, got int64"),
    ("negative lr", lambda: ref.Adam(P, lr=-1.0), ValueError,
     r"lr: expected a float in \[0.0, inf\], got -1.0"),
    ("beta of 1", lambda: ref.Adam(P, betas=(0.9, 1.0)), ValueError,
     r"betas\[1\]: expected a float in \[0.0, 1.0\), got 1.0"),
    ("nesterov without momentum", lambda: ref.SGD(P, nesterov=True), ValueError,
     r"nesterov: needs momentum > 0 and dampening = 0"),
    ("missing grad", lambda: ref.Adam(P).step({}), ValueError,
     r"grads: the keys must be the params' keys; missing \['w'\], unexpected \[\]"),
    ("extra grad", lambda: ref.SGD(P).step({"w": np.zeros((2, 2)), "v": np.zeros(1)}),
     ValueError, r"grads: the keys must be the params' keys; missing \[\], unexpected \['v'\]"),
    ("misshaped grad", lambda: kernels.Adam(P).step({"w": np.zeros(4)}), ValueError,
     r"grads\['w'\]: expected shape like params\['w'\] = \(2, 2\), got \(4,\)"),
    ("float32 grad", lambda: ref.SGD(P).step({"w": np.zeros((2, 2), np.float32)}), TypeError,
     r"grads\['w'\]: dtype float32 does not match the dtype of params\['w'\]"),
    ("clip max_norm", lambda: ref.clip_grad_norm({"w": np.ones(2)}, -1.0), ValueError,
     r"max_norm: expected a float in \[0.0, inf\], got -1.0"),
    ("clip norm_type", lambda: ref.clip_grad_norm({"w": np.ones(2)}, 1.0, 0.5), ValueError,
     r"norm_type: expected a float in \[1.0, inf\], got 0.5"),
]


@pytest.mark.parametrize(("call", "error", "message"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_optimizer_bad_input_raises_a_clear_error(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()
