r"""The seed experiment: a BiLSTM with attention learns the sentiment of six sentences.

Run it from the repository root::

    python examples/seed_classifier.py                    # pure NumPy, 5000 epochs, ~10 s
    python examples/seed_classifier.py --seed-compatible  # also train the seed's buggy model
    python examples/seed_classifier.py --backend kernels  # the same model on the Numba ops

(``--backend kernels``: about 5 s instead of 10 on an idle machine. ``--threads`` (default
1) is the number of BLAS and Numba threads, see ``_common.limit_threads``; ``--epochs`` and
``--seed`` change the run, ``--out`` where it is written.)

The data, sizes and optimizer are the seed's (the primer "Attention 扫盲" and its
``BiLSTM_Attention``): six 3-word sentences, three positive (label 1) and three negative (0),
embedding size E = 2, hidden size H = 5 per direction, C = 2 classes, Adam with lr = 0.001,
5000 full-batch epochs, the cost printed every 1000 epochs, then a prediction for the unseen
"sorry hate you". The vocabulary is every distinct word of the sentences, one id each, as the
tutorial script the primer's class comes from builds it (the primer shows only the class).
That script numbers the words with ``list(set(words))``, an order that changes from run to
run with Python's string hashing; here they are numbered in order of first appearance, so a
run is repeatable (the order only decides which random initial embedding each word gets).

The model (``numpy_ref.bilstm_attention_forward``; B sentences of T = 3 words)::

    x        = embedding(ids)                       [B, T, E]
    out, h_n = BiLSTM(x)                            out [B, T, 2H], h_n [2, B, H]
    q        = concat(h_n[0], h_n[1])               [B, 2H]   forward state after the last
                                                              word, backward after the first
    w        = softmax(out q)                       [B, T]    one weight per word
    c        = sum_t w_t out_t                      [B, 2H]
    logits   = W c + b                              [B, C]
    loss     = cross_entropy(logits, labels)        mean over the batch

and every epoch is forward -> loss -> backward -> Adam step, all of it by hand in NumPy (no
autograd). The figure ``attention.png`` is w for the six training sentences: which word each
sentence's final state picked out.

``--seed-compatible``: the seed's own query is ``final_state.view(-1, n_hidden * 2, 1)``.
``h_n`` is [2, B, H] (direction first), so row b of that view reads h_n's memory in order,
10 numbers at a time: with B = 6, row 0 is the forward states of sentences 0 and 1, row 3 the
backward states of sentences 0 and 1. At B = 1 it is exactly concat(h_n[0], h_n[1]); for
B > 1 a sentence's score depends on which sentences share its batch. The flag trains that
model (``seed_compatible=True``) beside the fixed one, from the same initial weights, and scores
each training sentence alone (B = 1) and inside the full batch (B = 6): the fixed model's two
probabilities agree to rounding, the seed's do not (``batch_dependence.png``). The seed's
script itself scores "sorry hate you" alone, B = 1, with weights trained on mixed queries at
B = 6: its prediction is made by a model it never trained.

Output: the printed lines, and in ``--out`` (default ``examples-out/seed_classifier``)
``attention.png``, ``batch_dependence.png`` (with ``--seed-compatible``) and
``results.json``, every printed number with the options, seed, vocabulary and timings.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import ModuleType

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
from tqdm import tqdm

import numpy_ref

SENTENCES = ["i love you", "he loves me", "she likes baseball",
             "i hate you", "sorry for that", "this is awful"]
LABELS = [1, 1, 1, 0, 0, 0]  # 1: positive ("Good Mean"), 0: negative ("Bad Mean")
TEST_TEXT = "sorry hate you"
EMBEDDING_DIM, N_HIDDEN, NUM_CLASSES = 2, 5, 2
LEARNING_RATE = 0.001
LOG_EVERY = 1000  # the seed prints the cost every 1000 epochs


def build_vocabulary(sentences: list[str]) -> dict[str, int]:
    """Every distinct word of `sentences` -> an id 0..V-1, in order of first appearance."""
    words = " ".join(sentences).split()
    return {w: i for i, w in enumerate(dict.fromkeys(words))}


def encode(sentences: list[str], word_dict: dict[str, int]) -> np.ndarray:
    """Sentences of equal length T -> token ids [B, T] (int64)."""
    return np.array([[word_dict[w] for w in s.split()] for s in sentences], dtype=np.int64)


def train_step(params: dict[str, np.ndarray], optimizer, ids: np.ndarray, labels: np.ndarray,
               *, seed_compatible: bool, bk: ModuleType) -> float:
    """One full-batch epoch: forward -> loss -> backward -> Adam step; returns the loss.

    ids [B, T], labels [B]; `params` is updated in place by the optimizer.
    """
    logits, _, cache = numpy_ref.bilstm_attention_forward(  # [B, C]
        ids, params, seed_compatible=seed_compatible, backend=bk)
    loss, ce_cache = bk.cross_entropy_forward(logits, labels)  # mean over B
    d_logits = bk.cross_entropy_backward(1.0, ce_cache)  # dloss/dlogits [B, C]
    grads = numpy_ref.bilstm_attention_backward(d_logits, cache)  # same keys as params
    optimizer.step(grads)
    return float(loss)


def predict(params: dict[str, np.ndarray], ids: np.ndarray, *, seed_compatible: bool,
            bk: ModuleType) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [B, C] and attention weights [B, T] of the sentences ids [B, T],
    scored together as one batch."""
    logits, attention, _ = numpy_ref.bilstm_attention_forward(
        ids, params, seed_compatible=seed_compatible, backend=bk)
    return bk.masked_softmax_forward(logits)[0], attention  # softmax over the classes


