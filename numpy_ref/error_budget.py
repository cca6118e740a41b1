r"""The error budget of a float16/bfloat16 result (FlashAttention's rule), per tensor.

A low-precision result cannot be held to a fixed tolerance: its error depends on the dtype,
the problem size and the op. FlashAttention's tests judge a kernel by comparing its error with
that of a reference computed in the same precision, both measured against a float32-or-better
truth. Here, for one call of a `numpy_ref` op on float16/bfloat16 inputs:

    truth     = the op on the inputs cast to float64            (`numpy_ref.precision.truth`)
    reference = the op itself on the low-precision inputs       (the same-precision reference)
    err_user  = max |user - truth|        err_ref = max |reference - truth|
    allowed   = factor * err_ref + ulp(scale) / 2,   factor 2 for outputs, 3 for gradients

with ``scale = max |truth|`` of that tensor (of the call's largest gradient, for a gradient:
a gradient that comes back through layers or steps is a sum of terms far larger than itself,
whose rounding errors scale with those terms) and ``ulp(scale)`` the dtype's spacing at that
magnitude (the half ulp is what rounding an exact result to the dtype can cost, so a result
that is the truth correctly rounded always passes). The user's result passes when
``err_user <= allowed``; NaN or an infinity where the truth has a number never passes. The
report names, per tensor, the worst index and the values there.

Two refinements, each measured against torch's own results (with round to nearest alone,
torch's float16/bfloat16 recurrent layers failed 13 of 480 drawn cases; with them, none):

- **err_ref is the largest of several runs**: the reference rounding to nearest and `samples`
  (4) runs whose roundings *inside* the op are stochastic (Monte Carlo arithmetic, seeded, so
  the budget is deterministic; the results' own final rounding stays to nearest, as in any
  correct implementation). On a small tensor one run's max error is a small sample: a lucky
  run would make the budget tighter than the precision allows.
- **near a ReLU kink** a gradient is not a continuous function of the data: a pre-activation
  within rounding distance of 0 (``|x| <= eps(dtype) * max|x|``) may land on either side in a
  correct implementation. The truth is computed again with those derivatives taken the other
  way (all of them, and random halves), and each gradient entry is allowed the largest change
  on top of its budget; it is 0 wherever no kink is near.

The same-precision reference rounds where torch's CPU paths round (`numpy_ref.precision`), so
torch's own float16/bfloat16 CPU results pass this budget (the tests check every op family);
a kernel that accumulates in bfloat16, a softmax without the max subtraction, or an online
softmax that forgets to rescale does not (`tests/test_low_precision_broken.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract.fields import documented
from numpy_ref.precision import (
    LOW_DTYPES,
    LowPrecisionCache,
    bfloat16,
    kinks_flipped,
    sampling_rounding_errors,
    truth,
)

# How near ReLU's kink an input counts as on either side: |x| <= band * max|x|, one epsilon of
# the dtype (`numpy_ref.precision.kinks_flipped`).
KINK_BAND = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}

# The names of each op's results, in order (a nested tuple for a nested result; a params dict
# d_params gives one tensor per key, named d_<key>). An op not listed gets "output 0", ...
RESULT_NAMES: dict[str, tuple] = {
    "attention_forward": ("context", "weights"),
    "attention_backward": ("d_query", "d_keys", "d_values", "d_params"),
    "multihead_attention_forward": ("output", "weights"),
    "multihead_attention_backward": ("d_query", "d_key", "d_value", "d_params"),
    "lstm_forward": ("output", ("h_n", "c_n")),
    "lstm_backward": ("d_x", "d_params", ("d_h0", "d_c0")),
    "lstm_cell_forward": ("h", "c"),
    "lstm_cell_backward": ("d_x", "d_h", "d_c", "d_params"),
    "gru_forward": ("output", "h_n"),
    "gru_backward": ("d_x", "d_params", "d_h0"),
    "gru_cell_forward": ("h",),
    "gru_cell_backward": ("d_x", "d_h", "d_params"),
    "rnn_forward": ("output", "h_n"),
    "rnn_backward": ("d_x", "d_params", "d_h0"),
    "rnn_cell_forward": ("h",),
    "rnn_cell_backward": ("d_x", "d_h", "d_params"),
    "linear_forward": ("y",),
    "linear_backward": ("d_x", "d_params"),
    "cross_entropy_forward": ("loss",),
    "cross_entropy_backward": "d_logits",
    "embedding_forward": ("y",),
    "embedding_backward": "d_params",
    "layer_norm_forward": ("y",),
    "layer_norm_backward": ("d_x", "d_params"),
    "relu_forward": ("y",),
    "relu_backward": "d_x",
    "gelu_forward": ("y",),
    "gelu_backward": "d_x",
    "feed_forward_forward": ("y",),
    "feed_forward_backward": ("d_x", "d_params"),
    "transformer_encoder_layer_forward": ("output",),
    "transformer_encoder_layer_backward": ("d_src", "d_params"),
    "transformer_decoder_layer_forward": ("output", "weights"),
    "transformer_decoder_layer_backward": ("d_tgt", "d_memory", "d_params"),
    "transformer_encoder_forward": ("output",),
    "transformer_encoder_backward": ("d_src", "d_params"),
    "transformer_decoder_forward": ("output",),
    "transformer_decoder_backward": ("d_tgt", "d_memory", "d_params"),
    "transformer_forward": ("output",),
    "transformer_backward": ("d_src", "d_tgt", "d_params"),
}


def _flatten(result: Any, names: Any, prefix: str = "output") -> dict[str, Any]:
    """{name: array} for every array of a (nested) result; None entries are left out."""
    out: dict[str, Any] = {}
    if isinstance(result, Mapping):
        for k, v in result.items():
            out.update(_flatten(v, None, f"d_{k}" if names in ("d_params", None) else
                                f"{names}[{k}]"))
    elif isinstance(result, (tuple, list)):
        seq = names if isinstance(names, tuple) else (None,) * len(result)
        for i, v in enumerate(result):
            name = seq[i] if i < len(seq) and seq[i] is not None else f"{prefix} {i}"
            out.update(_flatten(v, name, name))
    elif result is not None:
        out[names if isinstance(names, str) else prefix] = result
    return out


def _as_array(a: Any) -> np.ndarray:
    """An ndarray from an array or a torch tensor (bfloat16 tensors included)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        t = a.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            if bfloat16 is None:
                raise ModuleNotFoundError("a bfloat16 tensor needs ml_dtypes: pip install "
                                          "'lstm-attention-reference[bfloat16]'")
            return t.float().numpy().astype(bfloat16)
        return t.numpy()
    return np.asarray(a)


