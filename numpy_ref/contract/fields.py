"""Field documentation for the caches: each field's trailing comment becomes its docstring.

A cache is a `NamedTuple` whose fields are documented where they are declared, one comment
per field (its shape, and whether backward reads it):

    x: np.ndarray  # [B, I]   input; read for d_weight_ih

`documented` copies each comment (and any comment-only lines right under it) into the field's
``__doc__``, so ``help(LSTMCellCache)`` and ``LSTMCellCache.x.__doc__`` show it and the
comments stay the single source.
"""

from __future__ import annotations

import inspect
import re
from typing import TypeVar

T = TypeVar("T")

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*#\s?(.*)$")
_MORE = re.compile(r"^\s+#\s*(.*)$")


def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} for the fields of class `cls` declared with a trailing comment."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (frozen or compiled-only install): keep defaults
        return {}
    docs: dict[str, str] = {}
    last = None
    for line in lines:
        if (m := _FIELD.match(line)) and m.group(1) in cls._fields:
            last = m.group(1)
            docs[last] = m.group(2).strip()
        elif last is not None and (m := _MORE.match(line)):
            docs[last] += " " + m.group(1).strip()
        else:
            last = None
    return docs


def documented(cls: T) -> T:
    """Class decorator for a NamedTuple: set each field's ``__doc__`` from its comment."""
    for name, doc in field_comments(cls).items():
        getattr(cls, name).__doc__ = f"{name}: {doc}"
    return cls
