"""The seed's BiLSTM-attention classifier, forward and backward (the equations and the seed's
bug: the `numpy_ref.models` package docstring).
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
# the seed classifier


@documented
class BiLSTMAttentionCache(NamedTuple):
    """What `bilstm_attention_backward` needs: each op's own cache, and the backend."""

    backend: ModuleType  # the module every op ran on
    embedding: Any  # embedding cache
    lstm: Any  # the recurrent layer's cache, LSTM or GRU (output [B, T, 2H], batch-first)
    attention: Any  # attention cache (query [B, 2H], keys = values = the LSTM output)
    out: Any  # linear cache
    seed_compatible: bool  # whether the query was the seed's view of h_n
    cell: str  # "lstm" or "gru"
    keys: tuple[str, ...]  # the params' keys, in order: d_params comes back in it
    arguments: tuple[tuple[str, np.ndarray, bool], ...]  # the caller's ids and params and the
    #   returned attention by name: an array the ops' checks find changed since the forward
    #   is named so (`numpy_ref.contract.unchanged`)


@unchanged.memoized()  # the ops' fingerprints: each array once
def bilstm_attention_forward(
    ids: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    lengths: Any = None,
    seed_compatible: bool = False,
    cell: str = "lstm",
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
        ``lstm.*`` (one bidirectional layer, hidden H; ``gru.*`` with ``cell="gru"``),
        ``out.weight`` [C, 2H], ``out.bias``.
    lengths : integer [B] in 1..T, or None. Packed LSTM, masked attention; ids past a
        sentence's length may be anything.
    seed_compatible : take the query as the seed does, ``h_n.view(-1, 2H)``, which mixes
        sentences when B > 1 (see the module docstring); the default is each sentence's own
        ``concat(h_n[-2], h_n[-1])``.
    cell : "lstm" (the seed's) or "gru": the bidirectional layer is an nn.GRU, its h_n the
        query's source (a GRU has no c).
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
    real, lengths, p, sizes = contract.bilstm_attention(ids, params, lengths, seed_compatible,
                                                        cell)
    B, H = real.shape[0], sizes.H
    x, emb_cache = backend.embedding_forward(real, group(p, "embedding"))  # [B, T, E]
    output, h_n, _, lstm_cache = cells.layers_forward(
        backend, cell, x, group(p, cell), bidirectional=True, batch_first=True, lengths=lengths)
    if seed_compatible:  # the seed's final_state.view(-1, n_hidden * 2, 1): h_n [2, B, H]
        query = h_n.reshape(B, 2 * H)  # read in C order, as torch's view of its memory
    else:
        query = np.concatenate([h_n[-2], h_n[-1]], axis=1)  # [B, 2H]
    context, attention, att_cache = backend.attention_forward(query, output, output,
                                                              score="dot", lengths=lengths)
    logits, out_cache = backend.linear_forward(context, group(p, "out"))  # [B, C]
    named = unchanged.names({"ids": ids, "params": params}, {"attention": attention})
    cache = BiLSTMAttentionCache(backend, emb_cache, lstm_cache, att_cache, out_cache,
                                 seed_compatible, cell, tuple(p), named)
    return logits, attention, cache


def bilstm_attention_backward(
    d_logits: np.ndarray, cache: BiLSTMAttentionCache, *, d_attention: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Backward of `bilstm_attention_forward`: d_logits [B, C] (and optionally d_attention
    [B, T]) -> d_params, the keys of params in their order.

    Each op's backward in reverse order; the LSTM output gets both attention gradients
    (``d_out = d_keys + d_values``) and ``d_h_n`` gets the query's. See
    the `numpy_ref.models` module docstring."""
    backend, emb_cache, lstm_cache, att_cache, out_cache, seed_compatible, cell, keys, named \
        = checks.cache_of(cache, BiLSTMAttentionCache, "bilstm_attention_forward")
    # an input or output changed since the forward: each op's backward checks the arrays it
    # references first; the error names them as the caller passed them
    with unchanged.reported_as("bilstm_attention_forward", "bilstm_attention_backward", named), \
            unchanged.memoized():
        return _backward(backend, emb_cache, lstm_cache, att_cache, out_cache, seed_compatible,
                         cell, keys, d_logits, d_attention)


def _backward(backend, emb_cache, lstm_cache, att_cache, out_cache, seed_compatible, cell, keys,
              d_logits, d_attention):
    """`bilstm_attention_backward` on the cache's fields: each op's backward in reverse."""
    d_context, d_out = backend.linear_backward(d_logits, out_cache)  # logits = out(context)
    # context, attention = attention(query, output, output)
    d_query, d_keys, d_values, _ = backend.attention_backward(d_context, att_cache,
                                                              d_weights=d_attention)
    B, H = d_query.shape[0], d_query.shape[1] // 2
    if seed_compatible:  # query = h_n.reshape(B, 2H)
        d_h_n = d_query.reshape(2, B, H)
    else:  # query = concat(h_n[-2], h_n[-1])
        d_h_n = np.stack([d_query[:, :H], d_query[:, H:]])
    d_x, d_rnn, _, _ = cells.layers_backward(backend, cell, d_keys + d_values, lstm_cache,
                                             d_h_n=d_h_n)
    d_emb = backend.embedding_backward(d_x, emb_cache)  # x = embedding(ids)
    grads = {**prefixed("embedding", d_emb), **prefixed(cell, d_rnn),
             **prefixed("out", d_out)}
    return {k: grads[k] for k in keys}
