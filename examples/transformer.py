r"""A Transformer learns to reverse sequences, in NumPy: an encoder-decoder trained by hand
(no autograd, no torch), then its attention drawn per layer and per head.

Run it from the repository root::

    python examples/transformer.py                    # pure NumPy (numpy_ref)
    python examples/transformer.py --backend kernels  # the same model on the Numba ops

The task. A source is a random string of S symbols ("a", "b", ...), its length drawn from
min_len..max_len; the target is the source reversed, then <eos>. Output token t (t < len)
is source token len - 1 - t, so the alignment the cross-attention should find is the
anti-diagonal. Every training step draws a fresh batch; the held-out sources are drawn first
and never appear in training. The decoder is teacher-forced: its input is <bos> followed by
the target without its <eos>; padded source positions are kept out by ``src_lengths``,
padded target positions out of the loss by ``ignore_index``.

The model (``numpy_ref.transformer_seq2seq_forward``: torch's ``nn.Transformer`` stacks,
post-norm, ReLU, dropout 0, with the Annotated Transformer's embeddings)::

    x      = src_embed(src) * sqrt(E) + PE           sinusoidal positions      [B, Ts, E]
    memory = encoder(x)                               n_enc layers, h heads     [B, Ts, E]
    out    = decoder(tgt_embed(tgt_in) * sqrt(E) + PE, memory)   causal         [B, Tt, E]
    loss   = cross_entropy(generator(out), tgt_out)  mean over the real target tokens

Each step is forward -> loss -> backward (``transformer_seq2seq_backward``) -> clip the
gradient norm -> Adam, with the learning rate rising linearly over the warmup steps, then
falling linearly to lr_final.

What is measured, on the held-out set, at the end (and every ``eval_every`` steps):

- the teacher-forced loss, and the greedy decoding (``transformer_greedy_decode``, fed its own
  outputs): token accuracy over the len + 1 target tokens (<eos> included) and exact match,
  the share of sequences entirely right;
- per decoder layer and head, the alignment agreement of the teacher-forced cross-attention:
  the share of output steps t < len whose argmax is source position len - 1 - t.

The figures are drawn for one held-out source of the longest length. The decoder's
cross-attention weights come with the model's forward; the encoder's self-attention weights
do not (its layers run without them), so ``encoder_self_attention`` runs the encoder layer
by layer and recomputes each layer's self-attention, with weights, on exactly what the layer
feeds it (post-norm: the layer's input itself), checking that its stack gives the model's
memory.

The sizes were chosen by experiment on this 2-core machine: S = 12, lengths 4..10, E = 32,
h = 4, 2 + 2 layers, F = 64 (44k parameters), batch 64, Adam with lr 0.003 after 100 warmup
steps falling to 0.0001, clipping at 1, 1000 steps (about 27 ms each on one thread). Held-out
greedy exact match ends at 1.000 with seeds 0, 1 and 2 (0.996-1.000 at step 750; also 1.000
after a 700- or a 1500-step schedule). The demo takes 45-48 s on numpy_ref and 31-39 s on
``--backend kernels``, with other processes keeping about one CPU busy. Each backend repeats
its run bit for bit for a seed; the two differ in the last bits, and so slightly in the
printed figures. ``--threads`` (default 1) is the number of BLAS and Numba threads
(``_common.limit_threads``). ``--quick`` shrinks everything to a smoke run for the tests: its
numbers mean nothing.

Output: the printed lines, and in ``--out`` (default ``examples-out/transformer``)
``encoder_self_attention.png`` (layers down, heads across: source tokens against source
tokens), ``decoder_cross_attention.png`` (layers down, heads across: output tokens against
source tokens, the true alignment outlined in red) and ``results.json`` (every printed
number, the options, sizes, seeds, the evaluation log and the timings).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from _common import (
    BACKENDS,
    MachineLoad,
    backend_module,
    describe_load,
    limit_threads,
    non_negative_int,
    positive_int,
    write_json,
)
from matplotlib.patches import Rectangle
from tqdm import tqdm

import numpy_ref
from numpy_ref.models.transformer import positional_encoding

PAD, BOS, EOS = 0, 1, 2  # special token ids; symbol k is id k + 3
IGNORE = -100  # target id of padded steps: cross-entropy skips them


class Sizes(NamedTuple):
    """Everything that sizes the run (see the module docstring)."""

    symbols: int  # S, the alphabet
    min_len: int  # source lengths are drawn from min_len..max_len
    max_len: int
    n_test: int  # held-out sources, none of them ever trained on
    d_model: int  # E
    nhead: int  # h
    layers: int  # encoder layers = decoder layers
    dim_feedforward: int  # F
    batch_size: int
    lr: float  # Adam's peak learning rate, reached after the warmup ...
    lr_final: float  # ... then falling linearly to this at the last step
    warmup: int  # steps of the linear warmup from 0
    clip: float  # max gradient norm
    steps: int
    eval_every: int  # held-out evaluation every this many steps (and at the end)


DEFAULT = Sizes(symbols=12, min_len=4, max_len=10, n_test=256, d_model=32, nhead=4, layers=2,
                dim_feedforward=64, batch_size=64, lr=3e-3, lr_final=1e-4, warmup=100,
                clip=1.0, steps=1000, eval_every=200)
QUICK = Sizes(symbols=5, min_len=2, max_len=4, n_test=16, d_model=8, nhead=2, layers=1,
              dim_feedforward=16, batch_size=8, lr=3e-3, lr_final=1e-4, warmup=2, clip=1.0,
              steps=8, eval_every=4)


class Data(NamedTuple):
    """Sources and targets, padded to the batch's longest source."""

    src: np.ndarray  # [N, Ts] ids, PAD past each length
    lengths: np.ndarray  # [N] source lengths
    tgt_in: np.ndarray  # [N, Ts + 1] decoder input: BOS, reversed source, PAD
    tgt_out: np.ndarray  # [N, Ts + 1] what to predict: reversed source, EOS, IGNORE


