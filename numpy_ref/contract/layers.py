"""Validation of the layer ops: embedding, linear, cross-entropy (see `numpy_ref.layers`).

Each message names the argument, what was expected and what was received.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from numpy_ref.contract import checks

REDUCTIONS = ("mean", "sum", "none")


def integer_ids(name: str, ids: Any, vocab: int) -> np.ndarray:
    """`ids` as an integer ndarray, every entry in 0..vocab-1.

    NumPy would wrap a negative index silently (-1 is the last row) and raise an IndexError
    without the argument's name for a large one; both are a `ValueError` here. A masked array
    is a `TypeError` (`checks.not_masked`).
    """
    checks.not_masked(name, ids)
    if not isinstance(ids, np.ndarray):
        if isinstance(ids, (list, tuple, int, np.integer)):
            ids = np.asarray(ids)
        else:
            raise TypeError(f"{name}: expected an integer numpy.ndarray, got {type(ids).__name__}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)]
        raise ValueError(f"{name}: every id must be in 0..{vocab - 1} (the vocabulary has "
                         f"{vocab} rows), got {bad.size} outside it, e.g. {bad.flat[0]} "
                         f"(min {ids.min()}, max {ids.max()})")
    return ids


def embedding(ids: Any, params: Mapping[str, Any], padding_idx: Any):
    """Check `embedding_forward`'s arguments; return (ids, weight, padding_idx as 0..V-1 or
    None)."""
    V = checks.leading_dim(params, "weight", 2, "[V, E]")
    weight = checks.param(params, "weight", (V, params["weight"].shape[1]), "[V, E]",
                          params["weight"].dtype, "weight")
    checks.no_unexpected_keys(params, {"weight"}, "an embedding takes only 'weight'")
    ids = integer_ids("ids", ids, V)
    if padding_idx is not None:
        if not isinstance(padding_idx, (int, np.integer)) or not -V <= padding_idx < V:
            raise ValueError(f"padding_idx: expected an integer in -{V}..{V - 1} or None "
                             f"(as torch.nn.Embedding), got {padding_idx!r}")
        padding_idx = int(padding_idx) % V  # torch's negative padding_idx counts from the end
    return ids, weight, padding_idx


def cotangent(name: str, d: Any, shape: tuple[int, ...], dtype: np.dtype, what: str
              ) -> np.ndarray:
    """A cotangent `d` shaped and typed like the forward output it belongs to."""
    if not isinstance(d, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray shaped like {what} {shape}, "
                        f"got {type(d).__name__}")
    if d.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {d.dtype}")
    checks.same_dtype(name, d, dtype, what)
    checks.shape_is(name, d, shape, f"like {what}")
    return d


def linear(x: Any, params: Mapping[str, Any]):
    """Check `linear_forward`'s arguments; return (x, weight, bias or None)."""
    checks.not_masked("x", x)
    if not isinstance(x, np.ndarray) or x.ndim == 0:
        checks.float_array("x", x, ("...", "I"))  # raises the type / rank message
    if x.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float32 or float64, got {x.dtype}")
    O = checks.leading_dim(params, "weight", 2, "[O, I]")
    I = x.shape[-1]
    weight = checks.param(params, "weight", (O, I), "[O, I]", x.dtype, "x")
    bias = None
    if "bias" in params:
        bias = checks.param(params, "bias", (O,), "[O]", x.dtype, "x")
    checks.no_unexpected_keys(params, {"weight", "bias"},
                              "a linear layer takes 'weight' and optionally 'bias'")
    return x, weight, bias


