r"""Autograd bridges: the hand-written forward/backward pairs of `numpy_ref` and `kernels`,
running inside a torch graph as `torch.autograd.Function`s.

Each public function here takes torch tensors and returns torch tensors, and torch's autograd
calls our backward for it:

    attention(query, keys, values, *, score, params, lengths, mask, causal, scale, bias)
        -> (context, weights)                      over attention_forward / attention_backward
    multihead_attention(query, key, value, params, *, num_heads, ...)
        -> (output, weights or None)               over multihead_attention_forward / _backward
    lstm(x, params, *, num_layers, bidirectional, batch_first, h0, c0, lengths)
        -> (output, (h_n, c_n))                    over lstm_forward / lstm_backward
    lstm_cell(x, h, c, params) -> (h_new, c_new)   over lstm_cell_forward / lstm_cell_backward
    gru(x, params, *, ..., linear_before_reset) / rnn(x, params, *, nonlinearity, ...)
        -> (output, h_n)                           over gru_/rnn_forward and _backward
    gru_cell(x, h, params) / rnn_cell(x, h, params) -> h_new      over the cells' pairs

The math is the op's own (the docstrings of `numpy_ref.attention`, `numpy_ref.lstm`,
`numpy_ref.gru`, `numpy_ref.rnn` and `numpy_ref.multihead_attention`); a bridge only moves
arrays. In forward it takes NumPy views of the tensors (no copy on the CPU), runs
``backend.op_forward`` and keeps the op's cache on the autograd context; in backward it gives
the output cotangents to ``backend.op_backward`` and hands torch one gradient per input, in the
forward's argument order (``d_params[name]`` for each entry of ``params``; ``d_params["bias"]``
for attention's ``bias``). An output that the loss does not use reaches the backward as
``None`` and is passed on as "no cotangent" (zeros for the context, the LSTM output and the
cell's h; absent for the weights and the final states), so no zero array is built for it.

Conventions kept from torch:
- dtype: float32 stays float32 and float64 float64; inputs of mixed dtype get the op's
  TypeError, which names the argument.
- device: CPU tensors in, CPU tensors out (sharing memory with the NumPy results). A CUDA
  tensor goes to `kernels.cuda` when ``backend="kernels"`` and numba-cuda sees a GPU (the
  single-query attention core; its arrays stay on the device, and it runs on the default
  stream, so torch work queued on another stream must be synchronised first). Every other
  case of a tensor that is not on the CPU is a ValueError saying what to do instead.
- Saved tensors: the inputs and outputs are saved with ``ctx.save_for_backward``, so an
  in-place change to one of them between forward and backward is torch's usual
  "modified by an inplace operation" error, not a silently wrong gradient.
- Double backward: the backward is NumPy, outside the graph, so a second derivative is not
  available; asking for one (``create_graph=True`` and then differentiating the gradient) is
  torch's ``once_differentiable`` RuntimeError.

``backend`` is ``"numpy_ref"`` (the default, the readable reference), ``"kernels"`` (Numba) or
one of those modules itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.autograd.function import FunctionCtx, once_differentiable

import kernels
import numpy_ref

BACKENDS = ("numpy_ref", "kernels")

# --------------------------------------------------------------------------------------------
# plumbing: backends, devices, arrays


def resolve_backend(backend: str | ModuleType) -> ModuleType:
    """``"numpy_ref"`` / ``"kernels"`` (or the module itself) -> the module."""
    if backend is numpy_ref or backend is kernels:
        return backend
    if isinstance(backend, str) and backend in BACKENDS:
        return numpy_ref if backend == "numpy_ref" else kernels
    raise ValueError(f"backend: expected one of {BACKENDS} (or the module itself), "
                     f"got {backend!r}")


_CUDA: list[ModuleType | None] = []  # kernels.cuda once imported and found usable, else None


def cuda_backend() -> ModuleType | None:
    """`kernels.cuda` when it imports and numba-cuda sees a device, else None."""
    if not _CUDA:
        try:
            module = importlib.import_module("kernels.cuda")
            _CUDA.append(module if module.is_available() else None)
        except ImportError:
            _CUDA.append(None)
    return _CUDA[0]


def _device_of(op: str, tensors: Mapping[str, torch.Tensor | None]) -> torch.device:
    """The one device of every tensor argument; a ValueError naming them when they differ."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    kinds = {d.type for d in devices.values()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{op}: every tensor must be on one device, got {listed}")
    return next(iter(devices.values())) if kinds else torch.device("cpu")


