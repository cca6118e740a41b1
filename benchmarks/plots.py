"""Figures of one benchmark run's rows (the ``rows`` of a run, see ``benchmarks/schema.json``).

Two kinds of figure, both PNG, drawn with matplotlib's object-oriented API (a bare
`matplotlib.figure.Figure`, never pyplot), so they need no display and leave no figure open:

- `plot_sweeps`: one figure per size sweep (rows whose ``sweep`` is set; the rows of one family
  differ only in the swept size). One row of panels per pass (forward, forward+backward, ...);
  the left panel is the median time in ms against the swept size on log-log axes, so a straight
  line of slope 1 is linear scaling and the vertical gap between two lines is their speed ratio;
  the right panel is the rate as a percent of the run's ceiling (the fastest any library on the
  machine does the row's work), with the ceiling as a dashed line at 100%: a line near 100% does
  about as well as the machine's best, a line that rises with the size is paying a fixed
  overhead that large problems amortize. One colour per backend in every panel of every figure,
  solid lines and circles on the CPU, dashed lines and squares on CUDA. A hollow marker is a row
  whose status is "too small", "noisy" or "above ceiling" (its percentage of the ceiling is
  not trusted; the percent axis stops at 150% so that such a point cannot flatten the others);
  rows that failed validation are not drawn and are listed under the figure.
- `plot_ratios`: one horizontal bar per row that is not part of a sweep, its speed against its
  op's baseline (`BASELINES`; ``vs_baseline`` = baseline median / row median), on a log axis
  centred on the baseline's 1x: a bar to the right (green) is that many times faster than the
  baseline, a bar to the left (red) slower. Bars are grouped by op, size and pass, read top to
  bottom; the baselines themselves, rows without a baseline and failed rows get no bar. A bar
  whose row or baseline row is "too small" or "noisy" is faded and hatched (`UNSURE`), with a
  legend entry: its ratio compares call overheads or a busy machine's samples, not the ops.

`sweep_figure` and `ratio_figure` return the figures unsaved, for a look or a test.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

__all__ = ["BASELINES", "UNSURE", "plot_ratios", "plot_sweeps", "ratio_figure", "ratio_rows",
           "sweep_families", "sweep_figure", "unsure"]

# op -> (backend, device) that ``vs_baseline`` divides by (a copy of benchmarks.cases.BASELINES,
# so that plotting imports none of the backends).
BASELINES: dict[str, tuple[str, str]] = {
    "lstm": ("torch", "cpu"), "gru": ("torch", "cpu"), "rnn": ("torch", "cpu"),
    "attention": ("torch_bmm", "cpu"), "sdpa": ("torch_sdpa", "cpu"),
    "layer_norm": ("torch", "cpu"), "train": ("torch", "cpu"),
}

PASS_ORDER = ("forward", "forward+backward", "training step")
HOLLOW = ("too small", "noisy", "above ceiling")  # statuses drawn hollow: not trusted
UNSURE = ("too small", "noisy")  # a bar of such a row, or against such a baseline, is hatched
PCT_TOP = 150.0  # the percent axis ends here: an untrusted 3000% must not flatten the rest
PASS_SHORT = {"forward": "fwd", "forward+backward": "fwd+bwd", "training step": "step"}

# Known backends get fixed colours (tab10), so a backend looks the same in every figure of every
# run; others take the remaining colours in name order.
_KNOWN_BACKENDS = ("numpy_ref", "kernels", "kernels_sum_kv", "torch", "torch_bmm", "torch_sdpa",
                   "torch_heads")
_TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
_DEVICE_STYLE = {"cpu": ("-", "o"), "cuda": ("--", "s")}
_FASTER, _SLOWER = "#2a9d8f", "#e76f51"
_DPI = 110


def _slug(text: str) -> str:
    """Lowercase, each run of non-alphanumerics one "-", none at either end."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _order(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """The distinct `values`, those in `preferred` first in its order, then the rest as met."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def _palette(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """backend -> colour: the known backends fixed, the others in name order after them."""
    colours = {b: _TAB10[i] for i, b in enumerate(_KNOWN_BACKENDS)}
    free = [c for c in _TAB10 if c not in colours.values()]
    extra = sorted({r["backend"] for r in rows} - set(colours))
    for i, backend in enumerate(extra):
        colours[backend] = free[i % len(free)] if free else _TAB10[i % len(_TAB10)]
    return colours


def _new_figure(width: float, height: float, *, constrained: bool) -> Figure:
    """A figure with the Agg canvas attached: no pyplot, no display, nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    fig.clear()  # drop the artists now rather than at garbage collection
    return path


