"""The backends every parity test runs, in one place.

`BACKENDS` maps each name to its op module: `numpy_ref` and `kernels` both offer the whole op
surface (`kernels` re-exports what it does not accelerate), so a test takes
``BACKENDS[name].lstm_forward`` whatever the op. The attention tests also run each backend
without the weights (``"<name>-no-weights"``: `with_no_weights`).
"""

from __future__ import annotations

import functools
from types import ModuleType, SimpleNamespace

import pytest

import kernels
import numpy_ref

BACKENDS: dict[str, ModuleType] = {"numpy_ref": numpy_ref, "kernels": kernels}
over_backends = pytest.mark.parametrize("backend", list(BACKENDS))
NO_WEIGHTS = "-no-weights"


def has_weights(backend: str) -> bool:
    """Whether a backend variant's forward runs with need_weights=True."""
    return not backend.endswith(NO_WEIGHTS)


def module_name(backend: str) -> str:
    """The module a backend variant runs: "kernels-no-weights" -> "kernels"."""
    return backend.removesuffix(NO_WEIGHTS)


def without_weights(mod: ModuleType) -> SimpleNamespace:
    """`mod`'s attention pair, attention_forward defaulting to need_weights=False: what a test
    calls as ``ATTENTION_BACKENDS["<name>-no-weights"]``. It has nothing else, so a test of
    another function run on it fails (AttributeError), and a d_weights passed to its backward
    is a ValueError: neither passes silently."""
    return SimpleNamespace(
        attention_forward=functools.partial(mod.attention_forward, need_weights=False),
        attention_backward=mod.attention_backward)


def with_no_weights(modules: dict) -> dict:
    """Each module by name, and its `without_weights` pair as "<name>-no-weights"."""
    return {**modules, **{name + NO_WEIGHTS: without_weights(mod)
                          for name, mod in modules.items()}}


ATTENTION_BACKENDS = with_no_weights(BACKENDS)
