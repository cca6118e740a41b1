r"""Alignment you can see: an encoder-decoder learns to reverse sequences, and its attention
finds, for every output token, the source token it came from.

Run it from the repository root::

    python examples/alignment.py                    # both decoders, pure NumPy
    python examples/alignment.py --backend kernels  # the same models on the Numba ops

The task. A source is a random string of S = 20 symbols ("a".."t"), its length drawn from
5..12; the target is the source reversed, then <eos>. So the alignment is known: output
token t (t < len) is source token len - 1 - t, and <eos> comes from nowhere. Training reads
2048 distinct sources; the 256 held-out ones never appear in training. The decoder is
teacher-forced: its input is <bos> followed by the target without its <eos>.

The model (``numpy_ref.seq2seq_forward``; B batch, Ts source steps, Tt = Ts + 1 target
steps, V = S + 3 tokens with <pad>, <bos>, <eos>)::

    memory, (h_n, c_n) = BiLSTM(embed_src(src))     [B, Ts, 2H], packed by src_lengths
    s_0 = concat(h_n[0], h_n[1])                    [B, 2H] the decoder's first state

    Luong (score "general", w_tj ~ exp(s_t^T W memory_j)):
        s_t = LSTM(embed_tgt(y_t), s_{t-1})         attention queried by the NEW state
        c_t = sum_j w_tj memory_j;  logits_t = generator(tanh(W_c [c_t; s_t]))
    Bahdanau (additive, w_tj ~ exp(v^T tanh(W_q s_{t-1} + b + W_k memory_j))):
        c_t = sum_j w_tj memory_j                   attention queried by the PREVIOUS state
        s_t = LSTMCell([embed_tgt(y_t); c_t], s_{t-1});  logits_t = generator([s_t; c_t; y_t])

    loss = cross_entropy(logits, target)            mean over the real target tokens

Each step is forward -> loss -> backward -> clip the gradient norm at 1 -> Adam step, by hand
in NumPy (no autograd); the source lengths keep padding out of the encoder and the attention,
and ``ignore_index`` keeps it out of the loss.

What is measured, per decoder, on the held-out set:

- token accuracy of greedy decoding (``numpy_ref.greedy_decode``, fed its own outputs): the
  share of the len + 1 target tokens (<eos> included) it gets right, and the share of
  sequences it gets entirely right;
- alignment agreement, on the teacher-forced attention (the decoder reads the reference
  prefix, so every step has a known source token): the share of output steps t < len whose
  attention argmax is source position len - 1 - t; and the mean weight on that position.

The sizes were chosen by experiment on this 2-core machine, where the default run must stay
under 3 minutes (31-37 s idle over three runs, 41 s with other processes keeping 1.2 CPUs
busy):
E = 16, H = 32 (the decoder's state is 64 wide), batch 32, 8 epochs of 64 steps, Adam with
lr 0.01 falling linearly to 0.0005. Held-out figures after 8 epochs, seed 0 unless said
(token accuracy / sequence accuracy / agreement):

    lr 0.01 constant                 luong 0.965 / 0.83 / 0.99   bahdanau 0.999 / 0.99 / 0.997
    lr 0.01 -> 0.0005 (the default)  luong 0.998 / 0.99 / 0.998  bahdanau 1.000 / 1.00 / 0.999
      the same, seeds 1 and 2        luong >= 0.995 / 0.99 / 0.998 bahdanau 1.000 / 0.996 / 0.999
    lr 0.001 -> 0.00005              luong 0.964 / 0.80 / 0.96   bahdanau 0.993 / 0.95 / 0.99
    lr 0.003 -> 0.00015              luong 0.998 / 0.99 / 0.995
    H = 16                           luong 0.994 / 0.98 / 0.993
    4 epochs                         luong 0.995 / 0.98 / 0.991  bahdanau 1.000 / 1.00 / 1.0

The task is easy for both: the decay is what makes the last errors go (with a constant rate
Luong's held-out loss wanders); the extra epochs over 4 are margin. A Luong step costs about
25 ms, a Bahdanau step, a Python loop over the target steps, about 40 ms. ``--backend
kernels`` runs the same models on the Numba ops: 22 s instead of 31-37 s on an idle machine.
``--threads`` (default 1) is the number of BLAS and Numba threads (see
``_common.limit_threads``: one is robust on a shared machine). ``--quick`` shrinks everything
(data, model, lengths) to a smoke run for the tests: its numbers mean nothing.

Output: the printed lines, and in ``--out`` (default ``examples-out/alignment``)
``alignment_luong.png`` and ``alignment_bahdanau.png`` (teacher-forced attention of three
held-out examples, source tokens across, output tokens down, the true alignment outlined),
``training.png`` (loss, accuracy and agreement per epoch) and ``results.json`` (every printed
number, the options, sizes, seeds and timings).
"""

