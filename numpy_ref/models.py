r"""The models, forward and backward by hand, composed of the public op pairs: the seed's
BiLSTM-attention classifier and an encoder-decoder with Luong or Bahdanau attention, with
greedy decoding and beam search.

Every function takes ``backend=``: a module with `numpy_ref`'s op signatures (`numpy_ref`
itself by default, `kernels` for speed). The module is passed in, never imported here, and the
cache remembers it, so the backward runs on the forward's backend. Parameters are the
state_dicts of `torch_impl.BiLSTMAttention` and `torch_impl.Seq2SeqAttention`.

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

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks
from numpy_ref.contract import models as contract
from numpy_ref.contract.backend import op_module
from numpy_ref.contract.fields import documented
from numpy_ref.contract.models import as_cell, group, prefixed
from numpy_ref.lstm import init_lstm_params

# --------------------------------------------------------------------------------------------
# parameter initialisation, with torch's distributions


def _uniform(rng: np.random.Generator, bound: float, shape: tuple[int, ...], dtype
             ) -> np.ndarray:
    return rng.uniform(-bound, bound, shape).astype(dtype)


def _linear_params(rng, out_features: int, in_features: int, dtype, *, bias: bool = True):
    """nn.Linear's init: weight and bias ~ U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1 / np.sqrt(in_features)
    p = {"weight": _uniform(rng, bound, (out_features, in_features), dtype)}
    if bias:
        p["bias"] = _uniform(rng, bound, (out_features,), dtype)
    return p


def _attention_params(rng, score: str, size: int, dtype) -> dict[str, np.ndarray]:
    """`torch_impl.Attention`'s init for query and key size `size` (A = size)."""
    bound = 1 / np.sqrt(size)
    if score == "general":
        return {"W": _uniform(rng, bound, (size, size), dtype)}
    if score == "additive":
        return {"W_query": _uniform(rng, bound, (size, size), dtype),
                "W_key": _uniform(rng, bound, (size, size), dtype),
                "v": _uniform(rng, bound, (size,), dtype),
                "b": _uniform(rng, bound, (size,), dtype)}
    return {}


def init_bilstm_attention_params(
    vocab_size: int, embedding_dim: int, n_hidden: int, num_classes: int, *,
    rng: np.random.Generator | int | None = None, dtype: Any = np.float64,
) -> dict[str, np.ndarray]:
    """Random classifier parameters (``embedding.weight`` [V, E], the LSTM's ``lstm.*``,
    ``out.weight`` [C, 2H], ``out.bias`` [C]),
    keyed as `torch_impl.BiLSTMAttention`'s state_dict and
    drawn from torch's initial distributions (embedding ~ N(0, 1); LSTM ~ U(+-1/sqrt(H));
    linear ~ U(+-1/sqrt(fan_in))). Not torch's random numbers: convert a torch module for those.
    The parameters' roles: the `numpy_ref.models` module docstring."""
    rng = np.random.default_rng(rng)
    lstm = init_lstm_params(embedding_dim, n_hidden, bidirectional=True, rng=rng,
                                      dtype=dtype)
    return {"embedding.weight": rng.standard_normal((vocab_size, embedding_dim)).astype(dtype),
            **prefixed("lstm", lstm),
            **prefixed("out", _linear_params(rng, num_classes, 2 * n_hidden, dtype))}


