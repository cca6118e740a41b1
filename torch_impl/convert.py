"""Weight converters between torch modules and `numpy_ref` parameter dicts.

`numpy_ref` uses `state_dict` key names and shapes, so converting is a dict comprehension; these
two functions add the checks a user wants (no missing or extra keys, matching shapes) and copy,
so that neither side aliases the other's memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def to_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copy every entry of ``module.state_dict()`` to a NumPy array (same keys, shapes, dtype)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


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
