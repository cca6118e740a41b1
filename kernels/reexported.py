"""The ops `kernels` does not accelerate, re-exported from `numpy_ref` so that the package
offers its whole op surface (a model needs no fallback logic to run on ``backend=kernels``).

Each is here because NumPy's own call is already the fast path, measured in the training-step
benchmark's profile: the linear layers are one BLAS product each, the embedding's forward one
gather. The scores on their own (`attention_scores_*`) are BLAS products too (the kernels'
attention forms them inside its own passes). The recurrent cells (one step: two products and
a pointwise pass over [B, G*H]) are the layers' steps; the kernels run whole layers. ReLU is
one NumPy ufunc each way.
"""

from numpy_ref.activations import relu_backward, relu_forward
from numpy_ref.attention import attention_scores_backward, attention_scores_forward
from numpy_ref.gru import gru_cell_backward, gru_cell_forward
from numpy_ref.layers import embedding_forward, linear_backward, linear_forward
from numpy_ref.lstm import lstm_cell_backward, lstm_cell_forward
from numpy_ref.rnn import rnn_cell_backward, rnn_cell_forward

__all__ = [
    "attention_scores_backward",
    "attention_scores_forward",
    "embedding_forward",
    "gru_cell_backward",
    "gru_cell_forward",
    "linear_backward",
    "linear_forward",
    "lstm_cell_backward",
    "lstm_cell_forward",
    "relu_backward",
    "relu_forward",
    "rnn_cell_backward",
    "rnn_cell_forward",
]
