"""benchmarks.plots: the sweep figures and the ratio chart, from synthetic schema-shaped rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from benchmarks import plots  # noqa: E402

SCHEMA = Path(__file__).resolve().parents[1] / "benchmarks" / "schema.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ATTN = "attention single query B32,H256"
LSTM = "lstm B32,H256"


def make_row(op: str, size: str, backend: str, device: str, pass_: str, median_s: float, *,
             pct: float = 50.0, vs_baseline: float | None = None, status: str = "ok",
             sweep: dict[str, Any] | None = None, dtype: str = "float32") -> dict[str, Any]:
    """A row with every field benchmarks/schema.json requires, plausible values in each."""
    work = 2.0
    ceiling_s = median_s * pct / 100.0
    return {
        "id": f"{op}/{size}/{backend}/{device}/{pass_}",
        "op": op, "size": size, "shape": {"B": 32, "H": 256}, "backend": backend,
        "device": device, "dtype": dtype, "pass": pass_,
        "median_s": median_s, "min_s": median_s * 0.95, "iqr_s": median_s * 0.04,
        "times_s": [median_s * 0.97, median_s, median_s * 1.02], "loops": 3,
        "max_err": 1e-7, "worst": "out", "tolerance": 1e-5,
        "work": work, "work_unit": "GFLOP", "rate": work / median_s, "rate_unit": "GFLOP/s",
        "ceiling": work / ceiling_s, "ceiling_s": ceiling_s, "ceiling_name": "gemm",
        "ceiling_by": "torch", "pct_of_ceiling": pct, "pct_of_peak": None,
        "peak_bytes": 1 << 20, "peak_bytes_by": "tracemalloc", "compile_s": 0.0,
        "vs_baseline": vs_baseline, "status": status, "sweep": sweep,
    }


def sweep_rows() -> list[dict[str, Any]]:
    """Two families: attention along T with both passes, lstm along B with one pass."""
    rows = []
    speed = {"torch_bmm": 1.0, "kernels": 0.4, "numpy_ref": 3.0, "kernels_sum_kv": 0.6}
    for pass_, k in (("forward", 1.0), ("forward+backward", 2.6)):
        for backend, s in speed.items():
            for T in (64, 256, 1024, 4096):
                status = "ok"
                if (backend, T, pass_) == ("kernels", 64, "forward"):
                    status = "too small"
                if (backend, T, pass_) == ("numpy_ref", 4096, "forward+backward"):
                    status = "FAIL"
                rows.append(make_row(
                    "attention", f"B32,T{T},H256", backend, "cpu", pass_,
                    median_s=1e-5 * T * s * k, pct=min(130.0, 40.0 / s * (1 + T / 4096)),
                    status=status, sweep={"family": ATTN, "x": "T", "value": T}))
    for backend, device, s in (("torch", "cpu", 1.0), ("kernels", "cpu", 0.7),
                               ("torch", "cuda", 0.05)):
        for B in (8, 32, 128):
            rows.append(make_row("lstm", f"B{B},T64,H256", backend, device, "forward",
                                 median_s=2e-4 * B * s, pct=60.0 * s ** 0.2,
                                 sweep={"family": LSTM, "x": "B", "value": B}))
    return rows


def ratio_input() -> list[dict[str, Any]]:
    """Non-sweep rows: 2 baselines, 5 rows that qualify, 1 FAIL, 1 without a baseline."""
    return [
        make_row("lstm", "B32,T64,H256", "torch", "cpu", "forward", 1e-3, vs_baseline=1.0),
        make_row("lstm", "B32,T64,H256", "kernels", "cpu", "forward", 5e-4, vs_baseline=2.0),
        make_row("lstm", "B32,T64,H256", "numpy_ref", "cpu", "forward", 4e-3, vs_baseline=0.25),
        make_row("lstm", "B32,T64,H256", "torch", "cuda", "forward", 1e-4, vs_baseline=10.0),
        make_row("attention", "B256,T512,H256", "torch_bmm", "cpu", "forward+backward", 1e-2,
                 vs_baseline=1.0),
        make_row("attention", "B256,T512,H256", "kernels", "cpu", "forward+backward", 1.2e-3,
                 vs_baseline=8.2),
        make_row("attention", "B256,T512,H256", "numpy_ref", "cpu", "forward+backward", 3e-2,
                 vs_baseline=0.33),
        make_row("attention", "B256,T512,H256", "kernels_sum_kv", "cpu", "forward+backward",
                 1e-3, vs_baseline=9.0, status="FAIL"),
        make_row("train", "B32,T32,H256", "kernels", "cpu", "training step", 1e-2,
                 vs_baseline=None),
    ]


def series_points(fig: Any) -> dict[tuple[str, str], int]:
    """(axes title, series label) -> points on that series' line; helper artists start '_'."""
    return {(ax.get_title(), line.get_label()): len(line.get_xdata())
            for ax in fig.axes for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_rows_carry_exactly_the_schema_fields() -> None:
    schema = json.loads(SCHEMA.read_text())["properties"]["rows"]["items"]
    for row in (*sweep_rows(), *ratio_input()):
        assert set(row) == set(schema["required"]) == set(schema["properties"])
        assert row["pass"] in schema["properties"]["pass"]["enum"]
        assert row["status"] in schema["properties"]["status"]["enum"]


def test_plot_sweeps_writes_one_png_per_family(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    paths = plots.plot_sweeps([*sweep_rows(), *ratio_input()], out)
    assert [p.name for p in paths] == [
        "sweep-attention-single-query-b32-h256-t.png", "sweep-lstm-b32-h256-b.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    shapes = []
    for p in paths:
        assert p.read_bytes()[:8] == PNG_SIGNATURE
        image = imread(p)
        assert image.ndim == 3 and image.shape[2] in (3, 4)
        shapes.append(image.shape[:2])
    # the two-pass family has two rows of panels, so is taller; both are at least 110 dpi wide
    (h2, w2), (h1, w1) = shapes
    assert h2 > 1.6 * h1 and min(w1, w2) > 900


def test_plot_sweeps_without_sweeps_writes_nothing(tmp_path: Path) -> None:
    assert plots.plot_sweeps(ratio_input(), tmp_path / "x") == []


def test_sweep_figure_grid_and_points() -> None:
    fig = plots.sweep_figure(sweep_rows(), ATTN)
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == [
        "forward: median time", "forward: rate (GFLOP/s) as % of ceiling",
        "forward+backward: median time", "forward+backward: rate (GFLOP/s) as % of ceiling"]
    points = series_points(fig)
    # 4 backends x 4 panels; each line has its 4 sizes, but the FAIL row is not drawn
    assert len(points) == 16
    for (title, label), n in points.items():
        failed = title.startswith("forward+backward") and label == "numpy_ref (cpu)"
        assert n == (3 if failed else 4), (title, label)
    time_ax, pct_ax = fig.axes[2], fig.axes[3]
    assert time_ax.get_xscale() == "log" and time_ax.get_yscale() == "log"
    assert pct_ax.get_xscale() == "log" and pct_ax.get_yscale() == "linear"
    lo, hi = pct_ax.get_ylim()
    assert lo == 0 and hi > 130  # the data reach 130%: the axis goes beyond, not clipped at 100
    ceilings = [ln for ln in pct_ax.get_lines() if ln.get_label() == "_ceiling"]
    assert len(ceilings) == 1 and list(ceilings[0].get_ydata()) == [100, 100]
    assert "float32" in fig.get_suptitle()
    assert "numpy_ref (cpu) forward+backward T=4096" in fig.get_supxlabel()
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)


def test_too_small_is_hollow_and_still_on_the_line() -> None:
    fig = plots.sweep_figure(sweep_rows(), ATTN)
    time_ax = fig.axes[0]
    kernels = next(ln for ln in time_ax.get_lines() if ln.get_label() == "kernels (cpu)")
    assert list(kernels.get_xdata()) == [64, 256, 1024, 4096]
    assert kernels.get_markevery() == [1, 2, 3]  # the solid markers skip the too-small point
    (hollow,) = [ln for ln in time_ax.get_lines() if ln.get_label() == "_too small"]
    assert list(hollow.get_xdata()) == [64] and hollow.get_markerfacecolor() == "none"
    assert hollow.get_markeredgecolor() == kernels.get_color()
    assert hollow.get_ydata()[0] == pytest.approx(1e-5 * 64 * 0.4 * 1e3)  # ms


def test_one_pass_family_is_one_row_and_colours_agree() -> None:
    rows = sweep_rows()
    lstm = plots.sweep_figure(rows, LSTM)
    assert len(lstm.axes) == 2
    assert set(series_points(lstm).values()) == {3}
    colours = {}
    for fig in (lstm, plots.sweep_figure(rows, ATTN)):
        for ax in fig.axes:
            for line in ax.get_lines():
                if not line.get_label().startswith("_"):
                    backend = line.get_label().split(" ")[0]
                    colours.setdefault(backend, set()).add(line.get_color())
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({c for cs in colours.values() for c in cs}) == len(colours)  # distinct per backend
    cuda = next(ln for ln in lstm.axes[0].get_lines() if ln.get_label() == "torch (cuda)")
    cpu = next(ln for ln in lstm.axes[0].get_lines() if ln.get_label() == "torch (cpu)")
    assert cuda.get_color() == cpu.get_color() and cuda.get_linestyle() != cpu.get_linestyle()


def test_sweep_figure_unknown_family() -> None:
    with pytest.raises(ValueError, match="no row of sweep family"):
        plots.sweep_figure(sweep_rows(), "nothing like it")


def test_ratio_rows_selection_and_order() -> None:
    chosen = plots.ratio_rows([*ratio_input(), *sweep_rows()])
    assert [(r["op"], r["backend"], r["device"], r["vs_baseline"]) for r in chosen] == [
        ("lstm", "kernels", "cpu", 2.0), ("lstm", "numpy_ref", "cpu", 0.25),
        ("lstm", "torch", "cuda", 10.0), ("attention", "kernels", "cpu", 8.2),
        ("attention", "numpy_ref", "cpu", 0.33)]


def test_ratio_figure_bars() -> None:
    fig = plots.ratio_figure(ratio_input(), title="synthetic")
    (ax,) = fig.axes
    bars = ax.patches
    assert len(bars) == 5
    # each bar spans from 1 to its ratio, right of 1 when faster, left when slower
    spans = [(b.get_x(), b.get_x() + b.get_width()) for b in bars]
    expected = [(1, 2.0), (0.25, 1), (1, 10.0), (1, 8.2), (0.33, 1)]
    assert spans == [pytest.approx(e) for e in expected]
    faster, slower = bars[0].get_facecolor(), bars[1].get_facecolor()
    assert faster != slower
    assert [b.get_facecolor() for b in bars] == [faster, slower, faster, faster, slower]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "lstm B32,T64,H256 fwd · kernels", "lstm B32,T64,H256 fwd · numpy_ref",
        "lstm B32,T64,H256 fwd · torch (cuda)", "attention B256,T512,H256 fwd+bwd · kernels",
        "attention B256,T512,H256 fwd+bwd · numpy_ref"]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["2.0x", "0.25x", "10x", "8.2x", "0.33x"]
    assert [t.xy[0] for t in ax.texts] == [2.0, 0.25, 10.0, 8.2, 0.33]  # at each bar's end
    baseline = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [1, 1]]
    assert len(baseline) == 1
    fig.canvas.draw()
    ticks = {t.get_text() for t in ax.get_xticklabels()}
    assert {"0.2x", "0.5x", "1x\n= baseline", "2x", "5x", "10x"} <= ticks
    assert ax.get_xscale() == "log"
    lo, hi = ax.get_xlim()
    assert lo < 0.25 and hi > 10  # room for every bar and its text
    assert fig.get_suptitle() == "synthetic (float32)"