def half_ulp(scale: float, dtype: np.dtype) -> float:
    """Half the spacing of ``dtype``'s numbers at magnitude ``scale`` (a float16/bfloat16 dtype;
    the subnormal spacing below the smallest normal number)."""
    if np.dtype(dtype) == np.float16:
        eps, tiny, mant = 2.0 ** -10, 2.0 ** -14, 10
    else:  # bfloat16: float32's exponent range, 7 stored mantissa bits
        eps, tiny, mant = 2.0 ** -7, 2.0 ** -126, 7
    if not math.isfinite(scale) or scale <= 0:
        return 0.5 * tiny * 2.0 ** -mant
    if scale < tiny:
        return 0.5 * tiny * 2.0 ** -mant
    return 0.5 * eps * 2.0 ** math.floor(math.log2(scale))


@documented
class Budgeted(NamedTuple):
    """One tensor of a low-precision result judged against its error budget."""

    name: str  # e.g. "context", "d_weight_hh_l0"
    ok: bool  # error <= allowed
    error: float  # max |user - truth| (inf where a NaN or infinity disagrees)
    reference_error: float  # max |same-precision reference - truth|
    allowed: float  # factor * reference_error + half an ulp at the truth's scale
    factor: int  # 2 for outputs, 3 for gradients
    index: tuple[int, ...]  # where the user's error most exceeds its allowance (else largest)
    got: Any  # the user's value there (a Python float)
    want: Any  # the truth there
    kink: float = 0.0  # the largest allowance added for a ReLU kink within rounding distance
    floor: float = 0.0  # the half ulp of the dtype at the scale (allowed's last term)

    def __str__(self) -> str:
        verdict = "ok  " if self.ok else "FAIL"
        kink = f" + kink {self.kink:.3g} (at most)" if self.kink else ""
        return (f"{verdict} {self.name}: error {self.error:.3g} vs allowed {self.allowed:.3g} "
                f"= {self.factor} x reference error {self.reference_error:.3g} + half ulp"
                f"{kink}; worst at {self.index}: got {self.got!r}, truth {self.want!r}")


