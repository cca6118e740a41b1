"""The encoder-decoder with Luong or Bahdanau attention, forward and backward with teacher
forcing (the equations: the `numpy_ref.models` package docstring).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks, unchanged
from numpy_ref.contract import models as contract
from numpy_ref.contract.backend import op_module
from numpy_ref.contract.fields import documented
from numpy_ref.contract.models import group, prefixed
from numpy_ref.models import cells

# --------------------------------------------------------------------------------------------
# the encoder-decoder: the encoder


@documented
class EncoderCache(NamedTuple):
    """The encoder's caches."""

    embedding: Any  # src_embed cache
    lstm: Any  # encoder cache, LSTM or GRU (memory [B, Ts, 2H], batch-first)
    num_layers: int  # L
    cell: str  # "lstm" or "gru"


def _final(n: np.ndarray | None) -> np.ndarray | None:
    """The last layer's two directions of a final state [2L, B, H], side by side [B, 2H]."""
    return None if n is None else np.concatenate([n[-2], n[-1]], axis=1)


def _encode(backend, real_src, src_lengths, p, L, cell="lstm"):
    """src -> (memory [B, Ts, 2H], s_0 [B, 2H], m_0 [B, 2H] (None with a GRU),
    EncoderCache)."""
    x, emb_cache = backend.embedding_forward(real_src, group(p, "src_embed"))  # [B, Ts, E]
    memory, h_n, c_n, rnn_cache = cells.layers_forward(
        backend, cell, x, group(p, "encoder"), num_layers=L, bidirectional=True,
        batch_first=True, lengths=src_lengths)
    return memory, _final(h_n), _final(c_n), EncoderCache(emb_cache, rnn_cache, L, cell)


def _encode_backward(backend, d_memory, d_s0, d_m0, cache: EncoderCache):
    """(d_memory, d_s0, d_m0 (None with a GRU)) -> the gradients of src_embed.* and
    encoder.*."""
    B, H2 = d_s0.shape
    H, L = H2 // 2, cache.num_layers

    def final(d):  # s_0 = concat(h_n[-2], h_n[-1]), and m_0 likewise
        if d is None:
            return None
        full = np.zeros((2 * L, B, H), d_s0.dtype)
        full[-2], full[-1] = d[:, :H], d[:, H:]
        return full
    d_x, d_rnn, _, _ = cells.layers_backward(backend, cache.cell, d_memory, cache.lstm,
                                             d_h_n=final(d_s0), d_c_n=final(d_m0))
    d_emb = backend.embedding_backward(d_x, cache.embedding)
    return {**prefixed("src_embed", d_emb), **prefixed("encoder", d_rnn)}


# --------------------------------------------------------------------------------------------
# the decoders, with teacher forcing


@documented
class LuongCache(NamedTuple):
    """The Luong decoder's caches."""

    lstm: Any  # decoder.lstm (decoder.gru) cache (s [B, Tt, 2H])
    attention: Any  # attention cache (queries s, keys = values = memory)
    concat: Any  # decoder.concat cache (input [c; s] [B, Tt, 4H])
    attentional: np.ndarray  # h~ = tanh(concat([c; s])) [B, Tt, 2H]; read
    generator: Any  # generator cache
    cell: str  # "lstm" or "gru"


def _luong_output(backend, s, memory, src_lengths, score, p):
    """The Luong decoder after its LSTM, for states s [B, 2H] (one step) or [B, Tt, 2H]:
    ``c = attention(s, memory)``, ``h~ = tanh(concat([c; s]))``, ``logits = generator(h~)``.

    -> (logits [B, (Tt,) Vt], attention [B, (Tt,) Ts], (att_cache, concat_cache, h~, gen_cache)).
    """
    context, attention, att_cache = backend.attention_forward(
        s, memory, memory, score=score, params=group(p, "decoder.attention") or None,
        lengths=src_lengths)  # [B, (Tt,) 2H], [B, (Tt,) Ts]
    z, concat_cache = backend.linear_forward(np.concatenate([context, s], axis=-1),
                                             group(p, "decoder.concat"))
    h_att = np.tanh(z)  # [B, (Tt,) 2H]
    logits, gen_cache = backend.linear_forward(h_att, group(p, "generator"))
    return logits, attention, (att_cache, concat_cache, h_att, gen_cache)


