"""The golden cases' registry: one `Config` per op configuration (one case per dtype), the
constants the file format shares, and the types of a case's arrays and functions.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

F64_TOL = 1e-7  # float64 rtol = atol (torch.testing's float64 defaults)
TOL_SLACK = 2.0  # verify: a stored float32 atol may be at most this times the recomputed one
SCALE_FLOOR = 1e-30  # the smallest scale of a float32 allowance
CONSISTENCY = 1e-10  # verify's float64 recomputation bound, relative to the scale
DTYPES = ("float64", "float32")
ROLES = ("input", "param", "cotangent", "output", "grad", "cache")
CHECKED_ROLES = ("output", "grad", "cache")
MANIFEST = "manifest.json"
FORMAT = "lstm-attention-reference golden vectors"
VERSION = 1

Arrays = dict[str, np.ndarray]
# run(inputs, params, cotangents) -> (outputs, grads, cache), names without the role prefix
RunFn = Callable[[Arrays, Arrays, Arrays], tuple[Arrays, Arrays, Arrays]]
MakeFn = Callable[[np.random.Generator], tuple[Arrays, Arrays, Arrays]]


@dataclasses.dataclass(frozen=True)
class Config:
    """One op configuration; it gives one case per dtype."""

    family: str  # e.g. "lstm"
    config: str  # e.g. "bidirectional_2layer_lengths"
    functions: str  # the numpy_ref functions computing it
    semantics: str  # what it computes, in torch's terms
    options: dict[str, Any]  # structured options (JSON values)
    make: MakeFn  # float64 draws: (inputs, params, cotangents)
    run: RunFn  # the computation, in the arrays' dtype

    @property
    def op(self) -> str:
        """The op's short name, the metadata's ``op``: the family (``lstm_cell``, ...)."""
        return self.family

    @property
    def stem(self) -> str:
        """``<family>-<config>``: the seed's source."""
        return f"{self.family}-{self.config}"

    @property
    def seed(self) -> int:
        """The configuration's fixed seed (a stable hash of its name, not Python's hash())."""
        return zlib.crc32(self.stem.encode())

    def case(self, dtype: str) -> str:
        """The case name for `dtype` ("float64" or "float32")."""
        return f"{self.stem}-{dtype}"


CONFIGS: dict[str, Config] = {}


def register(family: str, config: str, functions: str, semantics: str,
              options: dict[str, Any], make: MakeFn, run: RunFn) -> None:
    c = Config(family, config, functions, " ".join(semantics.split()), options, make, run)
    assert c.stem not in CONFIGS, c.stem
    assert all(k not in ("case", "family", "config", "op", "functions", "dtype", "semantics")
               and "." not in k for k in options), options
    CONFIGS[c.stem] = c


def all_cases() -> list[tuple[str, Config, str]]:
    """Every case: (name, config, dtype), in registry order, float64 first."""
    return [(c.case(d), c, d) for c in CONFIGS.values() for d in DTYPES]