def init_seq2seq_params(
    src_vocab: int, tgt_vocab: int, embedding_dim: int, hidden_size: int, *,
    decoder: str = "luong", score: str | None = None, num_layers: int = 1,
    rng: np.random.Generator | int | None = None, dtype: Any = np.float64,
) -> dict[str, np.ndarray]:
    """Random encoder-decoder parameters, keyed as `torch_impl.Seq2SeqAttention`'s state_dict
    (same order), from torch's initial distributions (each entry ~ N(0, 1) in the embeddings,
    U(+-1/sqrt(fan_in)) elsewhere; see `init_bilstm_attention_params`).
    The parameters' roles: the `numpy_ref.models` module docstring."""
    score = contract.seq2seq_config(decoder, score)
    rng = np.random.default_rng(rng)
    E, H2 = embedding_dim, 2 * hidden_size
    p = {"src_embed.weight": rng.standard_normal((src_vocab, E)).astype(dtype),
         **prefixed("encoder", init_lstm_params(
             E, hidden_size, num_layers=num_layers, bidirectional=True, rng=rng, dtype=dtype)),
         "tgt_embed.weight": rng.standard_normal((tgt_vocab, E)).astype(dtype)}
    attention = prefixed("decoder.attention", _attention_params(rng, score, H2, dtype))
    if decoder == "luong":
        p.update(prefixed("decoder.lstm", init_lstm_params(E, H2, rng=rng,
                                                                     dtype=dtype)))
        p.update(attention)
        p["decoder.concat.weight"] = _linear_params(rng, H2, 2 * H2, dtype, bias=False)["weight"]
        p.update(prefixed("generator", _linear_params(rng, tgt_vocab, H2, dtype)))
    else:
        p.update(attention)
        cell = init_lstm_params(E + H2, H2, rng=rng, dtype=dtype)
        p.update(prefixed("decoder.cell", as_cell(cell)))
        p.update(prefixed("generator", _linear_params(rng, tgt_vocab, 2 * H2 + E, dtype)))
    return p


# --------------------------------------------------------------------------------------------
# the seed classifier


@documented
class BiLSTMAttentionCache(NamedTuple):
    """What `bilstm_attention_backward` needs: each op's own cache, and the backend."""

    backend: ModuleType  # the module every op ran on
    embedding: Any  # embedding cache
    lstm: Any  # LSTM cache (output [B, T, 2H], batch-first)
    attention: Any  # attention cache (query [B, 2H], keys = values = the LSTM output)
    out: Any  # linear cache
    seed_compatible: bool  # whether the query was the seed's view of h_n
    keys: tuple[str, ...]  # the params' keys, in order: d_params comes back in it


def bilstm_attention_forward(
    ids: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    lengths: Any = None,
    seed_compatible: bool = False,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, np.ndarray, BiLSTMAttentionCache]:
    """The seed's BiLSTM-attention classifier.

    ``out, h_n = BiLSTM(embedding(ids))``; ``q = concat(h_n[-2], h_n[-1])`` (the seed's
    ``h_n.view(-1, 2H)`` with seed_compatible); ``c, w = attention(q, out, out, "dot")``;
    ``logits = out(c)``. The equations and the seed's bug: the `numpy_ref.models` module docstring.

    Parameters
    ----------
    ids : integer token ids [B, T].
    params : `torch_impl.BiLSTMAttention`'s state_dict: ``embedding.weight`` [V, E],
        ``lstm.*`` (one bidirectional layer, hidden H), ``out.weight`` [C, 2H], ``out.bias``.
    lengths : integer [B] in 1..T, or None. Packed LSTM, masked attention; ids past a
        sentence's length may be anything.
    seed_compatible : take the query as the seed does, ``h_n.view(-1, 2H)``, which mixes
        sentences when B > 1 (see the module docstring); the default is each sentence's own
        ``concat(h_n[-2], h_n[-1])``.
    backend : the op module (`numpy_ref` or `kernels`; None: `numpy_ref`).

    Returns
    -------
    logits [B, C], attention [B, T] (0 past each length), cache.

    Example (the seed's bug; params for any V, E, H, C)::

        one = [bilstm_attention_forward(ids[i:i + 1], params, seed_compatible=True)[0]
               for i in range(len(ids))]
        both = bilstm_attention_forward(ids, params, seed_compatible=True)[0]
        np.allclose(np.concatenate(one), both)  # False: rows depend on their batch-mates
    """
    backend = op_module(backend)
    real, lengths, p, sizes = contract.bilstm_attention(ids, params, lengths, seed_compatible)
    B, H = real.shape[0], sizes.H
    x, emb_cache = backend.embedding_forward(real, group(p, "embedding"))  # [B, T, E]
    output, (h_n, _), lstm_cache = backend.lstm_forward(
        x, group(p, "lstm"), bidirectional=True, batch_first=True, lengths=lengths)
    if seed_compatible:  # the seed's final_state.view(-1, n_hidden * 2, 1): h_n [2, B, H]
        query = h_n.reshape(B, 2 * H)  # read in C order, as torch's view of its memory
    else:
        query = np.concatenate([h_n[-2], h_n[-1]], axis=1)  # [B, 2H]
    context, attention, att_cache = backend.attention_forward(query, output, output,
                                                              score="dot", lengths=lengths)
    logits, out_cache = backend.linear_forward(context, group(p, "out"))  # [B, C]
    cache = BiLSTMAttentionCache(backend, emb_cache, lstm_cache, att_cache, out_cache,
                                 seed_compatible, tuple(p))
    return logits, attention, cache


