"""Validation of the models' arguments (see `numpy_ref.models`): token ids, lengths, and the
whole parameter dict, whose expected keys and shapes follow from the model's configuration.

Sizes are read off the parameters themselves (the vocabularies and E from the embeddings, H
from the first LSTM's ``weight_hh``, L from how many encoder layers there are), then every key
is checked against the shape those sizes imply. A missing, extra or misshaped key is a
`ValueError` that names it; a misshaped one names both shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks
from numpy_ref.contract.attention import SCORES
from numpy_ref.contract.fields import documented
from numpy_ref.contract.layers import integer_ids

DECODERS = ("luong", "bahdanau")
CELLS = ("lstm", "gru")
GATES = {"lstm": 4, "gru": 3}
DEFAULT_SCORE = {"luong": "general", "bahdanau": "additive"}


def cell_of(cell: Any) -> str:
    """Check a model's ``cell`` option: "lstm" or "gru"."""
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
    return cell


def _lstm_keys(prefix: str, input_size: int, H: int, num_layers: int, D: int, G: int = 4):
    """(key, shape, labels) of a torch.nn.LSTM's (G = 3: nn.GRU's) state_dict under
    `prefix`."""
    for layer in range(num_layers):
        for d in range(D):
            tail = f"_l{layer}" + ("_reverse" if d else "")
            ins, in_label = (input_size, "I") if layer == 0 else (D * H, "D*H")
            yield f"{prefix}weight_ih{tail}", (G * H, ins), f"[{G}H, {in_label}]"
            yield f"{prefix}weight_hh{tail}", (G * H, H), f"[{G}H, H]"
            yield f"{prefix}bias_ih{tail}", (G * H,), f"[{G}H]"
            yield f"{prefix}bias_hh{tail}", (G * H,), f"[{G}H]"


def _check_spec(params: Mapping[str, Any], spec, dtype: np.dtype, model: str
                ) -> dict[str, np.ndarray]:
    """Every (key, shape, labels) of `spec` present with that shape and `dtype`; no others."""
    expected = {key: (shape, labels) for key, shape, labels in spec}
    missing = [k for k in expected if k not in params]
    if missing:
        shape, labels = expected[missing[0]]
        raise ValueError(f"params: missing key {missing[0]!r} (expected shape {labels} = "
                         f"{shape}) for this {model}; {len(missing)} missing in all: {missing}")
    checks.no_unexpected_keys(params, set(expected), f"they are not part of this {model}")
    first = next(iter(expected))
    return {key: checks.param(params, key, shape, labels, dtype, f"params[{first!r}]")
            for key, (shape, labels) in expected.items()}


def _float_param(params: Any, key: str, labels: str) -> np.ndarray:
    """``params[key]``, a 2-D float array that fixes sizes (read before the full check)."""
    checks.leading_dim(params, key, 2, labels)
    a = params[key]
    if a.dtype not in checks.FLOAT_DTYPES:
        raise TypeError(f"params[{key!r}]: expected dtype float32 or float64, got {a.dtype}")
    return a


def _hidden(params: Any, key: str, G: int = 4) -> int:
    """H from ``params[key]``, an LSTM's (G = 3: a GRU's) weight_hh of shape [GH, H]."""
    rows = checks.leading_dim(params, key, 2, f"[{G}H, H]")
    if rows % G or params[key].shape[1] != rows // G:
        raise ValueError(f"params[{key!r}]: expected shape [{G}H, H], got {params[key].shape}")
    return rows // G


