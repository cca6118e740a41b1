"""What a run prints and writes, from its rows (`benchmarks.runner.Row`).

- The header: `header`, the JSON header (`benchmarks/schema.json`) of the machine's facts and
  the run's noise that `benchmarks.measure` gives, and `header_lines`, the lines printed above
  the table (with the rules of each column).
- The table: `format_table`, one line per row grouped by op and size under a heading with the
  ceiling, and `flagged_lines`, one line per row that is not ok, saying why.
- The targets: `target_results` checks the GPU goals of `benchmarks.cases.TARGETS` against the
  rows (the header's ``targets``), `target_lines` prints them under the table.
- The JSON file: `write_json`, named after the run's start (`utc_now`) and commit
  (`run_stamp`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import measure
from benchmarks.cases import BASELINES, TARGETS, Target
from benchmarks.ceilings import nominal_peak
from benchmarks.runner import MAX_OVER_MIN, MAX_REL_IQR, MIN_CEILING_S, Row, baseline, find_row

SCHEMA = "lstm-attention-reference/benchmarks/1"


# --------------------------------------------------------------------------------------------
# the header


def header(*, argv: Sequence[str], options: Mapping[str, Any], started: datetime,
           rows: Sequence[Row], other_cpu_s: float | None, drift: float | None,
           wall_s: float) -> dict[str, Any]:
    """The JSON header (`benchmarks/schema.json`): what the figures depend on."""
    peak, how = nominal_peak()
    rel_iqrs = [r.rel_iqr for r in rows]
    return {
        "date": started.isoformat(timespec="seconds"),
        "git": measure.git_state(),
        "argv": list(argv),
        "options": dict(options),
        "machine": measure.machine(),
        "versions": measure.versions(),
        "threads": measure.threads(),
        "blas": measure.blas(),
        "peak": {"gflops": peak, "derivation": how, "best_blas_gflops": max(
            (r.ceiling for r in rows if r.work_unit == "GFLOP" and r.device == "cpu"),
            default=None)},
        "noise": {"other_processes_cpu_s": other_cpu_s, "probe_drift": drift,
                  "median_row_rel_iqr": float(np.median(rel_iqrs)) if rel_iqrs else None},
        "wall_s": wall_s,
    } | ({"targets": targets} if (targets := target_results(rows)) else {})


def header_lines(head: Mapping[str, Any]) -> list[str]:
    """The lines above the table: machine, versions, peak, noise, and the rules of each column."""
    m, v, t, n = head["machine"], head["versions"], head["threads"], head["noise"]
    commit = head["git"]["commit"]
    commit = "no git" if commit is None else commit[:10] + (" (dirty)" if head["git"]["dirty"]
                                                            else "")
    peak = head["peak"]["gflops"]
    peak_text = ("unknown" if peak["float32"] is None else
                 f"{peak['float32']:.0f} GFLOP/s float32, {peak['float64']:.0f} float64")
    other = n["other_processes_cpu_s"]
    return [
        f"{head['date']}  commit {commit}  {m['cpu']}, {m['logical_cpus']} logical CPUs, "
        f"{m['platform']}, CUDA: {m['cuda_device'] or 'none'}",
        f"python {v['python']}, numpy {v['numpy']} (BLAS {head['blas']['numpy']}), torch "
        f"{v['torch']} (BLAS {head['blas']['torch']}), numba {v['numba']}, scipy {v['scipy']}",
        f"threads: torch {t['torch']}, numba {t['numba']} ({t['numba_threading_layer'] or '-'} "
        f"layer), NumPy's BLAS {t.get('numpy_blas') or '-'}, env "
        + (" ".join(f"{k}={x}" for k, x in t["blas_env"].items()) or "none set"),
        f"nominal peak: {peak_text} = {head['peak']['derivation']}",
        *_best_blas_line(head),
        "noise: other processes took " + ("unknown" if other is None else f"{other:.1f} CPU-s")
        + f" in {head['wall_s']:.0f} s; the probe moved "
        + ("unknown" if n["probe_drift"] is None else f"{100 * n['probe_drift']:.0f}%")
        + " from start to end; median row IQR "
        + ("-" if n["median_row_rel_iqr"] is None else f"{100 * n['median_row_rel_iqr']:.1f}%"),
        "median/iqr: of samples (a call under 2 ms is looped); vs torch: the baseline's median / "
        "this row's (" + ", ".join(f"{op}: {' '.join(b)}" for op, b in BASELINES.items()) + ")",
        "% ceil: the ceiling's time / median; the ceiling is the fastest any library here does "
        "the row's work (BLAS on its products, or a read + copy of V's bytes); peak MiB: what "
        "one call allocates",
        "max err: max over every returned array of max|got - ref| / max|ref|, ref = numpy_ref "
        "in float64; FAIL above sqrt(eps)",
    ]


def _best_blas_line(head: Mapping[str, Any]) -> list[str]:
    """How close the run's fastest BLAS ceiling came to the nominal peak (a line, or none)."""
    best = head["peak"].get("best_blas_gflops")
    peak = head["peak"]["gflops"].get(head["options"]["dtype"])
    if best is None or peak is None:
        return []
    line = (f"  the fastest BLAS ceiling of this run ran at {best:.0f} GFLOP/s, "
            f"{best / peak:.0%} of it")
    if best > peak:
        line += (": the cores ran faster than the clock given (boost), so the peak is an "
                 "underestimate")
    return [line]

