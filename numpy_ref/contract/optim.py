"""Validation of the optimizers' arguments (see `numpy_ref.optim`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from numpy_ref.contract import checks


def params_dict(params: Any) -> dict[str, np.ndarray]:
    """The params an optimizer updates: a dict of float arrays, each writable in place."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    if not params:
        raise ValueError("params: expected at least one parameter, got an empty dict")
    for k, v in params.items():
        checks.not_masked(f"params[{k!r}]", v)
        if not isinstance(v, np.ndarray):
            raise TypeError(f"params[{k!r}]: expected a numpy.ndarray, got {type(v).__name__}")
        if v.dtype not in checks.FLOAT_DTYPES:
            raise TypeError(f"params[{k!r}]: expected dtype float32 or float64, got {v.dtype}")
        if not v.flags.writeable:
            raise ValueError(f"params[{k!r}]: the array is read-only; an optimizer updates "
                             "params in place")
    return dict(params)


def grads_like(grads: Any, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check that `grads` has exactly the keys of `params`, each with its shape and dtype."""
    if not isinstance(grads, Mapping):
        raise TypeError(f"grads: expected a dict of arrays, got {type(grads).__name__}")
    missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
    if missing or extra:
        raise ValueError(f"grads: the keys must be the params' keys; missing {missing}, "
                         f"unexpected {extra}")
    for k, p in params.items():
        g = grads[k]
        if not isinstance(g, np.ndarray):
            raise TypeError(f"grads[{k!r}]: expected a numpy.ndarray, got {type(g).__name__}")
        checks.same_dtype(f"grads[{k!r}]", g, p.dtype, f"params[{k!r}]")
        checks.shape_is(f"grads[{k!r}]", g, p.shape, f"like params[{k!r}]")
    return {k: grads[k] for k in params}


def hyper(name: str, value: Any, *, low: float = 0.0, high: float | None = None,
          open_high: bool = False) -> float:
    """A nonnegative float hyperparameter in [low, high] (or [low, high) with `open_high`)."""
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    ok = ok and value >= low and (high is None or (value < high if open_high else value <= high))
    if not ok:
        interval = f"[{low}, {high})" if open_high else f"[{low}, {high if high else 'inf'}]"
        raise ValueError(f"{name}: expected a float in {interval}, got {value!r}")
    return float(value)


def betas(value: Any) -> tuple[float, float]:
    """Adam's (beta1, beta2), each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {value!r}")
    return (hyper("betas[0]", value[0], high=1.0, open_high=True),
            hyper("betas[1]", value[1], high=1.0, open_high=True))
