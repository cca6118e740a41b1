r"""The seed's EncoderDecoder as a Transformer, forward and backward by hand: the Annotated
Transformer's frame (``src_embed``, ``tgt_embed``, ``encoder``, ``decoder``, ``generator``) on
`nn.Transformer`'s stacks, with teacher forcing. Parameters are the state_dict of
`torch_impl.TransformerSeq2Seq`.

Shapes
------
B  batch      Ts, Tt  source and target tokens      Vs, Vt  vocabularies     E  d_model
h  heads      n_enc, n_dec  encoder and decoder layers

Forward
-------
    PE[t, 2i] = sin(t / 10000^(2i/E)),   PE[t, 2i+1] = cos(t / 10000^(2i/E))     [T, E]
    x      = src_embed(src) * sqrt(E) + PE[:Ts]                                   [B, Ts, E]
    memory = encoder(x, src_key_padding_mask = (s >= src_lengths[b]))             [B, Ts, E]
    y      = tgt_embed(tgt) * sqrt(E) + PE[:Tt]                                   [B, Tt, E]
    out    = decoder(y, memory, tgt_mask = causal, memory_key_padding_mask = same)
    logits = generator(out)                                                       [B, Tt, Vt]

encoder and decoder are `numpy_ref.transformer`'s stacks (params ``encoder.layers.{i}.*``,
``encoder.norm.*``, ``decoder.layers.{i}.*``, ``decoder.norm.*``), batch first. The returned
attention is every decoder layer's cross-attention weights per head [n_dec, B, h, Tt, Ts]; it
is an output only (no gradient flows back through it).

Backward
--------
    d_out, d_generator = generator_backward(d_logits)
    d_y, d_memory, d_decoder = decoder_backward(d_out)
    d_x, d_encoder = encoder_backward(d_memory)
    d_tgt_embed = embedding_backward(sqrt(E) d_y),   d_src_embed = embedding_backward(sqrt(E) d_x)

Padding is not data: source ids past src_lengths may be any integer (-1 included); they are
replaced by 0 before the embedding and their positions are padding in every layer (the
`numpy_ref.transformer` rules), so the results are those of any other padding, bit for bit.

Decoding
--------
`transformer_greedy_decode` and `transformer_beam_search` follow `greedy_decode` and
`beam_search` (`numpy_ref.models.decoding`): the encoder runs once, and each step runs the
decoder on the tokens so far (bos first) and reads the last position's logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks, unchanged
from numpy_ref.contract import models as contract
from numpy_ref.contract import transformer as layer_contract
from numpy_ref.contract.backend import op_module
from numpy_ref.contract.fields import documented
from numpy_ref.contract.models import group, prefixed
from numpy_ref.models.decoding import beam, greedy
from numpy_ref.transformer import _options  # the layers' options, checked once

__all__ = ["TransformerSeq2SeqCache", "init_transformer_seq2seq_params", "positional_encoding",
           "transformer_beam_search", "transformer_greedy_decode",
           "transformer_seq2seq_backward", "transformer_seq2seq_forward"]


def positional_encoding(steps: int, d_model: int) -> np.ndarray:
    """The sinusoidal positional encoding [steps, d_model] in float64:
    ``PE[t, 2i] = sin(t w_i)``, ``PE[t, 2i+1] = cos(t w_i)``, ``w_i = 10000^(-2i/d_model)``
    (the Annotated Transformer's; the `numpy_ref.models.transformer` module docstring). Cast it
    to the data's dtype once, as the torch module does."""
    position = np.arange(steps, dtype=np.float64)[:, None]
    rates = np.exp(np.arange(0, d_model, 2, dtype=np.float64) * -(math.log(10000.0) / d_model))
    pe = np.zeros((steps, d_model))
    pe[:, 0::2] = np.sin(position * rates)
    pe[:, 1::2] = np.cos(position * rates[: d_model // 2])
    return pe


@documented
class TransformerSeq2SeqSizes(NamedTuple):
    """The sizes the params fix."""

    Vs: int  # source vocabulary
    Vt: int  # target vocabulary
    E: int  # d_model


def _params(params: Any) -> tuple[dict[str, np.ndarray], TransformerSeq2SeqSizes]:
    """Check the params' keys outside the stacks (the stacks check their own); return them
    with the sizes."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    Vs = checks.leading_dim(params, "src_embed.weight", 2, "[Vs, E]")
    E = params["src_embed.weight"].shape[1]
    dtype = params["src_embed.weight"].dtype
    if dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"params['src_embed.weight']: expected dtype float32 or float64, got "
                        f"{dtype}")
    Vt = checks.leading_dim(params, "tgt_embed.weight", 2, "[Vt, E]")
    checks.param(params, "tgt_embed.weight", (Vt, E), "[Vt, E]", dtype, "src_embed.weight")
    checks.param(params, "generator.weight", (Vt, E), "[Vt, E]", dtype, "src_embed.weight")
    if "generator.bias" in params:
        checks.param(params, "generator.bias", (Vt,), "[Vt]", dtype, "src_embed.weight")
    extra = sorted(k for k in params if not k.startswith(("encoder.", "decoder."))
                   and k not in ("src_embed.weight", "tgt_embed.weight", "generator.weight",
                                 "generator.bias"))
    if extra:
        raise ValueError(f"params: unexpected keys {extra} (TransformerSeq2Seq's are "
                         "src_embed.weight, tgt_embed.weight, encoder.*, decoder.*, "
                         "generator.*)")
    return dict(params), TransformerSeq2SeqSizes(Vs, Vt, E)


def _padding(src_lengths: np.ndarray | None, Ts: int) -> np.ndarray | None:
    """The source's key padding mask [B, Ts] (True = padding), or None."""
    if src_lengths is None or (src_lengths == Ts).all():
        return None
    return np.arange(Ts)[None, :] >= src_lengths[:, None]


def _causal(T: int) -> np.ndarray:
    """The decoder's self-attention mask [T, T], True above the diagonal (not allowed)."""
    return np.triu(np.ones((T, T), bool), k=1)


def _embed(backend, ids, table, E):
    """``table[ids] * sqrt(E) + PE`` -> (x [B, T, E], the embedding's cache)."""
    x, cache = backend.embedding_forward(ids, {"weight": table})
    pe = positional_encoding(ids.shape[1], E).astype(table.dtype)
    return x * table.dtype.type(math.sqrt(E)) + pe, cache


def _encode(backend, real_src, kpm, p, o, E):
    x, c_src = _embed(backend, real_src, p["src_embed.weight"], E)
    memory, c_enc = backend.transformer_encoder_forward(
        x, group(p, "encoder"), nhead=o.nhead, norm_first=o.norm_first, activation=o.activation,
        eps=o.eps, src_key_padding_mask=kpm, batch_first=True, backend=backend)
    return memory, c_src, c_enc


def _decode(backend, tgt, memory, kpm, p, o, E, need_weights):
    y, c_tgt = _embed(backend, tgt, p["tgt_embed.weight"], E)
    out, c_dec = backend.transformer_decoder_forward(
        y, memory, group(p, "decoder"), nhead=o.nhead, norm_first=o.norm_first,
        activation=o.activation, eps=o.eps, tgt_mask=_causal(tgt.shape[1]), tgt_is_causal=True,
        memory_key_padding_mask=kpm, batch_first=True, need_weights=need_weights,
        backend=backend)
    logits, c_gen = backend.linear_forward(out, group(p, "generator"))
    return logits, c_tgt, c_dec, c_gen


@documented
class TransformerSeq2SeqCache(NamedTuple):
    """What `transformer_seq2seq_backward` needs."""

    backend: ModuleType  # the op module the forward ran on
    sizes: TransformerSeq2SeqSizes  # (Vs, Vt, E)
    src_embed: Any  # the source embedding's cache
    encoder: Any  # the encoder stack's cache
    tgt_embed: Any  # the target embedding's cache
    decoder: Any  # the decoder stack's cache
    generator: Any  # the generator's linear cache
    keys: tuple[str, ...]  # the params' keys, in order (d_params comes back in it)
    fingerprints: unchanged.Fingerprints | None  # the caller's ids and params as the forward
    #   saw them (the ops inside record none); the backward checks them first


@unchanged.memoized()
def transformer_seq2seq_forward(
    src: np.ndarray,
    tgt: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    nhead: int,
    src_lengths: Any = None,
    norm_first: bool = False,
    activation: str = "relu",
    eps: float = 1e-5,
    need_weights: bool = True,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, np.ndarray | None, TransformerSeq2SeqCache]:
    """The Transformer encoder-decoder with teacher forcing:
    ``logits = generator(decoder(tgt_embed(tgt), encoder(src_embed(src))))`` with a causal
    target and the source's padding masked (the `numpy_ref.models.transformer`
    module docstring).

    Parameters
    ----------
    src : integer ids [B, Ts]; past src_lengths any integer (padding is not data).
    tgt : integer ids [B, Tt], the decoder's input tokens (bos first).
    params : `torch_impl.TransformerSeq2Seq`'s state_dict (``src_embed.weight`` [Vs, E],
        ``tgt_embed.weight`` [Vt, E], ``encoder.layers.{i}.*``, ``encoder.norm.*``,
        ``decoder.layers.{i}.*``, ``decoder.norm.*``, ``generator.weight`` [Vt, E],
        ``generator.bias`` [Vt]).
    nhead : h, a divisor of E.
    src_lengths : integer [B], each in 1..Ts, or None (every source position is real).
    norm_first, activation, eps : the layers' (`transformer_encoder_layer_forward`).
    need_weights : return the cross-attention weights (False: None, and every attention of the
        model runs without forming its weights, as a training step needs).
    backend : the op module (`numpy_ref` when None, or `kernels`).

    Returns
    -------
    logits : [B, Tt, Vt].
    attention : [n_dec, B, h, Tt, Ts], each decoder layer's cross-attention weights per head
        (None without need_weights).
    cache.
    """
    backend = op_module(backend)
    o = _options(nhead, norm_first, activation, eps, True)
    need_weights = layer_contract.flag("need_weights", need_weights)
    p, sizes = _params(params)
    real_src, src_lengths = contract.source(src, src_lengths, sizes.Vs)
    kpm = _padding(src_lengths, real_src.shape[1])
    # the caller's arrays fingerprinted once; the ops inside record none (what they hold is
    # the model's own)
    fingerprints = unchanged.record("transformer_seq2seq_forward", "transformer_seq2seq_backward",
                                    [("src", src), ("tgt", tgt), *(
                                        (f"params[{k!r}]", v) for k, v in p.items())])
    with unchanged.untracked():
        memory, c_src, c_enc = _encode(backend, real_src, kpm, p, o, sizes.E)
        logits, c_tgt, c_dec, c_gen = _decode(backend, tgt, memory, kpm, p, o, sizes.E,
                                              need_weights)
    attention = np.stack([c.weights for c in c_dec.layers]) if need_weights else None
    cache = TransformerSeq2SeqCache(backend, sizes, c_src, c_enc, c_tgt, c_dec, c_gen,
                                    tuple(params), fingerprints)
    return logits, attention, cache


def transformer_seq2seq_backward(d_logits: np.ndarray, cache: TransformerSeq2SeqCache
                                 ) -> dict[str, np.ndarray]:
    """Backward of `transformer_seq2seq_forward`: the generator's, the decoder stack's, the
    encoder stack's (fed ``d_memory`` from every decoder layer), then the embeddings' with
    ``d_table = embedding_backward(sqrt(E) d_x)`` (the `numpy_ref.models.transformer`
    module docstring).

    d_logits [B, Tt, Vt] -> d_params with the params' keys, in their order.
    """
    backend, sizes, c_src, c_enc, c_tgt, c_dec, c_gen, keys, fingerprints = checks.cache_of(
        cache, TransformerSeq2SeqCache, "transformer_seq2seq_forward")
    unchanged.check(fingerprints)
    with unchanged.untracked():
        d_out, d_gen = backend.linear_backward(d_logits, c_gen)
        scale = d_out.dtype.type(math.sqrt(sizes.E))  # d_out: d_logits' dtype, checked
        d_y, d_memory, d_dec = backend.transformer_decoder_backward(d_out, c_dec)
        d_x, d_enc = backend.transformer_encoder_backward(d_memory, c_enc)
        d_tgt = backend.embedding_backward(d_y * scale, c_tgt)
        d_src = backend.embedding_backward(d_x * scale, c_src)
    grads = (prefixed("src_embed", d_src) | prefixed("tgt_embed", d_tgt)
             | prefixed("encoder", d_enc) | prefixed("decoder", d_dec)
             | prefixed("generator", d_gen))
    return {k: grads[k] for k in keys}


# --------------------------------------------------------------------------------------------
# parameters


def _xavier(rng: np.random.Generator, shape: tuple[int, int], dtype) -> np.ndarray:
    bound = math.sqrt(6 / (shape[0] + shape[1]))
    return rng.uniform(-bound, bound, shape).astype(dtype)


def _layer(rng, E: int, F: int, dtype, decoder: bool, bias: bool) -> dict[str, np.ndarray]:
    attentions = ("self_attn", "multihead_attn") if decoder else ("self_attn",)
    norms = ("norm1", "norm2", "norm3") if decoder else ("norm1", "norm2")
    p: dict[str, np.ndarray] = {}
    for a in attentions:
        p[f"{a}.in_proj_weight"] = _xavier(rng, (3 * E, E), dtype)
        if bias:
            p[f"{a}.in_proj_bias"] = np.zeros(3 * E, dtype)
        p[f"{a}.out_proj.weight"] = _xavier(rng, (E, E), dtype)
        if bias:
            p[f"{a}.out_proj.bias"] = np.zeros(E, dtype)
    for name, (o, i) in (("linear1", (F, E)), ("linear2", (E, F))):
        p[f"{name}.weight"] = _xavier(rng, (o, i), dtype)
        if bias:
            p[f"{name}.bias"] = rng.uniform(-1 / math.sqrt(i), 1 / math.sqrt(i), o).astype(dtype)
    for n in norms:
        p[f"{n}.weight"] = np.ones(E, dtype)
        if bias:
            p[f"{n}.bias"] = np.zeros(E, dtype)
    return p


def init_transformer_seq2seq_params(
    src_vocab: int, tgt_vocab: int, *, d_model: int = 512, nhead: int = 8,
    num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 2048,
    bias: bool = True, rng: np.random.Generator | int | None = None, dtype: Any = np.float64,
) -> dict[str, np.ndarray]:
    """Random `torch_impl.TransformerSeq2Seq` parameters with nn.Transformer's initialisation:
    every matrix ~ U(+-sqrt(6 / (fan_in + fan_out))) (xavier_uniform), the attention biases 0,
    the linear biases ~ U(+-1/sqrt(fan_in)), the norms' weight 1 and bias 0
    (the `numpy_ref.models.transformer` module docstring has the roles and shapes:
    ``src_embed.weight`` [Vs, E], ``encoder.layers.{i}.*``, ..., ``generator.bias`` [Vt]).
    `bias=False`: no bias anywhere but the generator's."""
    rng = np.random.default_rng(rng)
    E, F = int(d_model), int(dim_feedforward)
    if E % int(nhead):
        raise ValueError(f"nhead: {nhead} does not divide d_model {E}")
    p = {"src_embed.weight": _xavier(rng, (src_vocab, E), dtype),
         "tgt_embed.weight": _xavier(rng, (tgt_vocab, E), dtype)}
    for stack, n, decoder in (("encoder", num_encoder_layers, False),
                              ("decoder", num_decoder_layers, True)):
        for i in range(n):
            p |= prefixed(f"{stack}.layers.{i}", _layer(rng, E, F, dtype, decoder, bias))
        p[f"{stack}.norm.weight"] = np.ones(E, dtype)
        if bias:
            p[f"{stack}.norm.bias"] = np.zeros(E, dtype)
    p["generator.weight"] = _xavier(rng, (tgt_vocab, E), dtype)
    bound = 1 / math.sqrt(E)
    p["generator.bias"] = rng.uniform(-bound, bound, tgt_vocab).astype(dtype)
    return p


# --------------------------------------------------------------------------------------------
# decoding


@unchanged.untracked()  # no backward follows: the ops record no fingerprints
def _start(src, params, src_lengths, nhead, norm_first, activation, eps, backend):
    """Encode src once -> (a step function over the state (prefix [N, t], memory, kpm), the
    state, sizes)."""
    backend = op_module(backend)
    o = _options(nhead, norm_first, activation, eps, True)
    p, sizes = _params(params)
    real_src, src_lengths = contract.source(src, src_lengths, sizes.Vs)
    kpm = _padding(src_lengths, real_src.shape[1])
    memory, _, _ = _encode(backend, real_src, kpm, p, o, sizes.E)

    @unchanged.untracked()
    def step(tokens, state):
        prefix, memory, kpm = state
        prefix = np.concatenate([prefix, tokens[:, None]], axis=1)  # [N, t]
        logits = _decode(backend, prefix, memory, kpm, p, o, sizes.E, False)[0][:, -1]
        z = logits - logits.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True)), (prefix, memory, kpm)

    empty = np.zeros((memory.shape[0], 0), np.int64)
    return step, (empty, memory, kpm), sizes, memory.dtype


def transformer_greedy_decode(
    src: np.ndarray, params: Mapping[str, np.ndarray], *, nhead: int, max_len: int, bos: int,
    eos: int, src_lengths: Any = None, norm_first: bool = False, activation: str = "relu",
    eps: float = 1e-5, backend: ModuleType | None = None,
) -> np.ndarray:
    """Greedy decoding with the Transformer: ``y_{t+1} = argmax logits_t`` where each step runs
    the decoder on bos, y_1 .. y_t (the `numpy_ref.models.transformer` module docstring).

    src [B, Ts] -> tokens [B, T_out], T_out <= max_len (bos not included), padded with eos
    after each row's eos, as `greedy_decode`.
    """
    step, state, sizes, _ = _start(src, params, src_lengths, nhead, norm_first, activation, eps,
                                   backend)
    contract.decoding(max_len, bos, eos, sizes.Vt)
    return greedy(step, state, state[1].shape[0], max_len, bos, eos)


def transformer_beam_search(
    src: np.ndarray, params: Mapping[str, np.ndarray], *, nhead: int, beam_size: int,
    max_len: int, bos: int, eos: int, src_lengths: Any = None, length_penalty: float = 1.0,
    norm_first: bool = False, activation: str = "relu", eps: float = 1e-5,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Beam search with the Transformer: keep the k best hypotheses by
    ``score = sum log p / len ** length_penalty`` (the rules of `beam_search`; the
    `numpy_ref.models.transformer` module docstring).

    src [B, Ts] -> (tokens [B, T_out] padded with eos, scores [B] in the params' dtype).
    """
    step, state, sizes, dtype = _start(src, params, src_lengths, nhead, norm_first, activation,
                                       eps, backend)
    contract.decoding(max_len, bos, eos, sizes.Vt, beam_size, length_penalty)
    return beam(step, state, state[1].shape[0], int(beam_size), sizes.Vt, max_len, bos, eos,
                length_penalty, dtype)