def token_ids(name: str, ids: Any, vocab: int, lengths: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [B, T]; only the real positions (t < lengths[b]) must be in 0..vocab-1.

    Returns (ids as given, ids with every padded position replaced by 0): padding is not
    data, so whatever it holds (-1, a huge id) changes nothing, exactly as zeros would.
    """
    checks.not_masked(name, ids)
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        integer_ids(name, ids, vocab)  # raises the type message
    if ids.ndim != 2 or 0 in ids.shape:
        raise ValueError(f"{name}: expected token ids [B, T] with B, T >= 1, got shape "
                         f"{ids.shape}")
    real = ids
    if lengths is not None:
        real = np.where(np.arange(ids.shape[1])[None, :] < lengths[:, None], ids, 0)
    integer_ids(name, real, vocab)
    return ids, real


def _lengths(name: str, lengths: Any, ids: Any) -> np.ndarray | None:
    if lengths is None:
        return None
    shape = np.shape(ids)
    if len(shape) != 2:
        return None  # token_ids reports the rank
    return checks.lengths_array(lengths, shape[0], shape[1], name)


# --------------------------------------------------------------------------------------------
# the seed classifier


@documented
class ClassifierSizes(NamedTuple):
    V: int  # vocabulary
    E: int  # embedding size
    H: int  # hidden size of each LSTM direction
    C: int  # classes


def bilstm_attention(ids: Any, params: Any, lengths: Any, seed_compatible: Any,
                     cell: Any = "lstm"):
    """Check `bilstm_attention_forward`'s arguments (the recurrent layer's params under
    ``lstm.`` or, with ``cell="gru"``, ``gru.``).

    Returns ``(real_ids [B, T], lengths or None, params, sizes)``: the ids with padding
    replaced by 0, the validated params (the caller's arrays), and `ClassifierSizes`.
    """
    if not isinstance(seed_compatible, bool):
        raise TypeError(f"seed_compatible: expected True or False, got {seed_compatible!r}")
    cell = cell_of(cell)
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    emb = _float_param(params, "embedding.weight", "[V, E]")
    V, E = emb.shape
    G = GATES[cell]
    H = _hidden(params, f"{cell}.weight_hh_l0", G)
    C = checks.leading_dim(params, "out.weight", 2, "[C, 2H]")
    spec = [("embedding.weight", (V, E), "[V, E]"),
            *_lstm_keys(f"{cell}.", E, H, 1, 2, G),
            ("out.weight", (C, 2 * H), "[C, 2H]"),
            ("out.bias", (C,), "[C]")]
    p = _check_spec(params, spec, emb.dtype, f"Bi{cell.upper()}-attention classifier "
                    f"(V={V}, E={E}, H={H}, C={C})")
    lengths = _lengths("lengths", lengths, ids)
    _, real = token_ids("ids", ids, V, lengths)
    return real, lengths, p, ClassifierSizes(V, E, H, C)


# --------------------------------------------------------------------------------------------
# the encoder-decoder


@documented
class Seq2SeqSizes(NamedTuple):
    Vs: int  # source vocabulary
    Vt: int  # target vocabulary
    E: int  # embedding size (both embeddings)
    H: int  # encoder hidden size per direction; the decoder's is 2H
    L: int  # encoder layers


def seq2seq_config(decoder: Any, score: Any) -> str:
    """Check the decoder and score names; return the score (its default when None)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder: expected one of {DECODERS}, got {decoder!r}")
    score = DEFAULT_SCORE[decoder] if score is None else score
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES} or None, got {score!r}")
    if decoder == "bahdanau" and score != "additive":
        raise ValueError(f"score: the 'bahdanau' decoder uses the 'additive' score only, got "
                         f"{score!r}")
    return score


