"""Readable NumPy forward and backward passes for the LSTM + attention family. No autograd.

Every differentiable op is a pair ``op_forward(...) -> (outputs..., cache)`` and
``op_backward(d_outputs..., cache) -> (d_inputs..., d_params)``: the LSTM, attention and its
parts, the layers (embedding, linear, cross-entropy); the models compose them (see
`numpy_ref.models`), the optimizers update params dicts in place (`numpy_ref.optim`).
"""

from numpy_ref.attention import (
    SCORES,
    AdditiveScoresCache,
    AttentionCache,
    AttentionScoresCache,
    MaskedSoftmaxCache,
    WeightedSumCache,
    additive_scores_backward,
    additive_scores_forward,
    attention_backward,
    attention_forward,
    attention_scores_backward,
    attention_scores_forward,
    masked_softmax_backward,
    masked_softmax_forward,
    weighted_sum_backward,
    weighted_sum_forward,
)
from numpy_ref.gradcheck import gradcheck, numerical_gradient
from numpy_ref.layers import (
    CrossEntropyCache,
    EmbeddingCache,
    LinearCache,
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    linear_backward,
    linear_forward,
)
from numpy_ref.lstm import (
    LSTMCache,
    LSTMCellCache,
    init_lstm_params,
    lstm_backward,
    lstm_cell_backward,
    lstm_cell_forward,
    lstm_forward,
)
from numpy_ref.models import (
    BiLSTMAttentionCache,
    Seq2SeqCache,
    beam_search,
    bilstm_attention_backward,
    bilstm_attention_forward,
    greedy_decode,
    init_bilstm_attention_params,
    init_seq2seq_params,
    seq2seq_backward,
    seq2seq_forward,
)
from numpy_ref.multihead_attention import (
    MultiheadAttentionCache,
    multihead_attention_backward,
    multihead_attention_forward,
)
from numpy_ref.optim import SGD, Adam, AdamW, clip_grad_norm

__all__ = [
    "SCORES",
    "SGD",
    "Adam",
    "AdamW",
    "AdditiveScoresCache",
    "AttentionCache",
    "AttentionScoresCache",
    "BiLSTMAttentionCache",
    "CrossEntropyCache",
    "EmbeddingCache",
    "LSTMCache",
    "LSTMCellCache",
    "LinearCache",
    "MaskedSoftmaxCache",
    "MultiheadAttentionCache",
    "Seq2SeqCache",
    "WeightedSumCache",
    "additive_scores_backward",
    "additive_scores_forward",
    "attention_backward",
    "attention_forward",
    "attention_scores_backward",
    "attention_scores_forward",
    "beam_search",
    "bilstm_attention_backward",
    "bilstm_attention_forward",
    "clip_grad_norm",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "embedding_backward",
    "embedding_forward",
    "gradcheck",
    "greedy_decode",
    "init_bilstm_attention_params",
    "init_lstm_params",
    "init_seq2seq_params",
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
    "numerical_gradient",
    "seq2seq_backward",
    "seq2seq_forward",
    "weighted_sum_backward",
    "weighted_sum_forward",
]