from __future__ import annotations

import argparse
import sys
import time
from types import ModuleType
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from _common import (
    MachineLoad,
    add_common_options,
    backend_module,
    describe_load,
    limit_threads,
    write_json,
)
from matplotlib.patches import Rectangle
from tqdm import tqdm

import numpy_ref

PAD, BOS, EOS = 0, 1, 2  # special token ids; symbol k is id k + 3
IGNORE = -100  # target id of padded steps: cross-entropy skips them
DECODERS = ("luong", "bahdanau")


class Sizes(NamedTuple):
    """Everything that sizes the run (see the module docstring for the choice)."""

    symbols: int  # S, the source alphabet
    min_len: int  # source lengths are drawn from min_len..max_len
    max_len: int
    n_train: int  # distinct training sources
    n_test: int  # held-out sources, none in the training set
    embedding_dim: int  # E
    hidden_size: int  # H per encoder direction
    batch_size: int
    lr: float  # Adam's learning rate at the first step...
    lr_final: float  # ... falling linearly to this at the last
    clip: float  # max gradient norm
    epochs: int


DEFAULT = Sizes(symbols=20, min_len=5, max_len=12, n_train=2048, n_test=256, embedding_dim=16,
                hidden_size=32, batch_size=32, lr=0.01, lr_final=0.0005, clip=1.0, epochs=8)
QUICK = Sizes(symbols=6, min_len=2, max_len=5, n_train=48, n_test=16, embedding_dim=4,
              hidden_size=4, batch_size=16, lr=0.01, lr_final=0.0005, clip=1.0, epochs=1)


class Data(NamedTuple):
    """Sources and targets, padded to the longest possible length."""

    src: np.ndarray  # [N, max_len] ids, PAD past each length
    lengths: np.ndarray  # [N] source lengths
    tgt_in: np.ndarray  # [N, max_len + 1] decoder input: BOS, reversed source, PAD
    tgt_out: np.ndarray  # [N, max_len + 1] what to predict: reversed source, EOS, IGNORE


def vocabulary(symbols: int) -> list[str]:
    """Token names by id: the three specials, then the symbols a, b, c, ..."""
    return ["<pad>", "<bos>", "<eos>"] + [chr(ord("a") + k) for k in range(symbols)]


def make_data(rng: np.random.Generator, n: int, sizes: Sizes, exclude: set) -> Data:
    """n distinct random sources of lengths min_len..max_len, none in `exclude` (a set of
    tuples of ids, updated with the new ones), and their reversal targets."""
    T = sizes.max_len
    src = np.full((n, T), PAD, np.int64)
    tgt_in = np.full((n, T + 1), PAD, np.int64)
    tgt_out = np.full((n, T + 1), IGNORE, np.int64)
    lengths = np.zeros(n, np.int64)
    i = 0
    while i < n:
        L = int(rng.integers(sizes.min_len, sizes.max_len + 1))
        s = rng.integers(3, 3 + sizes.symbols, L)
        if tuple(s) in exclude:
            continue
        exclude.add(tuple(s))
        src[i, :L], lengths[i] = s, L
        tgt_in[i, 0], tgt_in[i, 1:L + 1] = BOS, s[::-1]
        tgt_out[i, :L], tgt_out[i, L] = s[::-1], EOS
        i += 1
    return Data(src, lengths, tgt_in, tgt_out)


