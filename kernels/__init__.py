"""Numba-compiled versions of the hot ops, with the signatures of `numpy_ref`.

Tests and benchmarks swap backends by module: ``kernels.attention_forward`` takes the same
arguments, raises the same errors and returns the same results (to rounding) as
``numpy_ref.attention_forward``, and likewise for every op below. The package offers the whole
op surface of `numpy_ref`, so a model runs on it with ``backend=kernels``: the ops it does not
accelerate are `numpy_ref`'s own, re-exported (see `kernels.reexported`). Compilation options
live in `kernels._config` alone; `kernels.warmup()` compiles every kernel ahead of use.
"""

try:
    import numba  # noqa: F401
    import scipy  # noqa: F401
except ModuleNotFoundError as e:  # numpy_ref needs NumPy alone; the kernels add these
    raise ModuleNotFoundError(f"kernels needs Numba and SciPy ({e}): pip install "
                              "'lstm-attention-reference[kernels]'") from e

from kernels.activations import GeluCache, gelu_backward, gelu_forward
from kernels.attention import (
    KernelAttentionCache,
    KernelMaskedSoftmaxCache,
    additive_scores_backward,
    additive_scores_forward,
    attention_backward,
    attention_forward,
    masked_softmax_backward,
    masked_softmax_forward,
    weighted_sum_backward,
    weighted_sum_forward,
)
from kernels.layer_norm import KernelLayerNormCache, layer_norm_backward, layer_norm_forward
from kernels.layers import (
    KernelCrossEntropyCache,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
)
from kernels.lstm import lstm_backward, lstm_forward
from kernels.multihead_attention import (
    MultiheadAttentionCache,
    multihead_attention_backward,
    multihead_attention_forward,
)
from kernels.optim import SGD, Adam, AdamW, clip_grad_norm
from kernels.recurrent import gru_backward, gru_forward, rnn_backward, rnn_forward
from kernels.reexported import (
    attention_scores_backward,
    attention_scores_forward,
    embedding_forward,
    gru_cell_backward,
    gru_cell_forward,
    linear_backward,
    linear_forward,
    lstm_cell_backward,
    lstm_cell_forward,
    relu_backward,
    relu_forward,
    rnn_cell_backward,
    rnn_cell_forward,
)
from kernels.transformer import (
    FeedForwardCache,
    TransformerCache,
    TransformerDecoderCache,
    TransformerDecoderLayerCache,
    TransformerEncoderCache,
    TransformerEncoderLayerCache,
    feed_forward_backward,
    feed_forward_forward,
    transformer_backward,
    transformer_decoder_backward,
    transformer_decoder_forward,
    transformer_decoder_layer_backward,
    transformer_decoder_layer_forward,
    transformer_encoder_backward,
    transformer_encoder_forward,
    transformer_encoder_layer_backward,
    transformer_encoder_layer_forward,
    transformer_forward,
)
from kernels.warmup import warmup

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "FeedForwardCache",
    "GeluCache",
    "KernelAttentionCache",
    "KernelCrossEntropyCache",
    "KernelLayerNormCache",
    "KernelMaskedSoftmaxCache",
    "MultiheadAttentionCache",
    "TransformerCache",
    "TransformerDecoderCache",
    "TransformerDecoderLayerCache",
    "TransformerEncoderCache",
    "TransformerEncoderLayerCache",
    "additive_scores_backward",
    "additive_scores_forward",
    "attention_backward",
    "attention_forward",
    "attention_scores_backward",
    "attention_scores_forward",
    "clip_grad_norm",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "embedding_backward",
    "embedding_forward",
    "feed_forward_backward",
    "feed_forward_forward",
    "gelu_backward",
    "gelu_forward",
    "gru_backward",
    "gru_cell_backward",
    "gru_cell_forward",
    "gru_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "linear_backward",
    "linear_forward",
    "lstm_backward",
    "lstm_cell_backward",
    "lstm_cell_forward",
    "lstm_forward",
    "masked_softmax_backward",
    "masked_softmax_forward",
    "multihead_attention_backward",
    "multihead_attention_forward",
    "relu_backward",
    "relu_forward",
    "rnn_backward",
    "rnn_cell_backward",
    "rnn_cell_forward",
    "rnn_forward",
    "transformer_backward",
    "transformer_decoder_backward",
    "transformer_decoder_forward",
    "transformer_decoder_layer_backward",
    "transformer_decoder_layer_forward",
    "transformer_encoder_backward",
    "transformer_encoder_forward",
    "transformer_encoder_layer_backward",
    "transformer_encoder_layer_forward",
    "transformer_forward",
    "warmup",
    "weighted_sum_backward",
    "weighted_sum_forward",
]
