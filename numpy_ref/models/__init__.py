r"""The models, forward and backward by hand, composed of the public op pairs: the seed's
BiLSTM-attention classifier, an encoder-decoder with Luong or Bahdanau attention, and the same
frame as a Transformer (`numpy_ref.models.transformer`), with greedy decoding and beam search.

Every function takes ``backend=``: a module with `numpy_ref`'s op signatures (`numpy_ref`
itself by default, `kernels` for speed). The module is passed in (None: `numpy_ref`, imported
at call time), and the cache remembers it, so the backward runs on the forward's backend.
Parameters are the state_dicts of `torch_impl.BiLSTMAttention` and
`torch_impl.Seq2SeqAttention`.

Every model takes ``cell="lstm"`` (default) or ``"gru"``: with a GRU every recurrence below is
the GRU's (`numpy_ref.gru`, torch's variant), a state has no c (m_0, m_t do not exist), the
classifier's layer is ``gru.*`` and the Luong decoder's ``decoder.gru.*``.

Shapes
------
B  batch      T  tokens per sentence     Ts, Tt  source and target tokens
V  vocabulary (Vs, Vt: source, target)   E  embedding size     C  classes
H  hidden size of each encoder direction; the decoder's state is 2H wide
L  encoder layers                        A  additive-attention width (2H here)

The classifier (the seed's BiLSTM_Attention)
-------------------------------------------
    x        = embedding(ids)                                    [B, T, E]
    out, h_n = BiLSTM(x)                                         [B, T, 2H], h_n [2, B, H]
    q        = concat(h_n[-2], h_n[-1])                          [B, 2H]  each row's own state
    c, w     = attention(q, out, out, score="dot")               [B, 2H], [B, T]
    logits   = out_layer(c)                                      [B, C]

The seed itself computes ``q = h_n.view(-1, 2H)``: row b of that view is h_n's memory
[2, B, H] read row by row, so for B > 1 it pairs the states of different sentences (row 0 is
the forward states of sentences 0 and 1). ``seed_compatible=True`` reproduces it exactly; then
one sentence's prediction depends on which sentences share its batch. With lengths, the LSTM
runs packed, attention is masked, and each sentence's final states are its own last real step.

The encoder-decoder (teacher forcing: tgt holds the decoder's input tokens)
----------------------------------------------------------------------------
    memory, (h_n, c_n) = BiLSTM_L(src_embed(src))                [B, Ts, 2H], packed by lengths
    s_0 = concat(h_n[-2], h_n[-1]),  m_0 = concat(c_n[-2], c_n[-1])              [B, 2H]
    y_t = tgt_embed(tgt_t)                                       [B, E]

Luong (global attention, no input feeding; all steps at once):
    s_t       = LSTM(y_t, s_{t-1})                               [B, Tt, 2H]
    c_t, w_t  = attention(s_t, memory, memory, score)            dot, scaled_dot, general,
                                                                 additive
    h~_t      = tanh(concat_layer([c_t; s_t]))                   [B, Tt, 2H]  (no bias)
    logits_t  = generator(h~_t)                                  [B, Tt, Vt]

Bahdanau (step by step: the query is the previous state):
    K         = memory W_key^T                                   [B, Ts, A]  once
    e_t       = v . tanh(W_query s_{t-1} + b + K)                [B, Ts]
    w_t       = masked softmax(e_t);  c_t = sum_j w_tj memory_j  [B, 2H]
    s_t, m_t  = LSTMCell([y_t; c_t], (s_{t-1}, m_{t-1}))
    logits_t  = generator([s_t; c_t; y_t])                       [B, Tt, Vt]

Backward runs the same graph in reverse, each op's backward under its forward (see the
comments). Where two paths meet, the gradients add: keys and values are the same encoder
output (d_memory = d_keys + d_values), the decoder's initial state is a slice of h_n and c_n,
and in the Bahdanau decoder s_{t-1} feeds both the next query and the next cell.

Padding is not data: ids past src_lengths (or the classifier's lengths) may be any integer;
they are replaced by 0 before the embedding, and the packed LSTM and the masked attention do
not read what they become, so the results are those of zero padding, bit for bit.

Decoding
--------
`greedy_decode` feeds the argmax token back; `beam_search` keeps the k best hypotheses by
``sum of log-probabilities / len ** length_penalty`` (finished ones carried unchanged), so
k = 1 is greedy decoding and a k as large as the number of hypotheses is exhaustive search.
"""

from numpy_ref.models.classifier import (
    BiLSTMAttentionCache,
    bilstm_attention_backward,
    bilstm_attention_forward,
)
from numpy_ref.models.decoding import beam_search, greedy_decode
from numpy_ref.models.params import init_bilstm_attention_params, init_seq2seq_params
from numpy_ref.models.seq2seq import (
    BahdanauCache,
    BahdanauStepCache,
    EncoderCache,
    LuongCache,
    Seq2SeqCache,
    seq2seq_backward,
    seq2seq_forward,
)
from numpy_ref.models.transformer import (
    TransformerSeq2SeqCache,
    init_transformer_seq2seq_params,
    positional_encoding,
    transformer_beam_search,
    transformer_greedy_decode,
    transformer_seq2seq_backward,
    transformer_seq2seq_forward,
)

__all__ = [
    "BahdanauCache",
    "BahdanauStepCache",
    "BiLSTMAttentionCache",
    "EncoderCache",
    "LuongCache",
    "Seq2SeqCache",
    "TransformerSeq2SeqCache",
    "beam_search",
    "bilstm_attention_backward",
    "bilstm_attention_forward",
    "greedy_decode",
    "init_bilstm_attention_params",
    "init_seq2seq_params",
    "init_transformer_seq2seq_params",
    "positional_encoding",
    "seq2seq_backward",
    "seq2seq_forward",
    "transformer_beam_search",
    "transformer_greedy_decode",
    "transformer_seq2seq_backward",
    "transformer_seq2seq_forward",
]
