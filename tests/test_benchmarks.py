"""The benchmark harness: every registered case validates on the small sizes, a wrong backend is
flagged, and ``python -m benchmarks`` runs end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import cases, runner
from benchmarks.core import PASSES, Prepared

REPO = Path(__file__).resolve().parents[1]


def test_small_suite_validates_every_case_and_renders_the_table():
    selected = cases.select_cases("small")
    assert {(c.backend.name, c.pass_) for c in selected} >= {
        (name, p) for name in ("numpy_ref", "torch") for p in PASSES
    }
    rows = runner.run_cases(selected, dtype=np.float32, repeat=1, min_time=0.0)
    assert len(rows) == len(selected)
    for row in rows:
        # A correct float32 LSTM is near 1e-6 of the float64 reference; 1e-4 is far below that
        # only when the computation is wrong.
        assert row.ok and row.error < 1e-4, (
            f"{row.backend}/{row.device}/{row.pass_}: max err {row.error:.2e} in {row.worst}, "
            f"allowed {row.tolerance:.2e}"
        )
        assert row.median_ms > 0 and row.rate > 0 and row.floor_rate > 0
    table = runner.format_table(rows)
    assert len(table.splitlines()) == 2 + len(rows)
    assert "FAIL" not in table
    header = runner.header_lines(runner.machine_info(), rows, repeat=1, min_time=0.0, warmup=1)
    assert any("floor of lstm" in line for line in header)


def test_a_backend_with_a_wrong_result_is_flagged():
    case = next(c for c in cases.select_cases("small") if c.backend.name == "numpy_ref")

    def prepare_wrong(inputs, pass_):
        right = case.backend.prepare(inputs, pass_)

        def collect(result):
            got = dict(right.collect(result))
            got["output"] = got["output"] * 1.01  # a 1 % error, far above float32 rounding
            return got

        return Prepared(run=right.run, collect=collect)

    wrong = dataclasses.replace(case, backend=dataclasses.replace(case.backend,
                                                                  prepare=prepare_wrong))
    (row,) = runner.run_cases([wrong], dtype=np.float32, repeat=1, min_time=0.0)
    assert not row.ok and row.worst == "output"
    assert "FAIL (output)" in runner.format_table([row])


def test_command_line_small_run_exits_zero_and_writes_json(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--sizes", "small", "--repeat", "1",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "numpy_ref" in proc.stdout and "vs torch cpu" in proc.stdout
    data = json.loads(out.read_text())
    assert data["rows"] and all(r["ok"] for r in data["rows"])
