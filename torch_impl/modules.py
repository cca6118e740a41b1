"""PyTorch modules of the reference's models: the same equations as `numpy_ref.models`, written
with torch ops and autograd, and the same state_dict names, so `to_numpy` / `load_numpy_` move
weights between the two as they are.

- `Attention`: the four scores of `numpy_ref.attention` (dot, scaled_dot, general, additive
  with its bias b), one query per row or many, masked by lengths.
- `BiLSTMAttention`: the seed's BiLSTM_Attention (``embedding``, ``lstm``, ``out``: a
  state_dict saved from the seed's own class loads with ``strict=True``); the correct query by
  default, the seed's ``final_state.view(-1, n_hidden * 2, 1)`` with ``seed_compatible=True``.
- `Seq2SeqAttention`: the encoder-decoder (``src_embed``, ``encoder``, ``tgt_embed``,
  ``decoder``, ``generator``), with a `LuongDecoder` or a `BahdanauDecoder`, teacher-forced
  ``forward`` and the decoding methods ``greedy_decode`` and ``beam_search``.

Padding is not data here either: ids past the given lengths are replaced by 0 before the
embedding, the LSTMs run packed (``pack_padded_sequence(enforce_sorted=False)``), and the
attention puts a real -inf on padded keys.

Backends: every module takes ``backend=`` (and has a ``backend`` attribute that may be set later,
for the module and all its submodules): ``"torch"`` (the default) runs the torch ops above;
``"numpy_ref"`` and ``"kernels"`` run the attention, the LSTMs and the LSTM cell on our own
hand-written forward/backward pairs through the autograd bridges of `torch_impl.functions`
(the same parameters, the same equations; the embeddings and the linear layers stay torch's).
So the same model trains with torch's autograd over either implementation, and the two give
the same losses to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch_impl import functions
from torch_impl.reference.recurrent import run_packed

SCORES = ("dot", "scaled_dot", "general", "additive")
DECODERS = ("luong", "bahdanau")
BACKENDS = ("torch", *functions.BACKENDS)  # what a module's ``backend`` may be


class _Backend:
    """The ``backend`` attribute: ``"torch"``, ``"numpy_ref"`` or ``"kernels"``. Setting it on
    a module sets it on every submodule that has one."""

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {value!r}")
        for m in self.modules():
            if isinstance(m, _Backend):
                m.__dict__["_backend"] = value


CELLS = ("lstm", "gru")
_LAYERS = {"lstm": nn.LSTM, "gru": nn.GRU}
_CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}


def _cell_of(cell: str) -> str:
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
    return cell


def _run_lstm(rnn: nn.Module, x: torch.Tensor, backend: str, lengths=None, state=None):
    """``rnn`` (an nn.LSTM or nn.GRU, its own batch_first, layers and directions) on x
    [B, T, E] or [T, B, E], packed by lengths, from state (h0, c0), (h0, None) for a GRU, or
    None for zeros, on the module's backend -> (output padded to T, (h_n, c_n or None))."""
    h0, c0 = (None, None) if state is None else state
    gru = isinstance(rnn, nn.GRU)
    if backend != "torch":
        options = {"num_layers": rnn.num_layers, "bidirectional": rnn.bidirectional,
                   "batch_first": rnn.batch_first, "lengths": lengths, "backend": backend}
        if gru:
            out, h_n = functions.gru(x, dict(rnn.named_parameters()), h0=h0, **options)
            return out, (h_n, None)
        return functions.lstm(x, dict(rnn.named_parameters()), h0=h0, c0=c0, **options)
    if gru:
        out, h_n = run_packed(rnn, x, h0, lengths)
        return out, (h_n, None)
    return run_packed(rnn, x, state, lengths)


def _run_cell(cell: nn.Module, x: torch.Tensor, state, backend: str):
    """One step of an nn.LSTMCell or nn.GRUCell from state (s, m) or (s, None) -> the new
    state, on the module's backend."""
    s, m = state
    gru = isinstance(cell, nn.GRUCell)
    if backend == "torch":
        return (cell(x, s), None) if gru else cell(x, (s, m))
    params = dict(cell.named_parameters())
    if gru:
        return functions.gru_cell(x, s, params, backend=backend), None
    return functions.lstm_cell(x, s, m, params, backend=backend)


