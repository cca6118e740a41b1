"""The optimizers and gradient clipping against torch.optim / torch.nn.utils, step for step
(torch on the CPU, and on CUDA in the tests marked ``cuda``); kernels' fused Adam bit for bit
against numpy_ref's; bad input."""

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


def _run(name: str, kw: dict, module, dtype, steps: int, seed: int, device: str = "cpu",
         t_kw: dict | None = None):
    """(ours, torch's) params after `steps` steps of the same random gradients.

    Ours runs on the CPU; torch.optim's optimizer `name` on parameters on `device`, built with
    `kw` plus `t_kw` (torch-only options such as ``foreach``). Params {k: SHAPES[k]} in dtype.
    """
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    ours = {k: v.copy() for k, v in params.items()}
    theirs = [torch.tensor(v.copy(), device=device, requires_grad=True) for v in params.values()]
    opt = getattr(module, name)(ours, **kw)
    t_opt = getattr(torch.optim, name)(theirs, **kw, **(t_kw or {}))
    for _ in range(steps):
        grads = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
        opt.step(grads)
        for t, g in zip(theirs, grads.values(), strict=True):
            t.grad = torch.tensor(g, device=device)
        t_opt.step()
    return ours, {k: t.detach().cpu().numpy() for k, t in zip(SHAPES, theirs, strict=True)}


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


def check_clip_grad_norm_against_torch_on(device: str, norm_type: float, max_norm: float,
                                          dtype) -> None:
    """ref.clip_grad_norm (on the CPU) against torch.nn.utils.clip_grad_norm_ on `device`:
    the total norm and the clipped gradients (SHAPES, in dtype); float64 to 1e-15, float32 to
    1e-6 on the CPU and to rtol = atol = 1e-3 (the CPU-vs-CUDA rule, TF32 off) elsewhere."""
    rng = np.random.default_rng(4)
    grads = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
    before = {k: g.copy() for k, g in grads.items()}
    tensors = [torch.tensor(g.copy(), device=device, requires_grad=True)
               for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = torch.tensor(g.copy(), device=device)
    total = ref.clip_grad_norm(grads, max_norm, norm_type)
    t_total = torch.nn.utils.clip_grad_norm_(tensors, max_norm, norm_type)
    if dtype == np.float64:
        rtol = atol = 1e-15
    else:
        rtol = atol = 1e-6 if device == "cpu" else 1e-3
    assert np.asarray(total).dtype == dtype
    np.testing.assert_allclose(total, t_total.item(), rtol=rtol)
    for k, g, t in zip(grads, grads.values(), tensors, strict=True):
        np.testing.assert_allclose(g, t.grad.cpu().numpy(), rtol=rtol, atol=atol, err_msg=k)
    if max_norm > 1e2:  # not clipped: multiplied by 1, exactly
        for k, g in grads.items():
            np.testing.assert_array_equal(g, before[k], err_msg=k)
    else:
        assert all(np.abs(grads[k]).max() < np.abs(before[k]).max() for k in grads)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_clip_grad_norm_matches_torch(norm_type, max_norm, dtype) -> None:
    check_clip_grad_norm_against_torch_on("cpu", norm_type, max_norm, dtype)


# ---------------------------------------------------------------------------------------------
# torch on CUDA: ours (on the CPU) against torch.optim / clip_grad_norm_ on the GPU


def check_optimizer_against_torch_on(device: str, module, name: str, kw: dict, dtype,
                                     foreach: bool | None, steps: int = 25, seed: int = 5
                                     ) -> None:
    """`steps` steps of ours against torch.optim on `device` (foreach=None: torch's default),
    float64 to the CPU test's 1e-13, float32 to rtol = atol = 1e-3 (the CPU-vs-CUDA rule)."""
    ours, theirs = _run(name, kw, module, dtype, steps, seed, device, dict(foreach=foreach))
    tol = 1e-13 if dtype == np.float64 else 1e-3
    for k in SHAPES:
        assert ours[k].dtype == theirs[k].dtype == dtype, (k, ours[k].dtype, theirs[k].dtype)
        np.testing.assert_allclose(ours[k], theirs[k], rtol=tol, atol=tol, err_msg=k)


# torch.optim's default (foreach=None) on CUDA parameters is the foreach implementation (the
# for-loop one on the CPU): the same formulas through torch._foreach_* kernels, which may fuse
# a multiply-add (addcdiv, add with alpha, lerp) into one rounding where the CPU rounds twice;
# that is an ulp per step, far inside 1e-13 over 25 steps. Both implementations are checked.
@pytest.mark.cuda
@pytest.mark.parametrize("foreach", [None, False], ids=["default-foreach", "for-loop"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@over_optimizers
def test_optimizer_matches_torch_cuda(name: str, kw: dict, dtype, foreach) -> None:
    check_optimizer_against_torch_on("cuda", ref, name, kw, dtype, foreach)


# clip_grad_norm_ on CUDA also defaults to foreach (torch._foreach_norm per tensor, then the
# norm of the norms): a reduction in another order, within the CPU test's float64 1e-15.
@pytest.mark.cuda
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_clip_grad_norm_matches_torch_cuda(norm_type, max_norm, dtype) -> None:
    check_clip_grad_norm_against_torch_on("cuda", norm_type, max_norm, dtype)


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