def batch(data: Data, rows: np.ndarray) -> Data:
    """The rows `rows` of `data`, cut to the longest source among them."""
    Ts = int(data.lengths[rows].max())
    return Data(data.src[rows, :Ts], data.lengths[rows], data.tgt_in[rows, :Ts + 1],
                data.tgt_out[rows, :Ts + 1])


def train_step(params: dict[str, np.ndarray], optimizer, b: Data, *, decoder: str,
               clip: float, bk: ModuleType) -> float:
    """One minibatch: forward -> loss -> backward -> clip -> Adam step; returns the loss."""
    logits, _, cache = numpy_ref.seq2seq_forward(  # [B, Tt, V]
        b.src, b.tgt_in, params, decoder=decoder, src_lengths=b.lengths, backend=bk)
    B, Tt, V = logits.shape
    loss, ce_cache = bk.cross_entropy_forward(logits.reshape(B * Tt, V),
                                              b.tgt_out.reshape(B * Tt), ignore_index=IGNORE)
    d_logits = bk.cross_entropy_backward(1.0, ce_cache).reshape(B, Tt, V)
    grads = numpy_ref.seq2seq_backward(d_logits, cache)  # same keys as params
    bk.clip_grad_norm(grads, clip)
    optimizer.step(grads)
    return float(loss)


def evaluate(params: dict[str, np.ndarray], data: Data, *, decoder: str, bk: ModuleType
             ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Held-out figures (see the module docstring), the teacher-forced attention
    [N, Tt, Ts] and the greedy outputs [N, max_len + 1] (EOS after each one's end)."""
    N, Tt = data.tgt_out.shape
    logits, attention, _ = numpy_ref.seq2seq_forward(
        data.src, data.tgt_in, params, decoder=decoder, src_lengths=data.lengths, backend=bk)
    loss, _ = bk.cross_entropy_forward(logits.reshape(N * Tt, -1), data.tgt_out.reshape(-1),
                                       ignore_index=IGNORE)
    # alignment: output step t < len comes from source position len - 1 - t
    t = np.arange(Tt)[None, :]  # [1, Tt]
    aligned = data.lengths[:, None] - 1 - t  # [N, Tt]
    real = t < data.lengths[:, None]  # the steps that have a source token (not <eos>)
    rows, steps = np.nonzero(real)
    agreement = float((attention.argmax(axis=2)[real] == aligned[real]).mean())
    weight_on_aligned = float(attention[rows, steps, aligned[rows, steps]].mean())
    # greedy decoding, fed its own outputs
    out = numpy_ref.greedy_decode(data.src, params, max_len=Tt, bos=BOS, eos=EOS,
                                  src_lengths=data.lengths, decoder=decoder, backend=bk)
    greedy = np.full((N, Tt), EOS, np.int64)
    greedy[:, :out.shape[1]] = out
    scored = data.tgt_out != IGNORE  # the len + 1 target tokens of each row
    correct = (greedy == data.tgt_out) | ~scored
    figures = {"loss": float(loss), "token_accuracy": float(correct[scored].mean()),
               "sequence_accuracy": float(correct.all(axis=1).mean()),
               "alignment_agreement": agreement, "weight_on_aligned": weight_on_aligned}
    return figures, attention, greedy


def train(decoder: str, train_data: Data, test_data: Data, sizes: Sizes, *, seed: int,
          bk: ModuleType) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], float]:
    """Train one decoder; returns its params, one log entry per epoch, and the seconds."""
    V = sizes.symbols + 3
    params = numpy_ref.init_seq2seq_params(V, V, sizes.embedding_dim, sizes.hidden_size,
                                           decoder=decoder, rng=seed)
    optimizer = bk.Adam(params, lr=sizes.lr)
    order_rng = np.random.default_rng(seed + 1)  # the same batches for both decoders
    n = len(train_data.lengths)
    total_steps = sizes.epochs * -(-n // sizes.batch_size)
    log, step = [], 0
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"{decoder:>8}", unit="step", mininterval=0.5)
    for epoch in range(sizes.epochs):
        order = order_rng.permutation(n)
        losses = []
        for start in range(0, n, sizes.batch_size):
            # the learning rate falls linearly from lr (first step) to lr_final (last step)
            optimizer.lr = sizes.lr + (sizes.lr_final - sizes.lr) * step / max(total_steps - 1, 1)
            b = batch(train_data, order[start:start + sizes.batch_size])
            losses.append(train_step(params, optimizer, b, decoder=decoder, clip=sizes.clip,
                                     bk=bk))
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        held_out, _, _ = evaluate(params, test_data, decoder=decoder, bk=bk)
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), **held_out,
                 "seconds": round(time.perf_counter() - t0, 2)}
        log.append(entry)
        tqdm.write(f"{decoder:>8} epoch {epoch + 1:2d}: train loss {entry['train_loss']:.4f}, "
                   f"held-out loss {entry['loss']:.4f}, token accuracy "
                   f"{entry['token_accuracy']:.3f}, sequences {entry['sequence_accuracy']:.3f}, "
                   f"alignment agreement {entry['alignment_agreement']:.3f}")
    bar.close()
    return params, log, time.perf_counter() - t0