def _padding(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Bool [B, T]: True at positions t >= lengths[b]."""
    return torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]


def _lengths(lengths, B: int, T: int, device) -> torch.Tensor | None:
    """lengths as an int64 tensor [B] on `device`, each checked to be in 1..T."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device).long()
    if lengths.shape != (B,) or (B and (lengths.min() < 1 or lengths.max() > T)):
        raise ValueError(f"lengths: expected shape ({B},) with every value in 1..{T}, got "
                         f"{tuple(lengths.shape)} {lengths.tolist()}")
    return lengths


class Attention(_Backend, nn.Module):
    """Attention over keys [B, Tk, Hk] and values [B, Tk, Hv] for a query [B, Hq] or
    [B, Tq, Hq], with the score's parameters: ``W`` [Hq, Hk] (general); ``W_query`` [A, Hq],
    ``W_key`` [A, Hk], ``v`` [A] and ``b`` [A] (additive, b when ``bias``).

    ``forward(query, keys, values=None, lengths=None, *, projected_keys=None)`` ->
    ``(context [B, (Tq,) Hv], weights [B, (Tq,) Tk])``; values default to keys, and a decoder
    that attends step by step may pass ``projected_keys = project_keys(keys)`` computed once
    (the torch backend uses it; ours compute the projection inside the op).
    """

    def __init__(self, query_size: int, key_size: int, score: str = "dot", *,
                 attention_size: int | None = None, bias: bool = True,
                 backend: str = "torch") -> None:
        super().__init__()
        self.backend = backend
        if score not in SCORES:
            raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
        if score in ("dot", "scaled_dot") and query_size != key_size:
            raise ValueError(f"query_size: the {score!r} score needs query_size == key_size, "
                             f"got {query_size} and {key_size}")
        self.score, self.key_size = score, key_size
        if score == "general":
            self.W = nn.Parameter(torch.empty(query_size, key_size))
        elif score == "additive":
            A = attention_size or key_size
            self.W_query = nn.Parameter(torch.empty(A, query_size))
            self.W_key = nn.Parameter(torch.empty(A, key_size))
            self.v = nn.Parameter(torch.empty(A))
            self.b = nn.Parameter(torch.empty(A)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every parameter, as nn.Linear draws them:
        W is a linear map of the key (fan_in Hk), W_query and b the query's (Hq), W_key the
        key's (Hk), v one of the A features."""
        for name, p in self.named_parameters(recurse=False):
            n = self.W_query.shape[1] if name == "b" else p.shape[-1]  # [out, in] or [A]
            nn.init.uniform_(p, -1 / math.sqrt(n), 1 / math.sqrt(n))

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """The additive score's ``W_key k`` [B, Tk, A]."""
        return F.linear(keys, self.W_key)

    def scores(self, query: torch.Tensor, keys: torch.Tensor,
               projected_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, Tq, Tk] of a query [B, Tq, Hq]."""
        if self.score == "dot":
            return torch.bmm(query, keys.transpose(1, 2))
        if self.score == "scaled_dot":
            return torch.bmm(query, keys.transpose(1, 2)) / math.sqrt(self.key_size)
        if self.score == "general":
            return torch.bmm(query @ self.W, keys.transpose(1, 2))
        ka = self.project_keys(keys) if projected_keys is None else projected_keys
        qa = F.linear(query, self.W_query, self.b)  # [B, Tq, A]
        return torch.tanh(qa.unsqueeze(2) + ka.unsqueeze(1)) @ self.v

    def forward(self, query: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor | None = None, lengths=None, *,
                projected_keys: torch.Tensor | None = None, need_weights: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, weights) for query [B, Hq] or [B, Tq, Hq], keys [B, Tk, Hk], values
        [B, Tk, Hv] (keys when None) and lengths [B]; weights None with need_weights=False
        (then our backends form no [Tq, Tk] array; torch's path here still does)."""
        values = keys if values is None else values
        lengths = _lengths(lengths, keys.shape[0], keys.shape[1], keys.device)
        if self.backend != "torch":
            params = dict(self.named_parameters(recurse=False))
            return functions.attention(query, keys, values, score=self.score,
                                       params=params or None, lengths=lengths,
                                       need_weights=need_weights, backend=self.backend)
        single = query.dim() == 2
        q = query.unsqueeze(1) if single else query  # [B, Tq, Hq]
        s = self.scores(q, keys, projected_keys)  # [B, Tq, Tk]
        if lengths is not None:  # a real -inf: padded keys get weight exactly 0
            s = s.masked_fill(_padding(lengths, keys.shape[1]).unsqueeze(1), float("-inf"))
        w = torch.softmax(s, dim=-1)
        context = torch.bmm(w, values)  # [B, Tq, Hv]
        context, w = (context.squeeze(1), w.squeeze(1)) if single else (context, w)
        return context, w if need_weights else None


class BiLSTMAttention(_Backend, nn.Module):
    """The seed's BiLSTM_Attention classifier with its submodule names.

    ``forward(X [B, T] token ids, lengths=None) -> (logits [B, C], attention [B, T])``. The
    attention is returned as a tensor in the graph (the seed detaches it to NumPy).

    seed_compatible : take the query as the seed does, ``h_n.view(-1, 2H)``, which mixes the
        sentences of a batch when B > 1; the default is each sentence's own
        ``cat(h_n[-2], h_n[-1])``.
    cell : "lstm" (the seed's ``lstm``) or "gru" (an nn.GRU named ``gru``).
    """

    def __init__(self, vocab_size: int, embedding_dim: int, n_hidden: int, num_classes: int,
                 *, seed_compatible: bool = False, cell: str = "lstm",
                 backend: str = "torch") -> None:
        super().__init__()
        self.n_hidden, self.seed_compatible = n_hidden, bool(seed_compatible)
        self.cell = _cell_of(cell)
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        setattr(self, cell, _LAYERS[cell](embedding_dim, n_hidden, bidirectional=True))
        self.out = nn.Linear(n_hidden * 2, num_classes)
        self.attention = Attention(2 * n_hidden, 2 * n_hidden, "dot")  # no parameters
        self.backend = backend

    def forward(self, X: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = X.shape
        lengths = _lengths(lengths, B, T, X.device)
        if lengths is not None:
            X = X.masked_fill(_padding(lengths, T), 0)  # padding is not data
        x = self.embedding(X).permute(1, 0, 2)  # [T, B, E], as the seed
        output, (h_n, _) = _run_lstm(getattr(self, self.cell), x, self.backend, lengths)
        output = output.permute(1, 0, 2)  # [B, T, 2H]
        if self.seed_compatible:  # the seed's final_state.view(-1, n_hidden * 2, 1)
            query = h_n.reshape(-1, self.n_hidden * 2)
        else:
            query = torch.cat([h_n[-2], h_n[-1]], dim=1)  # [B, 2H]
        context, attention = self.attention(query, output, output, lengths)
        return self.out(context), attention


class LuongDecoder(_Backend, nn.Module):
    """Global attention without input feeding: ``lstm`` (nn.LSTM(E, 2H); ``gru``, an nn.GRU,
    with cell "gru") over the target, ``attention`` with every step's state as a query,
    ``h~ = tanh(concat([c; s]))``."""

    def __init__(self, embedding_dim: int, state_size: int, score: str, *, cell: str = "lstm",
                 backend: str = "torch") -> None:
        super().__init__()
        self.cell = _cell_of(cell)
        setattr(self, cell, _LAYERS[cell](embedding_dim, state_size, batch_first=True))
        self.attention = Attention(state_size, state_size, score, attention_size=state_size)
        self.concat = nn.Linear(2 * state_size, state_size, bias=False)
        self.backend = backend

    def forward(self, y, memory, state, lengths):
        """y [B, Tt, E], state (s, m) [B, 2H] each (m None for a GRU) -> (features
        [B, Tt, 2H], attention [B, Tt, Ts], the last state)."""
        s0, m0 = state
        s, (h, c) = _run_lstm(getattr(self, self.cell), y, self.backend,
                              state=(s0[None], None if m0 is None else m0[None]))
        context, attention = self.attention(s, memory, memory, lengths)
        features = torch.tanh(self.concat(torch.cat([context, s], dim=-1)))
        return features, attention, (h[0], None if c is None else c[0])


class BahdanauDecoder(_Backend, nn.Module):
    """Step by step: additive ``attention`` (with b) queried by the previous state, ``cell``
    (nn.LSTMCell(E + 2H, 2H); an nn.GRUCell with cell "gru") on ``[y_t; c_t]``; the generator
    reads ``[s_t; c_t; y_t]``."""

    def __init__(self, embedding_dim: int, state_size: int, *, cell: str = "lstm",
                 backend: str = "torch") -> None:
        super().__init__()
        self.attention = Attention(state_size, state_size, "additive", attention_size=state_size)
        self.cell = _CELLS[_cell_of(cell)](embedding_dim + state_size, state_size)
        self.backend = backend

    def forward(self, y, memory, state, lengths, projected_keys=None):
        """y [B, Tt, E] -> (features [s; c; y] [B, Tt, 4H + E], attention [B, Tt, Ts],
        the last state)."""
        if self.backend == "torch" and projected_keys is None:
            projected_keys = self.attention.project_keys(memory)
        s, m = state
        features, weights = [], []
        for t in range(y.shape[1]):
            c, w = self.attention(s, memory, memory, lengths, projected_keys=projected_keys)
            x = torch.cat([y[:, t], c], dim=1)
            s, m = _run_cell(self.cell, x, (s, m), self.backend)
            features.append(torch.cat([s, c, y[:, t]], dim=1))
            weights.append(w)
        return torch.stack(features, 1), torch.stack(weights, 1), (s, m)


class Seq2SeqAttention(_Backend, nn.Module):
    """Encoder-decoder with attention: a bidirectional LSTM encoder (hidden H, L layers,
    packed by source lengths) and a Luong or Bahdanau decoder whose state, 2H wide, starts
    from the last layer's final states of both directions. ``cell="gru"``: GRUs throughout
    (the state has no c).

    ``forward(src [B, Ts], tgt [B, Tt], src_lengths=None) -> (logits [B, Tt, Vt], attention
    [B, Tt, Ts])``, teacher-forced: tgt holds the decoder's input tokens.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, embedding_dim: int, hidden_size: int,
                 *, decoder: str = "luong", score: str | None = None, num_layers: int = 1,
                 cell: str = "lstm", backend: str = "torch") -> None:
        super().__init__()
        self.cell = _cell_of(cell)
        if decoder not in DECODERS:
            raise ValueError(f"decoder: expected one of {DECODERS}, got {decoder!r}")
        score = {"luong": "general", "bahdanau": "additive"}[decoder] if score is None else score
        if score not in SCORES:
            raise ValueError(f"score: expected one of {SCORES} or None, got {score!r}")
        if decoder == "bahdanau" and score != "additive":
            raise ValueError(f"score: the 'bahdanau' decoder uses the 'additive' score only, "
                             f"got {score!r}")
        self.decoder_kind, self.score = decoder, score
        H2 = 2 * hidden_size
        self.src_embed = nn.Embedding(src_vocab, embedding_dim)
        self.encoder = _LAYERS[cell](embedding_dim, hidden_size, num_layers=num_layers,
                                     bidirectional=True, batch_first=True)
        self.tgt_embed = nn.Embedding(tgt_vocab, embedding_dim)
        if decoder == "luong":
            self.decoder = LuongDecoder(embedding_dim, H2, score, cell=cell)
            self.generator = nn.Linear(H2, tgt_vocab)
        else:
            self.decoder = BahdanauDecoder(embedding_dim, H2, cell=cell)
            self.generator = nn.Linear(2 * H2 + embedding_dim, tgt_vocab)
        self.backend = backend

    def encode(self, src: torch.Tensor, src_lengths=None):
        """-> (memory [B, Ts, 2H], (s_0, m_0) [B, 2H] each (m_0 None for a GRU), lengths or
        None)."""
        B, Ts = src.shape
        lengths = _lengths(src_lengths, B, Ts, src.device)
        if lengths is not None:
            src = src.masked_fill(_padding(lengths, Ts), 0)  # padding is not data
        memory, (h_n, c_n) = _run_lstm(self.encoder, self.src_embed(src), self.backend, lengths)
        state = (torch.cat([h_n[-2], h_n[-1]], 1),
                 None if c_n is None else torch.cat([c_n[-2], c_n[-1]], 1))
        return memory, state, lengths

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_lengths=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        memory, state, lengths = self.encode(src, src_lengths)
        features, attention, _ = self.decoder(self.tgt_embed(tgt), memory, state, lengths)
        return self.generator(features), attention

    def _start(self, src, src_lengths, repeat: int = 1):
        memory, state, lengths = self.encode(src, src_lengths)
        memory = memory.repeat_interleave(repeat, 0)
        state = tuple(None if x is None else x.repeat_interleave(repeat, 0) for x in state)
        lengths = None if lengths is None else lengths.repeat_interleave(repeat, 0)
        K = None
        if self.decoder_kind == "bahdanau" and self.backend == "torch":
            K = self.decoder.attention.project_keys(memory)
        return memory, state, lengths, K

    def _step(self, tokens, memory, state, lengths, K):
        """One step for tokens [N] -> (log-probabilities [N, Vt], state)."""
        y = self.tgt_embed(tokens)[:, None]  # [N, 1, E]
        if self.decoder_kind == "luong":
            features, _, state = self.decoder(y, memory, state, lengths)
        else:
            features, _, state = self.decoder(y, memory, state, lengths, projected_keys=K)
        return torch.log_softmax(self.generator(features[:, 0]), dim=-1), state

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, *, max_len: int, bos: int, eos: int,
                      src_lengths=None) -> torch.Tensor:
        """As `numpy_ref.greedy_decode`: tokens [B, T_out] (T_out <= max_len, bos not
        included), each row padded with eos after its eos."""
        _check_decoding(max_len, 1, bos, eos, self.generator.out_features)
        memory, state, lengths, K = self._start(src, src_lengths)
        tokens = torch.full((src.shape[0],), bos, dtype=torch.long, device=src.device)
        done = torch.zeros_like(tokens, dtype=torch.bool)
        out = []
        for _ in range(max_len):
            log_p, state = self._step(tokens, memory, state, lengths, K)
            tokens = torch.where(done, eos, log_p.argmax(dim=1))
            out.append(tokens)
            done |= tokens == eos
            if bool(done.all()):
                break
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, *, beam_size: int, max_len: int, bos: int,
                    eos: int, src_lengths=None, length_penalty: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `numpy_ref.beam_search`: (tokens [B, T_out], scores [B]); a hypothesis' score is its
        summed log-probability over len ** length_penalty."""
        _check_decoding(max_len, beam_size, bos, eos, self.generator.out_features)
        B, k, V = src.shape[0], beam_size, self.generator.out_features
        memory, state, lengths, K = self._start(src, src_lengths, repeat=k)
        dev, dtype = src.device, memory.dtype
        total = torch.full((B, k), float("-inf"), dtype=dtype, device=dev)
        total[:, 0] = 0
        length = torch.zeros((B, k), dtype=torch.long, device=dev)
        done = torch.zeros((B, k), dtype=torch.bool, device=dev)
        seqs = torch.zeros((B, k, 0), dtype=torch.long, device=dev)
        tokens = torch.full((B * k,), bos, dtype=torch.long, device=dev)
        rows = torch.arange(B, device=dev)[:, None]
        for step in range(1, max_len + 1):
            log_p, state = self._step(tokens, memory, state, lengths, K)
            extended = total[..., None] + log_p.reshape(B, k, V)
            extended = extended.masked_fill(done[..., None], float("-inf"))
            kept = torch.where(done, total, float("-inf"))
            ranked = torch.cat([extended.reshape(B, k * V) / float(step) ** length_penalty,
                                kept / length.clamp(min=1).to(dtype) ** length_penalty], dim=1)
            best = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :k]
            carried = best >= k * V
            beam = torch.where(carried, best - k * V, best // V)
            token = torch.where(carried, eos, best % V)
            alive = torch.isfinite(ranked.gather(1, best))
            total = torch.where(carried, total.gather(1, beam),
                                extended.reshape(B, k * V).gather(1, best.clamp(max=k * V - 1)))
            total = torch.where(alive, total, float("-inf"))
            length = torch.where(carried, length.gather(1, beam), step)
            done = torch.where(carried, True, token == eos) & alive
            seqs = torch.cat([seqs[rows, beam], token[..., None]], dim=2)
            flat = (rows * k + beam).reshape(-1)
            state = tuple(None if x is None else x[flat] for x in state)
            tokens = token.reshape(-1)
            if bool((done | ~alive).all()):
                break
        final = torch.where(torch.isfinite(total),
                            total / length.clamp(min=1).to(dtype) ** length_penalty,
                            float("-inf"))
        pick = final.argmax(dim=1)
        r = torch.arange(B, device=dev)
        best_len = length[r, pick]
        out = seqs[r, pick]
        positions = torch.arange(out.shape[1], device=dev)[None, :]
        out = torch.where(positions < best_len[:, None], out, eos)[:, :int(best_len.max())]
        return out, final[r, pick]


def _check_decoding(max_len, beam_size, bos, eos, vocab: int) -> None:
    for name, value in (("max_len", max_len), ("beam_size", beam_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    for name, value in (("bos", bos), ("eos", eos)):
        if not isinstance(value, int) or not 0 <= value < vocab:
            raise ValueError(f"{name}: expected a token id in 0..{vocab - 1}, got {value!r}")
