r"""float16 and bfloat16: the same-precision reference and the truth.

Every op pair of `numpy_ref` takes float16 (NumPy's) or bfloat16 (``ml_dtypes.bfloat16``)
arrays and returns its results in that dtype. Two answers exist for such a call, and a
low-precision implementation is judged by both (`numpy_ref.testing.error_budget`):

- **the truth**: the same op on the inputs cast to float64 (``truth(op, ...)``). The inputs
  are what they are: the rounding of the data to the dtype is not an error of the op.
- **the same-precision reference**: the call itself. It computes as torch's CPU kernels do
  for these dtypes: each op reads its low-precision inputs exactly (upcast to float32),
  accumulates its products and sums in float32, and rounds to the dtype where torch's CPU path
  holds a tensor in the dtype:

  - every op's outputs (and its gradients, in the backward): each torch op writes its result
    as a tensor of the input's dtype. A composite (multi-head attention, a Transformer layer,
    a stack) is a chain of public ops, so it rounds between them as torch does between its
    ops (the projections, the attention, the residual sums, the norms);
  - the recurrent layers follow torch's native CPU path (``aten/src/ATen/native/RNN.cpp``,
    which torch 2.13 runs for the float16 LSTM and for the GRU and RNN in both dtypes; its
    bfloat16 LSTM runs oneDNN's fused cell, which rounds less, so the same budget holds it
    too): the input projection of all steps rounded once; per step the hidden projection,
    their sum, each activated gate, ``f c``, ``i g``, c, tanh(c) and the state h rounded; in
    the backward each step's gradients (dh, dc, the gates' and each product's) rounded, and
    the hidden weights' and biases' gradients summed step by step in the dtype, as
    autograd adds one term per step (`step_sum`);
  - attention: the probabilities are rounded to the dtype before their product with the
    values (``p = round(softmax(s))``, ``context = p V`` accumulated in float32), as torch's
    flash-attention CPU kernel (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``) and its
    math path (softmax written in the dtype, then a bmm) both do; in the backward the softmax's
    VJP ``ds = p * (dp - sum p dp)`` is rounded before the products ``ds K`` and ``ds^T Q``,
    as the flash kernel's backward rounds it;
  - layer norm (``layer_norm_kernel.cpp``): the output from float32 statistics, but the mean
    and 1/std that torch saves for the backward are in the dtype, and the backward adds
    d_weight and d_bias row by row into buffers of the dtype (torch's result exactly, on one
    thread).

The rounding is an emulation: ``round(x) = x.astype(dtype).astype(float32)``, round to
nearest even, the rounding torch's conversions use. Inside an op the arithmetic is float32;
the caches hold float32 values (what the op computed before rounding), and attributes read
from a low-precision cache come back in its dtype. Two contexts serve the error budget:
`sampling_rounding_errors` makes the roundings inside an op stochastic (Monte Carlo
arithmetic: how large the error of this precision can be on these inputs), and
`kinks_flipped` takes ReLU's derivative the other way near its kink (where a correct
low-precision run may take either branch).

How it is wired: `same_precision` wraps every public forward and backward. Given
low-precision arrays, it checks that they share one dtype (a float32 array next to a bfloat16
one is a `TypeError`, as a mixed float32/float64 call is), upcasts them to float32, runs the
op with the dtype set as the one being emulated (a context variable, so nested public ops
round their outputs too), and hands back results in the dtype and the cache wrapped in a
`LowPrecisionCache`. For float32 and float64 arrays nothing changes: `rounded` is the
identity and the wrapper only looks at the arguments' dtypes.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np

from numpy_ref.contract import unchanged

try:  # bfloat16 is not a NumPy dtype; ml_dtypes (used by JAX, ONNX, Keras) provides it
    from ml_dtypes import bfloat16
except ImportError:  # pragma: no cover - ml_dtypes is an optional dependency
    bfloat16 = None

LOW_DTYPES: tuple[np.dtype, ...] = tuple(
    np.dtype(t) for t in (np.float16, bfloat16) if t is not None)

_EMULATED: ContextVar[np.dtype | None] = ContextVar("numpy_ref_emulated_dtype", default=None)
# Stochastic rounding (`sampling_rounding_errors`): a generator, or None for round to nearest.
_STOCHASTIC: ContextVar[np.random.Generator | None] = ContextVar("numpy_ref_stochastic",
                                                                 default=None)


def _floating(a: np.ndarray) -> bool:
    """A floating array: NumPy's float kinds, or bfloat16 (whose dtype kind is 'V')."""
    return a.dtype.kind == "f" or a.dtype in LOW_DTYPES


