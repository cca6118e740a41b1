"""The op module a composite op runs on.

The models and multi-head attention are written once against an op module (``backend``: a
module with `lstm_forward`, `attention_forward`, `linear_forward`, ... such as `numpy_ref` or
`kernels`). Their default is resolved here, at call time: a default argument that named the
package itself would be bound while the package is still importing the module that defines the
function, to a half-initialised module.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def op_module(backend: ModuleType | None, default: str = "numpy_ref") -> ModuleType:
    """`backend`, or the package named `default` when None (imported now, complete)."""
    return importlib.import_module(default) if backend is None else backend
