"""Attention problems and backends for the registry in `benchmarks.cases`.

Problem: the seed's attention core, score "dot" (scale 1), keys and values the same array kv
(as the seed passes the encoder outputs), with one query per row (query [B, H], the seed's case)
or many (query [B, Tq, H], all decoder steps at once), optionally with lengths (keys at
j >= lengths[b] masked). q and kv are drawn N(0, 1/sqrt(H)) so that the logits q . k have unit
variance, as after an LSTM's tanh: with unit inputs the logits of H = 256 would have std 16 and
the softmax would be nearly one-hot. forward returns the context; forward+backward drives a
random cotangent of the context (never ``.sum()``) and returns the context, d_query and
d_keys + d_values (keys is values, so their gradients add, as autograd adds them). The
reference is `numpy_ref` in float64 on the same inputs (the float32 inputs upcast exactly).

Work and ceiling (the README's "Performance" section):
- single query: memory-bound. Work is bytes of V: forward reads the valid keys of V once
  (n_valid = sum(lengths) * H elements, all B*T*H without lengths); forward+backward reads them
  once more and writes d_values once, 2 * n_valid + B*T*H elements. q, the context and the
  weights ([B, T]) are below 1/H of that and not counted. The ceiling is a streaming read and a
  fresh copy of the same bytes, measured in the same run (`benchmarks.ceilings`).
- many queries: GEMM-bound. Work is the batched products' flops: forward the scores
  q k^T [Tq, H] @ [H, Tk] and the context w v [Tq, Tk] @ [Tk, H], per batch row; backward four
  more (dw = dc v^T, d_values = w^T dc, d_query = ds k, d_keys = ds^T q), so forward+backward is
  3x forward. The softmax is not counted. The ceiling is the best BLAS time of these products.

Backends: `module_backend` (``numpy_ref`` and, once it exports the op, ``kernels``: same
function names and signatures), torch's bmm -> softmax -> bmm, and torch's
``scaled_dot_product_attention`` (on the CPU, 4-D [B, 1, Tq, H] inputs select its flash kernel;
3-D ones fall back to the unfused math path, about 5x slower on the single-query problem), on
the CPU and on CUDA when present; and ``kernels_cuda`` (`KERNELS_CUDA`), the Numba CUDA kernels
of ``kernels.cuda`` on the single-query problems, on inputs prepared on the device once, the
backward with ``sum_kv=True`` into preallocated buffers. The CUDA calls do not synchronize: the
runner times every "cuda" row with CUDA events (`benchmarks.core.EventClock`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from types import ModuleType
from typing import Any

import numba
import numpy as np
import torch

from benchmarks.ceilings import Product, gemm_ceiling, gemm_work, memory_ceilings, memory_work
from benchmarks.core import OP_PASSES, Backend, Prepared, Problem
from numpy_ref import attention_backward, attention_forward
from torch_impl import reference
from torch_impl.precision import true_float32

FORWARD_NAMES = ("context",)
BACKWARD_NAMES = ("context", "d_query", "d_keys+d_values")


@dataclass(frozen=True)
class AttentionInputs:
    """One attention problem's inputs, the arrays all of one dtype."""

    query: np.ndarray  # [B, H] or [B, Tq, H]
    kv: np.ndarray  # [B, Tk, H]  passed as both keys and values
    lengths: np.ndarray | None  # [B] int64, each in 1..Tk; None: every key valid
    d_context: np.ndarray  # like the context ([B, H] or [B, Tq, H])  cotangent

    def astype(self, dtype: np.dtype) -> AttentionInputs:
        """The same inputs converted to `dtype` (exact when widening float32 to float64)."""
        return replace(self, query=self.query.astype(dtype), kv=self.kv.astype(dtype),
                       d_context=self.d_context.astype(dtype))


