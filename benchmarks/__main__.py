"""Time every backend of every op against the float64 reference and the machine's ceiling.

What is measured: for each problem (an op at one size) and each backend (numpy_ref, kernels,
torch on the CPU, torch on CUDA when present; for attention torch's bmm path and its
scaled_dot_product_attention), the time of one forward call and of one forward+backward call,
backward driven by random cotangents of the outputs; and for each model (the seed's
classifier, the encoder-decoder with a Luong and with a Bahdanau decoder) one training step:
forward, cross-entropy, backward and an Adam step (where such a step's time goes:
python -m benchmarks.profile).

Before a row is timed its result (outputs, and for forward+backward the gradient of every input
and parameter) is compared with numpy_ref run in float64 on the same inputs; a row that
disagrees is FAIL and the command exits with status 1.

Each row is printed as a percentage of its ceiling, the least time any library on this
machine takes for the row's work, measured in the same run (benchmarks/ceilings.py):
- GEMM-bound rows (the LSTM, the many-query and multi-head attention): the best of NumPy's and
  torch's BLAS on exactly the matrix products the op must compute; the training steps: their
  flops at the best BLAS rate of the model's largest product (an estimate);
- memory-bound rows (the single-query attention, the seed's case): a streaming read of V (and
  for forward+backward a fresh copy of it), the least traffic the op needs.
A row above 100% of its ceiling is flagged ABOVE CEILING (a measurement problem); a row whose
ceiling is under 20 us says "too small", and one whose samples spread wide (an IQR over half
their median, or a median over twice the fastest sample) "noisy", instead of a percentage; the
plot against torch hatches the bars of such rows. The header gives the CPU's nominal peak and
how it was derived.

Files: the run is written as JSON (benchmarks/schema.json: a header with the machine, versions,
threads, BLAS, git commit, date and the run's noise; one record per row) and as PNG plots
(speed against torch; with --sizes sweep, time and % of ceiling against size), by default into
bench-results/<date>-<time>-<commit>/. --compare OLD.json [NEW.json] compares runs row by row
(after a run, the rows that got slower are timed once more and keep their faster look).

Exit status: 0 when every row validated; 1 when a row FAILed (whatever --compare says); 2 when
the selection matched no case, named an unknown op or backend, or --compare could not read a
file; 3 with --fail-on-regression when --compare found a regression.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numba
import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from benchmarks import cases, compare, measure, report, runner
from benchmarks.core import Case

# --quick: every case at its tiny size with a few short samples, under a minute on 2 cores.
QUICK = {"repeat": 3, "min_time": 0.01}
DEFAULT_TIMING = {"default": {"repeat": 5, "min_time": 0.5},
                  "quick": QUICK, "sweep": {"repeat": 5, "min_time": 0.2}}


def _names(text: str) -> list[str]:
    """"lstm, attention" -> ["lstm", "attention"]."""
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see ``python -m benchmarks --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", choices=cases.SUITES, default="default",
                        help="default: realistic sizes (the main job, a few minutes); quick: "
                             "tiny ones (a smoke test); sweep: each op over a range of sizes, "
                             "for the plots")
    parser.add_argument("--quick", action="store_true",
                        help="every case at tiny sizes with short timing: --sizes quick "
                             f"--repeat {QUICK['repeat']} --min-time {QUICK['min_time']}")
    parser.add_argument("--ops", type=_names, metavar="OP,...",
                        help=f"only these ops, of {', '.join(cases.OPS)}")
    parser.add_argument("--backends", type=_names, metavar="NAME,...",
                        help=f"only these backends, of {', '.join(cases.BACKEND_NAMES)}")
    parser.add_argument("--filter", default="", metavar="SUBSTRING",
                        help="only the cases whose id (op/size/backend/device/pass) contains "
                             "SUBSTRING")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="at least N timed samples per row (default 5, --quick 3)")
    parser.add_argument("--min-time", type=float, metavar="SECONDS",
                        help="and at least SECONDS of them per row (default 0.5; sweep 0.2)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), metavar="N",
                        help="the threads of torch, of numba and of NumPy's BLAS (default: the "
                             "machine's logical CPUs)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the run here (default: results.json in the run's folder)")
    parser.add_argument("--plot", metavar="DIR",
                        help="write the plots here (default: the run's folder)")
    parser.add_argument("--compare", nargs="+", metavar="JSON",
                        help="OLD.json: run, then compare this run with OLD; OLD.json "
                             "NEW.json: compare the two files without running anything")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="exit with status 3 when --compare flags a row slower")
    parser.add_argument("--min-band", type=float, default=compare.MIN_BAND, metavar="FRACTION",
                        help="--compare calls a change within this fraction noise whatever the "
                             f"runs' own noise (default {compare.MIN_BAND}; on a shared virtual "
                             "machine two runs of one commit moved rows by up to 0.45)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory measurement of each row")
    parser.add_argument("--list", action="store_true",
                        help="print the selected case ids and exit")
    args = parser.parse_args(argv)
    if args.quick:
        if args.sizes not in ("default", "quick"):
            parser.error(f"--quick is --sizes quick; it cannot go with --sizes {args.sizes}")
        args.sizes = "quick"
    timing = DEFAULT_TIMING[args.sizes]
    args.repeat = timing["repeat"] if args.repeat is None else args.repeat
    args.min_time = timing["min_time"] if args.min_time is None else args.min_time
    if args.repeat < 1 or args.threads < 1 or args.min_time < 0:
        parser.error("--repeat and --threads must be >= 1, --min-time >= 0")
    if args.compare is not None and len(args.compare) > 2:
        parser.error("--compare takes OLD.json, or OLD.json NEW.json")
    if args.fail_on_regression and args.compare is None:
        parser.error("--fail-on-regression needs --compare")
    if args.min_band < 0:
        parser.error("--min-band must be >= 0")
    return args


def _retime_slower(rows: list[runner.Row], selected: list[Case], old: dict,
                   args: argparse.Namespace) -> list[runner.Row]:
    """Time once more the rows that `old` says got slower, and keep each row's faster look.

    A shared machine moves whole runs by 10-40% within minutes, more than a run's own noise
    shows; a second look at a flagged row (as at a ceiling a row beat) keeps a passing cloud
    from reading as a regression, while a real slowdown is slow both times.
    """
    new = {"schema": report.SCHEMA, "header": {"noise": {"probe_drift": None}},
           "rows": [r.record(rows) for r in rows]}
    slower = {c.id for c in compare.compare(old, new, min_band=args.min_band).regressions}
    again = [case for case in selected if case.id in slower]
    if not again:
        return rows
    print(f"--compare: timing the {len(again)} row(s) that got slower once more",
          file=sys.stderr)
    second = {r.id: r for r in runner.run_cases(
        again, dtype=np.dtype(args.dtype), repeat=args.repeat, min_time=args.min_time,
        memory=not args.no_memory)}
    return [second[r.id] if r.id in second and second[r.id].median_s < r.median_s else r
            for r in rows]


def _compare(old: dict, new: dict, args: argparse.Namespace) -> int:
    comparison = compare.compare(old, new, min_band=args.min_band)
    print()
    print(compare.format_comparison(comparison))
    return 3 if args.fail_on_regression and comparison.regressions else 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring for the exit status)."""
    args = parse_args(argv)
    if args.compare is not None and len(args.compare) == 2:
        try:
            old, new = (compare.load(path) for path in args.compare)
        except (OSError, ValueError) as error:
            print(f"--compare: {error}", file=sys.stderr)
            return 2
        return _compare(old, new, args)
    old = None
    if args.compare is not None:  # read it first: a bad file should not cost a whole run
        try:
            old = compare.load(args.compare[0])
        except (OSError, ValueError) as error:
            print(f"--compare: {error}", file=sys.stderr)
            return 2
    try:
        selected = cases.select_cases(args.sizes, args.filter, ops=args.ops,
                                      backends=args.backends)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not selected:
        by_op = {op: sorted({b.name for b in cases.BACKENDS if b.op == op}) for op in cases.OPS}
        print(f"no case of --sizes {args.sizes} matches the selection; the backends of each op: "
              + "; ".join(f"{op}: {', '.join(names)}" for op, names in by_op.items()),
              file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(case.id for case in selected))
        return 0

    try:
        from benchmarks import plots  # matplotlib: the bench extra; known before a long run
    except ImportError as error:
        plots = None
        print(f"no plots: {error} (pip install -e '.[bench]')", file=sys.stderr)
    torch.set_num_threads(args.threads)
    # numba cannot go above the thread count it started with (NUMBA_NUM_THREADS, by default
    # the machine's logical CPUs).
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    # NumPy's BLAS (OpenBLAS) reads its thread count when it loads; threadpoolctl resets it.
    threadpool_limits(limits=args.threads, user_api="blas")
    started = report.utc_now()
    folder = Path("bench-results") / report.run_stamp(started)
    watch = measure.OtherProcesses()
    probe = measure.Probe()
    bar = tqdm(total=len(selected), unit="row", disable=None, file=sys.stderr,
               dynamic_ncols=True)
    seen = []

    def progress(case: Case) -> None:
        if seen:
            bar.update(1)
        seen.append(case)
        bar.set_postfix_str(case.id, refresh=True)

    try:
        rows = runner.run_cases(selected, dtype=np.dtype(args.dtype), repeat=args.repeat,
                                min_time=args.min_time, memory=not args.no_memory,
                                progress=progress)
        bar.update(1)
    finally:
        bar.close()
    if old is not None:
        rows = _retime_slower(rows, selected, old, args)
    drift = probe.drift()
    other_cpu_s, wall_s = watch.seconds()
    head = report.header(
        argv=sys.argv, started=started, rows=rows, other_cpu_s=other_cpu_s, drift=drift,
        wall_s=wall_s, options={"sizes": args.sizes, "dtype": args.dtype,
                                "repeat": args.repeat, "min_time": args.min_time,
                                "threads": args.threads, "ops": args.ops,
                                "backends": args.backends, "filter": args.filter})
    for line in report.header_lines(head):
        print(f"# {line}")
    print(report.format_table(rows))
    flagged = report.flagged_lines(rows)
    if flagged:
        print()
        print("\n".join(flagged))

    json_path = report.write_json(args.json or folder / "results.json", head, rows)
    records = [r.record(rows) for r in rows]
    plot_dir = Path(args.plot) if args.plot else folder
    title = f"{head['machine']['cpu']}, {head['date']}"
    written = [] if plots is None else [
        p for p in (plots.plot_ratios(records, plot_dir / "vs-torch.png", title=title),
                    *plots.plot_sweeps(records, plot_dir)) if p is not None]
    print()
    print(f"wrote {json_path}")
    for path in written:
        print(f"wrote {path}")

    regressed = 0
    if old is not None:
        new = {"schema": report.SCHEMA, "header": head, "rows": records}
        regressed = _compare(old, new, args)
    # a wrong result outranks a slow one
    return 1 if any(r.status == "FAIL" for r in rows) else regressed


if __name__ == "__main__":
    sys.exit(main())
