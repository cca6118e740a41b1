"""Training-step problems and backends for the registry in `benchmarks.cases`.

Problem: one training step of a model on one batch: forward, the cross-entropy loss (mean over
the batch; over the target tokens for seq2seq), backward, and an Adam step (lr 1e-3). The
models are the seed's classifier (labels over C classes), the encoder-decoder with a Luong
or a Bahdanau decoder, and the same encoder-decoder as a Transformer (teacher forcing: the
decoder reads tgt[:, :-1] and predicts tgt[:, 1:]; the Transformer's attention forms no weights
in any backend).
The row returns the loss and every parameter's gradient as computed before the update, and is
validated on them against `numpy_ref` in float64 on the same inputs.

Backends:
- ``numpy_ref`` and ``kernels``: `numpy_ref.models` with ``backend=`` that module and that
  module's Adam (kernels' is fused into one pass);
- ``torch``: the torch_impl module holding the same weights, autograd, `torch.optim.Adam`.
Each call continues training from where the previous one left the weights; the batch stays.

Work: the flops of the step's matrix products, forward and backward (each forward product
has two in the backward, so 3x forward), counted in `_forward_gflop`; the elementwise math
(gates, softmax, tanh, Adam) is not counted. The ceiling is that work at the best BLAS rate of
the model's largest product (the classifier's LSTM input product [T*B, E+H] @ [E+H, 4H], the
seq2seq generator [B*Tt, 2H (+2H+E)] @ [., V], the Transformer's [B*Tt, E] @ [E, V]): an
estimate, since most of a step's products are
smaller and slower than its largest, so it is a ceiling a step cannot reach.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

import kernels
import numpy_ref
from benchmarks.ceilings import Product, gemm_ceiling
from benchmarks.core import TRAINING_STEP, Backend, Prepared, Problem
from torch_impl import BiLSTMAttention, Seq2SeqAttention, TransformerSeq2Seq, load_numpy_
from torch_impl.precision import true_float32

LR = 1e-3


@dataclass(frozen=True)
class TrainingInputs:
    """One model, one batch."""

    model: str  # "classifier", "luong", "bahdanau" or "transformer"
    score: str | None  # the seq2seq attention score (None: the decoder's default)
    sizes: dict[str, int]  # V, C / Vs, Vt, E, H (and B, T / Ts, Tt); the Transformer's
    #                        E (d_model), nhead, F, layers
    params: dict[str, np.ndarray]  # the torch_impl module's state_dict
    batch: tuple[np.ndarray, ...]  # classifier: (ids [B, T], labels [B]);
    #                                seq2seq: (src [B, Ts], tgt_in [B, Tt], tgt_out [B, Tt])
    cell: str = "lstm"  # the recurrent cell, "lstm" or "gru"
    activation: str = "gelu"  # the Transformer's feed-forward activation

    def astype(self, dtype: np.dtype) -> TrainingInputs:
        """The same inputs with params in `dtype` (exact when widening float32 to float64)."""
        return replace(self, params={k: v.astype(dtype) for k, v in self.params.items()})


def _transformer_gflop(s: Mapping[str, int]) -> float:
    """The Transformer's forward product flops, in GFLOP: per layer the in- and out-
    projections, the scores and the context (counted in full, causal or not), the feed-forward
    block; then the generator."""
    B, S, T, E, F, V, n = s["B"], s["Ts"], s["Tt"], s["E"], s["F"], s["Vt"], s["layers"]
    encoder = 2 * B * S * (4 * E * E + 2 * S * E + 2 * E * F)
    decoder = 2 * B * T * (4 * E * E + 2 * T * E + 2 * E * F)  # self-attention, feed-forward
    decoder += 2 * B * (2 * T * E * E + 2 * S * E * E + 2 * T * S * E)  # cross-attention
    return (n * (encoder + decoder) + 2 * B * T * E * V) / 1e9


def _forward_gflop(model: str, s: Mapping[str, int], G: int = 4) -> float:
    """The forward's matrix-product flops (2 per multiply-add), in GFLOP (G gate blocks: 4
    for the LSTM, 3 for the GRU)."""
    if model == "transformer":
        return _transformer_gflop(s)
    if model == "classifier":
        B, T, E, H, C = s["B"], s["T"], s["E"], s["H"], s["C"]
        flops = 2 * 2 * T * B * G * H * (E + H)  # BiLSTM (BiGRU)
        flops += 2 * 2 * B * T * 2 * H  # attention scores and context
        flops += 2 * B * 2 * H * C  # output layer
        return flops / 1e9
    B, Ts, Tt, E, H, V = s["B"], s["Ts"], s["Tt"], s["E"], s["H"], s["Vt"]
    H2 = 2 * H
    flops = 2 * 2 * Ts * B * G * H * (E + H)  # encoder (one layer)
    if model == "luong":
        flops += 2 * Tt * B * G * H2 * (E + H2)  # decoder LSTM
        flops += 2 * B * Tt * H2 * H2 + 2 * 2 * B * Tt * Ts * H2  # general score, context
        flops += 2 * B * Tt * 2 * H2 * H2 + 2 * B * Tt * H2 * V  # concat layer, generator
    else:
        flops += 2 * B * Ts * H2 * H2  # the keys' projection, once
        flops += Tt * (2 * B * H2 * H2 + 2 * B * Ts * H2)  # query projection, context
        flops += Tt * 2 * B * G * H2 * (E + 2 * H2)  # the cell
        flops += 2 * B * Tt * (2 * H2 + E) * V  # generator
    return flops / 1e9


def training_problem(model: str, *, score: str | None = None, B: int, T: int, E: int, H: int,
                     V: int, C: int = 2, cell: str = "lstm", nhead: int = 8, layers: int = 2,
                     activation: str = "gelu", suites: tuple[str, ...] = ("default",)
                     ) -> Problem:
    """A training step of `model` at batch B, T tokens (Ts = Tt = T for seq2seq), embedding
    E, hidden H, vocabulary V (both vocabularies for seq2seq), C classes (classifier), with
    LSTM or GRU cells; the Transformer: d_model E, dim_feedforward H, nhead heads, `layers`
    layers each side, its feed-forward `activation` (GELU by default: with ReLU a float32
    pre-activation that rounds to the other side of 0 flips its unit's gradient, and
    d_linear1.weight of every backend, torch's included, leaves the float32 validation bound)."""
    G = 4 if cell == "lstm" else 3
    tag = "" if cell == "lstm" else "-gru"
    if model == "transformer":
        sizes = dict(B=B, Ts=T, Tt=T, E=E, F=H, Vs=V, Vt=V, nhead=nhead, layers=layers)
        size = f"transformer-{activation},B{B},T{T},d{E},h{nhead},L{layers}+{layers},F{H},V{V}"
        largest = Product(B * T, E, V)
    elif model == "classifier":
        sizes = dict(B=B, T=T, E=E, H=H, V=V, C=C)
        size = f"classifier{tag},B{B},T{T},E{E},H{H},V{V}"
        largest = Product(T * B, E + H, G * H)
    else:
        sizes = dict(B=B, Ts=T, Tt=T, E=E, H=H, Vs=V, Vt=V)
        size = f"{model}{'-' + score if score else ''}{tag},B{B},T{T},E{E},H{H},V{V}"
        largest = Product(B * T, 2 * H if model == "luong" else 4 * H + E, V)

    def make(dtype: np.dtype, rng: np.random.Generator) -> TrainingInputs:
        if model == "transformer":
            params = numpy_ref.init_transformer_seq2seq_params(
                V, V, d_model=E, nhead=nhead, num_encoder_layers=layers,
                num_decoder_layers=layers, dim_feedforward=H, rng=rng)
            tgt = rng.integers(0, V, (B, T + 1))
            batch = (rng.integers(0, V, (B, T)), tgt[:, :-1], tgt[:, 1:])
        elif model == "classifier":
            params = numpy_ref.init_bilstm_attention_params(V, E, H, C, cell=cell, rng=rng)
            batch = (rng.integers(0, V, (B, T)), rng.integers(0, C, B))
        else:
            params = numpy_ref.init_seq2seq_params(V, V, E, H, decoder=model, score=score,
                                                   cell=cell, rng=rng)
            tgt = rng.integers(0, V, (B, T + 1))
            batch = (rng.integers(0, V, (B, T)), tgt[:, :-1], tgt[:, 1:])
        return TrainingInputs(model, score, sizes, params, batch, cell,
                              activation).astype(dtype)

    forward = _forward_gflop(model, sizes, G)
    return Problem(
        op="train", size=size, suites=suites, make=make,
        reference=lambda inputs, pass_: _numpy_step(inputs.astype(np.float64), numpy_ref,
                                                    update=False),
        work=lambda pass_, dtype: 3 * forward,
        ceilings={TRAINING_STEP: gemm_ceiling(
            [largest], scale=3 * forward / largest.gflop,
            name=f"its GFLOP at the BLAS rate of its largest product {largest}")},
        shape={"model": model, "cell": cell, **sizes},
    )


def _numpy_step(inputs: TrainingInputs, module: ModuleType, optimizer=None,
                update: bool = True) -> dict[str, np.ndarray]:
    """One step of `numpy_ref.models` on ``backend=module``: the loss and the gradients
    ``d_<key>``; with `update`, `optimizer` (an Adam over inputs.params) steps too."""
    p, one = inputs.params, np.ones((), next(iter(inputs.params.values())).dtype)
    if inputs.model == "classifier":
        ids, labels = inputs.batch
        logits, _, cache = numpy_ref.bilstm_attention_forward(ids, p, cell=inputs.cell,
                                                              backend=module)
        loss, ce = module.cross_entropy_forward(logits, labels)
        grads = numpy_ref.bilstm_attention_backward(module.cross_entropy_backward(one, ce),
                                                    cache)
    else:
        src, tgt_in, tgt_out = inputs.batch
        if inputs.model == "transformer":
            logits, _, cache = numpy_ref.transformer_seq2seq_forward(
                src, tgt_in, p, nhead=inputs.sizes["nhead"], activation=inputs.activation,
                need_weights=False, backend=module)
        else:
            logits, _, cache = numpy_ref.seq2seq_forward(src, tgt_in, p, decoder=inputs.model,
                                                         score=inputs.score, cell=inputs.cell,
                                                         backend=module)
        V = logits.shape[-1]
        loss, ce = module.cross_entropy_forward(logits.reshape(-1, V), tgt_out.reshape(-1))
        d_logits = module.cross_entropy_backward(one, ce).reshape(logits.shape)
        backward = (numpy_ref.transformer_seq2seq_backward if inputs.model == "transformer"
                    else numpy_ref.seq2seq_backward)
        grads = backward(d_logits, cache)
    if update:
        optimizer.step(grads)
    return {"loss": np.asarray(loss), **{f"d_{k}": g for k, g in grads.items()}}


def module_backend(name: str, module: ModuleType) -> Backend:
    """`numpy_ref.models` on ``backend=module``, with ``module.Adam``."""

    def prepare(inputs: TrainingInputs, pass_: str) -> Prepared:
        own = replace(inputs, params={k: v.copy() for k, v in inputs.params.items()})
        optimizer = module.Adam(own.params, lr=LR)
        return Prepared(run=partial(_numpy_step, own, module, optimizer),
                        collect=lambda result: result)

    return Backend(name=name, op="train", device="cpu", passes=(TRAINING_STEP,),
                   prepare=prepare)


def _prepare_torch(inputs: TrainingInputs, pass_: str, *, device: str) -> Prepared:
    """The torch_impl module with the same weights; autograd and torch.optim.Adam."""
    if device == "cuda":
        true_float32()
    s = inputs.sizes
    if inputs.model == "transformer":
        module = TransformerSeq2Seq(s["Vs"], s["Vt"], d_model=s["E"], nhead=s["nhead"],
                                    num_encoder_layers=s["layers"],
                                    num_decoder_layers=s["layers"], dim_feedforward=s["F"],
                                    activation=inputs.activation)
    elif inputs.model == "classifier":
        module = BiLSTMAttention(s["V"], s["E"], s["H"], s["C"], cell=inputs.cell)
    else:
        module = Seq2SeqAttention(s["Vs"], s["Vt"], s["E"], s["H"], decoder=inputs.model,
                                  score=inputs.score, cell=inputs.cell)
    dtype = torch.float32 if next(iter(inputs.params.values())).dtype == np.float32 \
        else torch.float64
    module = load_numpy_(module.to(device=device, dtype=dtype), inputs.params)
    batch = [torch.from_numpy(a).to(device) for a in inputs.batch]
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    names = [n for n, _ in module.named_parameters()]

    def run() -> tuple[torch.Tensor, ...]:
        if inputs.model == "classifier":
            logits, _ = module(batch[0])
            loss = F.cross_entropy(logits, batch[1])
        else:
            extra = {"need_weights": False} if inputs.model == "transformer" else {}
            logits, _ = module(batch[0], batch[1], **extra)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[2].reshape(-1))
        optimizer.zero_grad()  # set_to_none: the next backward allocates fresh gradients
        loss.backward()
        # the gradients before the update, without a copy (the NumPy backends make none):
        # the step reads them and changes only the parameters
        grads = tuple(p.grad for p in module.parameters())
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return (loss.detach(), *grads)

    def collect(result) -> dict[str, np.ndarray]:
        arrays = [t.cpu().numpy() for t in result]
        return {"loss": arrays[0], **{f"d_{n}": a for n, a in zip(names, arrays[1:],
                                                                   strict=True)}}

    return Prepared(run=run, collect=collect)


NUMPY_REF = module_backend("numpy_ref", numpy_ref)
KERNELS = module_backend("kernels", kernels)
TORCH_CPU = Backend(name="torch", op="train", device="cpu", passes=(TRAINING_STEP,),
                    prepare=partial(_prepare_torch, device="cpu"), memory="torch")
TORCH_CUDA = Backend(name="torch", op="train", device="cuda", passes=(TRAINING_STEP,),
                     prepare=partial(_prepare_torch, device="cuda"),
                     available=torch.cuda.is_available, memory="torch")