@documented
class BudgetReport(NamedTuple):
    """Every tensor of one call judged against its budget; ``str()`` is a table."""

    op: str  # the forward's name
    dtype: str  # "float16" or "bfloat16"
    tensors: tuple[Budgeted, ...]  # outputs first, then gradients
    not_checked: tuple[str, ...]  # results the user did not hand in

    @property
    def ok(self) -> bool:
        """Every checked tensor within its budget."""
        return all(t.ok for t in self.tensors)

    def __str__(self) -> str:
        lines = [f"{self.op} in {self.dtype}: {'within budget' if self.ok else 'OVER BUDGET'}"]
        lines += [f"  {t}" for t in self.tensors]
        if self.not_checked:
            lines.append(f"  not handed in: {', '.join(self.not_checked)}")
        return "\n".join(lines)

    def raise_if_over(self) -> None:
        """Raise AssertionError with the report when a tensor is over its budget."""
        if not self.ok:
            raise AssertionError(str(self))


def judge(name: str, got: Any, reference: Any, truth64: np.ndarray, dtype: np.dtype, *,
          grad: bool = False, scale: float | None = None,
          kink: np.ndarray | None = None) -> Budgeted:
    """One tensor: the user's result `got` and the same-precision `reference` (both in the
    low dtype, any shape; `reference` may be a list of runs, whose largest error counts)
    against the float64 `truth64` of that shape, by the module's rule; `scale` is the
    magnitude the half-ulp floor is taken at (max|truth64| when None); `kink` (truth64's
    shape) adds, entry by entry, what a ReLU kink within rounding distance may change."""
    from numpy_ref.testing import _errors, _index  # the float64 error with NaN/inf rules

    runs = reference if isinstance(reference, (list, tuple)) else [reference]
    got, truth64 = _as_array(got), _as_array(truth64)
    if got.shape != truth64.shape:
        raise ValueError(f"{name}: shape {got.shape}, expected {truth64.shape}")
    factor = 3 if grad else 2
    if not got.size:
        return Budgeted(name, True, 0.0, 0.0, 0.0, factor, (), None, None)
    err = _errors(got, truth64)
    err_ref = max(float(_errors(_as_array(r), truth64).max()) for r in runs)
    if scale is None:
        scale = _scale(truth64)
    floor = half_ulp(scale, dtype)
    allowed = np.full(err.shape, factor * err_ref + floor)
    kinked = 0.0
    if kink is not None:
        allowed, kinked = allowed + kink, float(kink.max())
    ok = bool(np.all(err <= allowed))
    j = _index(err if ok else err - allowed)
    return Budgeted(name, ok, float(err[j]), err_ref, float(allowed[j]), factor, j,
                    float(got[j].astype(np.float64)), float(truth64[j]), kinked, floor)


def _scale(a: np.ndarray) -> float:
    """max |a| over its finite entries (0 for none)."""
    return float(np.abs(a[np.isfinite(a)]).max(initial=0.0))


def _pick(given: Any, names: Any, known: dict[str, Any]) -> dict[str, Any]:
    """The user's results by name: a dict keyed by result names as given; otherwise a result
    shaped like the op's (a tuple, a params dict, or one array for a one-result op)."""
    if given is None:
        return {}
    if isinstance(given, Mapping) and set(given) <= set(known):
        return dict(given)
    if not isinstance(given, (tuple, list, Mapping)) and isinstance(names, tuple):
        return {names[0]: given}
    return _flatten(given, names)