def sweep_families(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping]]:
    """(family, swept size's name) -> that sweep's rows, in the order the families first occur."""
    families: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        if r.get("sweep"):
            families.setdefault((r["sweep"]["family"], r["sweep"]["x"]), []).append(r)
    return families


_NICE = (1.0, 2.0, 3.0, 5.0)


def _nice_values(x: float) -> list[float]:
    """1, 2, 3 and 5 times the powers of ten around `x` (positive), ascending."""
    k = math.floor(math.log10(x))
    return [m * 10.0 ** e for e in (k - 1, k, k + 1) for m in _NICE]


def _nice_below(x: float) -> float:
    """The largest 1-2-3-5 value at most x / 1.05 (a margin under the lowest point)."""
    return max(v for v in _nice_values(x / 1.05) if v <= x / 1.05)


def _nice_above(x: float) -> float:
    """The smallest 1-2-3-5 value at least x * 1.05 (a margin over the highest point)."""
    return min(v for v in _nice_values(x * 1.05) if v >= x * 1.05)


def _plain(value: float, _pos: object = None) -> str:
    """A tick label without scientific notation: 0.05, 2, 4096."""
    return f"{value:g}"


def sweep_figure(rows: Sequence[Mapping[str, Any]], family: str, x: str | None = None, *,
                 colours: Mapping[str, str] | None = None) -> Figure:
    """The figure of one sweep family (see the module docstring); `rows` may hold other rows.

    `x` picks the swept size when a family is swept along several; by default the family's
    first. `colours` maps backend -> colour (by default `_palette(rows)`). Raises ValueError
    when no row of `rows` belongs to the family.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    mine = [r for r in rows if r.get("sweep") and r["sweep"]["family"] == family
            and (x is None or r["sweep"]["x"] == x)]
    if not mine:
        raise ValueError(f"no row of sweep family {family!r}" + (f" along {x}" if x else ""))
    x = x or mine[0]["sweep"]["x"]
    mine = [r for r in mine if r["sweep"]["x"] == x]
    colours = dict(colours) if colours is not None else _palette(rows)
    failed = [r for r in mine if r["status"] == "FAIL"]
    drawn = [r for r in mine if r["status"] != "FAIL"]
    passes = _order([r["pass"] for r in mine], PASS_ORDER)
    dtypes = _order([r["dtype"] for r in mine], ("float32", "float64"))
    backends = _order([r["backend"] for r in mine], _KNOWN_BACKENDS)
    devices = _order([r["device"] for r in mine], ("cpu", "cuda"))
    series = [(b, d, t) for b in backends for d in devices for t in dtypes
              if any((r["backend"], r["device"], r["dtype"]) == (b, d, t) for r in mine)]
    xs_all = sorted({float(r["sweep"]["value"]) for r in mine})
    # ticks at the swept sizes themselves, thinned to at most 8
    ticks = xs_all[:: max(1, -(-len(xs_all) // 8))]

    fig = _new_figure(10.5, 3.6 * len(passes) + 0.6, constrained=True)
    axes = fig.subplots(len(passes), 2, squeeze=False)
    handles: dict[str, Line2D] = {}
    for i, pass_ in enumerate(passes):
        ax_t, ax_p = axes[i]
        pct_max = 100.0
        times: list[float] = []
        for backend, device, dtype in series:
            pts = sorted((float(r["sweep"]["value"]), r) for r in drawn
                         if (r["pass"], r["backend"], r["device"], r["dtype"])
                         == (pass_, backend, device, dtype))
            if not pts:
                continue
            xs = [p for p, _ in pts]
            small = [k for k, (_, r) in enumerate(pts) if r["status"] in HOLLOW]
            solid = [k for k in range(len(pts)) if k not in small]
            linestyle, marker = _DEVICE_STYLE.get(device, (":", "^"))
            label = f"{backend} ({device})" + (f" {dtype}" if len(dtypes) > 1 else "")
            colour = colours.get(backend, "black")
            for ax, ys in ((ax_t, [r["median_s"] * 1e3 for _, r in pts]),
                           (ax_p, [r["pct_of_ceiling"] for _, r in pts])):
                (line,) = ax.plot(xs, ys, linestyle=linestyle, marker=marker, markevery=solid,
                                  color=colour, label=label, linewidth=1.6, markersize=6)
                if small:
                    ax.plot([xs[k] for k in small], [ys[k] for k in small], linestyle="none",
                            marker=marker, markersize=6, markerfacecolor="none",
                            markeredgecolor=colour, markeredgewidth=1.4, label="_too small")
                handles.setdefault(label, line)
            pct_max = max(pct_max, *(r["pct_of_ceiling"] for _, r in pts))
            times += [r["median_s"] * 1e3 for _, r in pts]

        ax_p.axhline(100.0, color="0.35", linestyle=(0, (5, 3)), linewidth=1.1,
                     label="_ceiling")
        # labelled just outside the right spine, where it cannot cover a data point
        ax_p.annotate("ceiling", xy=(1.0, 100.0), xycoords=("axes fraction", "data"),
                      xytext=(3, 0), textcoords="offset points", ha="left", va="center",
                      color="0.35", fontsize=8, annotation_clip=False)
        ax_p.set_ylim(0.0, min(pct_max, PCT_TOP) * 1.1)
        ax_t.set_yscale("log")
        if times and max(times) / min(times) < 30:
            # under 1.5 decades a decade's ticks leave the axis almost unlabelled: tick at 1, 2,
            # 3 and 5 of each decade and end the axis on such a value at each side
            ax_t.yaxis.set_major_locator(LogLocator(base=10, subs=_NICE))
            ax_t.set_ylim(_nice_below(min(times)), _nice_above(max(times)))
        ax_t.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax_t.yaxis.set_minor_formatter(NullFormatter())
        for ax in (ax_t, ax_p):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks)
            ax.xaxis.set_major_formatter(FuncFormatter(_plain))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlim(xs_all[0] / 1.25, xs_all[-1] * 1.25)
            ax.grid(True, which="major", color="0.9", linewidth=0.8)
            ax.set_axisbelow(True)
            ax.set_xlabel(f"{x} (swept size, log scale)")
        ax_t.set_title(f"{pass_}: median time", fontsize=10)
        units = "/".join(_order([r["rate_unit"] for r in mine if r["pass"] == pass_], ()))
        ax_p.set_title(f"{pass_}: rate ({units}) as % of ceiling", fontsize=10)
        ax_t.set_ylabel("median time per call (ms, log scale)")
        ax_p.set_ylabel("rate / ceiling rate (%)")

    legend = list(handles.values())
    if any(r["status"] in HOLLOW for r in drawn):
        legend.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="none",
                             markeredgecolor="0.3",
                             label="hollow: not trusted (too\nsmall, noisy, above ceiling)"))
    legend.append(Line2D([], [], color="0.35", linestyle=(0, (5, 3)),
                         label="ceiling: fastest on\nthis machine = 100%"))
    fig.legend(handles=legend, loc="outside right upper", fontsize=9, frameon=False)
    fig.suptitle(f"{family}: sweep over {x} ({', '.join(dtypes)})", fontsize=12)
    if failed:
        names = sorted({f"{r['backend']} ({r['device']}) {r['pass']} {x}={r['sweep']['value']:g}"
                        for r in failed})
        fig.supxlabel("not drawn, failed validation: " + "; ".join(names), fontsize=8,
                      color="#b00000")
    return fig


def plot_sweeps(rows: Sequence[Mapping[str, Any]], directory: str | Path) -> list[Path]:
    """Write one ``sweep-<family slug>-<x>.png`` per sweep family in `rows` into `directory`.

    See the module docstring for what each figure shows. Creates `directory` if missing;
    returns the paths written, in the order the families first occur (none without a sweep).
    """
    directory = Path(directory)
    colours = _palette(rows)
    paths = []
    for family, x in sweep_families(rows):
        fig = sweep_figure(rows, family, x, colours=colours)
        paths.append(_save(fig, directory / f"sweep-{_slug(family)}-{_slug(x)}.png"))
    return paths


def ratio_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows `plot_ratios` draws a bar for, in the order it draws them (top to bottom).

    A row qualifies when it is not part of a sweep, did not fail validation, has a positive
    ``vs_baseline`` and is not its op's baseline itself. They are grouped by op (in `BASELINES`'
    order, then others as met), size and pass (each as first met); a group keeps its rows'
    order.
    """
    chosen = [r for r in rows
              if not r.get("sweep") and r["status"] != "FAIL"
              and r.get("vs_baseline") is not None and r["vs_baseline"] > 0
              and (r["backend"], r["device"]) != BASELINES.get(r["op"])]
    ops = _order([r["op"] for r in chosen], tuple(BASELINES))
    sizes = _order([r["size"] for r in chosen], ())
    passes = _order([r["pass"] for r in chosen], PASS_ORDER)

    def key(r: Mapping[str, Any]) -> tuple[int, int, int]:
        return ops.index(r["op"]), sizes.index(r["size"]), passes.index(r["pass"])

    return sorted(chosen, key=key)  # stable: a group keeps the rows' order


