"""Readable NumPy forward and backward passes for the LSTM + attention family. No autograd.

Every differentiable op is a pair ``op_forward(...) -> (outputs..., cache)`` and
``op_backward(d_outputs..., cache) -> (d_inputs..., d_params)``; see DESIGN.md.
"""

from numpy_ref.gradcheck import gradcheck, numerical_gradient
from numpy_ref.lstm import (
    LSTMCache,
    LSTMCellCache,
    init_lstm_params,
    lstm_backward,
    lstm_cell_backward,
    lstm_cell_forward,
    lstm_forward,
)

__all__ = [
    "LSTMCache",
    "LSTMCellCache",
    "gradcheck",
    "init_lstm_params",
    "lstm_backward",
    "lstm_cell_backward",
    "lstm_cell_forward",
    "lstm_forward",
    "numerical_gradient",
]