# --------------------------------------------------------------------------------------------
# the table


def _figure(x: float) -> str:
    """A rate with at least three significant digits and at most one decimal above 100."""
    return f"{x:.0f}" if x >= 1000 else f"{x:.1f}" if x >= 100 else f"{x:.3g}"


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def _spread(rel_iqr: float) -> str:
    """The IQR column: a percentage of the median, shown as ">999%" beyond that, where a few
    samples of a looped tiny call caught a preemption (12611% was seen) and the figure says
    nothing more than that the row was not timed reliably."""
    pct = 100 * rel_iqr
    return f"{pct:.0f}%" if pct < 999.5 else ">999%"


def format_table(rows: Sequence[Row]) -> str:
    """The rows as aligned text, grouped by op and size (a heading line each, with the
    ceiling), one line per pass and backend; ``*`` marks each pass's fastest backend on each
    device among the rows that validated."""
    head = ("pass", "backend", "device", "median ms", "iqr", "min ms", "vs torch", "rate",
            "% ceil", "peak MiB", "compile s", "max err", "status")
    numeric = set(range(3, 12))
    fastest = {}
    for r in rows:
        key = (r.op, r.size, r.pass_, r.device, r.dtype)
        if r.ok and (key not in fastest or r.median_s < fastest[key].median_s):
            fastest[key] = r
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.size, r.dtype), []).append(r)
    body: list[tuple[str, ...] | str] = []
    for (op, size, dtype), members in groups.items():
        # per pass and device, the ceiling (every row of a pass and device shares it)
        ceilings = {(r.pass_, r.device): r for r in members}
        several = len({r.device for r in members}) > 1
        body.append(f"{op} {size} {dtype}: ceiling " + "; ".join(
            f"{r.pass_}{f' on {r.device}' if several else ''} {_ms(r.ceiling_s)} ms = "
            f"{r.ceiling_name} ({r.ceiling_by})" for r in ceilings.values()))
        for r in sorted(members, key=lambda r: (r.pass_, r.device, r.median_s)):
            base = baseline(r, rows)
            pct = "-" if r.status in ("too small", "noisy") else f"{r.pct_of_ceiling:.1f}"
            status = {"FAIL": f"FAIL ({r.worst})", "above ceiling": "ABOVE CEILING"}.get(
                r.status, r.status)
            star = "* " if fastest.get((r.op, r.size, r.pass_, r.device, r.dtype)) is r else "  "
            body.append((
                r.pass_, star + r.backend, r.device, _ms(r.median_s),
                _spread(r.rel_iqr), _ms(r.min_s),
                "-" if base is None else f"{base.median_s / r.median_s:.2f}x",
                f"{_figure(r.rate)} {r.rate_unit}", pct,
                "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.2f}",
                f"{r.compile_s:.2f}", f"{r.max_err:.1e}", status,
            ))
    lines = [line for line in body if isinstance(line, tuple)]
    widths = [max(len(line[i]) for line in (head, *lines)) for i in range(len(head))]

    def fmt(line: Sequence[str]) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        return "  " + "  ".join(cells).rstrip()

    out = [fmt(head)]
    for line in body:
        if isinstance(line, str):
            out += ["", line]
        else:
            out.append(fmt(line))
    targets = target_lines(rows)
    if targets:  # only where a target's problem ran on its device (a GPU)
        out += ["", *targets]
    return "\n".join(out)