def unsure(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether `row`'s ``vs_baseline`` is not to be trusted: its status, or that of its op's
    baseline row of the same size, pass and dtype in `rows`, is one of `UNSURE`."""
    if row["status"] in UNSURE:
        return True
    like = (row["op"], row["size"], row["pass"], row["dtype"])
    return any((r["backend"], r["device"]) == BASELINES.get(row["op"])
               and (r["op"], r["size"], r["pass"], r["dtype"]) == like
               and r["status"] in UNSURE for r in rows)


def _ratio_text(ratio: float) -> str:
    """8.2x, 12x, 0.25x, 0.004x: two significant digits at most, none lost below 1."""
    return f"{ratio:.0f}x" if ratio >= 9.95 else f"{ratio:.1f}x" if ratio >= 0.995 \
        else f"{ratio:.2g}x"


def ratio_figure(rows: Sequence[Mapping[str, Any]], *, title: str = "") -> Figure | None:
    """The bar chart `plot_ratios` saves (see the module docstring), or None with no bar."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    bars = ratio_rows(rows)
    if not bars:
        return None
    dtypes = _order([r["dtype"] for r in bars], ("float32", "float64"))
    labels = []
    for r in bars:
        device = "" if r["device"] == "cpu" else f" ({r['device']})"
        dtype = f" {r['dtype']}" if len(dtypes) > 1 else ""
        labels.append(f"{r['op']} {r['size']} {PASS_SHORT.get(r['pass'], r['pass'])}{dtype}"
                      f" · {r['backend']}{device}")
    ratios = [float(r["vs_baseline"]) for r in bars]
    n = len(bars)

    # wide enough that the longest label leaves the bars 4.5 inches (8.5 pt: ~0.065 in/char)
    label_in = 0.065 * max(map(len, labels)) + 0.4
    width_in = max(9.0, 4.5 + label_in)
    fig = _new_figure(width_in, 0.3 * n + 1.9, constrained=True)
    ax = fig.add_subplot()
    ys = list(range(n))
    lefts = [min(q, 1.0) for q in ratios]
    widths = [abs(q - 1.0) or 1e-9 for q in ratios]
    colours = [_FASTER if q >= 1 else _SLOWER for q in ratios]
    hatched = [unsure(r, rows) for r in bars]
    drawn = ax.barh(ys, widths, left=lefts, height=0.62, color=colours, zorder=2)
    for patch, colour, mark in zip(drawn, colours, hatched, strict=True):
        if mark:
            _hatch(patch, colour)
    lo, hi = min(*ratios, 1.0), max(*ratios, 1.0)
    for y, q in zip(ys, ratios, strict=True):
        ax.annotate(_ratio_text(q), xy=(q, y), xytext=(4 if q >= 1 else -4, 0),
                    textcoords="offset points", ha="left" if q >= 1 else "right",
                    va="center", fontsize=8.5)
    groups = [(r["op"], r["size"], r["pass"]) for r in bars]
    for y in range(1, n):
        if groups[y] != groups[y - 1]:
            ax.axhline(y - 0.5, color="0.8", linewidth=0.8, zorder=1)
    ax.axvline(1.0, color="0.2", linewidth=1.2, zorder=3)
    ax.set_xscale("log")
    # room for the ratio text ("0.032x", ~0.6 inch) beyond the extreme bars at both ends: m
    # decades each side of the D shown, on an axis of about W inches, take m W / (D + 2m) inches
    decades, axis_in = math.log10(hi / lo), width_in - label_in
    margin = max(math.log10(2.2), 0.6 * decades / (axis_in - 1.2))
    ax.set_xlim(lo / 10**margin, hi * 10**margin)
    if hi / lo < 100:  # up to 2.7 decades shown: label 1, 2 and 5 of each, else only decades
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.set_ylim(n - 0.5, -0.5)  # first bar on top
    ax.set_yticks(ys, labels, fontsize=8.5)
    # the 1x tick names the line drawn there
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda v, _p: "1x\n= baseline" if math.isclose(v, 1.0) else f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, axis="x", which="major", color="0.9", linewidth=0.8, zorder=0)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    present = _order([r["op"] for r in bars], tuple(BASELINES))
    base = ", ".join(f"{op}: {' '.join(BASELINES[op])}" for op in present if op in BASELINES)
    ax.set_xlabel("speed vs baseline = baseline median time / this row's median time "
                  f"(log scale)\nbaselines: {base}", fontsize=9)
    # above the bars, right-aligned: the layout keeps the title above it
    kinds = [Patch(color=_FASTER, label="faster than baseline")] * any(q >= 1 for q in ratios) \
        + [Patch(color=_SLOWER, label="slower than baseline")] * any(q < 1 for q in ratios)
    if any(hatched):
        kinds.append(_hatch(Patch(label="too small or noisy (the row or\nits baseline): not "
                                        "a reliable ratio"), "0.45"))
    ax.legend(handles=kinds,
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(kinds), fontsize=8.5,
              frameon=False, borderaxespad=0.2)
    heading = title or "Speed against each op's baseline"
    fig.suptitle(f"{heading} ({', '.join(dtypes)})", fontsize=11)
    return fig


def _hatch(patch: Patch, colour: str) -> Patch:
    """`patch` faded and hatched in `colour`: a bar whose ratio is not trusted."""
    from matplotlib.colors import to_rgba

    patch.set_facecolor(to_rgba(colour, 0.3))
    patch.set_edgecolor(colour)
    patch.set_hatch("////")
    patch.set_linewidth(0.8)
    return patch


def plot_ratios(rows: Sequence[Mapping[str, Any]], path: str | Path, *,
                title: str = "") -> Path | None:
    """Write the bar chart of every qualifying row's ``vs_baseline`` (see `ratio_rows`) to `path`.

    Creates the parent directory if missing. Returns `path`, or None (writing nothing) when no
    row qualifies.
    """
    fig = ratio_figure(rows, title=title)
    return None if fig is None else _save(fig, Path(path))