def show_examples(data: Data) -> list[int]:
    """Three held-out rows to draw: the shortest, a middle one and the longest source."""
    order = np.argsort(data.lengths, kind="stable")
    return [int(order[0]), int(order[len(order) // 2]), int(order[-1])]


def plot_alignments(decoder: str, attention: np.ndarray, greedy: np.ndarray, data: Data,
                    rows: list[int], names: list[str], figures: dict[str, float], path) -> None:
    """Teacher-forced attention of a few held-out rows: source tokens across, output tokens
    down, the true alignment (len - 1 - t) outlined in red."""
    fig, axes = plt.subplots(1, len(rows), figsize=(4.3 * len(rows), 4.6), layout="constrained")
    for ax, r in zip(np.atleast_1d(axes), rows, strict=True):
        L = int(data.lengths[r])
        w = attention[r, :L + 1, :L]  # [L + 1 outputs (eos last), L sources]
        im = ax.imshow(w, cmap="viridis", vmin=0, vmax=1)
        for t in range(L):
            ax.add_patch(Rectangle((L - 1 - t - 0.5, t - 0.5), 1, 1, fill=False, ec="red",
                                   lw=1.2))
        ax.set_xticks(range(L), [names[i] for i in data.src[r, :L]])
        ax.set_yticks(range(L + 1), [names[i] for i in data.tgt_out[r, :L + 1]])
        ax.set_xlabel("source token")
        ax.set_ylabel("output token (reference)")
        got = "".join(names[i] for i in greedy[r, :L]) + ("" if greedy[r, L] == EOS else "...")
        ok = "correct" if np.array_equal(greedy[r, :L + 1], data.tgt_out[r, :L + 1]) else "WRONG"
        ax.set_title(f"greedy: {got} ({ok})", fontsize=9)
    fig.suptitle(f"{decoder}: teacher-forced attention on held-out sources (red: the true "
                 f"alignment); agreement {figures['alignment_agreement']:.1%}, token accuracy "
                 f"{figures['token_accuracy']:.1%}", fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label="attention weight")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(logs: dict[str, list[dict[str, Any]]], path) -> None:
    """Per epoch and decoder: the losses, and the held-out accuracy and agreement."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for decoder, log in logs.items():
        epochs = [e["epoch"] for e in log]
        line, = ax_loss.plot(epochs, [e["train_loss"] for e in log], marker="o",
                             label=f"{decoder} train")
        ax_loss.plot(epochs, [e["loss"] for e in log], ls="--", color=line.get_color(),
                     label=f"{decoder} held-out")
        ax_acc.plot(epochs, [e["token_accuracy"] for e in log], marker="o",
                    color=line.get_color(), label=f"{decoder} token accuracy (greedy)")
        ax_acc.plot(epochs, [e["alignment_agreement"] for e in log], marker="s", ls="--",
                    color=line.get_color(), label=f"{decoder} alignment agreement")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("held-out share")
    ax_acc.axhline(0.9, color="gray", lw=0.8, ls=":")
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Train a Luong and a Bahdanau encoder-decoder to reverse sequences and "
                    "measure how well their attention finds the known alignment.")
    add_common_options(parser, demo="alignment", epochs=DEFAULT.epochs)
    parser.add_argument("--quick", action="store_true",
                        help="tiny data and model, one epoch unless --epochs says otherwise: "
                             "a smoke run for the tests (its numbers mean nothing)")
    parser.set_defaults(epochs=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train both decoders, print, draw, write results.json; returns the exit status."""
    args = parse_args(argv)
    sizes = QUICK if args.quick else DEFAULT
    if args.epochs is not None:
        sizes = sizes._replace(epochs=args.epochs)
    bk = backend_module(args.backend)
    limit_threads(args.threads, args.backend)
    args.out.mkdir(parents=True, exist_ok=True)
    load = MachineLoad().start()

    data_rng = np.random.default_rng(args.seed)
    seen: set = set()
    test_data = make_data(data_rng, sizes.n_test, sizes, seen)  # drawn first, then excluded
    train_data = make_data(data_rng, sizes.n_train, sizes, seen)
    names = vocabulary(sizes.symbols)
    print(f"task: reverse {sizes.min_len}..{sizes.max_len} symbols of {sizes.symbols}; "
          f"{sizes.n_train} training and {sizes.n_test} held-out sources; E {sizes.embedding_dim}"
          f", H {sizes.hidden_size}, batch {sizes.batch_size}, Adam lr {sizes.lr} -> "
          f"{sizes.lr_final}, clip "
          f"{sizes.clip}, {sizes.epochs} epochs; backend {args.backend}")

    results: dict[str, Any] = {
        "options": {"backend": args.backend, "epochs": sizes.epochs, "seed": args.seed,
                    "threads": args.threads,
                    "quick": args.quick, "out": args.out},
        "sizes": sizes._asdict(),
        "seeds": {"data": args.seed, "init": args.seed, "batch_order": args.seed + 1},
        "alignment_measured_on": "teacher-forced attention, output steps t < len (not <eos>)",
        "decoders": {},
    }
    figures, logs = [], {}
    rows = show_examples(test_data)
    for decoder in DECODERS:
        params, log, seconds = train(decoder, train_data, test_data, sizes, seed=args.seed,
                                     bk=bk)
        final, attention, greedy = evaluate(params, test_data, decoder=decoder, bk=bk)
        logs[decoder] = log
        results["decoders"][decoder] = {
            "held_out": final, "epochs": log, "train_s": round(seconds, 2),
            "examples": [{"source": "".join(names[i] for i in test_data.src[r, :L]),
                          "greedy": "".join(names[i] for i in greedy[r, :L + 1]),
                          "attention": attention[r, :L + 1, :L]}
                         for r in rows for L in [int(test_data.lengths[r])]]}
        figures.append(args.out / f"alignment_{decoder}.png")
        plot_alignments(decoder, attention, greedy, test_data, rows, names, final, figures[-1])

    figures.append(args.out / "training.png")
    plot_training(logs, figures[-1])
    results["machine"] = load.stop()

    print(f"\nheld-out ({sizes.n_test} sources), after {sizes.epochs} epochs:")
    print(f"{'decoder':<10}{'token acc':>10}{'seq acc':>9}{'agreement':>11}{'weight':>8}"
          f"{'train s':>9}")
    for decoder, d in results["decoders"].items():
        h = d["held_out"]
        print(f"{decoder:<10}{h['token_accuracy']:>10.3f}{h['sequence_accuracy']:>9.3f}"
              f"{h['alignment_agreement']:>11.3f}{h['weight_on_aligned']:>8.3f}"
              f"{d['train_s']:>9.1f}")
    print("(token acc: greedy decoding; agreement: teacher-forced attention argmax on the "
          "source token each output came from; weight: mean attention weight there)")
    print(f"whole demo: {describe_load(results['machine'])}")
    write_json(args.out / "results.json", results)
    for path in [*figures, args.out / "results.json"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
