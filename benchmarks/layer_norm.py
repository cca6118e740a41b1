"""Layer norm problems and backends for the registry in `benchmarks.cases`.

Problem: `torch.nn.LayerNorm(E)` with a weight and a bias over x [..., E] (every leading
position a row), torch's variant, eps 1e-5: the Transformer's norms, at the training step's
activation shape [B, T, E] and at a larger [M, E]. x ~ N(0, 1); the weight and the bias drawn
N(1, 0.1) and N(0, 0.1) (a trained norm's), the cotangent d_y ~ N(0, 1). forward returns y;
forward+backward drives d_y (never ``.sum()``) and returns y, d_x, d_weight and d_bias. The
reference is `numpy_ref` in float64 on the same inputs (the float32 inputs upcast exactly).

Work and ceiling: memory-bound, work is the bytes the pass cannot avoid moving. forward reads x
and writes y (2 arrays of x's size); forward+backward also reads x^ (or x) and d_y and writes
d_x (5 arrays). The weight, the bias, d_weight, d_bias and the per-row statistics are 1/M of
that and not counted. The ceiling is the time of exactly that traffic on an array of x's
shape, measured in the same run (`benchmarks.ceilings.stream_ceilings`): a fresh copy
forward; two fresh copies and a streaming read forward+backward. A backend that saves x^ for the
backward (numpy_ref and kernels do; torch saves x and the row statistics) writes one array more
than the ceiling counts forward.

Backends: `module_backend` (``numpy_ref`` and ``kernels``: the same function names and
signatures) and torch on the CPU (``torch.nn.functional.layer_norm``, forward under no_grad,
backward by ``torch.autograd.grad``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from types import ModuleType

import numpy as np
import torch

from benchmarks.ceilings import stream_ceilings
from benchmarks.core import OP_PASSES, Backend, Prepared, Problem
from numpy_ref import layer_norm_backward, layer_norm_forward

OP = "layer_norm"
EPS = 1e-5
FORWARD_NAMES = ("y",)
BACKWARD_NAMES = ("y", "d_x", "d_weight", "d_bias")
# pass -> (fresh copies, streaming reads) of one array of x's size: the least traffic
TRAFFIC = {"forward": (1, 0), "forward+backward": (2, 1)}


@dataclass(frozen=True)
class LayerNormInputs:
    """One layer norm problem's inputs, all of one dtype."""

    x: np.ndarray  # [..., E]
    weight: np.ndarray  # [E]
    bias: np.ndarray  # [E]
    d_y: np.ndarray  # like x  cotangent

    def astype(self, dtype: np.dtype) -> LayerNormInputs:
        """The same inputs converted to `dtype` (exact when widening float32 to float64)."""
        return replace(self, x=self.x.astype(dtype), weight=self.weight.astype(dtype),
                       bias=self.bias.astype(dtype), d_y=self.d_y.astype(dtype))


def layer_norm_problem(shape: tuple[int, ...], *, suites: tuple[str, ...] = ("default",)
                       ) -> Problem:
    """A layer norm over the last axis of x of `shape`: [B, T, E] (size "B..,T..,E..") or
    [M, E] ("M..,E..")."""
    labels = ("B", "T", "E") if len(shape) == 3 else ("M", "E")
    if len(shape) != len(labels):
        raise ValueError(f"shape: expected [B, T, E] or [M, E], got {shape}")
    size = ",".join(f"{k}{n}" for k, n in zip(labels, shape, strict=True))
    E, elements = shape[-1], math.prod(shape)

    def make(dtype: np.dtype, rng: np.random.Generator) -> LayerNormInputs:
        return LayerNormInputs(x=rng.standard_normal(shape),
                               weight=1 + 0.1 * rng.standard_normal(E),
                               bias=0.1 * rng.standard_normal(E),
                               d_y=rng.standard_normal(shape)).astype(dtype)

    def work(pass_: str, dtype: np.dtype) -> float:
        copies, reads = TRAFFIC[pass_]
        return (2 * copies + reads) * elements * np.dtype(dtype).itemsize / 1e9

    return Problem(
        op=OP,
        size=size,
        suites=suites,
        make=make,
        reference=lambda inputs, pass_: _call_module(layer_norm_forward, layer_norm_backward,
                                                     inputs.astype(np.float64), pass_),
        work=work,
        ceilings=stream_ceilings(shape, TRAFFIC),
        shape=dict(zip(labels, shape, strict=True)),
    )


def _call_module(forward, backward, inputs: LayerNormInputs, pass_: str
                 ) -> dict[str, np.ndarray]:
    """A module backend's timed call (numpy_ref's API): the named outputs and gradients."""
    y, cache = forward(inputs.x, {"weight": inputs.weight, "bias": inputs.bias}, eps=EPS)
    if pass_ == "forward":
        return {"y": y}
    d_x, d_params = backward(inputs.d_y, cache)
    return {"y": y, "d_x": d_x, "d_weight": d_params["weight"], "d_bias": d_params["bias"]}


def module_backend(name: str, module: ModuleType) -> Backend:
    """A CPU backend calling ``module.layer_norm_forward`` / ``module.layer_norm_backward``
    (numpy_ref's signatures): numpy_ref itself, or kernels; unavailable while `module` lacks
    them."""

    def prepare(inputs: LayerNormInputs, pass_: str) -> Prepared:
        run = partial(_call_module, module.layer_norm_forward, module.layer_norm_backward,
                      inputs, pass_)
        return Prepared(run=run, collect=lambda result: result)

    return Backend(name=name, op=OP, device="cpu", passes=OP_PASSES, prepare=prepare,
                   available=lambda: hasattr(module, "layer_norm_forward"))


def _prepare_torch(inputs: LayerNormInputs, pass_: str) -> Prepared:
    """``torch.nn.functional.layer_norm`` on the CPU; forward under no_grad, backward by
    ``torch.autograd.grad`` of x, the weight and the bias with the same cotangent."""
    x, weight, bias = (torch.from_numpy(a) for a in (inputs.x, inputs.weight, inputs.bias))
    E = x.shape[-1]
    if pass_ == "forward":

        def run() -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return (torch.nn.functional.layer_norm(x, (E,), weight, bias, EPS),)

        names = FORWARD_NAMES
    else:
        leaves = tuple(t.requires_grad_(True) for t in (x, weight, bias))
        d_y = torch.from_numpy(inputs.d_y)

        def run() -> tuple[torch.Tensor, ...]:
            y = torch.nn.functional.layer_norm(x, (E,), weight, bias, EPS)
            return (y.detach(), *torch.autograd.grad(y, leaves, d_y))

        names = BACKWARD_NAMES

    def collect(result: tuple[torch.Tensor, ...]) -> Mapping[str, np.ndarray]:
        return {k: t.numpy() for k, t in zip(names, result, strict=True)}

    return Prepared(run=run, collect=collect)


TORCH_CPU = Backend(name="torch", op=OP, device="cpu", passes=OP_PASSES, prepare=_prepare_torch,
                    memory="torch")