def spread_lengths(B: int, T: int) -> np.ndarray:
    """Lengths [B] spread evenly over 1..T (mean (T+1)/2), in a fixed shuffled order so that
    the threads of a kernel parallel over the batch get similar work."""
    lengths = 1 + (np.arange(B) * (T - 1)) // max(B - 1, 1)
    return np.random.default_rng(1234).permutation(lengths).astype(np.int64)


def attention_problem(
    B: int,
    Tk: int,
    H: int,
    *,
    Tq: int | None = None,
    masked: bool = False,
    suites: tuple[str, ...] = ("default",),
    sweep: tuple[str, str] | None = None,
) -> Problem:
    """Attention of batch B over Tk keys of size H: one query per row (``Tq=None``, query
    [B, H]) or Tq of them; with ``masked``, lengths from `spread_lengths`. `sweep`: the
    family and swept size's name when the problem is a point of a size sweep."""
    lengths = spread_lengths(B, Tk) if masked else None
    if Tq is None:
        size = f"B{B},T{Tk},H{H}"
        query_shape: tuple[int, ...] = (B, H)
    else:
        size = f"B{B},Tq{Tq},Tk{Tk},H{H}"
        query_shape = (B, Tq, H)
    size += ",len~T/2" if masked else ""

    def make(dtype: np.dtype, rng: np.random.Generator) -> AttentionInputs:
        scale = H ** -0.25  # q . k ~ N(0, 1)
        inputs = AttentionInputs(
            query=scale * rng.standard_normal(query_shape),
            kv=scale * rng.standard_normal((B, Tk, H)),
            lengths=lengths,
            d_context=rng.standard_normal(query_shape),
        )
        return inputs.astype(dtype)

    if Tq is None:
        n_full = B * Tk * H
        n_valid = n_full if lengths is None else int(lengths.sum()) * H
        ceilings = memory_ceilings((B, Tk, H), lengths)

        def work(pass_: str, dtype: np.dtype) -> float:
            return memory_work(n_valid, n_full, pass_, dtype)

    else:
        products = attention_products(B, Tq, Tk, H, H)
        ceilings = {pass_: gemm_ceiling(products[pass_]) for pass_ in OP_PASSES}

        def work(pass_: str, dtype: np.dtype) -> float:
            return gemm_work(products[pass_])

    return Problem(
        op="attention",
        size=size,
        suites=suites,
        make=make,
        reference=lambda inputs, pass_: _reference(inputs.astype(np.float64), pass_),
        work=work,
        ceilings=ceilings,
        shape=(dict(B=B, T=Tk, H=H) if Tq is None else dict(B=B, Tq=Tq, Tk=Tk, H=H))
        | {"lengths": masked},
        sweep=sweep,
    )


def attention_products(batch: int, Tq: int, Tk: int, Hk: int, Hv: int
                       ) -> dict[str, list[Product]]:
    """pass -> the products of an attention of `batch` independent (query, key) sets: scores
    [Tq, Hk] @ [Hk, Tk] and context [Tq, Tk] @ [Tk, Hv] forward; dw = dc v^T
    [Tq, Hv] @ [Hv, Tk], d_values = w^T dc [Tk, Tq] @ [Tq, Hv], d_query = ds k
    [Tq, Tk] @ [Tk, Hk] and d_keys = ds^T q [Tk, Tq] @ [Tq, Hk] backward."""
    forward = [Product(Tq, Hk, Tk, batch), Product(Tq, Tk, Hv, batch)]
    backward = [Product(Tq, Hv, Tk, batch), Product(Tk, Tq, Hv, batch),
                Product(Tq, Tk, Hk, batch), Product(Tk, Tq, Hk, batch)]
    return {"forward": forward, "forward+backward": forward + backward}


def _reference(inputs: AttentionInputs, pass_: str) -> dict[str, np.ndarray]:
    """`numpy_ref`'s attention on `inputs`, in their dtype: the named outputs and gradients."""
    result = _call_module(attention_forward, attention_backward, inputs, pass_)
    return _collect_module(pass_, result)


