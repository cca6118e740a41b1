"""Decoding, one token at a time: greedy decoding and beam search, both on one decoder step
that runs the teacher-forced decoder's own equations (`numpy_ref.models.seq2seq`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import models as contract
from numpy_ref.contract import unchanged
from numpy_ref.contract.backend import op_module
from numpy_ref.contract.fields import documented
from numpy_ref.contract.models import as_cell, group
from numpy_ref.models import cells
from numpy_ref.models.seq2seq import _bahdanau_layers, _bahdanau_step, _encode, _luong_output

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
    cell: str  # "lstm" or "gru"

    def repeat(self, k: int) -> _Decoder:
        """Each row k times (row b's copies at b*k .. b*k + k-1), for k beams."""
        def rep(a):
            return None if a is None else np.repeat(a, k, axis=0)

        return self._replace(memory=rep(self.memory), lengths=rep(self.lengths), K=rep(self.K))


@unchanged.untracked()  # no backward follows: the ops record no fingerprints
def _start(src, params, src_lengths, decoder, score, backend, cell):
    """Encode src; return (the `_Decoder`, s_0, m_0 (None with a GRU), sizes)."""
    backend = op_module(backend)
    score = contract.seq2seq_config(decoder, score)
    p, sizes = contract.seq2seq_params(params, decoder, score, cell)
    real_src, src_lengths = contract.source(src, src_lengths, sizes.Vs)
    memory, s0, m0, _ = _encode(backend, real_src, src_lengths, p, sizes.L, cell)
    K = None
    if decoder == "bahdanau":
        K, _ = backend.linear_forward(memory, {"weight": p["decoder.attention.W_key"]})
    return _Decoder(backend, decoder, score, memory, src_lengths, K, p, cell), s0, m0, sizes


@unchanged.untracked()  # no backward follows: the ops record no fingerprints
def _step(dec: _Decoder, tokens: np.ndarray, s: np.ndarray, m: np.ndarray | None):
    """One decoder step for tokens [N]: -> (log-probabilities [N, Vt], s, m (None with a
    GRU))."""
    bk, p = dec.backend, dec.p
    y, _ = bk.embedding_forward(tokens, group(p, "tgt_embed"))  # [N, E]
    if dec.decoder == "luong":  # the teacher-forced decoder's equations, one step at a time
        s, m, _ = cells.step_forward(bk, dec.cell, y, s, m,
                                     as_cell(group(p, f"decoder.{dec.cell}")))
        logits, _, _ = _luong_output(bk, s, dec.memory, dec.lengths, dec.score, p)
    else:
        query_layer, cell = _bahdanau_layers(p)
        s, m, c, _, _ = _bahdanau_step(bk, y, s, m, dec.K, dec.memory, dec.lengths, query_layer,
                                       p["decoder.attention.v"], cell, dec.cell)
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
    cell: str = "lstm",
    backend: ModuleType | None = None,
) -> np.ndarray:
    """Greedy decoding: start from bos, feed each step's most likely token back.

    ``y_{t+1} = argmax_v logits_t[v]`` with the decoder's state carried step to step (the
    `numpy_ref.models` module docstring).

    Returns tokens [B, T_out], T_out <= max_len (bos not included): each row up to and
    including its eos, then eos again until the longest row ends; a row without eos has max_len
    tokens. Ties go to the lowest token id. ``cell``: the seq2seq's, "lstm" or "gru".
    """
    dec, s, m, sizes = _start(src, params, src_lengths, decoder, score, backend, cell)
    contract.decoding(max_len, bos, eos, sizes.Vt)
    return greedy(lambda tokens, state: _rnn_step(dec, tokens, state), (s, m),
                  dec.memory.shape[0], max_len, bos, eos)


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
    cell: str = "lstm",
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
    tokens [B, T_out] : each row's best hypothesis (bos not included), padded with eos after its
        eos up to the longest; T_out <= max_len.
    scores [B] : their scores, in the params' dtype.
    """
    dec, s, m, sizes = _start(src, params, src_lengths, decoder, score, backend, cell)
    contract.decoding(max_len, bos, eos, sizes.Vt, beam_size, length_penalty)
    k = int(beam_size)
    beams = dec.repeat(k)  # each row's memory once per beam
    return beam(lambda tokens, state: _rnn_step(beams, tokens, state), (s, m),
                dec.memory.shape[0], k, sizes.Vt, max_len, bos, eos, length_penalty, s.dtype)


def _rnn_step(dec: _Decoder, tokens: np.ndarray, state: tuple) -> tuple[np.ndarray, tuple]:
    """`_step` on a state (s, m) -> (log-probabilities, the new state)."""
    log_p, s, m = _step(dec, tokens, *state)
    return log_p, (s, m)


# --------------------------------------------------------------------------------------------
# the search, for any decoder: step(tokens [N], state) -> (log-probabilities [N, V], state),
# a state being a tuple of arrays (or None) whose first axis is the N rows


def _rows(state: tuple, index: np.ndarray) -> tuple:
    return tuple(None if a is None else a[index] for a in state)


def greedy(step: Any, state: tuple, B: int, max_len: int, bos: int, eos: int) -> np.ndarray:
    """Greedy decoding of B rows with `step` (see `greedy_decode`): -> tokens [B, T_out]."""
    tokens = np.full(B, bos, np.int64)
    done = np.zeros(B, bool)
    out = []
    for _ in range(max_len):
        log_p, state = step(tokens, state)
        tokens = np.where(done, eos, log_p.argmax(axis=1))
        out.append(tokens)
        done |= tokens == eos
        if done.all():
            break
    return np.stack(out, axis=1)


def beam(step: Any, state: tuple, B: int, k: int, V: int, max_len: int, bos: int, eos: int,
         length_penalty: float, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Beam search of B rows, k beams each, with `step` (see `beam_search`) on B*k rows (row
    b's beams at b*k .. b*k + k-1; the state is repeated so here) -> (tokens [B, T_out],
    scores [B])."""
    state = tuple(None if a is None else np.repeat(a, k, axis=0) for a in state)  # [B*k, ...]
    dtype = np.dtype(dtype)
    total = np.full((B, k), -np.inf, dtype)  # sum of log-probabilities; -inf: no hypothesis
    total[:, 0] = 0
    length = np.zeros((B, k), np.int64)
    done = np.zeros((B, k), bool)
    seqs = np.zeros((B, k, 0), np.int64)
    tokens = np.full(B * k, bos, np.int64)
    for step_no in range(1, max_len + 1):
        log_p, state = step(tokens, state)
        extended = total[..., None] + log_p.reshape(B, k, V)  # [B, k, V]
        extended[done] = -np.inf  # a finished hypothesis is not extended...
        kept = np.where(done, total, -np.inf)  # ... but carried as it is
        with np.errstate(divide="ignore", invalid="ignore"):
            ranked = np.concatenate([extended.reshape(B, k * V)
                                     / dtype.type(step_no)**length_penalty,
                                     kept / np.maximum(length, 1).astype(dtype)**length_penalty],
                                    axis=1)  # [B, k*V + k]
        best = np.argsort(-ranked, axis=1, kind="stable")[:, :k]  # [B, k]
        carried = best >= k * V
        parent = np.where(carried, best - k * V, best // V)
        token = np.where(carried, eos, best % V)
        rows = np.arange(B)[:, None]
        total = np.where(carried, total[rows, parent], extended.reshape(B, k * V)[
            rows, np.minimum(best, k * V - 1)])
        alive = np.isfinite(ranked[rows, best])
        total = np.where(alive, total, -np.inf)
        length = np.where(carried, length[rows, parent], step_no)
        done = np.where(carried, True, token == eos) & alive
        seqs = np.concatenate([seqs[rows, parent], token[..., None]], axis=2)
        state, tokens = _rows(state, (rows * k + parent).reshape(-1)), token.reshape(-1)
        if (done | ~alive).all():
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        final = np.where(np.isfinite(total), total / np.maximum(length, 1).astype(dtype)
                         ** length_penalty, -np.inf)
    pick = final.argmax(axis=1)
    rows = np.arange(B)
    best_len = length[rows, pick]
    out = seqs[rows, pick]  # [B, steps]
    T_out = int(best_len.max())
    out = np.where(np.arange(out.shape[1])[None, :] < best_len[:, None], out, eos)[:, :T_out]
    return out, final[rows, pick].astype(dtype)