def vocabulary(symbols: int) -> list[str]:
    """Token names by id: the three specials, then the symbols a, b, c, ..."""
    return ["<pad>", "<bos>", "<eos>"] + [chr(ord("a") + k) for k in range(symbols)]


def make_data(rng: np.random.Generator, n: int, sizes: Sizes, exclude: set,
              remember: bool) -> Data:
    """n random sources of lengths min_len..max_len, none in `exclude` (a set of tuples of
    ids; the new ones are added when `remember`, so held-out sources are distinct), and their
    reversal targets, padded to the longest of them."""
    sources = []
    while len(sources) < n:
        L = int(rng.integers(sizes.min_len, sizes.max_len + 1))
        s = rng.integers(3, 3 + sizes.symbols, L)
        if tuple(s) in exclude:
            continue
        if remember:
            exclude.add(tuple(s))
        sources.append(s)
    T = max(len(s) for s in sources)
    src = np.full((n, T), PAD, np.int64)
    tgt_in = np.full((n, T + 1), PAD, np.int64)
    tgt_out = np.full((n, T + 1), IGNORE, np.int64)
    lengths = np.array([len(s) for s in sources], np.int64)
    for i, s in enumerate(sources):
        L = len(s)
        src[i, :L] = s
        tgt_in[i, 0], tgt_in[i, 1:L + 1] = BOS, s[::-1]
        tgt_out[i, :L], tgt_out[i, L] = s[::-1], EOS
    return Data(src, lengths, tgt_in, tgt_out)