def _call_module(forward, backward, inputs: AttentionInputs, pass_: str,
                 sum_kv: bool = False, need_weights: bool = True) -> tuple:
    """The timed call of a module backend: forward (returning the weights, or not), and
    backward from the context's cotangent (with ``sum_kv``, asking for d_keys + d_values as
    one array)."""
    context, _, cache = forward(inputs.query, inputs.kv, inputs.kv, score="dot",
                                lengths=inputs.lengths, need_weights=need_weights)
    if pass_ == "forward":
        return (context,)
    d_query, d_keys, d_values, _ = backward(inputs.d_context, cache, sum_kv=sum_kv)
    return context, d_query, d_keys, d_values


def _collect_module(pass_: str, result: tuple) -> dict[str, np.ndarray]:
    if pass_ == "forward":
        return dict(zip(FORWARD_NAMES, result, strict=True))
    context, d_query, d_keys, d_values = result
    d_kv = d_keys if d_values is None else d_keys + d_values  # None: sum_kv gave the sum
    return dict(zip(BACKWARD_NAMES, (context, d_query, d_kv), strict=True))


def module_backend(name: str, module: ModuleType, *, sum_kv: bool = False,
                   need_weights: bool = True) -> Backend:
    """A CPU backend calling ``module.attention_forward`` / ``module.attention_backward``, with
    `numpy_ref`'s signatures; unavailable (its cases skipped) while `module` lacks them. With
    ``sum_kv`` the backward returns d_keys + d_values as one array (keys is values here): one
    write of V's size instead of two, the ceiling's traffic. With ``need_weights=False`` the
    forward returns no weights (and forms none: the flash path)."""

    def prepare(inputs: AttentionInputs, pass_: str) -> Prepared:
        run = partial(_call_module, module.attention_forward, module.attention_backward,
                      inputs, pass_, sum_kv, need_weights)
        return Prepared(run=run, collect=partial(_collect_module, pass_))

    return Backend(name=name, op="attention", device="cpu", passes=OP_PASSES, prepare=prepare,
                   available=lambda: hasattr(module, "attention_forward"))


