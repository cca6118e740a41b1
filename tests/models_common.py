"""Shared model-test fixtures: random cases, inputs, and the torch runs they are compared with.

A case fixes a model's configuration and sizes and a seed; `model_inputs` draws its token ids
(padded positions hold -1, which both sides must ignore), lengths and cotangents from
``numpy.random.default_rng(seed)``; `torch_module` builds the torch_impl module holding the
same params; `torch_grads` runs it forward and takes every parameter's gradient under the
random cotangents with ``torch.autograd.grad``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from backends import BACKENDS

import numpy_ref as ref
from torch_impl import BiLSTMAttention, Seq2SeqAttention, load_numpy_

PAD = -1  # what padded source positions hold: not a valid id, so it must never be looked up


class ModelCase(NamedTuple):
    model: str  # "classifier", "luong" or "bahdanau"
    score: str | None  # the seq2seq score (None: the decoder's default); None for the classifier
    B: int
    Ts: int  # source (or sentence) length
    Tt: int  # target length (seq2seq)
    V: int  # source vocabulary (the classifier's only one)
    Vt: int  # target vocabulary (seq2seq) or classes (classifier)
    E: int
    H: int
    L: int  # encoder layers (seq2seq)
    lengths: tuple[int, ...] | None
    seed_compatible: bool
    seed: int
    cell: str = "lstm"  # the recurrent cell, "lstm" or "gru"


def case_params(case: ModelCase, dtype=np.float64) -> dict[str, np.ndarray]:
    """Random params of the case's model (torch's init distributions, scaled up so that gates
    and tanh leave their linear range), keyed as the torch module's state_dict."""
    rng = np.random.default_rng(case.seed + 1)
    if case.model == "classifier":
        p = ref.init_bilstm_attention_params(case.V, case.E, case.H, case.Vt, cell=case.cell,
                                             rng=rng)
    else:
        p = ref.init_seq2seq_params(case.V, case.Vt, case.E, case.H, decoder=case.model,
                                    score=case.score, num_layers=case.L, cell=case.cell,
                                    rng=rng)
    return {k: (v * 1.5).astype(dtype) for k, v in p.items()}


def model_inputs(case: ModelCase, dtype=np.float64) -> dict:
    """ids (src, tgt), lengths and cotangents for a case; padded source positions hold PAD."""
    rng = np.random.default_rng(case.seed)
    src = rng.integers(0, case.V, (case.B, case.Ts))
    lengths = None if case.lengths is None else np.array(case.lengths)
    if lengths is not None:
        src[np.arange(case.Ts)[None, :] >= lengths[:, None]] = PAD
    out = {"src": src, "lengths": lengths}
    if case.model == "classifier":
        out["d_logits"] = rng.standard_normal((case.B, case.Vt)).astype(dtype)
        out["d_attention"] = rng.standard_normal((case.B, case.Ts)).astype(dtype)
    else:
        out["tgt"] = rng.integers(0, case.Vt, (case.B, case.Tt))
        out["d_logits"] = rng.standard_normal((case.B, case.Tt, case.Vt)).astype(dtype)
        out["d_attention"] = rng.standard_normal((case.B, case.Tt, case.Ts)).astype(dtype)
    return out


def run_ours(case: ModelCase, params: dict, inputs: dict, backend: str = "numpy_ref", *,
             with_d_attention: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Forward and backward of our model: (logits, attention, d_params)."""
    mod = BACKENDS[backend]
    d_attention = inputs["d_attention"] if with_d_attention else None
    if case.model == "classifier":
        logits, attention, cache = ref.bilstm_attention_forward(
            inputs["src"], params, lengths=inputs["lengths"],
            seed_compatible=case.seed_compatible, cell=case.cell, backend=mod)
        grads = ref.bilstm_attention_backward(inputs["d_logits"], cache, d_attention=d_attention)
    else:
        logits, attention, cache = ref.seq2seq_forward(
            inputs["src"], inputs["tgt"], params, decoder=case.model, score=case.score,
            src_lengths=inputs["lengths"], cell=case.cell, backend=mod)
        grads = ref.seq2seq_backward(inputs["d_logits"], cache, d_attention=d_attention)
    return logits, attention, grads


def torch_module(case: ModelCase, params: dict, device: str = "cpu") -> torch.nn.Module:
    """The torch_impl module of the case, holding `params` (in their dtype) on `device`."""
    dtype = torch.float64 if next(iter(params.values())).dtype == np.float64 else torch.float32
    if case.model == "classifier":
        m = BiLSTMAttention(case.V, case.E, case.H, case.Vt,
                            seed_compatible=case.seed_compatible, cell=case.cell)
    else:
        m = Seq2SeqAttention(case.V, case.Vt, case.E, case.H, decoder=case.model,
                             score=case.score, num_layers=case.L, cell=case.cell)
    m = m.to(device=device, dtype=dtype)
    return load_numpy_(m, params)


def torch_forward(case: ModelCase, m: torch.nn.Module, inputs: dict, device: str = "cpu"):
    src = torch.tensor(inputs["src"], device=device)
    lengths = None if inputs["lengths"] is None else torch.tensor(inputs["lengths"])
    if case.model == "classifier":
        return m(src, lengths)
    return m(src, torch.tensor(inputs["tgt"], device=device), lengths)


def torch_grads(case: ModelCase, params: dict, inputs: dict, device: str = "cpu", *,
                with_d_attention: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """torch's (logits, attention, d_params) under the same cotangents."""
    m = torch_module(case, params, device)
    logits, attention = torch_forward(case, m, inputs, device)
    names, leaves = zip(*m.named_parameters(), strict=True)
    outputs, cotangents = [logits], [torch.tensor(inputs["d_logits"], device=device)]
    if with_d_attention:
        outputs.append(attention)
        cotangents.append(torch.tensor(inputs["d_attention"], device=device))
    grads = torch.autograd.grad(outputs, leaves, cotangents, allow_unused=True)
    d_params = {n: (torch.zeros_like(p) if g is None else g).detach().cpu().numpy()
                for n, p, g in zip(names, leaves, grads, strict=True)}
    return (logits.detach().cpu().numpy(), attention.detach().cpu().numpy(), d_params)