def seq2seq_params(params: Any, decoder: str, score: str, cell: str = "lstm"
                   ) -> tuple[dict[str, np.ndarray], Seq2SeqSizes]:
    """Check a seq2seq params dict for `decoder`, `score` and `cell`; return it and its
    sizes."""
    cell = cell_of(cell)
    G = GATES[cell]
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
    src = _float_param(params, "src_embed.weight", "[Vs, E]")
    Vs, E = src.shape
    Vt = checks.leading_dim(params, "tgt_embed.weight", 2, "[Vt, E]")
    H = _hidden(params, "encoder.weight_hh_l0", G)
    L = 1
    while f"encoder.weight_ih_l{L}" in params:
        L += 1
    H2 = 2 * H
    spec = [("src_embed.weight", (Vs, E), "[Vs, E]"),
            *_lstm_keys("encoder.", E, H, L, 2, G),
            ("tgt_embed.weight", (Vt, E), "[Vt, E]")]
    attention = []
    if score == "general":
        attention = [("decoder.attention.W", (H2, H2), "[2H, 2H]")]
    elif score == "additive":
        attention = [("decoder.attention.W_query", (H2, H2), "[A, 2H] (A = 2H)"),
                     ("decoder.attention.W_key", (H2, H2), "[A, 2H] (A = 2H)"),
                     ("decoder.attention.v", (H2,), "[A]"),
                     ("decoder.attention.b", (H2,), "[A]")]
    if decoder == "luong":
        spec += [*_lstm_keys(f"decoder.{cell}.", E, H2, 1, 1, G), *attention,
                 ("decoder.concat.weight", (H2, 2 * H2), "[2H, 4H]"),
                 ("generator.weight", (Vt, H2), "[Vt, 2H]")]
    else:
        spec += [*attention,
                 ("decoder.cell.weight_ih", (G * H2, E + H2), f"[{2 * G}H, E + 2H]"),
                 ("decoder.cell.weight_hh", (G * H2, H2), f"[{2 * G}H, 2H]"),
                 ("decoder.cell.bias_ih", (G * H2,), f"[{2 * G}H]"),
                 ("decoder.cell.bias_hh", (G * H2,), f"[{2 * G}H]"),
                 ("generator.weight", (Vt, 2 * H2 + E), "[Vt, 4H + E]")]
    spec.append(("generator.bias", (Vt,), "[Vt]"))
    model = (f"{decoder} seq2seq with the {score!r} score and {cell} cells (Vs={Vs}, Vt={Vt}, "
             f"E={E}, H={H}, L={L})")
    return _check_spec(params, spec, src.dtype, model), Seq2SeqSizes(Vs, Vt, E, H, L)


def seq2seq(src: Any, tgt: Any, params: Any, decoder: Any, score: Any, src_lengths: Any,
            cell: Any = "lstm"):
    """Check `seq2seq_forward`'s arguments.

    Returns ``(real_src [B, Ts], tgt [B, Tt], src_lengths or None, score, params, sizes)``.
    """
    score = seq2seq_config(decoder, score)
    p, sizes = seq2seq_params(params, decoder, score, cell)
    real_src, src_lengths = source(src, src_lengths, sizes.Vs)
    _, tgt = token_ids("tgt", tgt, sizes.Vt, None)
    if tgt.shape[0] != real_src.shape[0]:
        raise ValueError(f"tgt: batch {tgt.shape[0]} does not match src's batch "
                         f"{real_src.shape[0]} (src {np.shape(src)}, tgt {tgt.shape})")
    return real_src, tgt, src_lengths, score, p, sizes


def source(src: Any, src_lengths: Any, Vs: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Source ids [B, Ts] and their lengths; returns (ids with padding replaced by 0,
    lengths or None)."""
    src_lengths = _lengths("src_lengths", src_lengths, src)
    _, real = token_ids("src", src, Vs, src_lengths)
    return real, src_lengths


def decoding(max_len: Any, bos: Any, eos: Any, Vt: int, beam_size: Any = 1,
             length_penalty: Any = 0.0) -> None:
    """Check greedy decoding's and beam search's options."""
    for name, value, low in (("max_len", max_len, 1), ("beam_size", beam_size, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    for name, value in (("bos", bos), ("eos", eos)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not (
                0 <= value < Vt):
            raise ValueError(f"{name}: expected a token id in 0..{Vt - 1}, got {value!r}")
    if not isinstance(length_penalty, (int, float, np.floating)) or isinstance(
            length_penalty, bool) or not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty: expected a finite float, got {length_penalty!r}")


def group(params: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The entries of `params` under ``prefix.``, with the prefix taken off (a submodule's
    own state_dict: ``group(p, "out") == {"weight": ..., "bias": ...}``)."""
    head = prefix + "."
    return {k[len(head):]: v for k, v in params.items() if k.startswith(head)}


def prefixed(prefix: str, grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `group`: ``{prefix.key: value}``."""
    return {f"{prefix}.{k}": v for k, v in grads.items()}


def as_cell(lstm_params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A one-layer unidirectional nn.LSTM's params under nn.LSTMCell's names (``weight_ih_l0``
    -> ``weight_ih``): the same step, for decoding one token at a time."""
    return {k.removesuffix("_l0"): v for k, v in lstm_params.items()}