def _luong_forward(backend, y, memory, s0, m0, src_lengths, score, p, cell="lstm"):
    """y [B, Tt, E] -> (logits [B, Tt, Vt], attention [B, Tt, Ts], LuongCache)."""
    s, _, _, rnn_cache = cells.layers_forward(
        backend, cell, y, group(p, f"decoder.{cell}"), batch_first=True,
        state=(s0[None], None if m0 is None else m0[None]))  # [B, Tt, 2H]
    logits, attention, caches = _luong_output(backend, s, memory, src_lengths, score, p)
    return logits, attention, LuongCache(rnn_cache, *caches, cell)


def _luong_backward(backend, d_logits, d_attention, cache: LuongCache):
    """-> (d_y [B, Tt, E], d_memory [B, Ts, 2H], d_s0, d_m0, the decoder's gradients)."""
    d_h_att, d_gen = backend.linear_backward(d_logits, cache.generator)  # logits = gen(h~)
    d_z = d_h_att * (1 - cache.attentional**2)  # h~ = tanh(z)
    d_cat, d_concat = backend.linear_backward(d_z, cache.concat)  # z = concat_layer([c; s])
    H2 = d_cat.shape[-1] // 2
    d_context, d_s = d_cat[..., :H2], d_cat[..., H2:]
    d_s_att, d_keys, d_values, d_att = backend.attention_backward(  # c = attention(s, mem, mem)
        d_context, cache.attention, d_weights=d_attention)
    d_y, d_rnn, d_h0, d_c0 = cells.layers_backward(backend, cache.cell, d_s + d_s_att,
                                                   cache.lstm)  # s = LSTM(y)
    grads = {**prefixed(f"decoder.{cache.cell}", d_rnn), **prefixed("decoder.attention", d_att),
             **prefixed("decoder.concat", d_concat), **prefixed("generator", d_gen)}
    return d_y, d_keys + d_values, d_h0[0], None if d_c0 is None else d_c0[0], grads


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
    cell: str  # "lstm" or "gru"


def _bahdanau_layers(p):
    """(the query layer {weight: W_query, bias: b}, the cell's params) of the checked params."""
    att = group(p, "decoder.attention")
    return {"weight": att["W_query"], "bias": att["b"]}, group(p, "decoder.cell")


def _bahdanau_step(backend, y_t, s, m, K, memory, src_lengths, query_layer, v, cell,
                   kind="lstm"):
    """One Bahdanau step from s_{t-1}, m_{t-1}: ``qa = W_query s_{t-1} + b``,
    ``e = v . tanh(qa + K)``, ``w = softmax(e)``, ``c = w memory``,
    ``s_t, m_t = cell([y_t; c], s_{t-1}, m_{t-1})`` (an LSTM cell; `kind` "gru": a GRU cell,
    m None).

    y_t [B, E], s and m [B, 2H], K [B, Ts, A] -> (s_t, m_t, c [B, 2H], w [B, Ts],
    BahdanauStepCache).
    """
    qa, q_cache = backend.linear_forward(s, query_layer)  # [B, A]
    e, e_cache = backend.additive_scores_forward(qa, K, v)  # [B, Ts]
    w, sm_cache = backend.masked_softmax_forward(e, src_lengths)
    c, c_cache = backend.weighted_sum_forward(w, memory)  # [B, 2H]
    s, m, cell_cache = cells.step_forward(backend, kind, np.concatenate([y_t, c], axis=1), s, m,
                                          cell)
    return s, m, c, w, BahdanauStepCache(q_cache, e_cache, sm_cache, c_cache, cell_cache)


