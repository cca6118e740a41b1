"""Weight converters between torch modules and `numpy_ref` parameter dicts.

`numpy_ref` uses `state_dict` key names and shapes, so converting is a dict comprehension; these
two functions add the checks a user wants (no missing or extra keys, matching shapes) and copy,
so that neither side aliases the other's memory. `to_numpy` takes a module or a state_dict (for
example one read back by `torch.load`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def to_numpy(
    module: torch.nn.Module | Mapping[str, torch.Tensor],
) -> dict[str, np.ndarray]:
    """Copy every tensor of a module's `state_dict`, or of a state_dict, to a NumPy array.

    `module` is a ``torch.nn.Module`` (its ``state_dict()`` is read) or a state_dict itself:
    any mapping of names to tensors, such as what ``torch.load`` returns for a file written by
    ``torch.save(module.state_dict(), path)``. The result has the same keys, in the same order,
    shapes and dtypes; each array is a copy, on the CPU, detached from autograd.

    Raises `TypeError` for an argument that is neither a module nor a mapping, and for a
    mapping with a key that is not a string or a value that is not a tensor (naming the key).
    """
    if isinstance(module, torch.nn.Module):
        state: Mapping[Any, Any] = module.state_dict()
    elif isinstance(module, Mapping):
        state = module
    else:
        raise TypeError(
            "module: expected a torch.nn.Module or a state_dict (a mapping of str to "
            f"torch.Tensor), got {type(module).__name__}"
        )
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(f"module: expected a state_dict with str keys, got key {k!r} "
                            f"of type {type(k).__name__}")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"module[{k!r}]: expected a torch.Tensor, got {type(v).__name__}")
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def load_numpy_(module: torch.nn.Module, params: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """Load a `numpy_ref` parameter dict into `module` in place and return the module.

    The keys must be exactly the module's `state_dict` keys and each shape must match; values
    are cast to the dtype and device of the module's own tensors.
    """
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
    if missing or extra:
        raise ValueError(f"params: missing keys {missing}, unexpected keys {extra}")
    for k, v in params.items():
        if tuple(np.shape(v)) != tuple(own[k].shape):
            raise ValueError(f"params[{k!r}]: expected shape {tuple(own[k].shape)}, "
                             f"got {np.shape(v)}")
    new = {k: torch.as_tensor(np.asarray(v)).to(own[k]) for k, v in params.items()}
    module.load_state_dict(new)
    return module