def flagged_lines(rows: Sequence[Row]) -> list[str]:
    """One line per row whose status is not ok, saying why."""
    lines = []
    for r in rows:
        if r.status == "FAIL":
            lines.append(f"FAIL: {r.id}: max err {r.max_err:.2e} in {r.worst}, allowed "
                         f"{r.tolerance:.2e}")
        elif r.status == "above ceiling":
            lines.append(f"ABOVE CEILING: {r.id} ran in {_ms(r.median_s)} ms, its ceiling "
                         f"({r.ceiling_name}, timed twice) in {_ms(r.ceiling_s)} ms: a "
                         "measurement problem, not a result")
    small = sum(r.status == "too small" for r in rows)
    noisy = sum(r.status == "noisy" for r in rows)
    if small:
        # the status column shows "too small" before "noisy": name the noisy ones here
        both = sum(r.status == "too small" and r.noisy for r in rows)
        lines.append(f"{small} row(s) too small for a % of ceiling (a ceiling under "
                     f"{MIN_CEILING_S * 1e6:.0f} us is one library call's overhead): their "
                     "times stand, their percentages are not printed"
                     + (f"; {both} of them noisy too, whose times do not stand either"
                        if both else ""))
    if noisy:
        lines.append(f"{noisy} row(s) noisy (IQR over {MAX_REL_IQR:.0%} of the median, or a "
                     f"median over {MAX_OVER_MIN:g}x the fastest sample): the machine was busy "
                     "while they ran; run again on an idle machine")
    return lines


# --------------------------------------------------------------------------------------------
# the targets


def target_results(rows: Sequence[Row], targets: Sequence[Target] = TARGETS
                   ) -> list[dict[str, Any]]:
    """Each goal of `targets` whose problem ran on its device in this run, per pass: the
    backend's % of the device-to-device copy bandwidth and its speed over `versus` on the same
    device, against their minimums (the header's ``targets``, `benchmarks/schema.json`).

    ``met`` is True when both minimums are reached by a row that validated, False when one is
    missed, None when it cannot be said (``why``: no such row, the row FAILed, no copy
    bandwidth or no row of `versus` to compare with).
    """
    results = []
    for t in targets:
        ran = [r for r in rows if (r.op, r.size, r.dtype, r.device) == (t.op, t.size, t.dtype,
                                                                       t.device)]
        if not ran:
            continue
        for pass_ in t.passes:
            row = next((r for r in ran if (r.backend, r.pass_) == (t.backend, pass_)), None)
            other = None if row is None else find_row(rows, row, t.versus, t.device)
            result = {"op": t.op, "size": t.size, "dtype": t.dtype, "backend": t.backend,
                      "device": t.device, "pass": pass_,
                      "min_pct_of_copy_bandwidth": t.min_pct_of_copy_bandwidth,
                      "versus": t.versus, "min_speedup": t.min_speedup,
                      "pct_of_copy_bandwidth": None, "copy_gbps": None, "speedup": None,
                      "median_s": None, "versus_median_s": None, "status": None,
                      "met": None, "why": ""}
            results.append(result)
            if row is None:
                result["why"] = f"no {t.backend} row (unavailable here or not selected)"
                continue
            result.update(median_s=row.median_s, status=row.status,
                          copy_gbps=row.copy_gbps, pct_of_copy_bandwidth=row.pct_of_copy_bandwidth)
            if other is not None:
                result.update(speedup=other.median_s / row.median_s,
                              versus_median_s=other.median_s)
            if not row.ok:
                result["why"] = f"FAIL ({row.worst}): not a result"
                continue
            checks = []
            if result["pct_of_copy_bandwidth"] is None:
                result["why"] = "no copy bandwidth measured"
            else:
                checks.append(result["pct_of_copy_bandwidth"] >= t.min_pct_of_copy_bandwidth)
            if other is None:
                result["why"] = (result["why"] + "; " if result["why"] else "") + (
                    f"no {t.versus} {t.device} row to compare with")
            else:
                checks.append(result["speedup"] >= t.min_speedup)
            result["met"] = False if not all(checks) else None if result["why"] else True
    return results


