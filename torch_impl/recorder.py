r"""Record a torch module's intermediate values under the reference's names, for
`numpy_ref.divergence.first_divergence`: what your module computed, value by value, so the
report can say where it first leaves the reference.

Two ways in, combined freely inside one ``with record(module, names) as rec:`` block:

- forward hooks: each submodule named in `names` (its ``named_modules()`` name) has its
  output recorded under the reference name `names` maps it to. With ``names=None`` every
  submodule is recorded under its own name: for a layer built with torch's submodule names
  (``self_attn``, ``norm1``, ``linear1``, ...) those are the reference's names
  (`numpy_ref.divergence` module docstring); ``rec.values(keep=reference)`` drops the
  submodules the reference has no name for (``dropout1``, ``self_attn.out_proj``...); a
  submodule called again is recorded as ``name#1``, ``name#2``... in that mode.
- explicit calls ``log(name, tensor)`` (the module function, a no-op when no recording is
  active, so it can stay in your code; or ``rec.log``) for values that are not a submodule's
  output: a residual sum, a gate computed inline in a per-step loop.

A submodule called once per step (an LSTM cell in a loop) is recorded per call: give its name
a ``{call}`` field (``"l0.forward.t{call}.f"``; call = 0, 1, ... in call order) or a function
``call -> name`` (``lambda k: f"l0.reverse.t{T - 1 - k}.f"`` for a reverse walk). A submodule
that returns a tuple (``nn.MultiheadAttention``'s ``(output, weights)``, a cell's
``(h, c)``) is recorded by its first element, or element by element when its name is a tuple
of names (None skips one). Values are detached, copied to NumPy in their own dtype
(bfloat16 as float32), or float64 with ``float64=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["Recorder", "log", "record"]

Name = str | Callable[[int], str] | None
NameSpec = Name | tuple[Name, ...]

_ACTIVE: list[Recorder] = []


def _to_numpy(value: Any, float64: bool) -> np.ndarray:
    """A detached NumPy copy of a tensor (or array): its own dtype, bfloat16 as float32, all
    floats as float64 when asked."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    a = np.array(value, copy=True)
    return a.astype(np.float64) if float64 and a.dtype.kind == "f" else a


def _format(name: Name, call: int) -> str | None:
    if name is None:
        return None
    if callable(name):
        return name(call)
    return name.format(call=call) if "{call}" in name else name


class Recorder:
    """Records values by reference name: from forward hooks on `module`'s submodules (`names`:
    submodule name -> reference name, a ``{call}`` template or a function of the call index,
    or a tuple of them for a tuple output) and from `log`. ``values()`` = ``{name: array}`` in
    the order recorded, for ``first_divergence(reference, rec.values())`` (the
    `torch_impl.recorder` module docstring)."""

    def __init__(self, module: torch.nn.Module, names: Mapping[str, NameSpec] | None = None, *,
                 float64: bool = False) -> None:
        submodules = dict(module.named_modules())
        self._auto = names is None  # every submodule under its own name
        if names is None:
            names = {k: k for k in submodules if k}
        unknown = [k for k in names if k not in submodules]
        if unknown:
            raise KeyError(f"Recorder: {module.__class__.__name__} has no submodules {unknown}; "
                           f"it has {[k for k in submodules if k]}")
        self.module = module
        self.names = dict(names)
        self.float64 = float64
        self.calls: dict[str, int] = {}
        self._values: dict[str, np.ndarray] = {}
        self._handles: list[Any] = []

    def _hook(self, submodule: str) -> Callable[..., None]:
        spec = self.names[submodule]

        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            call = self.calls.get(submodule, 0)
            self.calls[submodule] = call + 1
            if isinstance(spec, tuple):
                outputs = output if isinstance(output, (tuple, list)) else (output,)
                for name, value in zip(spec, outputs, strict=False):
                    if (n := _format(name, call)) is not None:
                        self._store(n, value, submodule, call)
                return
            value = output[0] if isinstance(output, (tuple, list)) else output
            if self._auto and call:  # a repeated call, not asked for: kept apart
                spec_call = f"{spec}#{call}"
                self._store(spec_call, value, submodule, call)
                return
            if (n := _format(spec, call)) is not None:
                self._store(n, value, submodule, call)

        return hook

    def _store(self, name: str, value: Any, source: str, call: int) -> None:
        if name in self._values:
            where = f"submodule {source!r} (call {call})" if source else "log()"
            raise ValueError(f"Recorder: {name!r} recorded twice, again by {where}; a submodule "
                             "called once per step needs '{call}' in its name (or a function "
                             "of the call index)")
        self._values[name] = _to_numpy(value, self.float64)

    def log(self, name: str, value: Any) -> None:
        """Record ``value`` (a tensor or array, any shape) under the reference name `name`."""
        self._store(name, value, "", 0)

    def start(self) -> Recorder:
        """Attach the hooks (and make `log` record here); returns self."""
        if self._handles:
            return self
        submodules = dict(self.module.named_modules())
        self._handles = [submodules[k].register_forward_hook(self._hook(k)) for k in self.names]
        _ACTIVE.append(self)
        return self

    def stop(self) -> None:
        """Remove the hooks; what was recorded stays."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def values(self, keep: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """``{reference name: array}`` in the order recorded; with `keep` (e.g. the reference's
        intermediates) only the names it holds, so submodules the reference does not name
        (dropout, out_proj) drop out."""
        if keep is None:
            return dict(self._values)
        keep = set(keep)
        return {k: v for k, v in self._values.items() if k in keep}

    def clear(self) -> None:
        """Forget what was recorded and restart the call counts (a second forward)."""
        self._values.clear()
        self.calls.clear()


def record(module: torch.nn.Module, names: Mapping[str, NameSpec] | None = None, *,
           float64: bool = False) -> Recorder:
    """A `Recorder` of `module` to use as a context manager:
    ``with record(layer) as rec: layer(src)`` then ``rec.values()`` = ``{name: array}``
    (names: the `torch_impl.recorder` module docstring)."""
    return Recorder(module, names, float64=float64)


def log(name: str, value: Any) -> None:
    """Record ``value`` (tensor [...]) as `name` in every active recording, e.g.
    ``log("residual1", x)`` with ``x = src + self_attn(src)`` in your forward; a no-op outside
    one, so it can stay in the code (the `torch_impl.recorder` module docstring)."""
    for recorder in _ACTIVE:
        recorder.log(name, value)