def bilstm_attention_backward(
    d_logits: np.ndarray, cache: BiLSTMAttentionCache, *, d_attention: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Backward of `bilstm_attention_forward`: d_logits [B, C] (and optionally d_attention
    [B, T]) -> d_params, the keys of params in their order.

    Each op's backward in reverse order; the LSTM output gets both attention gradients
    (``d_out = d_keys + d_values``) and ``d_h_n`` gets the query's. See
    the `numpy_ref.models` module docstring."""
    backend, emb_cache, lstm_cache, att_cache, out_cache, seed_compatible, keys = \
        checks.cache_of(cache, BiLSTMAttentionCache, "bilstm_attention_forward")
    d_context, d_out = backend.linear_backward(d_logits, out_cache)  # logits = out(context)
    # context, attention = attention(query, output, output)
    d_query, d_keys, d_values, _ = backend.attention_backward(d_context, att_cache,
                                                              d_weights=d_attention)
    B, H = d_query.shape[0], d_query.shape[1] // 2
    if seed_compatible:  # query = h_n.reshape(B, 2H)
        d_h_n = d_query.reshape(2, B, H)
    else:  # query = concat(h_n[-2], h_n[-1])
        d_h_n = np.stack([d_query[:, :H], d_query[:, H:]])
    d_x, d_lstm, _ = backend.lstm_backward(d_keys + d_values, lstm_cache, d_h_n=d_h_n)
    d_emb = backend.embedding_backward(d_x, emb_cache)  # x = embedding(ids)
    grads = {**prefixed("embedding", d_emb), **prefixed("lstm", d_lstm),
             **prefixed("out", d_out)}
    return {k: grads[k] for k in keys}


# --------------------------------------------------------------------------------------------
# the encoder-decoder: the encoder


@documented
class EncoderCache(NamedTuple):
    """The encoder's caches."""

    embedding: Any  # src_embed cache
    lstm: Any  # encoder LSTM cache (memory [B, Ts, 2H], batch-first)
    num_layers: int  # L


def _encode(backend, real_src, src_lengths, p, L):
    """src -> (memory [B, Ts, 2H], s_0 [B, 2H], m_0 [B, 2H], EncoderCache)."""
    x, emb_cache = backend.embedding_forward(real_src, group(p, "src_embed"))  # [B, Ts, E]
    memory, (h_n, c_n), lstm_cache = backend.lstm_forward(
        x, group(p, "encoder"), num_layers=L, bidirectional=True, batch_first=True,
        lengths=src_lengths)
    s0 = np.concatenate([h_n[-2], h_n[-1]], axis=1)  # the last layer's two directions
    m0 = np.concatenate([c_n[-2], c_n[-1]], axis=1)
    return memory, s0, m0, EncoderCache(emb_cache, lstm_cache, L)


def _encode_backward(backend, d_memory, d_s0, d_m0, cache: EncoderCache):
    """(d_memory, d_s0, d_m0) -> the gradients of src_embed.* and encoder.*."""
    B, H2 = d_s0.shape
    H, L = H2 // 2, cache.num_layers
    d_h_n = np.zeros((2 * L, B, H), d_s0.dtype)
    d_c_n = np.zeros((2 * L, B, H), d_s0.dtype)
    d_h_n[-2], d_h_n[-1] = d_s0[:, :H], d_s0[:, H:]  # s_0 = concat(h_n[-2], h_n[-1])
    d_c_n[-2], d_c_n[-1] = d_m0[:, :H], d_m0[:, H:]
    d_x, d_lstm, _ = backend.lstm_backward(d_memory, cache.lstm, d_h_n=d_h_n, d_c_n=d_c_n)
    d_emb = backend.embedding_backward(d_x, cache.embedding)
    return {**prefixed("src_embed", d_emb), **prefixed("encoder", d_lstm)}


# --------------------------------------------------------------------------------------------
# the decoders, with teacher forcing


@documented
class LuongCache(NamedTuple):
    """The Luong decoder's caches."""

    lstm: Any  # decoder.lstm cache (s [B, Tt, 2H])
    attention: Any  # attention cache (queries s, keys = values = memory)
    concat: Any  # decoder.concat cache (input [c; s] [B, Tt, 4H])
    attentional: np.ndarray  # h~ = tanh(concat([c; s])) [B, Tt, 2H]; read
    generator: Any  # generator cache


def _luong_forward(backend, y, memory, s0, m0, src_lengths, score, p):
    """y [B, Tt, E] -> (logits [B, Tt, Vt], attention [B, Tt, Ts], LuongCache)."""
    s, _, lstm_cache = backend.lstm_forward(y, group(p, "decoder.lstm"), batch_first=True,
                                            h0=s0[None], c0=m0[None])  # [B, Tt, 2H]
    context, attention, att_cache = backend.attention_forward(
        s, memory, memory, score=score, params=group(p, "decoder.attention") or None,
        lengths=src_lengths)  # [B, Tt, 2H], [B, Tt, Ts]
    z, concat_cache = backend.linear_forward(np.concatenate([context, s], axis=-1),
                                             group(p, "decoder.concat"))
    h_att = np.tanh(z)  # [B, Tt, 2H]
    logits, gen_cache = backend.linear_forward(h_att, group(p, "generator"))
    return logits, attention, LuongCache(lstm_cache, att_cache, concat_cache, h_att, gen_cache)


def _luong_backward(backend, d_logits, d_attention, cache: LuongCache):
    """-> (d_y [B, Tt, E], d_memory [B, Ts, 2H], d_s0, d_m0, the decoder's gradients)."""
    d_h_att, d_gen = backend.linear_backward(d_logits, cache.generator)  # logits = gen(h~)
    d_z = d_h_att * (1 - cache.attentional**2)  # h~ = tanh(z)
    d_cat, d_concat = backend.linear_backward(d_z, cache.concat)  # z = concat_layer([c; s])
    H2 = d_cat.shape[-1] // 2
    d_context, d_s = d_cat[..., :H2], d_cat[..., H2:]
    d_s_att, d_keys, d_values, d_att = backend.attention_backward(  # c = attention(s, mem, mem)
        d_context, cache.attention, d_weights=d_attention)
    d_y, d_lstm, (d_h0, d_c0) = backend.lstm_backward(d_s + d_s_att, cache.lstm)  # s = LSTM(y)
    grads = {**prefixed("decoder.lstm", d_lstm), **prefixed("decoder.attention", d_att),
             **prefixed("decoder.concat", d_concat), **prefixed("generator", d_gen)}
    return d_y, d_keys + d_values, d_h0[0], d_c0[0], grads


@documented
class BahdanauStepCache(NamedTuple):
    """One decoder step's caches."""

    query: Any  # linear cache of qa = W_query s_{t-1} + b
    scores: Any  # additive scores cache
    softmax: Any  # masked softmax cache
    context: Any  # weighted sum cache
    cell: Any  # decoder.cell cache


@documented
class BahdanauCache(NamedTuple):
    """The Bahdanau decoder's caches."""

    keys: Any  # linear cache of K = memory W_key^T (once)
    steps: tuple[BahdanauStepCache, ...]  # Tt entries
    generator: Any  # generator cache (input [s; c; y] [B, Tt, 4H + E])
    state_size: int  # 2H


def _bahdanau_forward(backend, y, memory, s0, m0, src_lengths, p):
    """y [B, Tt, E] -> (logits [B, Tt, Vt], attention [B, Tt, Ts], BahdanauCache)."""
    Tt = y.shape[1]
    att = group(p, "decoder.attention")
    K, keys_cache = backend.linear_forward(memory, {"weight": att["W_key"]})  # [B, Ts, A]
    query_layer = {"weight": att["W_query"], "bias": att["b"]}
    cell = group(p, "decoder.cell")
    s, m = s0, m0
    states, contexts, weights, steps = [], [], [], []
    for t in range(Tt):
        qa, q_cache = backend.linear_forward(s, query_layer)  # [B, A]
        e, e_cache = backend.additive_scores_forward(qa, K, att["v"])  # [B, Ts]
        w, sm_cache = backend.masked_softmax_forward(e, src_lengths)
        c, c_cache = backend.weighted_sum_forward(w, memory)  # [B, 2H]
        s, m, cell_cache = backend.lstm_cell_forward(np.concatenate([y[:, t], c], axis=1), s, m,
                                                     cell)
        states.append(s)
        contexts.append(c)
        weights.append(w)
        steps.append(BahdanauStepCache(q_cache, e_cache, sm_cache, c_cache, cell_cache))
    gen_in = np.concatenate([np.stack(states, 1), np.stack(contexts, 1), y], axis=-1)
    logits, gen_cache = backend.linear_forward(gen_in, group(p, "generator"))
    return logits, np.stack(weights, 1), BahdanauCache(keys_cache, tuple(steps), gen_cache,
                                                      s0.shape[1])


def _bahdanau_backward(backend, d_logits, d_attention, cache: BahdanauCache):
    """-> (d_y [B, Tt, E], d_memory [B, Ts, 2H], d_s0, d_m0, the decoder's gradients)."""
    d_in, d_gen = backend.linear_backward(d_logits, cache.generator)  # gen([s; c; y])
    H2 = cache.state_size
    E = d_in.shape[-1] - 2 * H2
    d_states, d_contexts, d_y = d_in[..., :H2], d_in[..., H2:2 * H2], d_in[..., 2 * H2:].copy()
    sums: dict[str, np.ndarray] = {}  # d_memory, d_K, d_v summed over the steps
    d_query_layer: dict[str, np.ndarray] = {}
    d_cell: dict[str, np.ndarray] = {}
    d_s = np.zeros((d_in.shape[0], H2), d_in.dtype)  # dL/ds_t from the steps after t
    d_m = np.zeros_like(d_s)  # dL/dm_t, the cell state's
    for t in range(len(cache.steps) - 1, -1, -1):
        step = cache.steps[t]
        # s_t, m_t = cell([y_t; c_t], s_{t-1}, m_{t-1})
        d_x, d_s, d_m, g_cell = backend.lstm_cell_backward(d_states[:, t] + d_s, d_m, step.cell)
        d_y[:, t] += d_x[:, :E]
        # c_t = weighted_sum(w_t, memory)
        d_w, d_mem = backend.weighted_sum_backward(d_contexts[:, t] + d_x[:, E:], step.context)
        if d_attention is not None:
            d_w = d_w + d_attention[:, t]
        d_e = backend.masked_softmax_backward(d_w, step.softmax)  # w_t = softmax(e_t)
        d_qa, d_K_t, d_v_t = backend.additive_scores_backward(d_e, step.scores)
        d_s_q, g_query = backend.linear_backward(d_qa, step.query)  # qa = W_query s_{t-1} + b
        d_s = d_s + d_s_q
        _accumulate(sums, {"memory": d_mem, "K": d_K_t, "v": d_v_t})
        _accumulate(d_query_layer, g_query)
        _accumulate(d_cell, g_cell)
    d_mem_keys, g_keys = backend.linear_backward(sums["K"], cache.keys)  # K = memory W_key^T
    grads = {"decoder.attention.W_query": d_query_layer["weight"],
             "decoder.attention.W_key": g_keys["weight"],
             "decoder.attention.v": sums["v"],
             "decoder.attention.b": d_query_layer["bias"],
             **prefixed("decoder.cell", d_cell), **prefixed("generator", d_gen)}
    return d_y, sums["memory"] + d_mem_keys, d_s, d_m, grads


def _accumulate(total: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
    """total[k] += grads[k] (in place: the first of each is a fresh array a backward made)."""
    for k, g in grads.items():
        if k in total:
            total[k] += g
        else:
            total[k] = g


# --------------------------------------------------------------------------------------------
# the encoder-decoder


@documented
class Seq2SeqCache(NamedTuple):
    """What `seq2seq_backward` needs."""

    backend: ModuleType  # the module every op ran on
    decoder: str  # "luong" or "bahdanau"
    encoder: EncoderCache  # the encoder's caches
    tgt_embed: Any  # tgt_embed cache
    decoder_cache: LuongCache | BahdanauCache  # the decoder's caches
    keys: tuple[str, ...]  # the params' keys, in order


def seq2seq_forward(
    src: np.ndarray,
    tgt: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    decoder: str = "luong",
    score: str | None = None,
    src_lengths: Any = None,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, np.ndarray, Seq2SeqCache]:
    """The encoder-decoder with attention, teacher-forced.

    ``memory, h_n = BiLSTM(src_embed(src))``; the decoder starts from the final states; Luong:
    ``s = LSTM(tgt_embed(tgt))``, ``c = attention(s, memory)``,
    ``logits = generator(tanh(concat([c; s])))``; Bahdanau: per step additive attention on the
    previous state, ``LSTMCell([y_t; c_t])``, ``generator([s_t; c_t; y_t])``. All of it:
    the `numpy_ref.models` module docstring.

    Parameters
    ----------
    src : integer source ids [B, Ts] (past src_lengths: anything).
    tgt : integer target ids [B, Tt], the decoder's inputs (bos first); the loss compares
        the logits at step t with the token that follows tgt_t.
    params : `torch_impl.Seq2SeqAttention`'s state_dict (see `init_seq2seq_params`).
    decoder : "luong" or "bahdanau".
    score : the attention score; None is "general" for luong and "additive" for bahdanau
        (its only score).
    src_lengths : integer [B] in 1..Ts, or None.
    backend : the op module (`numpy_ref` or `kernels`; None: `numpy_ref`).

    Returns
    -------
    logits [B, Tt, Vt], attention [B, Tt, Ts] (0 past each source length), cache.
    """
    backend = op_module(backend)
    real_src, tgt, src_lengths, score, p, sizes = contract.seq2seq(src, tgt, params, decoder,
                                                                   score, src_lengths)
    memory, s0, m0, enc_cache = _encode(backend, real_src, src_lengths, p, sizes.L)
    y, tgt_cache = backend.embedding_forward(tgt, group(p, "tgt_embed"))  # [B, Tt, E]
    if decoder == "luong":
        logits, attention, dec_cache = _luong_forward(backend, y, memory, s0, m0, src_lengths,
                                                      score, p)
    else:
        logits, attention, dec_cache = _bahdanau_forward(backend, y, memory, s0, m0,
                                                         src_lengths, p)
    cache = Seq2SeqCache(backend, decoder, enc_cache, tgt_cache, dec_cache, tuple(p))
    return logits, attention, cache


def seq2seq_backward(
    d_logits: np.ndarray, cache: Seq2SeqCache, *, d_attention: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Backward of `seq2seq_forward`: d_logits [B, Tt, Vt] (and optionally d_attention
    [B, Tt, Ts]) -> d_params, the keys of params in their order.

    The decoder's backward (Bahdanau: its steps in reverse, the state's two paths added),
    then the encoder's, with ``d_memory = d_keys + d_values`` summed over the steps. See
    the `numpy_ref.models` module docstring."""
    backend, decoder, enc_cache, tgt_cache, dec_cache, keys = checks.cache_of(
        cache, Seq2SeqCache, "seq2seq_forward")
    backward = _luong_backward if decoder == "luong" else _bahdanau_backward
    d_y, d_memory, d_s0, d_m0, grads = backward(backend, d_logits, d_attention, dec_cache)
    grads.update(prefixed("tgt_embed", backend.embedding_backward(d_y, tgt_cache)))
    grads.update(_encode_backward(backend, d_memory, d_s0, d_m0, enc_cache))
    return {k: grads[k] for k in keys}


# --------------------------------------------------------------------------------------------
# decoding, one token at a time


@documented
class _Decoder(NamedTuple):
    """What every decoding step reads: the encoder's output and the decoder's params."""

    backend: ModuleType  # the op module
    decoder: str  # "luong" or "bahdanau"
    score: str  # the attention score
    memory: np.ndarray  # [N, Ts, 2H]
    lengths: np.ndarray | None  # [N]
    K: np.ndarray | None  # bahdanau: memory W_key^T [N, Ts, A]
    p: dict[str, np.ndarray]  # the checked params

    def repeat(self, k: int) -> _Decoder:
        """Each row k times (row b's copies at b*k .. b*k + k-1), for k beams."""
        def rep(a):
            return None if a is None else np.repeat(a, k, axis=0)

        return self._replace(memory=rep(self.memory), lengths=rep(self.lengths), K=rep(self.K))


def _start(src, params, src_lengths, decoder, score, backend):
    """Encode src; return (the `_Decoder`, s_0, m_0, sizes)."""
    backend = op_module(backend)
    score = contract.seq2seq_config(decoder, score)
    p, sizes = contract.seq2seq_params(params, decoder, score)
    real_src, src_lengths = contract.source(src, src_lengths, sizes.Vs)
    memory, s0, m0, _ = _encode(backend, real_src, src_lengths, p, sizes.L)
    K = None
    if decoder == "bahdanau":
        K, _ = backend.linear_forward(memory, {"weight": p["decoder.attention.W_key"]})
    return _Decoder(backend, decoder, score, memory, src_lengths, K, p), s0, m0, sizes


def _step(dec: _Decoder, tokens: np.ndarray, s: np.ndarray, m: np.ndarray):
    """One decoder step for tokens [N]: -> (log-probabilities [N, Vt], s, m)."""
    bk, p = dec.backend, dec.p
    y, _ = bk.embedding_forward(tokens, group(p, "tgt_embed"))  # [N, E]
    if dec.decoder == "luong":
        s, m, _ = bk.lstm_cell_forward(y, s, m, as_cell(group(p, "decoder.lstm")))
        c, _, _ = bk.attention_forward(s, dec.memory, dec.memory, score=dec.score,
                                       params=group(p, "decoder.attention") or None,
                                       lengths=dec.lengths)
        z, _ = bk.linear_forward(np.concatenate([c, s], axis=1), group(p, "decoder.concat"))
        logits, _ = bk.linear_forward(np.tanh(z), group(p, "generator"))
    else:
        att = group(p, "decoder.attention")
        qa, _ = bk.linear_forward(s, {"weight": att["W_query"], "bias": att["b"]})
        e, _ = bk.additive_scores_forward(qa, dec.K, att["v"])
        w, _ = bk.masked_softmax_forward(e, dec.lengths)
        c, _ = bk.weighted_sum_forward(w, dec.memory)
        s, m, _ = bk.lstm_cell_forward(np.concatenate([y, c], axis=1), s, m,
                                       group(p, "decoder.cell"))
        logits, _ = bk.linear_forward(np.concatenate([s, c, y], axis=1), group(p, "generator"))
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True)), s, m  # log softmax


def greedy_decode(
    src: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    max_len: int,
    bos: int,
    eos: int,
    src_lengths: Any = None,
    decoder: str = "luong",
    score: str | None = None,
    backend: ModuleType | None = None,
) -> np.ndarray:
    """Greedy decoding: start from bos, feed each step's most likely token back.

    ``y_{t+1} = argmax_v logits_t[v]`` with the decoder's state carried step to step (the
    `numpy_ref.models` module docstring).

    Returns tokens [B, L], L <= max_len (bos not included): each row up to and including its
    eos, then eos again until the longest row ends; a row without eos has max_len tokens.
    Ties go to the lowest token id.
    """
    dec, s, m, sizes = _start(src, params, src_lengths, decoder, score, backend)
    contract.decoding(max_len, bos, eos, sizes.Vt)
    B = dec.memory.shape[0]
    tokens = np.full(B, bos, np.int64)
    done = np.zeros(B, bool)
    out = []
    for _ in range(max_len):
        log_p, s, m = _step(dec, tokens, s, m)
        tokens = np.where(done, eos, log_p.argmax(axis=1))
        out.append(tokens)
        done |= tokens == eos
        if done.all():
            break
    return np.stack(out, axis=1)


def beam_search(
    src: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    beam_size: int,
    max_len: int,
    bos: int,
    eos: int,
    src_lengths: Any = None,
    length_penalty: float = 1.0,
    decoder: str = "luong",
    score: str | None = None,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Beam search over all rows and beams at once: keep the k best hypotheses by
    ``sum log p / len ** length_penalty`` (the `numpy_ref.models` module docstring).

    A hypothesis ends at eos or at max_len tokens; its score is the sum of its tokens'
    log-probabilities (eos included) over ``len ** length_penalty`` (len counts its tokens,
    eos included; length_penalty 0: the plain log-probability). Each step the k = beam_size
    best candidates by that score survive: every extension of a live hypothesis, and every
    finished hypothesis unchanged. Equal scores keep the earlier candidate (beam order, then
    token id). At the first step only one hypothesis exists, so no two beams start the same.

    Returns
    -------
    tokens [B, L] : each row's best hypothesis (bos not included), padded with eos after its
        eos up to the longest; L <= max_len.
    scores [B] : their scores, in the params' dtype.
    """
    dec, s, m, sizes = _start(src, params, src_lengths, decoder, score, backend)
    contract.decoding(max_len, bos, eos, sizes.Vt, beam_size, length_penalty)
    B, k, V = dec.memory.shape[0], int(beam_size), sizes.Vt
    dec = dec.repeat(k)
    s, m = np.repeat(s, k, axis=0), np.repeat(m, k, axis=0)  # [B*k, 2H]
    dtype = s.dtype
    total = np.full((B, k), -np.inf, dtype)  # sum of log-probabilities; -inf: no hypothesis
    total[:, 0] = 0
    length = np.zeros((B, k), np.int64)
    done = np.zeros((B, k), bool)
    seqs = np.zeros((B, k, 0), np.int64)
    tokens = np.full(B * k, bos, np.int64)
    for step in range(1, max_len + 1):
        log_p, s, m = _step(dec, tokens, s, m)
        extended = total[..., None] + log_p.reshape(B, k, V)  # [B, k, V]
        extended[done] = -np.inf  # a finished hypothesis is not extended...
        kept = np.where(done, total, -np.inf)  # ... but carried as it is
        with np.errstate(divide="ignore", invalid="ignore"):
            ranked = np.concatenate([extended.reshape(B, k * V) / dtype.type(step)**length_penalty,
                                     kept / np.maximum(length, 1).astype(dtype)**length_penalty],
                                    axis=1)  # [B, k*V + k]
        best = np.argsort(-ranked, axis=1, kind="stable")[:, :k]  # [B, k]
        carried = best >= k * V
        beam = np.where(carried, best - k * V, best // V)
        token = np.where(carried, eos, best % V)
        rows = np.arange(B)[:, None]
        total = np.where(carried, total[rows, beam], extended.reshape(B, k * V)[
            rows, np.minimum(best, k * V - 1)])
        alive = np.isfinite(ranked[rows, best])
        total = np.where(alive, total, -np.inf)
        length = np.where(carried, length[rows, beam], step)
        done = np.where(carried, True, token == eos) & alive
        seqs = np.concatenate([seqs[rows, beam], token[..., None]], axis=2)
        flat = (rows * k + beam).reshape(-1)
        s, m, tokens = s[flat], m[flat], token.reshape(-1)
        if (done | ~alive).all():
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        final = np.where(np.isfinite(total), total / np.maximum(length, 1).astype(dtype)
                         ** length_penalty, -np.inf)
    pick = final.argmax(axis=1)
    rows = np.arange(B)
    best_len = length[rows, pick]
    out = seqs[rows, pick]  # [B, steps]
    L = int(best_len.max())
    out = np.where(np.arange(out.shape[1])[None, :] < best_len[:, None], out, eos)[:, :L]
    return out, final[rows, pick].astype(dtype)