def test_ratio_bars_of_too_small_or_noisy_rows_or_baselines_are_hatched() -> None:
    rows = ratio_input()
    rows[2]["status"] = "noisy"  # lstm numpy_ref
    rows[3]["status"] = "above ceiling"  # lstm torch (cuda): its time, so its ratio, is real
    rows[4]["status"] = "too small"  # attention's baseline: both attention bars lean on it
    fig = plots.ratio_figure(rows)
    (ax,) = fig.axes
    marked = [bool(b.get_hatch()) for b in ax.patches]
    assert marked == [False, True, False, True, True]
    assert [plots.unsure(r, rows) for r in plots.ratio_rows(rows)] == marked
    alphas = [b.get_facecolor()[3] for b in ax.patches]
    assert all(a < 0.5 if m else a == 1 for a, m in zip(alphas, marked, strict=True))
    # still green and red underneath: faded, not recoloured
    plain = plots.ratio_figure(ratio_input()).axes[0].patches
    assert [b.get_facecolor()[:3] for b in ax.patches] == [b.get_facecolor()[:3] for b in plain]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["faster than baseline", "slower than baseline"]
    assert len(legend) == 3 and legend[2].startswith("too small or noisy")
    assert ax.get_legend().legend_handles[2].get_hatch() == "////"
    # nothing hatched, no such legend entry
    assert len(plots.ratio_figure(ratio_input()).axes[0].get_legend().get_texts()) == 2