def group(params: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The params under ``prefix.``, with the prefix taken off."""
    return {k[len(prefix) + 1:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def learning_rate(step: int, sizes: Sizes) -> float:
    """Linear warmup from 0 to lr over `warmup` steps, then linear decay to lr_final."""
    if step < sizes.warmup:
        return sizes.lr * (step + 1) / sizes.warmup
    frac = (step - sizes.warmup) / max(sizes.steps - sizes.warmup - 1, 1)
    return sizes.lr + (sizes.lr_final - sizes.lr) * frac


def train_step(params: dict[str, np.ndarray], optimizer: Any, b: Data, sizes: Sizes,
               bk: ModuleType) -> float:
    """One minibatch: forward -> loss -> backward -> clip -> Adam step; returns the loss."""
    logits, _, cache = numpy_ref.transformer_seq2seq_forward(  # [B, Tt, V]
        b.src, b.tgt_in, params, nhead=sizes.nhead, src_lengths=b.lengths, backend=bk)
    B, Tt, V = logits.shape
    loss, ce_cache = bk.cross_entropy_forward(logits.reshape(B * Tt, V),
                                              b.tgt_out.reshape(B * Tt), ignore_index=IGNORE)
    d_logits = bk.cross_entropy_backward(1.0, ce_cache).reshape(B, Tt, V)
    grads = numpy_ref.transformer_seq2seq_backward(d_logits, cache)  # same keys as params
    bk.clip_grad_norm(grads, sizes.clip)
    optimizer.step(grads)
    return float(loss)


def evaluate(params: dict[str, np.ndarray], data: Data, sizes: Sizes, bk: ModuleType
             ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Held-out figures (see the module docstring), the teacher-forced cross-attention
    [n_dec, N, h, Tt, Ts] and the greedy outputs [N, Tt] (EOS after each one's end)."""
    N, Tt = data.tgt_out.shape
    logits, attention, _ = numpy_ref.transformer_seq2seq_forward(
        data.src, data.tgt_in, params, nhead=sizes.nhead, src_lengths=data.lengths, backend=bk)
    loss, _ = bk.cross_entropy_forward(logits.reshape(N * Tt, -1), data.tgt_out.reshape(-1),
                                       ignore_index=IGNORE)
    # alignment: output step t < len comes from source position len - 1 - t
    t = np.arange(Tt)[None, :]  # [1, Tt]
    aligned = data.lengths[:, None] - 1 - t  # [N, Tt]
    real = t < data.lengths[:, None]  # the steps that have a source token (not <eos>)
    argmax = attention.argmax(axis=-1)  # [n_dec, N, h, Tt]
    agreement = (argmax.transpose(0, 2, 1, 3)[:, :, real]
                 == aligned[real][None, None, :]).mean(axis=-1)  # [n_dec, h]
    rows, steps = np.nonzero(real)
    on_aligned = attention[:, rows, :, steps, aligned[rows, steps]]  # [K, n_dec, h]
    weight_on_aligned = on_aligned.mean(axis=0)  # [n_dec, h]
    out = numpy_ref.transformer_greedy_decode(data.src, params, nhead=sizes.nhead, max_len=Tt,
                                              bos=BOS, eos=EOS, src_lengths=data.lengths,
                                              backend=bk)
    greedy = np.full((N, Tt), EOS, np.int64)
    greedy[:, :out.shape[1]] = out
    scored = data.tgt_out != IGNORE  # the len + 1 target tokens of each row
    correct = (greedy == data.tgt_out) | ~scored
    figures = {"loss": float(loss), "token_accuracy": float(correct[scored].mean()),
               "exact_match": float(correct.all(axis=1).mean()),
               "cross_attention_agreement": agreement,
               "cross_attention_weight_on_aligned": weight_on_aligned}
    return figures, attention, greedy


def encoder_self_attention(params: dict[str, np.ndarray], src: np.ndarray, sizes: Sizes,
                           bk: ModuleType) -> np.ndarray:
    """The encoder's self-attention weights per layer and head [n_enc, h, Ts, Ts] for one
    unpadded source `src` [Ts]: the encoder layers run one at a time, and each layer's
    self-attention is recomputed with weights on its input (post-norm layers feed it x)."""
    table = params["src_embed.weight"]
    E = table.shape[1]
    x0 = table[src][None] * np.sqrt(E) + positional_encoding(len(src), E)  # the model's _embed
    x, weights = x0, []
    for i in range(sizes.layers):
        layer = group(params, f"encoder.layers.{i}")
        _, w, _ = bk.multihead_attention_forward(
            x, x, x, group(layer, "self_attn"), num_heads=sizes.nhead, need_weights=True,
            average_attn_weights=False, batch_first=True)
        weights.append(w[0])  # [h, Ts, Ts]
        x, _ = numpy_ref.transformer_encoder_layer_forward(
            x, layer, nhead=sizes.nhead, batch_first=True, backend=bk)
    # the same stack as the model's: layer by layer, then the final norm, gives its memory
    x, _ = bk.layer_norm_forward(x, group(params, "encoder.norm"), eps=1e-5)
    memory, _ = numpy_ref.transformer_encoder_forward(
        x0, group(params, "encoder"), nhead=sizes.nhead, batch_first=True, backend=bk)
    assert np.allclose(x, memory, rtol=1e-12, atol=1e-12), "the encoder was not replayed"
    return np.stack(weights)


def _grid(n_rows: int, n_cols: int, cell: tuple[float, float]):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell[0] * n_cols + 1.2, cell[1] * n_rows
                                                      + 0.8), squeeze=False,
                             layout="constrained")
    return fig, axes