def _host_only(op: str, device: torch.device, backend: ModuleType, cuda_note: str) -> None:
    """A ValueError for a tensor that is not on the CPU, where only the CPU is supported."""
    if device.type == "cpu":
        return
    raise ValueError(f"{op}: the {backend.__name__} backend runs on the CPU and got tensors on "
                     f"{device}; {cuda_note} move them with .cpu(), or use torch's own op")


def _array(t: Any) -> Any:
    """A NumPy view of a CPU tensor (no copy; detached from the graph); anything else as is."""
    if isinstance(t, torch.Tensor):
        return t.detach().numpy()
    return t


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    """A NumPy result as a tensor, sharing its memory unless torch cannot (negative strides,
    a read-only array)."""
    if a is None:
        return None
    a = np.asarray(a)
    if not a.flags.writeable or any(s < 0 for s in a.strides):
        a = a.copy()
    return torch.from_numpy(a)


def _device_array(t: torch.Tensor | None) -> torch.Tensor | None:
    """A CUDA tensor as `kernels.cuda` takes it: detached (``__cuda_array_interface__`` refuses
    a tensor that requires grad) and C-contiguous (a copy on the device only if it is not)."""
    return None if t is None else t.detach().contiguous()


def _on_device(x: Any) -> torch.Tensor | None:
    """A `kernels.cuda` result (anything with ``__cuda_array_interface__``) as a CUDA tensor,
    without a copy."""
    return None if x is None else torch.as_tensor(x, device="cuda")


