"""The benchmark harness: every registered case validates on the small sizes, a wrong backend is
flagged, the memory floors move the bytes they claim, and ``python -m benchmarks`` runs end to
end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import numpy_ref
from benchmarks import attention, cases, floors, runner
from benchmarks.core import OP_PASSES, TRAINING_STEP, Prepared

REPO = Path(__file__).resolve().parents[1]


def test_small_suite_validates_every_case_and_renders_the_table():
    selected = cases.select_cases("small")
    assert {(c.problem.op, c.backend.name, c.pass_) for c in selected} >= {
        (op, name, p)
        for op, names in (("lstm", ("numpy_ref", "torch")),
                          ("attention", ("numpy_ref", "torch_bmm", "torch_sdpa")))
        for name in names
        for p in OP_PASSES
    } | {("train", name, TRAINING_STEP) for name in ("numpy_ref", "kernels", "torch")}
    rows = runner.run_cases(selected, dtype=np.float32, repeat=1, min_time=0.0)
    assert len(rows) == len(selected)
    for row in rows:
        # A correct float32 LSTM or attention is near 1e-6 of the float64 reference; 1e-4 is
        # far below that only when the computation is wrong.
        assert row.ok and row.error < 1e-4, (
            f"{row.op}/{row.size}/{row.backend}/{row.device}/{row.pass_}: max err "
            f"{row.error:.2e} in {row.worst}, allowed {row.tolerance:.2e}"
        )
        assert row.median_ms > 0 and row.rate > 0 and row.floor_rate > 0 and row.floor_ms > 0
        assert row.pct_floor == pytest.approx(100 * row.floor_ms / row.median_ms)
    table = runner.format_table(rows)
    assert len(table.splitlines()) == 2 + len(rows)
    assert "FAIL" not in table
    header = "\n".join(runner.header_lines(runner.machine_info(), rows, repeat=1, min_time=0.0,
                                           warmup=1))
    for text in ("floor of lstm", "floor of attention", "floor of train", "GEMM",
                 "stream read of V", "read + fresh copy of V", "valid keys", "torch_bmm cpu"):
        assert text in header


@pytest.mark.parametrize(("op", "pass_", "name"), [
    ("lstm", "forward", "output"),
    ("attention", "forward+backward", "d_keys+d_values"),
])
def test_a_backend_with_a_wrong_result_is_flagged(op, pass_, name):
    case = next(c for c in cases.select_cases("small")
                if (c.problem.op, c.backend.name, c.pass_) == (op, "numpy_ref", pass_))

    def prepare_wrong(inputs, pass_):
        right = case.backend.prepare(inputs, pass_)

        def collect(result):
            got = dict(right.collect(result))
            got[name] = got[name] * 1.01  # a 1 % error, far above float32 rounding
            return got

        return Prepared(run=right.run, collect=collect)

    wrong = dataclasses.replace(case, backend=dataclasses.replace(case.backend,
                                                                  prepare=prepare_wrong))
    (row,) = runner.run_cases([wrong], dtype=np.float32, repeat=1, min_time=0.0)
    assert not row.ok and row.worst == name
    assert f"FAIL ({name})" in runner.format_table([row])


def test_module_backend_is_unavailable_until_the_module_exports_attention():
    # The registry's kernels line relies on this: it stays registered, its cases skipped.
    assert not attention.module_backend("kernels", SimpleNamespace()).available()
    lookalike = SimpleNamespace(attention_forward=numpy_ref.attention_forward,
                                attention_backward=numpy_ref.attention_backward)
    backend = attention.module_backend("lookalike", lookalike)
    assert backend.available()
    problem = next(p for p in cases.PROBLEMS if p.op == "attention" and "small" in p.suites)
    rows = runner.run_cases([cases.Case(problem, backend, p) for p in OP_PASSES],
                            dtype=np.float64, repeat=1, min_time=0.0)
    assert all(r.ok and r.error < 1e-12 for r in rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_memory_floor_kernels_read_and_copy_the_valid_keys(dtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((5, 7, 3)).astype(dtype)
    lengths = np.array([7, 1, 4, 2, 7])
    sums = np.empty(5, dtype)
    floors._read_rows(values, lengths, sums)
    valid = np.arange(7)[None, :, None] < lengths[:, None, None]  # [B, T, 1]
    np.testing.assert_allclose(sums, np.where(valid, values, 0).sum(axis=(1, 2)), rtol=1e-5)
    out = np.full_like(values, np.nan)
    floors._copy_rows(values, lengths, out)
    np.testing.assert_array_equal(out, np.where(valid, values, 0))
    # The work a single-query row is credited with is the bytes these two kernels move.
    n_valid, n_full = int(lengths.sum()) * 3, values.size
    itemsize = np.dtype(dtype).itemsize
    assert floors.memory_work(n_valid, n_full, "forward", dtype) == pytest.approx(
        n_valid * itemsize / 1e9)
    assert floors.memory_work(n_valid, n_full, "forward+backward", dtype) == pytest.approx(
        (2 * n_valid + n_full) * itemsize / 1e9)


def test_command_line_small_run_exits_zero_and_writes_json(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--sizes", "small", "--repeat", "1",
         "--min-time", "0", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "numpy_ref" in proc.stdout and "torch_sdpa" in proc.stdout
    assert "vs base" in proc.stdout and "other processes took" in proc.stdout
    data = json.loads(out.read_text())
    assert "CPU-s" in data["machine"]["other_processes"]
    rows = data["rows"]
    assert rows and all(r["ok"] for r in rows)
    for r in rows:
        assert r["floor"] and r["floor_rate"] > 0 and r["floor_ms"] > 0 and r["work"] > 0
        assert r["pct_floor"] == pytest.approx(100 * r["floor_ms"] / r["median_ms"])
    single_query = [r for r in rows if r["op"] == "attention" and ",Tq" not in r["size"]]
    assert single_query and all(r["floor_unit"] == "GB/s" for r in single_query)
    by_pass = {r["pass"]: r["floor"] for r in single_query if r["size"] == "B3,T7,H5"}
    assert by_pass == {"forward": "stream read of V [3, 7, 5], 420 B",
                       "forward+backward": "read + fresh copy of V [3, 7, 5], 420 B"}


def test_the_training_profile_accounts_for_the_step_op_by_op():
    from benchmarks import profile, training

    problem = next(p for p in cases.PROBLEMS if p.op == "train" and "small" in p.suites
                   and p.size.startswith("bahdanau"))
    inputs = problem.make(np.dtype(np.float32), np.random.default_rng(0))
    for module in (numpy_ref, training.kernels):
        total, ops = profile.profile_module(inputs, module, steps=2)
        names = [name for name, _ in ops]
        assert {"lstm_cell_forward", "lstm_cell_backward", "additive_scores_forward",
                "cross_entropy_backward", "Adam step"} <= set(names)
        assert all(seconds >= 0 for _, seconds in ops)
        assert sum(seconds for _, seconds in ops) == pytest.approx(total, rel=0.5)
    total, ops = profile.profile_torch(inputs, steps=2)
    assert total > 0 and any(name.startswith("aten::") for name, _ in ops)
