"""Parameter initialisation of the models, with torch's distributions (the parameters' roles:
the `numpy_ref.models` package docstring).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from numpy_ref.contract import models as contract
from numpy_ref.contract.models import as_cell, prefixed
from numpy_ref.gru import init_gru_params
from numpy_ref.lstm import init_lstm_params


def _init_rnn(cell: str, *args, **kw) -> dict[str, np.ndarray]:
    """init_lstm_params or init_gru_params (torch's U(+-1/sqrt(H)) either way)."""
    return (init_lstm_params if contract.cell_of(cell) == "lstm" else init_gru_params)(*args,
                                                                                       **kw)

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
    cell: str = "lstm", rng: np.random.Generator | int | None = None, dtype: Any = np.float64,
) -> dict[str, np.ndarray]:
    """Random classifier parameters (``embedding.weight`` [V, E], the LSTM's ``lstm.*`` (with
    ``cell="gru"`` the GRU's ``gru.*``), ``out.weight`` [C, 2H], ``out.bias`` [C]),
    keyed as `torch_impl.BiLSTMAttention`'s state_dict and
    drawn from torch's initial distributions (embedding ~ N(0, 1); LSTM ~ U(+-1/sqrt(H));
    linear ~ U(+-1/sqrt(fan_in))). Not torch's random numbers: convert a torch module for those.
    The parameters' roles: the `numpy_ref.models` module docstring."""
    rng = np.random.default_rng(rng)
    rnn = _init_rnn(cell, embedding_dim, n_hidden, bidirectional=True, rng=rng, dtype=dtype)
    return {"embedding.weight": rng.standard_normal((vocab_size, embedding_dim)).astype(dtype),
            **prefixed(cell, rnn),
            **prefixed("out", _linear_params(rng, num_classes, 2 * n_hidden, dtype))}


def init_seq2seq_params(
    src_vocab: int, tgt_vocab: int, embedding_dim: int, hidden_size: int, *,
    decoder: str = "luong", score: str | None = None, num_layers: int = 1, cell: str = "lstm",
    rng: np.random.Generator | int | None = None, dtype: Any = np.float64,
) -> dict[str, np.ndarray]:
    """Random encoder-decoder parameters, keyed as `torch_impl.Seq2SeqAttention`'s state_dict
    (same order), from torch's initial distributions (each entry ~ N(0, 1) in the embeddings,
    U(+-1/sqrt(fan_in)) elsewhere; see `init_bilstm_attention_params`). ``cell="gru"``: GRUs
    in place of the LSTMs (``decoder.gru.*`` for the Luong decoder's layer).
    The parameters' roles: the `numpy_ref.models` module docstring."""
    score = contract.seq2seq_config(decoder, score)
    rng = np.random.default_rng(rng)
    E, H2 = embedding_dim, 2 * hidden_size
    p = {"src_embed.weight": rng.standard_normal((src_vocab, E)).astype(dtype),
         **prefixed("encoder", _init_rnn(
             cell, E, hidden_size, num_layers=num_layers, bidirectional=True, rng=rng,
             dtype=dtype)),
         "tgt_embed.weight": rng.standard_normal((tgt_vocab, E)).astype(dtype)}
    attention = prefixed("decoder.attention", _attention_params(rng, score, H2, dtype))
    if decoder == "luong":
        p.update(prefixed(f"decoder.{cell}", _init_rnn(cell, E, H2, rng=rng, dtype=dtype)))
        p.update(attention)
        p["decoder.concat.weight"] = _linear_params(rng, H2, 2 * H2, dtype, bias=False)["weight"]
        p.update(prefixed("generator", _linear_params(rng, tgt_vocab, H2, dtype)))
    else:
        p.update(attention)
        p.update(prefixed("decoder.cell", as_cell(_init_rnn(cell, E + H2, H2, rng=rng,
                                                            dtype=dtype))))
        p.update(prefixed("generator", _linear_params(rng, tgt_vocab, 2 * H2 + E, dtype)))
    return p
