"""Validation primitives the contract modules are built from (the README's "Bad input" rules).

Every public function validates before it computes. A wrong rank or size is a `ValueError`, a
wrong dtype (integer data, float16, mixed float32/float64) is a `TypeError`; each message names
the argument, what was expected and what was received, so a user can fix the call without
reading our source. A masked array (`numpy.ma.MaskedArray`) is a `TypeError` wherever an array
is expected (`not_masked`): every op would read its data and ignore its mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


MASKED_HINT = (
    "say which entries to leave out with the op's own argument instead (lengths= for the LSTM, "
    "attention and the models; mask= or bias= for attention; key_padding_mask= or attn_mask= "
    "for multi-head attention; ignore_index for cross-entropy), or fill the masked entries "
    "with np.ma.filled(a, value)"
)


def not_masked(name: str, a: Any) -> None:
    """Raise `TypeError` if `a` is a `numpy.ma.MaskedArray`.

    A masked array is an ndarray subclass, so it passes every other check, and every op
    would then compute on its data, masked entries included, and drop its mask. The message
    says how to express the mask instead. Every array check in this module calls it first.
    """
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name}: masked arrays (numpy.ma.MaskedArray) are not accepted, their "
                        f"mask would be ignored; pass a plain numpy.ndarray and {MASKED_HINT}")


def float_array(name: str, a: Any, labels: Sequence[str]) -> np.ndarray:
    """Return `a` as a float32/float64 ndarray of rank ``len(labels)``.

    `labels` names the axes (for example ``("T", "B", "I")``) and only serves the error
    message. Strided and Fortran-ordered arrays are returned as they are (no copy); a masked
    array is a `TypeError` (`not_masked`).
    """
    not_masked(name, a)
    if not isinstance(a, np.ndarray):
        raise TypeError(
            f"{name}: expected a numpy.ndarray [{', '.join(labels)}], got {type(a).__name__}"
        )
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {a.dtype}")
    if a.ndim != len(labels):
        raise ValueError(
            f"{name}: expected a {len(labels)}-D array [{', '.join(labels)}], "
            f"got shape {a.shape}"
        )
    return a


def float_array_ranks(name: str, a: Any, options: Sequence[Sequence[str]]) -> np.ndarray:
    """Like `float_array`, for an argument that may have one of several ranks.

    `options` lists the accepted axis labels, e.g. ``(("B", "Hq"), ("B", "Tq", "Hq"))``.
    """
    not_masked(name, a)
    by_rank = {len(labels): labels for labels in options}
    if isinstance(a, np.ndarray) and a.ndim in by_rank:
        return float_array(name, a, by_rank[a.ndim])
    if isinstance(a, np.ndarray) and a.dtype in FLOAT_DTYPES:
        accepted = " or ".join(f"{len(o)}-D [{', '.join(o)}]" for o in options)
        raise ValueError(f"{name}: expected a {accepted} array, got shape {a.shape}")
    return float_array(name, a, options[0])


def same_dtype(name: str, a: np.ndarray, dtype: np.dtype, reference: str) -> None:
    """Raise `TypeError` unless `a` has the dtype of the reference argument (or if it is a
    masked array)."""
    not_masked(name, a)
    if a.dtype != dtype:
        raise TypeError(
            f"{name}: dtype {a.dtype} does not match the dtype of {reference} ({dtype}); "
            "cast one of them, mixed precision is not supported"
        )


def shape_is(name: str, a: np.ndarray, expected: tuple[int, ...], labels: str) -> None:
    """Raise `ValueError` unless ``a.shape == expected``; `labels` spells the axes out (a
    masked array is a `TypeError`)."""
    not_masked(name, a)
    if a.shape != tuple(expected):
        raise ValueError(f"{name}: expected shape {labels} = {tuple(expected)}, got {a.shape}")


def lengths_array(lengths: Any, batch: int, steps: int, name: str = "lengths") -> np.ndarray:
    """Return `lengths` as an int64 array [B], each value in 1..T.

    Accepts a numpy integer array or a sequence of Python ints (not a masked array). A length
    of 0 is refused: an empty sequence has no last step (LSTM) and an all-masked row has no
    softmax (attention).
    """
    not_masked(name, lengths)
    arr = np.asarray(lengths)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers, got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(f"{name}: expected shape [B] = ({batch},), got {arr.shape}")
    if batch and (arr.min() < 1 or arr.max() > steps):
        raise ValueError(
            f"{name}: every length must be in 1..{steps}, got min {arr.min()} and max {arr.max()}"
        )
    return arr.astype(np.int64)


def _param_array(params: Mapping[str, Any], key: str) -> np.ndarray:
    """``params[key]`` (present) once it is a plain ndarray; a `TypeError` naming it otherwise."""
    a = params[key]
    not_masked(f"params[{key!r}]", a)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"params[{key!r}]: expected a numpy.ndarray, got {type(a).__name__}")
    return a


def leading_dim(params: Mapping[str, Any], key: str, ndim: int, labels: str) -> int:
    """Size of the first axis of ``params[key]``, for parameters that fix a size (4H, A).

    Checks only what is needed to read it (present, an ndarray, the right rank, non-empty);
    `param` checks the full shape and dtype afterwards.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    if key not in params:
        raise ValueError(f"params: missing key {key!r} (expected shape {labels})")
    a = _param_array(params, key)
    if a.ndim != ndim or a.shape[0] == 0:
        raise ValueError(f"params[{key!r}]: expected shape {labels}, got {a.shape}")
    return a.shape[0]


def param(
    params: Mapping[str, Any],
    key: str,
    expected: tuple[int, ...],
    labels: str,
    dtype: np.dtype,
    reference: str,
) -> np.ndarray:
    """Fetch ``params[key]`` and check it is an ndarray of the given shape and dtype."""
    if key not in params:
        raise ValueError(f"params: missing key {key!r} (expected shape {labels} = {expected})")
    a = _param_array(params, key)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"params[{key!r}]: expected dtype float32 or float64, got {a.dtype}")
    same_dtype(f"params[{key!r}]", a, dtype, reference)
    shape_is(f"params[{key!r}]", a, expected, labels)
    return a


def no_unexpected_keys(params: Mapping[str, Any], allowed: set[str], hint: str) -> None:
    """Raise `ValueError` if `params` holds keys the options do not use (e.g. an extra layer)."""
    extra = sorted(set(params) - allowed)
    if extra:
        raise ValueError(f"params: unexpected keys {extra}; {hint}")


def cache_of(cache: Any, kind: type, op: str) -> Any:
    """Return `cache` once it is an instance of `kind`; a `TypeError` naming it otherwise."""
    if not isinstance(cache, kind):
        raise TypeError(f"cache: expected the {kind.__name__} returned by {op}, got "
                        f"{type(cache).__name__}")
    return cache


def quiet() -> np.errstate:
    """Around an op's arithmetic (never its checks): NaN and inf in real data propagate quietly,
    as in torch. inf - inf and 0 * inf are IEEE's invalid operations, whose NaN is the answer;
    numpy would also warn (a RuntimeWarning, an error under the project's pytest settings)."""
    return np.errstate(invalid="ignore")
