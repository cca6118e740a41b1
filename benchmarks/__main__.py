"""Time every backend of every op against the float64 reference and the hardware floor.

What is measured: for each problem (an op at one size) and each backend (numpy_ref, kernels,
torch on the CPU, torch on CUDA when present; for attention torch's bmm path and its
scaled_dot_product_attention), the wall time of one forward call and of one forward+backward
call, backward driven by random cotangents of the outputs; and for each model (the seed's
classifier, the encoder-decoder with a Luong and with a Bahdanau decoder) one training step:
forward, cross-entropy, backward and an Adam step (benchmarks/training.py; where the time of
such a step goes: python -m benchmarks.profile).
Before a row is timed its result (outputs, and for forward+backward the gradient of every input
and parameter) is compared with numpy_ref run in float64 on the same inputs; a row that
disagrees is flagged FAIL and the command exits with status 1.

Each row is printed next to the floor the machine puts under it, measured in the same run:
- The LSTM, the many-query attention and the training steps are GEMM-bound (an LSTM step is
  two matrix products and cheap gate math), so their GFLOP/s is compared with the rate numpy's
  BLAS reaches on one product of a comparable shape.
- The single-query attention (the seed's) is memory-bound: forward must read the values V once,
  backward read them once more and write d_values once. Its GB/s is compared with a streaming
  read and a fresh copy of V's bytes, done by parallel Numba kernels on as many threads.
"% floor" is the floor's time for the row's work over the row's time. The "vs base" column is
speed relative to the op's usual counterpart: torch on the CPU, torch's bmm path for attention.
A training-step row is validated on its loss and every gradient (before the update).
"""

from __future__ import annotations

import argparse
import os
import sys

import numba
import numpy as np
import torch

from benchmarks import cases, runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see ``python -m benchmarks --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", choices=cases.SUITES, default="default",
                        help="problem sizes: the default set, or tiny ones for a smoke test")
    parser.add_argument("--filter", default="", metavar="SUBSTRING",
                        help="run only the cases whose id (op/size/backend/device/pass) "
                             "contains SUBSTRING")
    parser.add_argument("--repeat", type=int, default=5, metavar="N",
                        help="at least N timed calls per row (default 5)")
    parser.add_argument("--min-time", type=float, default=0.5, metavar="SECONDS",
                        help="and at least SECONDS of timed calls per row (default 0.5)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), metavar="N",
                        help="torch CPU threads, and numba's for the memory floors (default: "
                             "the machine's cores)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--list", action="store_true",
                        help="print the selected case ids and exit")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.threads < 1 or args.min_time < 0:
        parser.error("--repeat and --threads must be >= 1, --min-time >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return 0 when every row validated, 1 otherwise, 2 when none matched."""
    args = parse_args(argv)
    selected = cases.select_cases(args.sizes, args.filter)
    if not selected:
        print(f"no case of --sizes {args.sizes} matches --filter {args.filter!r}",
              file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(case.id for case in selected))
        return 0
    torch.set_num_threads(args.threads)
    # The memory floors' Numba kernels get the same threads; numba cannot go above the count
    # it started with (NUMBA_NUM_THREADS, by default the machine's cores).
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    warmup = 1
    watch = runner.OtherProcesses()
    rows = runner.run_cases(selected, dtype=np.dtype(args.dtype), repeat=args.repeat,
                            min_time=args.min_time, warmup=warmup)
    info = runner.machine_info()
    info["other_processes"] = watch.report()
    for line in runner.header_lines(info, rows, repeat=args.repeat, min_time=args.min_time,
                                    warmup=warmup):
        print(f"# {line}")
    print(runner.format_table(rows))
    if args.json:
        runner.write_json(args.json, info, rows)
    failed = [r for r in rows if not r.ok]
    if failed:
        print(f"{len(failed)} row(s) failed validation", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
