"""Readable NumPy forward and backward passes for the LSTM + attention family. No autograd.

Every differentiable op is a pair ``op_forward(...) -> (outputs..., cache)`` and
``op_backward(d_outputs..., cache) -> (d_inputs..., d_params)``; see DESIGN.md.
"""

from numpy_ref.attention import (
    SCORES,
    AttentionCache,
    MaskedSoftmaxCache,
    attention_backward,
    attention_forward,
    masked_softmax_backward,
    masked_softmax_forward,
)
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
    "SCORES",
    "AttentionCache",
    "LSTMCache",
    "LSTMCellCache",
    "MaskedSoftmaxCache",
    "attention_backward",
    "attention_forward",
    "gradcheck",
    "init_lstm_params",
    "lstm_backward",
    "lstm_cell_backward",
    "lstm_cell_forward",
    "lstm_forward",
    "masked_softmax_backward",
    "masked_softmax_forward",
    "numerical_gradient",
]
