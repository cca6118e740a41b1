"""Numba-compiled versions of the hot ops, with the signatures of `numpy_ref`.

Tests and benchmarks swap backends by module: ``kernels.attention_forward`` takes the same
arguments, raises the same errors and returns the same results (to rounding) as
``numpy_ref.attention_forward``, and likewise ``kernels.lstm_forward`` / ``lstm_backward``.
Compilation options live in `kernels._config` alone.
"""

from kernels.attention import (
    KernelAttentionCache,
    KernelMaskedSoftmaxCache,
    attention_backward,
    attention_forward,
    masked_softmax_backward,
    masked_softmax_forward,
)
from kernels.lstm import lstm_backward, lstm_forward

__all__ = [
    "KernelAttentionCache",
    "KernelMaskedSoftmaxCache",
    "attention_backward",
    "attention_forward",
    "lstm_backward",
    "lstm_forward",
    "masked_softmax_backward",
    "masked_softmax_forward",
]