def _host_option(x: Any) -> Any:
    """A non-differentiable option (lengths, a bool mask) as NumPy; torch tensors copied to the
    host if needed, Python lists and None unchanged."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


def _params(op: str, params: Mapping[str, torch.Tensor] | None) -> tuple[tuple[str, ...], list]:
    """A params mapping -> (its names, its tensors) in its own order."""
    if params is None:
        return (), []
    if not isinstance(params, Mapping):
        raise TypeError(f"{op}: params must be a mapping of name -> tensor, got "
                        f"{type(params).__name__}")
    for name, p in params.items():
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{op}: params[{name!r}] must be a torch.Tensor, got "
                            f"{type(p).__name__}")
    return tuple(params), list(params.values())


def _saved(ctx: FunctionCtx) -> None:
    """Touch the saved tensors: torch raises here if one was modified in place since forward."""
    _ = ctx.saved_tensors


# --------------------------------------------------------------------------------------------
# attention


@dataclass(frozen=True)
class _AttentionOptions:
    """The non-tensor arguments of one `attention` call."""

    backend: ModuleType
    cuda: bool  # the arrays are on a CUDA device and go to kernels.cuda
    score: str
    names: tuple[str, ...]  # the params' names, in the order their tensors follow
    lengths: Any
    mask: Any
    causal: bool
    scale: float | None
    has_bias: bool
    need_weights: bool
    softcap: float | None = None


class AttentionFunction(torch.autograd.Function):
    """``apply(options, query, keys, values, bias, *params) -> (context, weights)``, or the
    context alone without weights; use `attention`, which builds the options."""

    @staticmethod
    def forward(ctx: FunctionCtx, o: _AttentionOptions, query, keys, values, bias, *params):
        # Two flavours of array: NumPy views of CPU tensors, or the CUDA tensors themselves.
        arr, out = (_device_array, _on_device) if o.cuda else (_array, _tensor)
        context, weights, cache = o.backend.attention_forward(
            arr(query), arr(keys), arr(values), score=o.score,
            params=dict(zip(o.names, map(arr, params), strict=True)) or None,
            lengths=o.lengths, mask=o.mask, causal=o.causal, scale=o.scale, bias=arr(bias),
            need_weights=o.need_weights, softcap=o.softcap)
        context = out(context)
        ctx.options, ctx.cache = o, cache
        ctx.set_materialize_grads(False)
        if not o.need_weights:
            ctx.save_for_backward(query, keys, values, context)
            return context
        weights = out(weights)
        ctx.save_for_backward(query, keys, values, context, weights)
        return context, weights

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_context, d_weights=None):
        _saved(ctx)
        o = ctx.options
        arr, out = (_device_array, _on_device) if o.cuda else (_array, _tensor)
        if d_context is None:  # only the weights reach the loss
            d_context = torch.zeros_like(ctx.saved_tensors[3])
        d_query, d_keys, d_values, d_params = o.backend.attention_backward(
            arr(d_context), ctx.cache, d_weights=arr(d_weights))
        grads = [out(d_params[n]) for n in o.names]
        d_bias = out(d_params["bias"]) if o.has_bias else None
        return None, out(d_query), out(d_keys), out(d_values), d_bias, *grads


def attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    score: str = "dot",
    params: Mapping[str, torch.Tensor] | None = None,
    lengths: Any = None,
    mask: torch.Tensor | np.ndarray | None = None,
    causal: bool = False,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    need_weights: bool = True,
    softcap: float | None = None,
    backend: str | ModuleType = "numpy_ref",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attention_forward` as a differentiable torch op; backward by `attention_backward`.

    ``s = cap(scale * score(q, k)) + bias`` (``cap(x) = softcap * tanh(x / softcap)``, or x),
    ``w = softmax(s)`` over the keys each query sees,
    ``c = w v`` (the `numpy_ref.attention` module docstring has the math and the derivation).

    Parameters
    ----------
    query : [B, Hq], [B, Tq, Hq] or [B, h, Tq, D] (heads).  keys : [B, Tk, Hk] or
        [B, h_kv, Tk, D].  values : like keys with its own last size; None means keys.
    score, lengths, mask, causal, scale : as `numpy_ref.attention_forward` (lengths and mask
        may be tensors, lists or NumPy arrays; they are not differentiated).
    params : {"W": [Hq, Hk]} for general; {"W_query", "W_key", "v"(, "b")} for additive; each
        a tensor that receives its gradient.
    bias : float tensor broadcastable to the weights (SDPA's float attn_mask); differentiable.
    need_weights : return the weights; with False, None, and the backend forms nothing of size
        Tq x Tk (its flash path).
    softcap : None, or c > 0: the scaled scores become c tanh(x / c) before the bias (as
        `numpy_ref.attention_forward`; not on CUDA tensors: kernels.cuda has no softcap yet).
    backend : "numpy_ref", "kernels" (or the module). CUDA tensors need "kernels" and a GPU
        that numba-cuda sees, and `kernels.cuda`'s subset: one query per row, dot or
        scaled_dot.

    Returns
    -------
    context : [B, Hv], [B, Tq, Hv] or [B, h, Tq, Dv].  weights : [B, Tk], [B, Tq, Tk] or
    [B, h, Tq, Tk], or None. Both are differentiable (a loss on the weights flows back as
    d_weights).
    """
    module = resolve_backend(backend)
    values = keys if values is None else values
    names, tensors = _params("attention", params)
    device = _device_of("attention", {"query": query, "keys": keys, "values": values,
                                      "bias": bias, **dict(zip(names, tensors, strict=True))})
    cuda = device.type == "cuda"
    if cuda:
        module = _cuda_attention_backend(module)
    else:
        _host_only("attention", device, module, "")
    options = _AttentionOptions(module, cuda, score, names, _host_option(lengths),
                                _host_option(mask), bool(causal), scale, bias is not None,
                                need_weights, softcap)  # the backend checks that it is a bool
    result = AttentionFunction.apply(options, query, keys, values, bias, *tensors)
    return result if need_weights else (result, None)


def _cuda_attention_backend(module: ModuleType) -> ModuleType:
    """`kernels.cuda` for CUDA tensors, or a ValueError saying why it cannot be used."""
    if module is not kernels:
        raise ValueError(f"attention: CUDA tensors run on backend='kernels' (kernels.cuda), "
                         f"not {module.__name__}; move them with .cpu() for "
                         f"{module.__name__}, or use torch's own op")
    found = cuda_backend()
    if found is None:
        raise ValueError("attention: CUDA tensors need kernels.cuda, which is not usable here "
                         "(numba-cuda is not installed or sees no GPU); move the tensors with "
                         ".cpu(), or use torch's own op")
    return found


# --------------------------------------------------------------------------------------------
# multi-head attention