def cross_entropy(logits: Any, targets: Any, ignore_index: Any, reduction: Any,
                  label_smoothing: Any, weight: Any):
    """Check `cross_entropy_forward`'s arguments, as `torch.nn.functional.cross_entropy`.

    Returns ``(z, targets, class_weight, probabilities)``: logits moved to [M, C] (class
    last; M = N*d1*..., no copy when already so), targets as int64 [M] (class indices) or
    [M, C] (probabilities, when `probabilities`), and the class weights [C] or None.
    """
    checks.not_masked("logits", logits)
    checks.not_masked("targets", targets)
    if not isinstance(logits, np.ndarray):
        raise TypeError(f"logits: expected a numpy.ndarray [N, C] or [N, C, d...], got "
                        f"{type(logits).__name__}")
    if logits.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"logits: expected dtype float32 or float64, got {logits.dtype}")
    if logits.ndim == 0:
        raise ValueError(f"logits: expected [C], [N, C] or [N, C, d...], got shape {logits.shape}")
    unbatched = logits.ndim == 1
    z = logits[None] if unbatched else logits  # [N, C, d...]
    C = z.shape[1]
    if C == 0:
        raise ValueError(f"logits: expected at least one class, got shape {logits.shape}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float, np.floating)) or not (
            0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index: expected an integer, got {ignore_index!r}")
    class_weight = None
    if weight is not None:
        class_weight = checks.float_array("weight", weight, ("C",))
        checks.same_dtype("weight", class_weight, logits.dtype, "logits")
        checks.shape_is("weight", class_weight, (C,), "[C]")
    if not isinstance(targets, np.ndarray):
        targets = np.asarray(targets)
    target_shape = z.shape[:1] + z.shape[2:]  # [N, d...]
    zl = np.moveaxis(z, 1, -1).reshape(-1, C)  # [M, C]
    if targets.dtype.kind == "f":  # class probabilities, shaped like the logits
        if ignore_index != -100:  # torch refuses it too: no row has a class to compare
            raise ValueError(f"ignore_index: {ignore_index} with class-probability targets; "
                             "they have no class index to ignore (leave the default -100, or "
                             "give a row zero weight through its probabilities)")
        checks.same_dtype("targets", targets, logits.dtype, "logits")
        checks.shape_is("targets", targets, logits.shape,
                        "like logits (class probabilities)")
        t = targets[None] if unbatched else targets
        return zl, np.moveaxis(t, 1, -1).reshape(-1, C), class_weight, True
    if targets.dtype.kind not in "iu":
        raise TypeError(f"targets: expected integer class indices or float probabilities, "
                        f"got dtype {targets.dtype}")
    expected = () if unbatched else target_shape
    checks.shape_is("targets", targets, expected, "[N, d...] (logits without the class axis)")
    t = targets.reshape(-1).astype(np.int64)
    bad = (t != ignore_index) & ((t < 0) | (t >= C))
    if bad.any():
        raise ValueError(f"targets: every class index must be in 0..{C - 1} or ignore_index "
                         f"({ignore_index}), got {t[bad][0]}")
    return zl, t, class_weight, False


def cross_entropy_denominator(reduction: str, targets: np.ndarray, probabilities: bool,
                              class_weight: np.ndarray | None, ignore_index: int) -> float:
    """What reduction "mean" divides the summed loss by (1.0 for "sum" and "none"), as torch:
    the rows' count M for probabilities; for class indices, the sum of the targets' class
    weights over the rows not ignored (their count without weights). 0 when every row is
    ignored: the mean is then NaN."""
    if reduction != "mean":
        return 1.0
    if probabilities:
        return float(len(targets))
    kept = targets[targets != ignore_index]
    return float(len(kept) if class_weight is None else class_weight[kept].sum())


def row_shape(logits_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-row loss's shape: the logits' without the class axis ([N, d...], or ())."""
    return (logits_shape[0], *logits_shape[2:]) if len(logits_shape) > 1 else ()


def cross_entropy_cotangent(d_loss: Any, reduction: str, denominator: float,
                            logits_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """d_loss (a float scalar, or [N, d...] for reduction "none") as each row's share d_rows
    [M] in the logits' dtype: d_loss / denominator for "mean" (0 when every row was
    ignored: nothing flows)."""
    if reduction == "none":
        return cotangent("d_loss", d_loss, row_shape(logits_shape), dtype,
                         "the per-row loss").reshape(-1)
    d = np.asarray(d_loss)
    if d.shape != () or d.dtype.kind != "f":
        raise ValueError(f"d_loss: expected a float scalar for reduction {reduction!r}, got "
                         f"{d.dtype} array of shape {d.shape}")
    M = int(np.prod(row_shape(logits_shape)))
    return np.full(M, d / denominator if denominator else 0.0, dtype)


def logits_layout(d_z: np.ndarray, logits_shape: tuple[int, ...]) -> np.ndarray:
    """Rows [M, C] back in the logits' layout: [M, C] -> [N, d..., C] -> [N, C, d...] (or
    [C] for one unbatched row)."""
    if len(logits_shape) == 1:
        return d_z[0]
    C = d_z.shape[1]
    return np.moveaxis(d_z.reshape(*row_shape(logits_shape), C), -1, 1)
