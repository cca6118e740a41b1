"""The models' recurrent cell, LSTM or GRU, behind one interface (the models take
``cell="lstm"`` or ``"gru"``).

A state is ``(h, c)`` for the LSTM and ``(h, None)`` for the GRU, which has no cell state: a
model carries the pair, and the GRU's second half stays None through forward and backward. A
model's recurrent layer is named after its cell in the state_dict (``lstm.*`` or ``gru.*``, a
decoder's ``decoder.lstm.*`` or ``decoder.gru.*``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from numpy_ref.contract.models import CELLS


def layers_forward(backend: ModuleType, cell: str, x: np.ndarray, params: dict, *,
                   num_layers: int = 1, bidirectional: bool = False,
                   batch_first: bool = False, state: tuple[Any, Any] | None = None,
                   lengths: Any = None) -> tuple[np.ndarray, np.ndarray, Any, Any]:
    """`lstm_forward` or `gru_forward` -> (output, h_n, c_n (None for the GRU), cache);
    state: (h0, c0) or (h0, None), or None for zeros."""
    assert cell in CELLS, cell
    h0, c0 = (None, None) if state is None else state
    options = {"num_layers": num_layers, "bidirectional": bidirectional,
               "batch_first": batch_first, "lengths": lengths}
    if cell == "lstm":
        out, (h_n, c_n), cache = backend.lstm_forward(x, params, h0=h0, c0=c0, **options)
        return out, h_n, c_n, cache
    out, h_n, cache = backend.gru_forward(x, params, h0=h0, **options)
    return out, h_n, None, cache


def layers_backward(backend: ModuleType, cell: str, d_out: np.ndarray, cache: Any, *,
                    d_h_n: np.ndarray | None = None, d_c_n: np.ndarray | None = None
                    ) -> tuple[np.ndarray, dict, np.ndarray, Any]:
    """The backward of `layers_forward` -> (d_x, d_params, d_h0, d_c0 (None for the GRU))."""
    if cell == "lstm":
        d_x, d_p, (d_h0, d_c0) = backend.lstm_backward(d_out, cache, d_h_n=d_h_n, d_c_n=d_c_n)
        return d_x, d_p, d_h0, d_c0
    d_x, d_p, d_h0 = backend.gru_backward(d_out, cache, d_h_n=d_h_n)
    return d_x, d_p, d_h0, None


def step_forward(backend: ModuleType, cell: str, x: np.ndarray, h: np.ndarray, c: Any,
                 params: dict) -> tuple[np.ndarray, Any, Any]:
    """One cell step: (h_new, c_new (None for the GRU), cache)."""
    if cell == "lstm":
        return backend.lstm_cell_forward(x, h, c, params)
    h_new, cache = backend.gru_cell_forward(x, h, params)
    return h_new, None, cache


def step_backward(backend: ModuleType, cell: str, d_h_new: np.ndarray, d_c_new: Any,
                  cache: Any) -> tuple[np.ndarray, np.ndarray, Any, dict]:
    """The backward of `step_forward` -> (d_x, d_h, d_c (None for the GRU), d_params)."""
    if cell == "lstm":
        return backend.lstm_cell_backward(d_h_new, d_c_new, cache)
    d_x, d_h, d_p = backend.gru_cell_backward(d_h_new, cache)
    return d_x, d_h, None, d_p