@dataclass(frozen=True)
class _MultiheadOptions:
    backend: ModuleType
    names: tuple[str, ...]
    num_heads: int
    key_padding_mask: Any
    attn_mask: Any
    is_causal: bool
    need_weights: bool
    average_attn_weights: bool
    batch_first: bool


class MultiheadAttentionFunction(torch.autograd.Function):
    """``apply(options, query, key, value, *params) -> output, or (output, weights)``; use
    `multihead_attention`."""

    @staticmethod
    def forward(ctx: FunctionCtx, o: _MultiheadOptions, query, key, value, *params):
        output, weights, cache = o.backend.multihead_attention_forward(
            _array(query), _array(key), _array(value),
            dict(zip(o.names, map(_array, params), strict=True)), num_heads=o.num_heads,
            key_padding_mask=o.key_padding_mask, attn_mask=o.attn_mask, is_causal=o.is_causal,
            need_weights=o.need_weights, average_attn_weights=o.average_attn_weights,
            batch_first=o.batch_first, backend=o.backend)
        output = _tensor(output)
        ctx.options, ctx.cache = o, cache
        ctx.set_materialize_grads(False)
        if not o.need_weights:
            ctx.save_for_backward(query, key, value, output)
            return output
        weights = _tensor(weights)
        ctx.save_for_backward(query, key, value, output, weights)
        return output, weights

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_output, d_weights=None):
        _saved(ctx)
        o = ctx.options
        if d_output is None:
            d_output = torch.zeros_like(ctx.saved_tensors[3])
        d_query, d_key, d_value, d_params = o.backend.multihead_attention_backward(
            _array(d_output), ctx.cache, d_weights=_array(d_weights))
        return (None, _tensor(d_query), _tensor(d_key), _tensor(d_value),
                *(_tensor(d_params[n]) for n in o.names))