def plot_encoder(weights: np.ndarray, src: np.ndarray, names: list[str], path: Path) -> None:
    """Encoder self-attention of one source: a grid of layers (down) x heads (across), each
    query (source position, down) against key (source position, across)."""
    n_layers, n_heads, L, _ = weights.shape
    tokens = [f"{names[i]}{k}" for k, i in enumerate(src)]
    top = float(weights.max())  # the colour scale ends at the largest weight, not at 1
    fig, axes = _grid(n_layers, n_heads, (2.9, 2.9))
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer, head]
            im = ax.imshow(weights[layer, head], cmap="viridis", vmin=0, vmax=top)
            ax.set_xticks(range(L), tokens, fontsize=7)
            ax.set_yticks(range(L), tokens, fontsize=7)
            ax.set_title(f"encoder layer {layer}, head {head}", fontsize=9)
            if layer == n_layers - 1:
                ax.set_xlabel("key (source token, position)", fontsize=8)
            if head == 0:
                ax.set_ylabel("query (source token, position)", fontsize=8)
    fig.suptitle(f"encoder self-attention, held-out source '{''.join(names[i] for i in src)}'",
                 fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.6, label=f"attention weight (scale 0..{top:.2f})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decoder(weights: np.ndarray, src: np.ndarray, tgt_out: np.ndarray, greedy: np.ndarray,
                 agreement: np.ndarray, on_aligned: np.ndarray, names: list[str], path: Path
                 ) -> None:
    """Teacher-forced decoder cross-attention of one source: a grid of layers (down) x heads
    (across), each output token (down) against source token (across), the true alignment
    (len - 1 - t) outlined in red."""
    n_layers, n_heads, T_out, L = weights.shape
    fig, axes = _grid(n_layers, n_heads, (2.9, 3.1))
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer, head]
            im = ax.imshow(weights[layer, head], cmap="viridis", vmin=0, vmax=1)
            for t in range(L):
                ax.add_patch(Rectangle((L - 1 - t - 0.5, t - 0.5), 1, 1, fill=False,
                                       ec="red", lw=0.9))
            ax.set_xticks(range(L), [f"{names[i]}{k}" for k, i in enumerate(src)], fontsize=7)
            ax.set_yticks(range(T_out), [names[i] for i in tgt_out], fontsize=7)
            ax.set_title(f"decoder layer {layer}, head {head}\nheld-out: argmax "
                         f"{agreement[layer, head]:.0%}, weight {on_aligned[layer, head]:.2f}",
                         fontsize=9)
            if layer == n_layers - 1:
                ax.set_xlabel("source token, position", fontsize=8)
            if head == 0:
                ax.set_ylabel("output token (reference)", fontsize=8)
    got = "".join(names[i] for i in greedy[:L]) + ("" if greedy[L] == EOS else "...")
    ok = "correct" if np.array_equal(greedy[:L + 1], tgt_out) else "WRONG"
    fig.suptitle(f"decoder cross-attention (teacher-forced), source "
                 f"'{''.join(names[i] for i in src)}', greedy '{got}' ({ok}); red: the true "
                 f"alignment; held-out share of steps whose argmax is on it, mean weight there",
                 fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Train a Transformer encoder-decoder to reverse sequences in NumPy and draw "
                    "its encoder self-attention and decoder cross-attention per layer and head.")
    parser.add_argument("--backend", choices=BACKENDS, default="numpy_ref",
                        help="the op module the model runs on: numpy_ref (pure NumPy, the "
                             "default) or kernels (Numba)")
    parser.add_argument("--out", type=Path, default=Path("examples-out") / "transformer",
                        help="folder for the figures and results.json (default: "
                             "examples-out/transformer)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"training steps, >= 1 (default {DEFAULT.steps}, "
                             f"{QUICK.steps} with --quick)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="random seed of the initial weights and the data (default 0)")
    parser.add_argument("--threads", type=non_negative_int, default=1,
                        help="threads of NumPy's BLAS and of the kernels' parallel loops; 0 "
                             "leaves the libraries' defaults (default 1: robust on a shared "
                             "machine)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny data and model and a few steps: a smoke run for the tests "
                             "(its numbers mean nothing)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, draw, write results.json; returns the exit status."""
    args = parse_args(argv)
    sizes = QUICK if args.quick else DEFAULT
    if args.steps is not None:
        sizes = sizes._replace(steps=args.steps)
    bk = backend_module(args.backend)
    limit_threads(args.threads, args.backend)
    args.out.mkdir(parents=True, exist_ok=True)
    load = MachineLoad().start()

    data_rng = np.random.default_rng(args.seed)
    held_out: set = set()
    test_data = make_data(data_rng, sizes.n_test, sizes, held_out, remember=True)
    names = vocabulary(sizes.symbols)
    V = len(names)
    params = numpy_ref.init_transformer_seq2seq_params(
        V, V, d_model=sizes.d_model, nhead=sizes.nhead, num_encoder_layers=sizes.layers,
        num_decoder_layers=sizes.layers, dim_feedforward=sizes.dim_feedforward, rng=args.seed)
    n_params = sum(v.size for v in params.values())
    optimizer = bk.Adam(params, lr=sizes.lr)
    print(f"task: reverse {sizes.min_len}..{sizes.max_len} symbols of {sizes.symbols} "
          f"(vocabulary {V} with <pad>, <bos>, <eos>); {sizes.n_test} held-out sources; "
          f"d_model {sizes.d_model}, {sizes.nhead} heads, {sizes.layers}+{sizes.layers} "
          f"layers, feed-forward {sizes.dim_feedforward}, {n_params} parameters; batch "
          f"{sizes.batch_size}, Adam lr {sizes.lr} (warmup {sizes.warmup}) -> "
          f"{sizes.lr_final}, clip {sizes.clip}, {sizes.steps} steps; backend {args.backend}")

    log: list[dict[str, Any]] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(sizes.steps), desc="training", unit="step", mininterval=0.5)
    for step in bar:
        optimizer.lr = learning_rate(step, sizes)
        b = make_data(data_rng, sizes.batch_size, sizes, held_out, remember=False)
        losses.append(train_step(params, optimizer, b, sizes, bk))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if (step + 1) % sizes.eval_every == 0 or step + 1 == sizes.steps:
            figures, attention, greedy = evaluate(params, test_data, sizes, bk)
            recent = losses[-sizes.eval_every:]
            entry = {"step": step + 1, "train_loss": float(np.mean(recent)), **figures,
                     "seconds": round(time.perf_counter() - t0, 2)}
            log.append(entry)
            tqdm.write(f"step {step + 1:5d}: train loss {entry['train_loss']:.4f}, held-out "
                       f"loss {entry['loss']:.4f}, token accuracy "
                       f"{entry['token_accuracy']:.3f}, exact match "
                       f"{entry['exact_match']:.3f}")
    bar.close()
    train_s = time.perf_counter() - t0
    final = log[-1]

    # one held-out example of the longest length, for the figures
    row = int(np.flatnonzero(test_data.lengths == test_data.lengths.max())[0])
    L = int(test_data.lengths[row])
    src = test_data.src[row, :L]
    enc_weights = encoder_self_attention(params, src, sizes, bk)  # [n_enc, h, L, L]
    dec_weights = attention[:, row, :, :L + 1, :L]  # [n_dec, h, L + 1, L]
    agreement = np.asarray(final["cross_attention_agreement"])
    on_aligned = np.asarray(final["cross_attention_weight_on_aligned"])
    figures_paths = [args.out / "encoder_self_attention.png",
                     args.out / "decoder_cross_attention.png"]
    plot_encoder(enc_weights, src, names, figures_paths[0])
    plot_decoder(dec_weights, src, test_data.tgt_out[row, :L + 1], greedy[row], agreement,
                 on_aligned, names, figures_paths[1])
    machine = load.stop()

    best = np.unravel_index(int(agreement.argmax()), agreement.shape)
    results: dict[str, Any] = {
        "options": {"backend": args.backend, "steps": sizes.steps, "seed": args.seed,
                    "threads": args.threads, "quick": args.quick, "out": args.out},
        "sizes": sizes._asdict(),
        "parameters": n_params,
        "seeds": {"data": args.seed, "init": args.seed},
        "final_train_loss": final["train_loss"],
        "held_out": {k: final[k] for k in ("loss", "token_accuracy", "exact_match",
                                           "cross_attention_agreement",
                                           "cross_attention_weight_on_aligned")},
        "best_cross_attention_head": {"layer": int(best[0]), "head": int(best[1]),
                                      "agreement": float(agreement[best]),
                                      "weight_on_aligned": float(on_aligned[best])},
        "log": log,
        "train_s": round(train_s, 2),
        "example": {"source": "".join(names[i] for i in src),
                    "greedy": "".join(names[i] for i in greedy[row, :L + 1]),
                    "encoder_self_attention": enc_weights,
                    "decoder_cross_attention": dec_weights},
        "machine": machine,
    }
    print(f"\nafter {sizes.steps} steps ({train_s:.1f} s of training): train loss "
          f"{final['train_loss']:.4f} (mean of the last {min(sizes.eval_every, sizes.steps)} "
          f"steps)")
    print(f"held-out ({sizes.n_test} sources): loss {final['loss']:.4f}, greedy token accuracy "
          f"{final['token_accuracy']:.3f}, exact match {final['exact_match']:.3f}")
    print("cross-attention against the reversal, teacher-forced, per decoder layer and head: "
          "share of steps whose argmax is source position len - 1 - t / mean weight there")
    for layer, (shares, weights) in enumerate(zip(agreement, on_aligned, strict=True)):
        print(f"  layer {layer}: " + "   ".join(f"head {h} {a:.3f} / {w:.2f}" for h, (a, w)
                                                in enumerate(zip(shares, weights, strict=True))))
    print(f"whole demo: {describe_load(machine)}")
    write_json(args.out / "results.json", results)
    for path in [*figures_paths, args.out / "results.json"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