def test_ratio_figure_height_grows_with_bars() -> None:
    rows = [make_row("attention", f"B{b},T64,H8", "kernels", "cpu", "forward", 1e-3,
                     vs_baseline=1.5 + b) for b in range(40)]
    small = plots.ratio_figure(rows[:4]).get_size_inches()[1]
    big = plots.ratio_figure(rows).get_size_inches()[1]
    assert big - small == pytest.approx(0.3 * 36)  # 0.3 inch per bar: labels of 8.5 pt fit


def test_plot_ratios_writes_png_or_none(tmp_path: Path) -> None:
    path = plots.plot_ratios(ratio_input(), tmp_path / "sub" / "ratios.png", title="t")
    assert path == tmp_path / "sub" / "ratios.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert imread(path).shape[0] > 200
    only_baselines = [r for r in ratio_input()
                      if (r["backend"], r["device"]) == plots.BASELINES[r["op"]]
                      or r["vs_baseline"] is None]
    assert len(only_baselines) == 3
    assert plots.plot_ratios(only_baselines, tmp_path / "none.png") is None
    assert plots.plot_ratios(sweep_rows(), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_no_pyplot_figure_left_open(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.plot_sweeps(sweep_rows(), tmp_path)
    plots.plot_ratios(ratio_input(), tmp_path / "r.png")
    assert plt.get_fignums() == before