def multihead_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    num_heads: int,
    key_padding_mask: torch.Tensor | np.ndarray | None = None,
    attn_mask: torch.Tensor | np.ndarray | None = None,
    is_causal: bool = False,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    batch_first: bool = True,
    backend: str | ModuleType = "numpy_ref",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`multihead_attention_forward` (`torch.nn.MultiheadAttention`'s semantics) as a
    differentiable torch op; backward by `multihead_attention_backward`.

    ``Q, K, V = split_heads(query W_q^T + b_q, ...)``, ``C = softmax(Q K^T / sqrt(d) + mask) V``,
    ``output = merge(C) W_o^T + b_o`` (the `numpy_ref.multihead_attention` module docstring).

    Parameters
    ----------
    query : [N, Tq, E] (batch_first), [Tq, N, E] or [Tq, E].  key : [N, Tk, kdim] (same layout).
    value : [N, Tk, vdim].  params : the module's parameters by state_dict name, e.g.
        ``dict(nn.MultiheadAttention(...).named_parameters())``; each receives its gradient.
    num_heads, key_padding_mask, attn_mask, is_causal, need_weights, average_attn_weights,
    batch_first : as `torch.nn.MultiheadAttention.forward` (True in a bool mask = not allowed;
        a float mask is added to the scores and is not differentiated).
    backend : "numpy_ref" or "kernels" (or the module); CPU tensors only.

    Returns
    -------
    output : like query with last size E.  weights : [N, Tq, Tk] (averaged) or [N, h, Tq, Tk], or
    None when need_weights is False.
    """
    module = resolve_backend(backend)
    names, tensors = _params("multihead_attention", params)
    device = _device_of("multihead_attention", {"query": query, "key": key, "value": value,
                                                **dict(zip(names, tensors, strict=True))})
    _host_only("multihead_attention", device, module,
               "kernels.cuda has no multi-head attention;")
    options = _MultiheadOptions(module, names, num_heads, _host_option(key_padding_mask),
                                _host_option(attn_mask), bool(is_causal), bool(need_weights),
                                bool(average_attn_weights), bool(batch_first))
    result = MultiheadAttentionFunction.apply(options, query, key, value, *tensors)
    return result if need_weights else (result, None)


# --------------------------------------------------------------------------------------------
# LSTM


@dataclass(frozen=True)
class _LSTMOptions:
    backend: ModuleType
    names: tuple[str, ...]
    num_layers: int
    bidirectional: bool
    batch_first: bool
    lengths: Any
    has_state: bool


class LSTMFunction(torch.autograd.Function):
    """``apply(options, x, h0, c0, *params) -> (output, h_n, c_n)``; use `lstm`."""

    @staticmethod
    def forward(ctx: FunctionCtx, o: _LSTMOptions, x, h0, c0, *params):
        output, (h_n, c_n), cache = o.backend.lstm_forward(
            _array(x), dict(zip(o.names, map(_array, params), strict=True)),
            num_layers=o.num_layers, bidirectional=o.bidirectional, batch_first=o.batch_first,
            h0=_array(h0), c0=_array(c0), lengths=o.lengths)
        output, h_n, c_n = _tensor(output), _tensor(h_n), _tensor(c_n)
        ctx.options, ctx.cache = o, cache
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, output, h_n, c_n)
        return output, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_output, d_h_n, d_c_n):
        _saved(ctx)
        o = ctx.options
        if d_output is None:  # only the final states reach the loss
            d_output = torch.zeros_like(ctx.saved_tensors[1])
        d_x, d_params, (d_h0, d_c0) = o.backend.lstm_backward(
            _array(d_output), ctx.cache, d_h_n=_array(d_h_n), d_c_n=_array(d_c_n))
        states = (_tensor(d_h0), _tensor(d_c0)) if o.has_state else (None, None)
        return None, _tensor(d_x), *states, *(_tensor(d_params[n]) for n in o.names)


def lstm(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    h0: torch.Tensor | None = None,
    c0: torch.Tensor | None = None,
    lengths: Any = None,
    backend: str | ModuleType = "numpy_ref",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`lstm_forward` (`torch.nn.LSTM`'s semantics) as a differentiable torch op; backward by
    `lstm_backward` (backpropagation through time).

    Per step and direction ``a_t = x_t W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T``, gates
    ``i, f, g, o``, ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)`` (times ``W_hr^T`` with
    proj_size); the `numpy_ref.lstm` module docstring has the derivation and the padding rules.

    Parameters
    ----------
    x : [T, B, I] (or [B, T, I] with batch_first).
    params : nn.LSTM's parameters by name, e.g. ``dict(nn.LSTM(...).named_parameters())``
        (``weight_ih_l0`` ... ``weight_hr_l0_reverse``); each receives its gradient.
    h0 : [L*D, B, Ho] and c0 : [L*D, B, H], both or neither (zeros); differentiable.
    lengths : integer [B] (tensor, list or array), each in 1..T: the packed semantics of
        ``pack_padded_sequence(x, lengths, enforce_sorted=False)``; not differentiated.
    backend : "numpy_ref" or "kernels" (or the module); CPU tensors only.

    Returns
    -------
    output : [T, B, D*Ho] (or [B, T, D*Ho]), zero at padded steps.
    (h_n [L*D, B, Ho], c_n [L*D, B, H]).
    """
    module = resolve_backend(backend)
    names, tensors = _params("lstm", params)
    device = _device_of("lstm", {"x": x, "h0": h0, "c0": c0,
                                 **dict(zip(names, tensors, strict=True))})
    _host_only("lstm", device, module, "kernels.cuda has no LSTM;")
    options = _LSTMOptions(module, names, int(num_layers), bool(bidirectional),
                           bool(batch_first), _host_option(lengths),
                           h0 is not None or c0 is not None)
    output, h_n, c_n = LSTMFunction.apply(options, x, h0, c0, *tensors)
    return output, (h_n, c_n)


class LSTMCellFunction(torch.autograd.Function):
    """``apply(backend, names, x, h, c, *params) -> (h_new, c_new)``; use `lstm_cell`."""

    @staticmethod
    def forward(ctx: FunctionCtx, backend: ModuleType, names: tuple[str, ...], x, h, c,
                *params):
        h_new, c_new, cache = backend.lstm_cell_forward(
            _array(x), _array(h), _array(c), dict(zip(names, map(_array, params), strict=True)))
        h_new, c_new = _tensor(h_new), _tensor(c_new)
        ctx.backend, ctx.names, ctx.cache = backend, names, cache
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h, c, h_new, c_new)
        return h_new, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_h_new, d_c_new):
        _saved(ctx)
        if d_h_new is None:  # only c_new reaches the loss
            d_h_new = torch.zeros_like(ctx.saved_tensors[3])
        d_x, d_h, d_c, d_params = ctx.backend.lstm_cell_backward(
            _array(d_h_new), _array(d_c_new), ctx.cache)
        return (None, None, _tensor(d_x), _tensor(d_h), _tensor(d_c),
                *(_tensor(d_params[n]) for n in ctx.names))


