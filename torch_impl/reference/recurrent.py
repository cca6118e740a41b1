"""The recurrent layers' torch reference: torch's own ``nn.LSTM`` holding our parameters, run on
a padded batch the way torch users run one.

With ``lengths``, the batch [T, B, I] (or [B, T, I] with batch_first) is packed with
``pack_padded_sequence(enforce_sorted=False)`` (unsorted lengths allowed), run, and padded back
to T with ``pad_packed_sequence(total_length=T)``: the outputs at padded steps are zeros and the
final state of each row is the one at its own last step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from torch_impl.convert import load_numpy_

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_module(params: Mapping[str, Any], *, mode: str = "LSTM", num_layers: int = 1,
                     bidirectional: bool = False, batch_first: bool = False,
                     dtype: torch.dtype | None = None, device: Any = None,
                     **options: Any) -> nn.Module:
    """``nn.LSTM`` (mode "LSTM"; ``nn.GRU``/``nn.RNN`` for "GRU"/"RNN") holding `params`.

    params: torch's state_dict names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ...,
    ``_reverse`` for the backward direction, ``weight_hr_l0`` with a projection), NumPy arrays
    or tensors; input, hidden and projection sizes and ``bias`` are read from their shapes.
    dtype: the module's (default: that of ``weight_ih_l0``). options: passed to the module
    (``nonlinearity`` for an RNN).
    """
    w_ih, w_hh = np.shape(params["weight_ih_l0"]), np.shape(params["weight_hh_l0"])
    hidden = w_hh[0] // GATES[mode]
    extra = dict(options)
    if "weight_hr_l0" in params:
        extra["proj_size"] = np.shape(params["weight_hr_l0"])[0]
    if dtype is None:
        first = params["weight_ih_l0"]
        dtype = first.dtype if isinstance(first, torch.Tensor) \
            else torch.from_numpy(np.asarray(first)[:0]).dtype
    module = getattr(nn, mode)(w_ih[1], hidden, num_layers=num_layers,
                               bidirectional=bidirectional, batch_first=batch_first,
                               bias="bias_ih_l0" in params, dtype=dtype, device=device, **extra)
    return load_numpy_(module, {k: _numpy(v) for k, v in params.items()})


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def run_packed(module: nn.Module, x: torch.Tensor, state: Any = None,
               lengths: Any = None) -> tuple[torch.Tensor, Any]:
    """``module`` on x [T, B, I] (or [B, T, I] with its batch_first) from state (``(h0, c0)``
    for an LSTM, ``h0`` otherwise; None = zeros), packed by lengths (int [B], each in 1..T,
    any order; None = all T) -> (output padded to T with zeros, final state)."""
    if lengths is None:
        return module(x, state)
    T = x.shape[1] if module.batch_first else x.shape[0]
    packed = pack_padded_sequence(x, torch.as_tensor(lengths).cpu(),
                                  batch_first=module.batch_first, enforce_sorted=False)
    output, final = module(packed, state)
    output, _ = pad_packed_sequence(output, batch_first=module.batch_first, total_length=T)
    return output, final