def _prepare_torch(inputs: AttentionInputs, pass_: str, *, device: str, path: str) -> Prepared:
    """torch on `device` (`torch_impl.reference.attention`, the dot score): ``path`` "bmm"
    (its explicit path: bmm -> masked_fill -inf -> softmax -> bmm) or "sdpa"
    (``scaled_dot_product_attention``, scale 1, boolean mask). Forward under no_grad; backward
    by ``torch.autograd.grad`` with the same cotangent, kv one leaf so that d_keys and d_values
    add up in it."""
    if device == "cuda":
        # The numerical policy (README): TF32 would put float32 rows near 1e-3 of the reference.
        true_float32()
    query = torch.from_numpy(inputs.query).to(device)
    kv = torch.from_numpy(inputs.kv).to(device)
    lengths = None if inputs.lengths is None else torch.from_numpy(inputs.lengths).to(device)
    explicit_or_sdpa = "explicit" if path == "bmm" else "sdpa"

    def attend(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return reference.attention(q, kv, kv, lengths=lengths, path=explicit_or_sdpa)[0]

    # On CUDA the calls return before the GPU is done: the runner's event clock waits for them.
    if pass_ == "forward":

        def run() -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                context = attend(query, kv)
            return (context,)

        names = FORWARD_NAMES
    else:
        query.requires_grad_(True)
        kv.requires_grad_(True)
        d_context = torch.from_numpy(inputs.d_context).to(device)

        def run() -> tuple[torch.Tensor, ...]:
            context = attend(query, kv)
            d_query, d_kv = torch.autograd.grad(context, (query, kv), d_context)
            return context.detach(), d_query, d_kv

        names = BACKWARD_NAMES

    def collect(result: tuple[torch.Tensor, ...]) -> Mapping[str, np.ndarray]:
        return {k: t.cpu().numpy() for k, t in zip(names, result, strict=True)}

    return Prepared(run=run, collect=collect)


def _torch_backend(name: str, device: str, path: str) -> Backend:
    available = torch.cuda.is_available if device == "cuda" else (lambda: True)
    return Backend(name=name, op="attention", device=device, passes=OP_PASSES,
                   prepare=partial(_prepare_torch, device=device, path=path),
                   available=available, memory="torch")


TORCH_BMM_CPU = _torch_backend("torch_bmm", "cpu", "bmm")
TORCH_SDPA_CPU = _torch_backend("torch_sdpa", "cpu", "sdpa")
TORCH_BMM_CUDA = _torch_backend("torch_bmm", "cuda", "bmm")
TORCH_SDPA_CUDA = _torch_backend("torch_sdpa", "cuda", "sdpa")


# --------------------------------------------------------------------------------------------
# kernels.cuda: the single-query core on the GPU


def _kernels_cuda() -> ModuleType | None:
    """``kernels.cuda``, or None when it does not import (not written, no numba-cuda)."""
    try:
        return importlib.import_module("kernels.cuda")
    except Exception:  # an import error of any kind: the backend is unavailable, not broken
        return None


def kernels_cuda_available() -> bool:
    """Whether `KERNELS_CUDA` can run here: torch sees a GPU (its events time the rows, its
    copy sets the ceiling), ``kernels.cuda`` imports and says it is available, and numba is not
    the CUDA simulator (``NUMBA_ENABLE_CUDASIM``: Python on the CPU, not a GPU; a test may
    still call the backend's ``prepare`` there)."""
    if numba.config.ENABLE_CUDASIM or not torch.cuda.is_available():
        return False
    module = _kernels_cuda()
    try:
        return module is not None and bool(module.is_available())
    except Exception:
        return False


def _to_host(array: Any) -> np.ndarray:
    """A device array (numba's, or the simulator's) or a host array as a NumPy array."""
    return array.copy_to_host() if hasattr(array, "copy_to_host") else np.asarray(array)


def _prepare_kernels_cuda(inputs: AttentionInputs, pass_: str) -> Prepared:
    """``kernels.cuda.attention_forward`` (forward) and then ``attention_backward`` with
    ``sum_kv=True`` into preallocated ``out=`` buffers (forward+backward), on numba device
    arrays made once here: the timed call copies nothing between host and device. The result
    stays on the device; `collect` copies it to the host for validation."""
    if inputs.query.ndim != 2:
        raise ValueError("kernels_cuda: the single-query layout only (query [B, H]), got "
                         f"query {inputs.query.shape}")
    module = importlib.import_module("kernels.cuda")  # its import error, if any, is the FAIL
    from numba import cuda

    query, kv = cuda.to_device(inputs.query), cuda.to_device(inputs.kv)
    lengths = None if inputs.lengths is None else cuda.to_device(inputs.lengths)

    def forward() -> tuple:
        return module.attention_forward(query, kv, kv, score="dot", lengths=lengths)

    if pass_ == "forward":

        def run() -> tuple:
            context, _, _ = forward()
            return (context,)

        names = FORWARD_NAMES
    else:
        d_context = cuda.to_device(inputs.d_context)
        out = (cuda.device_array(inputs.query.shape, inputs.query.dtype),
               cuda.device_array(inputs.kv.shape, inputs.kv.dtype), None)

        def run() -> tuple:
            context, _, cache = forward()
            d_query, d_kv, d_values, _ = module.attention_backward(d_context, cache,
                                                                   sum_kv=True, out=out)
            if d_values is not None:
                raise ValueError("kernels.cuda.attention_backward(sum_kv=True) returned "
                                 "d_values; expected None (the sum is in d_keys)")
            return context, d_query, d_kv

        names = BACKWARD_NAMES

    def collect(result: tuple) -> Mapping[str, np.ndarray]:
        return {k: _to_host(x) for k, x in zip(names, result, strict=True)}

    return Prepared(run=run, collect=collect)


KERNELS_CUDA = Backend(name="kernels_cuda", op="attention", device="cuda", passes=OP_PASSES,
                       prepare=_prepare_kernels_cuda, available=kernels_cuda_available,
                       memory="numba", handles=lambda problem: "Tq" not in problem.shape)


# --------------------------------------------------------------------------------------------
# heads: SDPA's layout [B, h, T, D], scaled_dot, causal or not, grouped-query when h_kv < h

HEADS_NAMES = ("context", "d_query", "d_keys", "d_values")
WEIGHTS_BYTES_LIMIT = 2**28  # backends that return the weights skip problems where they would
#                              take more than 256 MiB (the scale rows show the others)


@dataclass(frozen=True)
class HeadsInputs:
    """One heads-layout problem's inputs, the arrays all of one dtype."""

    query: np.ndarray  # [B, h, T, D]
    keys: np.ndarray  # [B, h_kv, T, D]
    values: np.ndarray  # [B, h_kv, T, D]
    causal: bool
    d_context: np.ndarray  # [B, h, T, D]  cotangent

    def astype(self, dtype: np.dtype) -> HeadsInputs:
        """The same inputs converted to `dtype` (exact when widening float32 to float64)."""
        return replace(self, query=self.query.astype(dtype), keys=self.keys.astype(dtype),
                       values=self.values.astype(dtype), d_context=self.d_context.astype(dtype))


def heads_problem(B: int, h: int, T: int, D: int, *, h_kv: int | None = None,
                  causal: bool = False, suites: tuple[str, ...] = ("default",),
                  sweep: tuple[str, str] | None = None) -> Problem:
    """Self-attention in SDPA's layout: query [B, h, T, D], keys/values [B, h_kv, T, D]
    (h_kv = h unless given: grouped-query attention), score scaled_dot, optionally causal.

    GEMM-bound: the work is the products' flops (`attention_products` with batch B*h), 3x the
    forward's for forward+backward. Causal, a query sees (T+1)/2 keys on average, so the work
    and the ceiling's time are (T+1)/(2T) of the dense ones: a kernel that computes the hidden
    half too reads about half the rate of one that skips it. The reference is numpy_ref in
    float64 without the weights (its blockwise path: nothing of size T x T, at any T).
    """
    h_kv = h if h_kv is None else h_kv
    size = f"B{B},h{h},T{T},D{D}" + (f",h_kv{h_kv}" if h_kv != h else "") + (
        ",causal" if causal else "")

    def make(dtype: np.dtype, rng: np.random.Generator) -> HeadsInputs:
        return HeadsInputs(query=rng.standard_normal((B, h, T, D)),
                           keys=rng.standard_normal((B, h_kv, T, D)),
                           values=rng.standard_normal((B, h_kv, T, D)), causal=causal,
                           d_context=rng.standard_normal((B, h, T, D))).astype(dtype)

    products = attention_products(B * h, T, T, D, D)
    visible = (T + 1) / (2 * T) if causal else 1.0

    def work(pass_: str, dtype: np.dtype) -> float:
        return visible * gemm_work(products[pass_])

    return Problem(op="sdpa", size=size, suites=suites, make=make,
                   reference=lambda inputs, pass_: _heads_module(
                       attention_forward, attention_backward, inputs.astype(np.float64), pass_,
                       need_weights=False),
                   work=work,
                   ceilings={pass_: gemm_ceiling(products[pass_], scale=visible)
                             for pass_ in OP_PASSES},
                   shape=dict(B=B, h=h, h_kv=h_kv, T=T, D=D, causal=causal), sweep=sweep)


def _weights_fit(problem: Problem) -> bool:
    """Whether the float32 weights [B, h, T, T] of a heads problem fit `WEIGHTS_BYTES_LIMIT`."""
    shape = problem.shape
    return 4 * shape["B"] * shape["h"] * shape["T"] ** 2 <= WEIGHTS_BYTES_LIMIT


def _heads_module(forward, backward, inputs: HeadsInputs, pass_: str, *,
                  need_weights: bool) -> dict[str, np.ndarray]:
    context, _, cache = forward(inputs.query, inputs.keys, inputs.values, score="scaled_dot",
                                causal=inputs.causal, need_weights=need_weights)
    if pass_ == "forward":
        return {"context": context}
    d_query, d_keys, d_values, _ = backward(inputs.d_context, cache)
    return dict(zip(HEADS_NAMES, (context, d_query, d_keys, d_values), strict=True))


def heads_module_backend(name: str, module: ModuleType, *, need_weights: bool,
                         max_T: int | None = None) -> Backend:
    """``module.attention_forward/backward`` on the heads problems (CPU), returning the
    weights or not (``need_weights``; those that do skip problems whose weights would not fit
    `WEIGHTS_BYTES_LIMIT`), on problems of at most `max_T` steps (None: all)."""

    def handles(problem: Problem) -> bool:
        return ((not need_weights or _weights_fit(problem))
                and (max_T is None or problem.shape["T"] <= max_T))

    def prepare(inputs: HeadsInputs, pass_: str) -> Prepared:
        run = partial(_heads_module, module.attention_forward, module.attention_backward,
                      inputs, pass_, need_weights=need_weights)
        return Prepared(run=run, collect=lambda result: result)

    return Backend(name=name, op="sdpa", device="cpu", passes=OP_PASSES, prepare=prepare,
                   available=lambda: hasattr(module, "attention_forward"), handles=handles)


def _prepare_torch_heads(inputs: HeadsInputs, pass_: str, *, device: str,
                         path: str) -> Prepared:
    """torch on `device` (`torch_impl.reference.attention`, scaled_dot): ``path`` "sdpa"
    (``F.scaled_dot_product_attention``, is_causal, enable_gqa when h_kv < h; no weights) or
    "softmax" (the explicit path that returns the weights: q k^T / sqrt(D), -inf above the
    diagonal when causal, softmax, @ v, the kv heads expanded to the query heads)."""
    if device == "cuda":
        true_float32()
    q, k, v = (torch.from_numpy(a).to(device) for a in (inputs.query, inputs.keys,
                                                       inputs.values))

    def attend() -> tuple[torch.Tensor, ...]:
        context, weights = reference.attention(q, k, v, score="scaled_dot",
                                               causal=inputs.causal,
                                               path="sdpa" if path == "sdpa" else "explicit")
        return (context,) if weights is None else (context, weights)

    if pass_ == "forward":  # on CUDA no synchronize: the runner's event clock waits
        def run() -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return attend()[:1]
    else:
        for t in (q, k, v):
            t.requires_grad_(True)
        d_context = torch.from_numpy(inputs.d_context).to(device)

        def run() -> tuple[torch.Tensor, ...]:
            context = attend()[0]
            grads = torch.autograd.grad(context, (q, k, v), d_context)
            return (context.detach(), *grads)

    def collect(result: tuple[torch.Tensor, ...]) -> Mapping[str, np.ndarray]:
        return {k: t.cpu().numpy() for k, t in zip(HEADS_NAMES, result, strict=False)}

    return Prepared(run=run, collect=collect)


def _torch_heads_backend(device: str, path: str = "sdpa") -> Backend:
    available = torch.cuda.is_available if device == "cuda" else (lambda: True)
    return Backend(name="torch_sdpa" if path == "sdpa" else "torch_softmax", op="sdpa",
                   device=device, passes=OP_PASSES,
                   prepare=partial(_prepare_torch_heads, device=device, path=path),
                   available=available, memory="torch",
                   handles=_weights_fit if path == "softmax" else lambda problem: True)


TORCH_HEADS_CPU = _torch_heads_backend("cpu")
TORCH_HEADS_CUDA = _torch_heads_backend("cuda")
TORCH_SOFTMAX_HEADS_CPU = _torch_heads_backend("cpu", "softmax")