def lstm_cell(
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    backend: str | ModuleType = "numpy_ref",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lstm_cell_forward` (`torch.nn.LSTMCell`'s step) as a differentiable torch op; backward
    by `lstm_cell_backward`.

    ``a = x W_ih^T + b_ih + h W_hh^T + b_hh``; ``i, f, g, o`` its sigmoid/tanh blocks;
    ``c_new = f c + i g``; ``h_new = o tanh(c_new)``.

    Parameters
    ----------
    x : [B, I].  h : [B, H].  c : [B, H].
    params : ``weight_ih`` [4H, I], ``weight_hh`` [4H, H], ``bias_ih``, ``bias_hh`` [4H], e.g.
        ``dict(nn.LSTMCell(...).named_parameters())``; each receives its gradient.
    backend : "numpy_ref" or "kernels" (or the module); CPU tensors only.

    Returns
    -------
    h_new [B, H], c_new [B, H].
    """
    module = resolve_backend(backend)
    names, tensors = _params("lstm_cell", params)
    device = _device_of("lstm_cell", {"x": x, "h": h, "c": c,
                                      **dict(zip(names, tensors, strict=True))})
    _host_only("lstm_cell", device, module, "kernels.cuda has no LSTM cell;")
    return LSTMCellFunction.apply(module, names, x, h, c, *tensors)


# --------------------------------------------------------------------------------------------
# GRU and Elman RNN: one bridge for both layers, one for both cells


@dataclass(frozen=True)
class _RecurrentOptions:
    backend: ModuleType
    op: str  # "gru" or "rnn"
    names: tuple[str, ...]
    options: tuple[tuple[str, Any], ...]  # the forward's keyword arguments
    has_state: bool


class RecurrentFunction(torch.autograd.Function):
    """``apply(options, x, h0, *params) -> (output, h_n)``; use `gru` or `rnn`."""

    @staticmethod
    def forward(ctx: FunctionCtx, o: _RecurrentOptions, x, h0, *params):
        forward = getattr(o.backend, f"{o.op}_forward")
        output, h_n, cache = forward(_array(x), dict(zip(o.names, map(_array, params),
                                                         strict=True)),
                                     h0=_array(h0), **dict(o.options))
        output, h_n = _tensor(output), _tensor(h_n)
        ctx.options, ctx.cache = o, cache
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, output, h_n)
        return output, h_n

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_output, d_h_n):
        _saved(ctx)
        o = ctx.options
        if d_output is None:  # only the final state reaches the loss
            d_output = torch.zeros_like(ctx.saved_tensors[1])
        d_x, d_params, d_h0 = getattr(o.backend, f"{o.op}_backward")(
            _array(d_output), ctx.cache, d_h_n=_array(d_h_n))
        return (None, _tensor(d_x), _tensor(d_h0) if o.has_state else None,
                *(_tensor(d_params[n]) for n in o.names))


def _recurrent(op: str, x, params, h0, lengths, backend, **options) -> tuple:
    module = resolve_backend(backend)
    names, tensors = _params(op, params)
    device = _device_of(op, {"x": x, "h0": h0, **dict(zip(names, tensors, strict=True))})
    _host_only(op, device, module, f"kernels.cuda has no {op.upper()};")
    o = _RecurrentOptions(module, op, names,
                          (*options.items(), ("lengths", _host_option(lengths))),
                          h0 is not None)
    return RecurrentFunction.apply(o, x, h0, *tensors)


def gru(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    h0: torch.Tensor | None = None,
    lengths: Any = None,
    linear_before_reset: bool = True,
    backend: str | ModuleType = "numpy_ref",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gru_forward` (`torch.nn.GRU`'s semantics, or with ``linear_before_reset=False`` the
    other published GRU) as a differentiable torch op; backward by `gru_backward`.

    Per step ``r, z = sigmoid(..)``, ``n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn))``,
    ``h' = (1 - z) n + z h``; the `numpy_ref.gru` module docstring has the derivation.

    x : [T, B, I] (or [B, T, I]).  params : nn.GRU's parameters by name, e.g.
    ``dict(nn.GRU(...).named_parameters())``; each receives its gradient.  h0 : [L*D, B, H]
    or None (zeros); differentiable.  lengths : integer [B], packed semantics; not
    differentiated.  backend : "numpy_ref" or "kernels"; CPU tensors only.
    Returns output [T, B, D*H] (or [B, T, D*H]), zero at padded steps, and h_n [L*D, B, H].
    """
    return _recurrent("gru", x, params, h0, lengths, backend, num_layers=int(num_layers),
                      bidirectional=bool(bidirectional), batch_first=bool(batch_first),
                      linear_before_reset=linear_before_reset)


def rnn(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    *,
    nonlinearity: str = "tanh",
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    h0: torch.Tensor | None = None,
    lengths: Any = None,
    backend: str | ModuleType = "numpy_ref",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rnn_forward` (`torch.nn.RNN`'s semantics) as a differentiable torch op; backward by
    `rnn_backward`: ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``, act tanh or
    relu (the `numpy_ref.rnn` module docstring).

    Arguments and results as `gru` (params of nn.RNN; [H, .] weights).
    """
    return _recurrent("rnn", x, params, h0, lengths, backend, nonlinearity=nonlinearity,
                      num_layers=int(num_layers), bidirectional=bool(bidirectional),
                      batch_first=bool(batch_first))