def target_lines(rows: Sequence[Row], targets: Sequence[Target] = TARGETS) -> list[str]:
    """`target_results` as text: a heading per goal, then per pass the % of the copy bandwidth
    and the speedup, each "met" or "MISSED", or why it cannot be said."""
    lines, heading = [], None
    for r in target_results(rows, targets):
        goal = (f"target: {r['op']} {r['size']} {r['dtype']}, {r['backend']} on {r['device']}: "
                f">= {r['min_pct_of_copy_bandwidth']:.0f}% of the device-to-device copy "
                f"bandwidth and >= {r['min_speedup']:g}x {r['versus']} on {r['device']}")
        if goal != heading:
            lines.append(goal)
            heading = goal
        if r["status"] is None or r["status"] == "FAIL":
            lines.append(f"  {r['pass']}: {r['why']}")
            continue
        parts = []
        pct = r["pct_of_copy_bandwidth"]
        if pct is not None:
            parts.append(f"{pct:.1f}% of the copy bandwidth ({r['copy_gbps']:.0f} GB/s), "
                         + ("met" if pct >= r["min_pct_of_copy_bandwidth"] else "MISSED"))
        speedup = r["speedup"]
        if speedup is not None:
            parts.append(f"{speedup:.2f}x {r['versus']} ({_ms(r['versus_median_s'])} ms / "
                         f"{_ms(r['median_s'])} ms), "
                         + ("met" if speedup >= r["min_speedup"] else "MISSED"))
        if r["why"]:
            parts.append(r["why"])
        if r["status"] != "ok":
            parts.append(f"status {r['status']}")
        lines.append(f"  {r['pass']}: " + "; ".join(parts))
    return lines


# --------------------------------------------------------------------------------------------
# the JSON file


def write_json(path: str | Path, head: Mapping[str, Any], rows: Sequence[Row]) -> Path:
    """Write ``{"schema", "header", "rows"}`` (`benchmarks/schema.json`) to `path`: the header
    indented, each row on one line (a diff shows which rows changed; the samples stay short)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = ",\n  ".join(json.dumps(r.record(rows)) for r in rows)
    path.write_text(f'{{"schema": {json.dumps(SCHEMA)},\n "header": '
                    f'{json.dumps(dict(head), indent=1)},\n "rows": [\n  {records}\n ]}}\n')
    return path


def utc_now() -> datetime:
    """Now, in UTC: the run's start in its header and in its files' names."""
    return datetime.now(UTC)


def run_stamp(started: datetime) -> str:
    """E.g. ``20261201-130500-2a748b9``: the default name of a run's files."""
    commit = measure.git_state()["commit"]
    return started.strftime("%Y%m%d-%H%M%S") + ("" if commit is None else f"-{commit[:7]}")

