"""benchmarks.compare: the verdict rule (MIN_BAND, the rows' IQR, the runs' probe drift),
untrusted rows, rows in one run only, loading and the text report."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks import compare as cmp

REPO = Path(__file__).resolve().parents[1]

IDS = (
    "lstm/B1,T8/numpy_ref/cpu/forward",
    "lstm/B1,T8/torch/cpu/forward+backward",
    "attention/B2,T4,H8/torch_bmm/cpu/forward",
    "train/classifier/kernels/cpu/training step",
)


def make_row(row_id: str, median_s: float = 1e-3, rel_iqr: float = 0.02, status: str = "ok",
             dtype: str = "float32") -> dict:
    """One row with every field benchmarks/schema.json requires, and samples consistent with
    median_s and iqr_s."""
    op, size, backend, device, pass_ = row_id.split("/")
    iqr = rel_iqr * median_s
    times = [median_s - iqr / 2, median_s, median_s + iqr / 2]
    work = 0.5
    return {
        "id": row_id, "op": op, "size": size, "shape": {"B": 1, "T": 8, "masked": False},
        "backend": backend, "device": device, "dtype": dtype, "pass": pass_,
        "median_s": median_s, "min_s": min(times), "iqr_s": iqr, "times_s": times, "loops": 1,
        "max_err": 1e-7, "worst": "output", "tolerance": 1e-4,
        "work": work, "work_unit": "GFLOP", "rate": work / median_s, "rate_unit": "GFLOP/s",
        "ceiling": work / (median_s / 2), "ceiling_s": median_s / 2, "ceiling_name": "GEMM",
        "ceiling_by": "numpy", "pct_of_ceiling": 50.0, "pct_of_peak": None,
        "peak_bytes": 4096, "peak_bytes_by": "tracemalloc", "compile_s": 0.0,
        "vs_baseline": None, "status": status, "sweep": None,
    }


def make_run(rows: list[dict] | None = None, drift: float | None = 0.01, dtype: str = "float32",
             cpu: str = "Test CPU @ 3.0GHz", commit: str | None = "a1b2c3d4e5f60718",
             date: str = "2026-12-01T13:00Z") -> dict:
    """A run as ``python -m benchmarks --json`` writes it, valid against benchmarks/schema.json."""
    if rows is None:
        rows = [make_row(i, median_s=1e-3 * (n + 1), dtype=dtype) for n, i in enumerate(IDS)]
    return {
        "schema": cmp.SCHEMA,
        "header": {
            "date": date,
            "git": {"commit": commit, "dirty": False},
            "argv": ["--sizes", "small", "--json", "run.json"],
            "options": {"sizes": "small", "dtype": dtype, "repeat": 5, "min_time": 0.5,
                        "threads": 4},
            "machine": {"cpu": cpu, "logical_cpus": 4, "platform": "Linux-x86_64",
                        "cuda_device": None},
            "versions": {"python": "3.11.9", "numpy": "2.0.0", "scipy": "1.14.0",
                         "torch": "2.4.0", "numba": "0.60.0"},
            "threads": {"torch": 4, "numba": 4, "numpy_blas": 4, "numba_threading_layer": "omp",
                        "blas_env": {"OMP_NUM_THREADS": "4"}},
            "blas": {"numpy": "openblas", "torch": "mkl"},
            "peak": {"gflops": {"float32": 200.0, "float64": None}, "derivation": "test"},
            "noise": {"other_processes_cpu_s": 0.1, "probe_drift": drift,
                      "median_row_rel_iqr": 0.02},
            "wall_s": 12.5,
        },
        "rows": rows,
    }


def scaled(run: dict, factor: float) -> dict:
    """A copy of ``run`` with every time of every row multiplied by ``factor``."""
    out = copy.deepcopy(run)
    for row in out["rows"]:
        for field in ("median_s", "min_s", "iqr_s"):
            row[field] *= factor
        row["times_s"] = [t * factor for t in row["times_s"]]
    return out


def one_row_runs(old_median: float, new_median: float, rel_iqr: float = 0.02,
                 old_drift: float | None = 0.0, new_drift: float | None = 0.0,
                 old_status: str = "ok", new_status: str = "ok") -> cmp.Change:
    """The single Change of two runs of one row."""
    old = make_run([make_row(IDS[0], old_median, rel_iqr, old_status)], drift=old_drift)
    new = make_run([make_row(IDS[0], new_median, rel_iqr, new_status)], drift=new_drift)
    (change,) = cmp.compare(old, new).changes
    return change


def test_synthetic_runs_follow_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "benchmarks" / "schema.json").read_text())
    assert schema["$id"] == cmp.SCHEMA
    for run in (make_run(), make_run(drift=None, commit=None),
                make_run([make_row(IDS[0], status="too small", dtype="float64")],
                         dtype="float64")):
        jsonschema.validate(run, schema)


def test_a_run_against_itself_has_no_regression():
    run = make_run()
    result = cmp.compare(run, copy.deepcopy(run))
    assert result.regressions == [] and result.improvements == []
    assert [c.id for c in result.changes] == list(IDS)
    for change in result.changes:
        assert change.verdict == "same" and change.trusted
        assert change.ratio == 1.0
        assert change.old_s == change.new_s
        assert change.band == pytest.approx(cmp.MIN_BAND)
    assert result.only_old == [] and result.only_new == [] and result.notes == []
    assert result.old_label == result.new_label == "2026-12-01T13:00Z a1b2c3d"


def test_every_row_twice_as_slow_is_a_regression_and_twice_as_fast_an_improvement():
    run = make_run()
    slower = cmp.compare(run, scaled(run, 2.0))
    assert [c.verdict for c in slower.changes] == ["slower"] * len(IDS)
    assert slower.regressions == slower.changes
    for change in slower.changes:
        assert change.ratio == pytest.approx(2.0)
        assert change.new_s == pytest.approx(2 * change.old_s)
    faster = cmp.compare(scaled(run, 2.0), run)
    assert [c.verdict for c in faster.changes] == ["faster"] * len(IDS)
    assert faster.regressions == [] and faster.improvements == faster.changes
    assert faster.changes[0].ratio == pytest.approx(0.5)


@pytest.mark.parametrize("factor", [1.05, 1 / 1.05, 1.09, 1 / 1.09])
def test_a_change_inside_min_band_is_the_same(factor):
    change = one_row_runs(1e-3, 1e-3 * factor, rel_iqr=0.01)
    assert change.band == pytest.approx(cmp.MIN_BAND)
    assert change.verdict == "same"


@pytest.mark.parametrize(("factor", "verdict"), [(1.12, "slower"), (1 / 1.12, "faster")])
def test_a_change_just_outside_min_band_is_flagged(factor, verdict):
    assert one_row_runs(1e-3, 1e-3 * factor, rel_iqr=0.01).verdict == verdict


def test_a_noisy_row_is_flagged_only_beyond_what_its_iqr_explains():
    # 30 % IQR in each run: band = 0.3 + 0.3 = 0.6.
    explained = one_row_runs(1e-3, 1.5e-3, rel_iqr=0.3)
    assert explained.band == pytest.approx(0.6)
    assert explained.verdict == "same"
    assert one_row_runs(1e-3, 1.7e-3, rel_iqr=0.3).verdict == "slower"
    assert one_row_runs(1e-3, 0.7e-3, rel_iqr=0.3).verdict == "same"
    assert one_row_runs(1e-3, 0.6e-3, rel_iqr=0.3).verdict == "faster"
    # The same 1.5x on a quiet row is a regression.
    assert one_row_runs(1e-3, 1.5e-3, rel_iqr=0.02).verdict == "slower"


@pytest.mark.parametrize(("old_drift", "new_drift"), [(0.4, 0.0), (0.0, -0.4), (None, 0.4)])
def test_a_large_probe_drift_in_either_run_widens_the_band(old_drift, new_drift):
    quiet = one_row_runs(1e-3, 1.3e-3)
    assert quiet.verdict == "slower" and quiet.band == pytest.approx(cmp.MIN_BAND)
    noisy = one_row_runs(1e-3, 1.3e-3, old_drift=old_drift, new_drift=new_drift)
    assert noisy.band == pytest.approx(0.4)
    assert noisy.verdict == "same"
    assert one_row_runs(1e-3, 1.5e-3, old_drift=old_drift, new_drift=new_drift).verdict == "slower"


def test_a_drifting_run_is_named_in_the_notes():
    run = make_run(drift=0.25)
    result = cmp.compare(run, make_run())
    assert any("old run's probe drifted 25%" in n for n in result.notes)
    assert all(c.band == pytest.approx(0.25) for c in result.changes)


def test_rows_in_one_run_only_are_listed():
    old = make_run()
    new = make_run()
    del new["rows"][1]
    new["rows"].append(make_row("attention/B9,T9,H9/torch_sdpa/cpu/forward"))
    result = cmp.compare(old, new)
    assert result.only_old == [f"{IDS[1]} [float32]"]
    assert result.only_new == ["attention/B9,T9,H9/torch_sdpa/cpu/forward [float32]"]
    assert [c.id for c in result.changes] == [IDS[0], IDS[2], IDS[3]]
    text = cmp.format_comparison(result)
    assert "only in old:\n  " + result.only_old[0] in text
    assert "only in new:\n  " + result.only_new[0] in text
    assert text.splitlines()[-1] == (
        "0 slower, 0 faster, 3 within noise, 0 untrusted, 1 only in old, 1 only in new")


def test_runs_of_different_dtypes_share_no_row_and_say_why():
    result = cmp.compare(make_run(dtype="float32"), make_run(dtype="float64"))
    assert result.changes == []
    assert len(result.only_old) == len(result.only_new) == len(IDS)
    assert "different dtype: old 'float32', new 'float64'" in result.notes
    assert "(no rows in common)" in cmp.format_comparison(result)


def test_different_cpu_and_commit_are_noted():
    old = make_run(cpu="Old CPU", commit="1111111aaaa")
    new = make_run(cpu="New CPU", commit=None, date="2026-12-02T09:00Z")
    result = cmp.compare(old, new)
    assert "different CPU: old 'Old CPU', new 'New CPU'" in result.notes
    assert "different commit: old '1111111aaaa', new None" in result.notes
    assert result.old_label == "2026-12-01T13:00Z 1111111"
    assert result.new_label == "2026-12-02T09:00Z no-git"
    assert result.regressions == []


@pytest.mark.parametrize("status", ["FAIL"])
@pytest.mark.parametrize("which", ["old", "new"])
def test_an_untrusted_row_is_never_a_regression(status, which):
    statuses = {"old_status": status} if which == "old" else {"new_status": status}
    change = one_row_runs(1e-3, 5e-3, **statuses)
    assert change.verdict == "same" and not change.trusted
    assert change.ratio == pytest.approx(5.0)
    old = make_run([make_row(IDS[0]), make_row(IDS[1])])
    new = scaled(old, 3.0)
    (old if which == "old" else new)["rows"][0]["status"] = status
    result = cmp.compare(old, new)
    assert [c.id for c in result.regressions] == [IDS[1]]
    old_status, new_status = (status, "ok") if which == "old" else ("ok", status)
    assert [n for n in result.notes if IDS[0] in n] == [
        f"{IDS[0]} [float32]: status old {old_status!r}, new {new_status!r} (not judged)"]
    text = cmp.format_comparison(result)
    assert "untrusted" in next(line for line in text.splitlines() if line.startswith(IDS[0]))
    assert text.splitlines()[-1].startswith("1 slower, 0 faster, 0 within noise, 1 untrusted")


def test_an_above_ceiling_row_is_judged_but_noted():
    old = make_run([make_row(IDS[0], status="above ceiling")])
    result = cmp.compare(old, scaled(old, 2.0))
    assert [c.verdict for c in result.changes] == ["slower"]
    assert any("'above ceiling'" in n and "judged as usual" in n for n in result.notes)


def test_load_round_trips_a_written_file(tmp_path):
    run = make_run()
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    assert cmp.load(path) == run
    assert cmp.load(str(path)) == run
    assert cmp.compare(cmp.load(path), cmp.load(path)).regressions == []


@pytest.mark.parametrize(("content", "found"), [
    ({"schema": "something/else/2", "header": {}, "rows": []}, "'something/else/2'"),
    ({"header": {}, "rows": []}, "<no schema key>"),
    ([1, 2], "found list"),
])
def test_load_rejects_a_file_of_another_schema(tmp_path, content, found):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"other\.json") as info:
        cmp.load(path)
    assert found in str(info.value)


def test_load_rejects_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not JSON"):
        cmp.load(path)


def test_format_comparison_has_a_line_per_row_and_the_summary():
    old = make_run()
    new = copy.deepcopy(old)
    new["rows"][0] = scaled(make_run([old["rows"][0]]), 2.0)["rows"][0]
    new["rows"][1] = scaled(make_run([old["rows"][1]]), 0.5)["rows"][0]
    text = cmp.format_comparison(cmp.compare(old, new))
    lines = text.splitlines()
    assert lines[:3] == ["old: 2026-12-01T13:00Z a1b2c3d", "new: 2026-12-01T13:00Z a1b2c3d", ""]
    assert lines[3].split() == ["id", "old", "ms", "new", "ms", "change", "ratio", "band",
                                "verdict"]
    table = lines[4:4 + len(IDS)]
    width = max(len(i) for i in IDS)
    # One line per row, in the run's order, the id padded to the longest (ids may hold spaces).
    assert [line[:width].rstrip() for line in table] == list(IDS)
    figures = [line[width:].split() for line in table]
    assert figures[0] == ["1.000", "2.000", "+100.0%", "x2.00", "±10%", "SLOWER"]
    assert figures[1] == ["2.000", "1.000", "-50.0%", "x0.50", "±10%", "faster"]
    assert figures[2] == ["3.000", "3.000", "+0.0%", "x1.00", "±10%", "same"]
    assert figures[3] == ["4.000", "4.000", "+0.0%", "x1.00", "±10%", "same"]
    # The figure columns line up: the ratio column starts at the same offset on every line.
    assert len({line.index(" x") for line in table}) == 1
    assert lines[-1] == (
        "1 slower, 1 faster, 2 within noise, 0 untrusted, 0 only in old, 0 only in new")


@pytest.mark.parametrize("status", ["too small", "noisy"])
def test_a_too_small_or_noisy_row_is_still_judged(status):
    # Their times are looped and real: a 3x slowdown is a regression whatever the ceiling says.
    old = make_run([make_row(IDS[0], status=status)])
    result = cmp.compare(old, scaled(old, 3.0))
    assert [c.id for c in result.regressions] == [IDS[0]]
    assert any("judged as usual" in n for n in result.notes)