def is_low(a: Any) -> bool:
    """True for an ndarray of dtype float16 or bfloat16."""
    return isinstance(a, np.ndarray) and a.dtype in LOW_DTYPES


def emulated() -> np.dtype | None:
    """The low-precision dtype the running op emulates, or None (float32/float64 calls)."""
    return _EMULATED.get()


def rounded(x: Any) -> Any:
    """``x`` rounded to the emulated dtype and back to float32; ``x`` itself when no
    low-precision call is running (or ``x`` is not a floating array)."""
    dtype = _EMULATED.get()
    if dtype is None or not isinstance(x, np.ndarray) or not _floating(x):
        return x
    rng = _STOCHASTIC.get()
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, as torch's cast gives
        if rng is None:
            return x.astype(dtype).astype(np.float32)
        return _stochastic(x.astype(np.float32), dtype, rng)


def _stochastic(x: np.ndarray, dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of float32 ``x`` to ``dtype`` (back in float32): to the neighbour
    below or above with probabilities proportional to the distance to the other one."""
    with np.errstate(over="ignore"):
        nearest = x.astype(dtype)
    near = nearest.astype(np.float32)
    toward = np.where(x > near, np.inf, -np.inf).astype(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        other = np.nextafter(nearest, toward).astype(np.float32)
        p = np.abs(x - near) / np.abs(other - near)
    pick = np.isfinite(p) & (rng.random(x.shape) < p)
    return np.where(pick, other, near)


_KINK: ContextVar[tuple[float, np.random.Generator | None] | None] = ContextVar(
    "numpy_ref_kink", default=None)


def near_kink(x: np.ndarray) -> np.ndarray | None:
    """Within `kinks_flipped`: the entries of a ReLU's input whose derivative is to be taken
    the other way (bool, x's shape): those with ``|x| <= band * max|x|``, whose side of 0 a
    rounding in the low dtype could change (each with probability 1/2 when the context has a
    generator); None outside it."""
    kink = _KINK.get()
    if kink is None:
        return None
    band, rng = kink
    finite = np.abs(x[np.isfinite(x)])
    near = np.abs(x) <= band * float(finite.max(initial=0.0))
    return near if rng is None else near & (rng.random(x.shape) < 0.5)


@contextmanager
def kinks_flipped(band: float, seed: int | None = None) -> Iterator[None]:
    """Within it, ReLU's backward takes the derivative the other way at inputs within
    ``band * max|x|`` of its kink (`near_kink`): all of them, or with a `seed` a random half.

    A gradient through a kink is not a continuous function of the data: where a pre-activation
    lies within rounding distance of 0, a correct low-precision implementation may land on
    either side and take the other branch, and the truth alone cannot say which one is right.
    `numpy_ref.testing.error_budget` runs the truth again within this (all flipped, and random
    halves, since flips can cancel in a sum) and allows each gradient entry the largest
    difference: it is 0 wherever no kink is near, so the budget stays as tight as before
    everywhere else.
    """
    token = _KINK.set((band, None if seed is None else np.random.default_rng(seed)))
    try:
        yield
    finally:
        _KINK.reset(token)


@contextmanager
def sampling_rounding_errors(seed: int) -> Iterator[None]:
    """Within it, float16/bfloat16 calls round stochastically (seeded) instead of to nearest.

    Monte Carlo arithmetic (as CADNA and Verificarlo use it): a few runs of the same-precision
    reference with each rounding drawn at random sample the errors that rounding in this
    precision can make on these inputs, including where a rounding decides a branch (a ReLU's
    kink, a state pushed across a saturation) that round to nearest happened to avoid.
    `numpy_ref.testing.error_budget` takes the largest error of such runs as the reference's.
    """
    token = _STOCHASTIC.set(np.random.default_rng(seed))
    try:
        yield
    finally:
        _STOCHASTIC.reset(token)


@contextmanager
def emulating(dtype: np.dtype | None) -> Iterator[None]:
    """Run the block with ``dtype`` as the emulated dtype (None: none)."""
    token = _EMULATED.set(dtype)
    try:
        yield
    finally:
        _EMULATED.reset(token)


class LowPrecisionCache:
    """A cache from a float16/bfloat16 forward: ``cache.x = round(inner.x)`` for each field of
    the op's own cache (float32 inside), a floating array cast to the dtype (``cache.lse``,
    ``cache.logits``, ...); its backward unwraps it (see the module docstring of
    `numpy_ref.precision`)."""

    __slots__ = ("dtype", "fingerprints", "inner")

    def __init__(self, inner: Any, dtype: np.dtype,
                 fingerprints: unchanged.Fingerprints | None = None) -> None:
        self.inner = inner
        self.dtype = dtype
        self.fingerprints = fingerprints  # the caller's low-precision arrays, as the forward
        #                                   saw them (the inner cache holds float32 copies)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if isinstance(value, np.ndarray) and _floating(value):
            return value.astype(self.dtype)
        return value

    def __repr__(self) -> str:
        return f"LowPrecisionCache({type(self.inner).__name__}, dtype={self.dtype})"


def _walk(value: Any, name: str) -> Iterator[tuple[str, np.ndarray]]:
    """Every ndarray in an argument (params dicts and tuples of arrays included), named."""
    if isinstance(value, np.ndarray):
        yield name, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _walk(v, f"{name}[{k!r}]")
    elif isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        for i, v in enumerate(value):
            yield from _walk(v, f"{name}[{i}]")


def _arrays(fn: Callable, args: tuple, kwargs: Mapping[str, Any]
            ) -> list[tuple[str, np.ndarray]]:
    """The call's arrays under its parameters' names (``params['W']`` for a dict's)."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs).arguments
    except TypeError:  # a wrong call: the op itself reports it
        bound = {**{f"argument {i}": a for i, a in enumerate(args)}, **kwargs}
    return [pair for name, value in bound.items() for pair in _walk(value, name)]


def _low_dtype(fn: Callable, args: tuple, kwargs: Mapping[str, Any]) -> np.dtype | None:
    """The call's low-precision dtype, or None; a TypeError when it mixes floating dtypes."""
    low = next((a.dtype for _, a in _walk((args, kwargs), "") if a.dtype in LOW_DTYPES), None)
    if low is not None:
        named = _arrays(fn, args, kwargs)
        first = next(name for name, a in named if a.dtype == low)
        for name, a in named:
            if _floating(a) and a.dtype != low:
                raise TypeError(f"{fn.__name__}: {name} has dtype {a.dtype}, but {first} is "
                                f"{low}; give every floating array one dtype")
    return low


def _convert(x: Any, to: Callable[[np.ndarray], np.ndarray]) -> Any:
    """Apply ``to`` to every floating ndarray of a (nested) result, keeping its structure."""
    if isinstance(x, np.ndarray):
        return to(x) if _floating(x) else x
    if isinstance(x, np.generic) and _floating(np.asarray(x)):  # a scalar (a loss)
        return to(np.asarray(x))[()]
    if isinstance(x, dict):
        return {k: _convert(v, to) for k, v in x.items()}
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_convert(v, to) for v in x)
    if isinstance(x, list):
        return [_convert(v, to) for v in x]
    return x


def _upcast(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype in LOW_DTYPES else a


def _to(dtype: np.dtype) -> Callable[[np.ndarray], np.ndarray]:
    def cast(a: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return a.astype(dtype)
    return cast


# The torch CPU path each op's float16/bfloat16 reference follows (by the op's name prefix);
# `same_precision` adds the line to the op's docstring.
FOLLOWS = {
    "lstm": "torch's native LSTM cell (aten/src/ATen/native/RNN.cpp), op by op; nn.LSTM in "
            "bfloat16 runs oneDNN's fused cell, which rounds less",
    "gru": "torch's native GRU cell (aten/src/ATen/native/RNN.cpp), op by op",
    "rnn": "torch's native RNN cell (aten/src/ATen/native/RNN.cpp), op by op",
    "attention": "SDPA's flash CPU kernel without the weights (p rounded before p V, ds before "
                 "ds K), its math path with them (the softmax written in the dtype, then bmm)",
    "additive": "torch's ops (linear, tanh, bmm), each result in the dtype",
    "masked_softmax": "torch.softmax (computed in float32, written in the dtype)",
    "weighted_sum": "torch.bmm (float32 accumulation, one rounding)",
    "multihead": "nn.MultiheadAttention: its projections (addmm) and its attention (above)",
    "linear": "F.linear (addmm: float32 accumulation, one rounding)",
    "embedding": "F.embedding (its backward adds the rows in the dtype, in order)",
    "cross_entropy": "F.cross_entropy (log_softmax with its sum kept in the dtype, nll_loss "
                     "adding rows in the dtype)",
    "layer_norm": "aten/src/ATen/native/cpu/layer_norm_kernel.cpp (mean and 1/std saved in "
                  "the dtype; d_weight and d_bias added row by row in it)",
    "relu": "F.relu", "gelu": "F.gelu (computed in float32, one rounding)",
    "feed_forward": "the torch modules, op by op (each op's result in the dtype)",
    "transformer": "the torch modules, op by op (each op's result in the dtype)",
}


def _follows(fn: Callable) -> str:
    name = fn.__name__
    return next((v for k, v in sorted(FOLLOWS.items(), key=lambda kv: -len(kv[0]))
                 if name.startswith(k)), "")


def same_precision(*, backward: bool = False) -> Callable[[Callable], Callable]:
    """Decorate a public forward (returning ``(outputs..., cache)``) or backward (taking a
    cache) so that it accepts float16/bfloat16 as the module docstring describes; the op's
    docstring gets a line naming the torch path its low-precision reference follows."""

    def decorate(fn: Callable) -> Callable:
        op = fn.__name__
        follows = _follows(fn)
        if fn.__doc__ and follows:
            fn.__doc__ = inspect.cleandoc(fn.__doc__) + "\n\n" + textwrap.fill(
                f"float16/bfloat16: rounds as {follows} (`numpy_ref.precision`).", 92)

        @functools.wraps(fn)
        def forward(*args: Any, **kwargs: Any) -> Any:
            low = _low_dtype(fn, args, kwargs) if LOW_DTYPES else None
            if low is None:
                if _EMULATED.get() is None:
                    return fn(*args, **kwargs)
                result = fn(*args, **kwargs)  # a public op inside a low-precision call
                return (*_convert(result[:-1], rounded), result[-1])
            fingerprints = unchanged.record(op, op.replace("forward", "backward"), [
                (n, a) for n, a in _arrays(fn, args, kwargs) if a.dtype == low])
            args, kwargs = _convert(args, _upcast), _convert(kwargs, _upcast)
            with emulating(low):
                result = fn(*args, **kwargs)
            # the results: float32 rounded to nearest, as any correct implementation's last
            # step (stochastic rounding, when sampled, is for the roundings inside the op)
            cache = LowPrecisionCache(result[-1], low, fingerprints)
            return (*_convert(result[:-1], _to(low)), cache)

        @functools.wraps(fn)
        def backward_(*args: Any, **kwargs: Any) -> Any:
            wrapped = [a for a in (*args, *kwargs.values()) if isinstance(a, LowPrecisionCache)]
            if not wrapped:
                if _EMULATED.get() is None:
                    return fn(*args, **kwargs)
                return _convert(fn(*args, **kwargs), rounded)
            low = wrapped[0].dtype
            unchanged.check(wrapped[0].fingerprints)

            def unwrap(a: Any) -> Any:
                return a.inner if isinstance(a, LowPrecisionCache) else a

            args = tuple(unwrap(a) for a in args)
            kwargs = {k: unwrap(v) for k, v in kwargs.items()}
            for n, a in _arrays(fn, args, kwargs):
                if _floating(a) and a.dtype != low:
                    raise TypeError(f"{op}: {n} has dtype {a.dtype}; the forward ran in {low}, "
                                    f"so the gradients must be {low} too")
            args, kwargs = _convert(args, _upcast), _convert(kwargs, _upcast)
            with emulating(low):
                grads = fn(*args, **kwargs)
            return _convert(grads, _to(low))  # rounded to nearest (see the forward)

        return backward_ if backward else forward

    return decorate


def truth(op: Callable, *args: Any, **kwargs: Any) -> Any:
    """``truth(op, *args) = op(*float64(args))``: every floating array cast to float64, the
    truth that a float16/bfloat16 result is measured against (`numpy_ref.testing.error_budget`;
    see the module docstring of `numpy_ref.precision`)."""
    return op(*_convert(args, lambda a: a.astype(np.float64)),
              **_convert(kwargs, lambda a: a.astype(np.float64)))


def step_sum(d: np.ndarray, h: np.ndarray | None, order: Any) -> np.ndarray:
    """A recurrent weight's gradient as torch's autograd forms it in a float16/bfloat16 call.

    ``sum_t d[t]^T h[t]`` (d [T, B, G], h [T, B, H] -> [G, H]), or ``sum_t sum_b d[t]`` when h
    is None (-> [G]), with each step's term rounded to the emulated dtype and the running sum
    rounded after each addition, steps taken in ``order`` (the backward's). torch's CPU
    recurrent layers apply the hidden weights once per step, so autograd gets one gradient
    term per step and adds them in the dtype. The input weights are applied to all steps in one
    product, whose gradient is one product too (no `step_sum`).
    """
    acc = None
    for t in order:
        term = rounded(d[t].T @ h[t] if h is not None else d[t].sum(axis=0))
        acc = term if acc is None else rounded(acc + term)
    return acc