def _bahdanau_forward(backend, y, memory, s0, m0, src_lengths, p, kind="lstm"):
    """y [B, Tt, E] -> (logits [B, Tt, Vt], attention [B, Tt, Ts], BahdanauCache)."""
    Tt = y.shape[1]
    att = group(p, "decoder.attention")
    K, keys_cache = backend.linear_forward(memory, {"weight": att["W_key"]})  # [B, Ts, A]
    query_layer, cell = _bahdanau_layers(p)
    s, m = s0, m0
    states, contexts, weights, steps = [], [], [], []
    for t in range(Tt):
        s, m, c, w, step = _bahdanau_step(backend, y[:, t], s, m, K, memory, src_lengths,
                                          query_layer, att["v"], cell, kind)
        states.append(s)
        contexts.append(c)
        weights.append(w)
        steps.append(step)
    gen_in = np.concatenate([np.stack(states, 1), np.stack(contexts, 1), y], axis=-1)
    logits, gen_cache = backend.linear_forward(gen_in, group(p, "generator"))
    return logits, np.stack(weights, 1), BahdanauCache(keys_cache, tuple(steps), gen_cache,
                                                      s0.shape[1], kind)


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
    d_m = np.zeros_like(d_s) if cache.cell == "lstm" else None  # dL/dm_t (LSTM)
    for t in range(len(cache.steps) - 1, -1, -1):
        step = cache.steps[t]
        # s_t, m_t = cell([y_t; c_t], s_{t-1}, m_{t-1})
        d_x, d_s, d_m, g_cell = cells.step_backward(backend, cache.cell, d_states[:, t] + d_s,
                                                    d_m, step.cell)
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
    arguments: tuple[tuple[str, np.ndarray, bool], ...]  # the caller's src, tgt and params
    #   and the returned attention by name: an array the ops' checks find changed since the
    #   forward is named so (`numpy_ref.contract.unchanged`)


@unchanged.memoized()  # the ops' fingerprints: each array once (the decoder's, once per step)
def seq2seq_forward(
    src: np.ndarray,
    tgt: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    decoder: str = "luong",
    score: str | None = None,
    src_lengths: Any = None,
    cell: str = "lstm",
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
    cell : "lstm" or "gru": the encoder, the Luong decoder's layer (``decoder.gru.*``) and the
        Bahdanau decoder's cell are GRUs; the decoder starts from the encoder's concatenated
        final h (a GRU has no c).
    backend : the op module (`numpy_ref` or `kernels`; None: `numpy_ref`).

    Returns
    -------
    logits [B, Tt, Vt], attention [B, Tt, Ts] (0 past each source length), cache.
    """
    backend = op_module(backend)
    real_src, tgt, src_lengths, score, p, sizes = contract.seq2seq(src, tgt, params, decoder,
                                                                   score, src_lengths, cell)
    memory, s0, m0, enc_cache = _encode(backend, real_src, src_lengths, p, sizes.L, cell)
    y, tgt_cache = backend.embedding_forward(tgt, group(p, "tgt_embed"))  # [B, Tt, E]
    if decoder == "luong":
        logits, attention, dec_cache = _luong_forward(backend, y, memory, s0, m0, src_lengths,
                                                      score, p, cell)
    else:
        logits, attention, dec_cache = _bahdanau_forward(backend, y, memory, s0, m0,
                                                         src_lengths, p, cell)
    named = unchanged.names({"src": src, "tgt": tgt, "params": params},
                            {"attention": attention})
    cache = Seq2SeqCache(backend, decoder, enc_cache, tgt_cache, dec_cache, tuple(p), named)
    return logits, attention, cache


def seq2seq_backward(
    d_logits: np.ndarray, cache: Seq2SeqCache, *, d_attention: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Backward of `seq2seq_forward`: d_logits [B, Tt, Vt] (and optionally d_attention
    [B, Tt, Ts]) -> d_params, the keys of params in their order.

    The decoder's backward (Bahdanau: its steps in reverse, the state's two paths added),
    then the encoder's, with ``d_memory = d_keys + d_values`` summed over the steps. See
    the `numpy_ref.models` module docstring."""
    backend, decoder, enc_cache, tgt_cache, dec_cache, keys, named = checks.cache_of(
        cache, Seq2SeqCache, "seq2seq_forward")
    backward = _luong_backward if decoder == "luong" else _bahdanau_backward
    # an input or output changed since the forward: each op's backward checks the arrays it
    # references first; the error names them as the caller passed them
    with unchanged.reported_as("seq2seq_forward", "seq2seq_backward", named), \
            unchanged.memoized():
        d_y, d_memory, d_s0, d_m0, grads = backward(backend, d_logits, d_attention, dec_cache)
        grads.update(prefixed("tgt_embed", backend.embedding_backward(d_y, tgt_cache)))
        grads.update(_encode_backward(backend, d_memory, d_s0, d_m0, enc_cache))
    return {k: grads[k] for k in keys}