def error_budget(forward: Callable, args: tuple, kwargs: Mapping[str, Any] | None = None, *,
                 got: Any = None, backward: Callable | None = None,
                 grad_outputs: tuple = (), grad_kwargs: Mapping[str, Any] | None = None,
                 got_grads: Any = None, samples: int = 4) -> BudgetReport:
    """Judge a user's float16/bfloat16 result of one op by the module's rule.

    Parameters
    ----------
    forward : a `numpy_ref` forward (``numpy_ref.attention_forward``, ``lstm_forward``, ...).
    args, kwargs : its arguments, the floating arrays in one low dtype (float16 or bfloat16),
        exactly the inputs the user's implementation was given.
    got : the user's forward results: a dict {name: array} (names from `RESULT_NAMES`, e.g.
        ``{"context": ..., "weights": ...}``; a subset is fine) or a tuple shaped like the
        forward's results without the cache. Arrays or torch tensors, the low dtype.
    backward : the matching backward, to judge gradients too; then `grad_outputs` are the
        upstream gradients passed before the cache (``(d_context,)``), in the low dtype,
        `grad_kwargs` its keyword arguments (``{"d_h_n": ...}``), and `got_grads` the user's
        gradients (a dict, e.g. ``{"d_query": ..., "d_W": ...}``, params' gradients as
        ``d_<key>``, or a tuple shaped like the backward's result).
    samples : how many runs of the reference with stochastic rounding join the one that rounds
        to nearest (the module docstring); 0 for the round-to-nearest reference alone.

    Returns a `BudgetReport` (`report.ok`, `print(report)`, `report.raise_if_over()`).
    """
    kwargs, grad_kwargs = dict(kwargs or {}), dict(grad_kwargs or {})
    op = getattr(forward, "__name__", "forward")
    bop = getattr(backward, "__name__", "backward")
    names, bnames = RESULT_NAMES.get(op), RESULT_NAMES.get(bop)

    def run(seed: int | None) -> tuple[dict, dict, Any]:
        """The same-precision reference's results by name (rounding to nearest, or sampled)."""
        with sampling_rounding_errors(seed) if seed is not None else nullcontext():
            ref = forward(*args, **kwargs)
            if not isinstance(ref[-1], LowPrecisionCache):
                raise TypeError(f"{op}: error_budget judges float16/bfloat16 calls; the "
                                f"arguments' floating arrays must be one of "
                                f"{[str(d) for d in LOW_DTYPES]}")
            grads = {} if backward is None else _flatten(
                backward(*grad_outputs, ref[-1], **grad_kwargs), bnames)
        return _flatten(ref[:-1], names), grads, ref[-1].dtype

    runs = [run(None), *(run(seed) for seed in range(samples))]
    dtype = runs[0][2]
    exact = truth(forward, *args, **kwargs)
    exact_outputs = _flatten(exact[:-1], names)
    exact_grads = {} if backward is None else _flatten(
        truth(backward, *grad_outputs, exact[-1], **grad_kwargs), bnames)
    kinks: dict[str, np.ndarray] = {}
    if backward is not None:  # the truth again with ReLU's near-kink derivatives flipped
        from numpy_ref.testing import _errors  # 0 where both are the same NaN or infinity

        for seed in (None, *range(samples)):  # all of them, then random halves
            with kinks_flipped(KINK_BAND[str(dtype)], seed):
                flipped = truth(forward, *args, **kwargs)[-1]
                other = _flatten(truth(backward, *grad_outputs, flipped, **grad_kwargs), bnames)
            for k, v in exact_grads.items():
                change = _errors(np.asarray(other[k]), np.asarray(v))
                kinks[k] = np.maximum(kinks[k], change) if k in kinks else change
    tensors: list[Budgeted] = []
    not_checked: list[str] = []

    def judge_all(which: int, exact_named: dict, names: Any, given: Any, grad: bool) -> None:
        # a gradient's floor is taken at the case's largest gradient: a gradient that comes
        # back through layers or steps is a sum of terms far larger than itself, whose
        # rounding errors scale with them (a float32 refinement of the same rule, kept)
        case = max((_scale(np.asarray(v)) for v in exact_named.values()), default=0.0)
        given = _pick(given, names, exact_named)
        unknown = sorted(set(given) - set(exact_named))
        if unknown:
            raise ValueError(f"{op}: no result named {unknown}; the names are "
                             f"{sorted(exact_named)}")
        for name, want in exact_named.items():
            if name in given and given[name] is not None:
                refs = [r[which][name] for r in runs]
                tensors.append(judge(name, given[name], refs, want, dtype, grad=grad,
                                     scale=case if grad else None, kink=kinks.get(name)))
            else:
                not_checked.append(name)

    judge_all(0, exact_outputs, names, got, False)
    if backward is not None:
        judge_all(1, exact_grads, bnames, got_grads, True)
    return BudgetReport(op, str(dtype), tuple(tensors), tuple(not_checked))