def alone_and_batched(params: dict[str, np.ndarray], ids: np.ndarray, *,
                      seed_compatible: bool, bk: ModuleType) -> tuple[np.ndarray, np.ndarray]:
    """P(positive) of each sentence scored alone (B = 1) and inside the batch ids [B, T]:
    two arrays [B]."""
    alone = np.array([predict(params, ids[i:i + 1], seed_compatible=seed_compatible,
                              bk=bk)[0][0, 1] for i in range(len(ids))])
    batched = predict(params, ids, seed_compatible=seed_compatible, bk=bk)[0][:, 1]
    return alone, batched


def verdict(label: int) -> str:
    """The seed's wording of a prediction."""
    return "is Bad Mean..." if label == 0 else "is Good Mean!!"


def plot_attention(attention: np.ndarray, sentences: list[str], labels: list[int], path,
                   title: str) -> None:
    """The [B, T] attention weights as a heatmap: one row per sentence (and its label),
    each cell its word and weight."""
    B, T = attention.shape
    fig, ax = plt.subplots(figsize=(6.4, 0.55 * B + 1.6))
    im = ax.imshow(attention, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for b, sentence in enumerate(sentences):
        for t, word in enumerate(sentence.split()):
            weight = attention[b, t]
            ax.text(t, b, f"{word}\n{weight:.3f}", ha="center", va="center", fontsize=10,
                    color="black" if weight > 0.6 else "white")
    ax.set_xticks(range(T), [f"word {t + 1}" for t in range(T)])
    ax.set_yticks(range(B), [f"{s!r} ({'+' if y else '-'})"
                             for s, y in zip(sentences, labels, strict=True)])
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="attention weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_batch_dependence(table: list[dict], path) -> None:
    """P(positive) of each sentence alone vs in the batch, the fixed model beside the seed's."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    x = np.arange(len(table))
    for ax, model, title in ((axes[0], "fixed", "fixed model: q = concat(h_n[0], h_n[1])"),
                             (axes[1], "seed_compatible",
                              "seed's model: q = final_state.view(-1, 2H)")):
        alone = [row[model]["alone"] for row in table]
        batched = [row[model]["batch"] for row in table]
        for offset, values, name in ((-0.2, alone, "scored alone (B = 1)"),
                                     (0.2, batched, "scored in the batch (B = 6)")):
            bars = ax.bar(x + offset, values, width=0.4, label=name)
            ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7, rotation=90,
                         padding=2)
        ax.set_xticks(x, [row["sentence"].replace(" ", "\n", 1) + f"\n(label {row['label']})"
                          for row in table], fontsize=8)
        ax.set_ylim(0, 1.15)
        ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("P(positive)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=2, fontsize=9,
               bbox_to_anchor=(0.5, 0.93))
    fig.suptitle("The same trained weights, each training sentence scored alone and in the "
                 "batch", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="The seed's BiLSTM-attention sentiment classifier, trained in NumPy.")
    add_common_options(parser, demo="seed_classifier", epochs=5000)
    parser.add_argument("--seed-compatible", action="store_true",
                        help="also train the seed's model, whose query mixes the batch's "
                             "sentences, and show that its predictions change with the batch")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train, print, draw, write results.json; returns the exit status."""
    args = parse_args(argv)
    bk = backend_module(args.backend)
    limit_threads(args.threads, args.backend)
    args.out.mkdir(parents=True, exist_ok=True)
    load = MachineLoad().start()

    word_dict = build_vocabulary(SENTENCES)
    ids = encode(SENTENCES, word_dict)  # [6, 3]
    labels = np.array(LABELS, dtype=np.int64)  # [6]
    test_ids = encode([TEST_TEXT], word_dict)  # [1, 3]

    # One initial set of weights; with --seed-compatible both models start from it.
    initial = numpy_ref.init_bilstm_attention_params(len(word_dict), EMBEDDING_DIM, N_HIDDEN,
                                                     NUM_CLASSES, rng=args.seed)
    models = {"fixed": False}
    if args.seed_compatible:
        models["seed_compatible"] = True
    params = {name: {k: v.copy() for k, v in initial.items()} for name in models}
    optimizers = {name: bk.Adam(params[name], lr=LEARNING_RATE) for name in models}
    losses: dict[str, dict[int, float]] = {name: {} for name in models}

    print(f"vocabulary ({len(word_dict)} words): {word_dict}")
    which = "the fixed and the seed-compatible model" if args.seed_compatible else "the model"
    print(f"training {which} on {len(SENTENCES)} sentences, {args.epochs} full-batch epochs, "
          f"backend {args.backend}")
    t0 = time.perf_counter()
    for epoch in tqdm(range(args.epochs), desc="epochs", unit="ep", mininterval=0.5):
        for name, seed_compatible in models.items():
            loss = train_step(params[name], optimizers[name], ids, labels,
                              seed_compatible=seed_compatible, bk=bk)
            if (epoch + 1) % LOG_EVERY == 0 or epoch + 1 == args.epochs:
                losses[name][epoch + 1] = loss
                tag = "" if name == "fixed" else "   [seed-compatible model]"
                tqdm.write(f"Epoch: {epoch + 1:04d} cost = {loss:.6f}{tag}")
    train_s = time.perf_counter() - t0

    results: dict = {
        "options": {"backend": args.backend, "epochs": args.epochs, "seed": args.seed,
                    "threads": args.threads,
                    "seed_compatible": args.seed_compatible, "out": args.out},
        "sizes": {"vocab_size": len(word_dict), "embedding_dim": EMBEDDING_DIM,
                  "n_hidden": N_HIDDEN, "num_classes": NUM_CLASSES,
                  "learning_rate": LEARNING_RATE},
        "vocabulary": word_dict,
        "sentences": SENTENCES,
        "labels": LABELS,
        "losses": losses,
        "train_s": round(train_s, 3),
    }

    # The unseen sentence, B = 1 (where the two queries are the same formula).
    results["prediction"] = {}
    for name, seed_compatible in models.items():
        probs, attention = predict(params[name], test_ids, seed_compatible=seed_compatible,
                                   bk=bk)
        label = int(probs[0].argmax())
        tag = "" if name == "fixed" else "   [seed-compatible model]"
        print(f"{TEST_TEXT} {verdict(label)}{tag}   (P(positive) = {probs[0, 1]:.6f})")
        results["prediction"][name] = {"text": TEST_TEXT, "label": label,
                                       "verdict": verdict(label),
                                       "probabilities": probs[0], "attention": attention[0]}

    # The training sentences' attention, scored as the training batch.
    probs, attention = predict(params["fixed"], ids, seed_compatible=False, bk=bk)
    results["train_probabilities"] = probs
    results["attention"] = attention
    figures = [args.out / "attention.png"]
    plot_attention(attention, SENTENCES, LABELS, figures[0],
                   f"attention weights after {args.epochs} epochs (fixed model)")

    if args.seed_compatible:
        table, diffs = [], {}
        for name, seed_compatible in models.items():
            alone, batched = alone_and_batched(params[name], ids,
                                               seed_compatible=seed_compatible, bk=bk)
            diffs[name] = float(np.abs(alone - batched).max())
            for i, sentence in enumerate(SENTENCES):
                if len(table) <= i:
                    table.append({"sentence": sentence, "label": LABELS[i]})
                table[i][name] = {"alone": alone[i], "batch": batched[i],
                                  "abs_diff": abs(alone[i] - batched[i])}
        print("\nP(positive) of each training sentence, scored alone (B=1) and in the batch "
              "(B=6):")
        print(f"{'sentence':<20}{'fixed: alone':>14}{'in batch':>11}{'|diff|':>10}"
              f"{'seed: alone':>14}{'in batch':>11}{'|diff|':>10}")
        for row in table:
            f, s = row["fixed"], row["seed_compatible"]
            print(f"{row['sentence']:<20}{f['alone']:>14.6f}{f['batch']:>11.6f}"
                  f"{f['abs_diff']:>10.1e}{s['alone']:>14.6f}{s['batch']:>11.6f}"
                  f"{s['abs_diff']:>10.1e}")
        print(f"largest |alone - batch|: fixed {diffs['fixed']:.1e} (rounding), "
              f"seed-compatible {diffs['seed_compatible']:.1e}")
        print("(the seed scores its test sentence alone, B = 1, with weights trained on "
              "B = 6 mixed queries)")
        results["batch_dependence"] = {"table": table, "max_abs_diff": diffs}
        figures.append(args.out / "batch_dependence.png")
        plot_batch_dependence(table, figures[-1])

    results["machine"] = load.stop()
    print(f"\ntraining {train_s:.1f} s; whole demo {describe_load(results['machine'])}")
    write_json(args.out / "results.json", results)
    for path in [*figures, args.out / "results.json"]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