class RecurrentCellFunction(torch.autograd.Function):
    """``apply(backend, op, names, options, x, h, *params) -> h_new``; use `gru_cell` or
    `rnn_cell`."""

    @staticmethod
    def forward(ctx: FunctionCtx, backend: ModuleType, op: str, names: tuple[str, ...],
                options: tuple[tuple[str, Any], ...], x, h, *params):
        h_new, cache = getattr(backend, f"{op}_cell_forward")(
            _array(x), _array(h), dict(zip(names, map(_array, params), strict=True)),
            **dict(options))
        h_new = _tensor(h_new)
        ctx.backend, ctx.op, ctx.names, ctx.cache = backend, op, names, cache
        ctx.save_for_backward(x, h, h_new)
        return h_new

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, d_h_new):
        _saved(ctx)
        d_x, d_h, d_params = getattr(ctx.backend, f"{ctx.op}_cell_backward")(
            _array(d_h_new), ctx.cache)
        return (None, None, None, None, _tensor(d_x), _tensor(d_h),
                *(_tensor(d_params[n]) for n in ctx.names))


def _recurrent_cell(op: str, x, h, params, backend, **options) -> torch.Tensor:
    module = resolve_backend(backend)
    names, tensors = _params(f"{op}_cell", params)
    device = _device_of(f"{op}_cell", {"x": x, "h": h, **dict(zip(names, tensors, strict=True))})
    _host_only(f"{op}_cell", device, module, f"kernels.cuda has no {op.upper()} cell;")
    return RecurrentCellFunction.apply(module, op, names, tuple(options.items()), x, h, *tensors)


def gru_cell(x: torch.Tensor, h: torch.Tensor, params: Mapping[str, torch.Tensor], *,
             linear_before_reset: bool = True,
             backend: str | ModuleType = "numpy_ref") -> torch.Tensor:
    """`gru_cell_forward` (`torch.nn.GRUCell`'s step) as a differentiable torch op:
    ``h_new = (1 - z) n + z h`` (the `numpy_ref.gru` module docstring).

    x : [B, I].  h : [B, H].  params : ``weight_ih`` [3H, I], ``weight_hh`` [3H, H], and both
    or neither ``bias_ih``, ``bias_hh`` [3H].  Returns h_new [B, H].
    """
    return _recurrent_cell("gru", x, h, params, backend,
                           linear_before_reset=linear_before_reset)


def rnn_cell(x: torch.Tensor, h: torch.Tensor, params: Mapping[str, torch.Tensor], *,
             nonlinearity: str = "tanh",
             backend: str | ModuleType = "numpy_ref") -> torch.Tensor:
    """`rnn_cell_forward` (`torch.nn.RNNCell`'s step) as a differentiable torch op:
    ``h_new = act(x W_ih^T + b_ih + h W_hh^T + b_hh)``. Arguments as `gru_cell` ([H, .]
    weights). Returns h_new [B, H]."""
    return _recurrent_cell("rnn", x, h, params, backend, nonlinearity=nonlinearity)
