"""The demos in examples/ run end to end: each is started as a user would start it (a
subprocess from the repository root) with tiny sizes, and what it writes is checked: its
figures, and results.json with sane values. The seed-compatible comparison must show the
seed's batch dependence and the fixed model's absence of it; a bad --epochs (--steps for the
transformer) is refused by argparse (exit status 2) with a message naming the option.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_demo(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run examples/<script> with `args` from the repository root; capture its output."""
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def read_results(out: Path) -> dict:
    """The demo's results.json."""
    return json.loads((out / "results.json").read_text())


def finite(x) -> bool:
    """A real, finite number (results.json writes non-finite floats as strings)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_seed_classifier_seed_compatible_shows_the_batch_dependence(tmp_path: Path) -> None:
    proc = run_demo("seed_classifier.py", "--epochs", "3", "--seed-compatible", "--seed", "1",
                    "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for name in ("attention.png", "batch_dependence.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
        assert str(tmp_path / name) in proc.stdout, f"the demo does not say where {name} went"
    # the seed's own lines: the cost (logged at the last epoch when it is under 1000) and
    # the verdict on the unseen sentence
    assert re.search(r"^Epoch: 0003 cost = \d+\.\d{6}$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^sorry hate you is (Bad Mean\.\.\.|Good Mean!!)", proc.stdout, re.M)

    r = read_results(tmp_path)
    assert r["options"] == {"backend": "numpy_ref", "epochs": 3, "seed": 1, "threads": 1,
                            "seed_compatible": True, "out": str(tmp_path)}
    assert len(r["vocabulary"]) == 16 and sorted(r["vocabulary"].values()) == list(range(16))
    assert set(r["losses"]) == {"fixed", "seed_compatible"}
    for losses in r["losses"].values():
        assert list(losses) == ["3"] and all(finite(v) and v > 0 for v in losses.values())
    for name, pred in r["prediction"].items():
        assert pred["label"] in (0, 1), name
        assert pred["verdict"] == ("is Bad Mean..." if pred["label"] == 0 else
                                   "is Good Mean!!")
        assert math.isclose(sum(pred["probabilities"]), 1.0, rel_tol=1e-12)
    attention = r["attention"]
    assert len(attention) == 6 and all(len(row) == 3 for row in attention)
    assert all(math.isclose(sum(row), 1.0, rel_tol=1e-12) for row in attention)
    assert r["machine"]["wall_s"] > 0 and finite(r["train_s"])

    table = r["batch_dependence"]["table"]
    assert [row["sentence"] for row in table] == r["sentences"]
    diff = r["batch_dependence"]["max_abs_diff"]
    assert diff["seed_compatible"] > 1e-6, "the seed's model must depend on its batch"
    assert diff["fixed"] < 1e-10, "the fixed model must not depend on its batch"
    assert diff["seed_compatible"] == max(row["seed_compatible"]["abs_diff"] for row in table)


def test_seed_classifier_without_the_flag_trains_only_the_fixed_model(tmp_path: Path) -> None:
    proc = run_demo("seed_classifier.py", "--epochs", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    r = read_results(tmp_path)
    assert set(r["losses"]) == {"fixed"} and "batch_dependence" not in r
    assert (tmp_path / "attention.png").exists()
    assert not (tmp_path / "batch_dependence.png").exists()


def test_alignment_quick_run_writes_its_figures_and_results(tmp_path: Path) -> None:
    proc = run_demo("alignment.py", "--quick", "--epochs", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for name in ("alignment_luong.png", "alignment_bahdanau.png", "training.png",
                 "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
        assert str(tmp_path / name) in proc.stdout, f"the demo does not say where {name} went"
    r = read_results(tmp_path)
    assert r["options"]["quick"] is True and r["options"]["epochs"] == 2
    assert r["sizes"]["epochs"] == 2
    assert set(r["decoders"]) == {"luong", "bahdanau"}
    for decoder, d in r["decoders"].items():
        assert [e["epoch"] for e in d["epochs"]] == [1, 2], decoder
        for entry in d["epochs"]:
            assert finite(entry["train_loss"]) and finite(entry["loss"]), decoder
        held_out = d["held_out"]
        for key in ("token_accuracy", "sequence_accuracy", "alignment_agreement",
                    "weight_on_aligned"):
            assert finite(held_out[key]) and 0 <= held_out[key] <= 1, (decoder, key)
        assert finite(held_out["loss"]) and held_out["loss"] > 0
        assert len(d["examples"]) == 3
        for ex in d["examples"]:  # [len + 1 outputs, len sources], rows summing to 1
            L = len(ex["source"])
            assert len(ex["attention"]) == L + 1
            assert all(math.isclose(sum(row), 1.0, rel_tol=1e-9) for row in ex["attention"])
    assert r["machine"]["wall_s"] > 0


def test_transformer_quick_run_writes_its_heatmaps_and_results(tmp_path: Path) -> None:
    proc = run_demo("transformer.py", "--quick", "--steps", "6", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for name in ("encoder_self_attention.png", "decoder_cross_attention.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0, name
        assert str(tmp_path / name) in proc.stdout, f"the demo does not say where {name} went"
    r = read_results(tmp_path)
    assert r["options"]["quick"] is True and r["options"]["steps"] == 6
    assert r["options"]["backend"] == "numpy_ref" and r["sizes"]["steps"] == 6
    layers, heads = r["sizes"]["layers"], r["sizes"]["nhead"]
    assert [e["step"] for e in r["log"]] == [4, 6]  # every eval_every (4) steps and the last
    assert finite(r["final_train_loss"]) and r["final_train_loss"] > 0
    held_out = r["held_out"]
    assert finite(held_out["loss"]) and held_out["loss"] > 0
    for key in ("token_accuracy", "exact_match"):
        assert finite(held_out[key]) and 0 <= held_out[key] <= 1, key
    for key in ("cross_attention_agreement", "cross_attention_weight_on_aligned"):
        assert len(held_out[key]) == layers and all(len(row) == heads for row in held_out[key])
        assert all(finite(v) and 0 <= v <= 1 for row in held_out[key] for v in row), key
    ex = r["example"]
    L = len(ex["source"])
    encoder, decoder = ex["encoder_self_attention"], ex["decoder_cross_attention"]
    # [layers, heads, L, L] and [layers, heads, L + 1 outputs, L sources], rows summing to 1
    assert [len(encoder), len(encoder[0]), len(encoder[0][0])] == [layers, heads, L]
    assert [len(decoder), len(decoder[0]), len(decoder[0][0])] == [layers, heads, L + 1]
    for grid in (encoder, decoder):
        for row in (row for layer in grid for head in layer for row in head):
            assert len(row) == L and math.isclose(sum(row), 1.0, rel_tol=1e-9)
    assert r["machine"]["wall_s"] > 0 and finite(r["train_s"])


def test_transformer_refuses_zero_steps(tmp_path: Path) -> None:
    proc = run_demo("transformer.py", "--steps", "0", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "--steps" in proc.stderr and "expected an integer >= 1" in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing is written before the arguments pass"


@pytest.mark.parametrize(("script", "epochs"), [("seed_classifier.py", "0"),
                                                ("alignment.py", "-3")])
def test_a_bad_epoch_count_is_an_argparse_error(script: str, epochs: str, tmp_path: Path
                                                ) -> None:
    proc = run_demo(script, "--epochs", epochs, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "--epochs" in proc.stderr and "expected an integer >= 1" in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing is written before the arguments pass"
