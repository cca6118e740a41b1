"""Where a training step's time goes: a profile by op of each model on each backend.

``python -m benchmarks.profile`` runs the training-step problems of `benchmarks.cases` (the
default sizes unless ``--sizes quick``, float32) and prints, per model and backend, the time
per step of each op:

- numpy_ref and kernels: every ``*_forward`` / ``*_backward`` of the backend module is wrapped
  in a timer (the models take the module as ``backend=``, so they call the wrapped ones), and
  the Adam step is timed on its own; what is left of the step is the models' own NumPy work
  between the ops (concatenations, slices, the Luong decoder's tanh);
- torch: `torch.profiler`'s self CPU time per aten op (its autograd backward ops included).

Steps are timed after warm-up calls (JIT compilation, allocator), the median of ``--steps``.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import types
from collections.abc import Callable

import numpy as np
import torch

from benchmarks import cases, training
from benchmarks.core import TRAINING_STEP
from benchmarks.runner import SEED


class _Timed(types.SimpleNamespace):
    """A backend module whose op pairs accumulate their wall time in `seconds`."""

    def __init__(self, module: types.ModuleType, seconds: collections.Counter) -> None:
        super().__init__()
        for name in dir(module):
            fn = getattr(module, name)
            if callable(fn) and name.endswith(("_forward", "_backward")):
                setattr(self, name, self._wrap(name, fn, seconds))
            elif not name.startswith("__"):
                setattr(self, name, fn)

    @staticmethod
    def _wrap(name: str, fn: Callable, seconds: collections.Counter) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start

        return timed


def profile_module(inputs: training.TrainingInputs, module: types.ModuleType, steps: int
                   ) -> tuple[float, list[tuple[str, float]]]:
    """(median step seconds, [(op, seconds per step)] largest first) on ``backend=module``."""
    own = training.replace(inputs, params={k: v.copy() for k, v in inputs.params.items()})
    seconds: collections.Counter = collections.Counter()
    timed = _Timed(module, seconds)
    optimizer = module.Adam(own.params, lr=training.LR)
    adam_step = optimizer.step

    def step_timed(grads) -> None:
        start = time.perf_counter()
        adam_step(grads)
        seconds["Adam step"] += time.perf_counter() - start

    optimizer.step = step_timed
    for _ in range(2):
        training._numpy_step(own, timed, optimizer)
    seconds.clear()
    totals = []
    for _ in range(steps):
        start = time.perf_counter()
        training._numpy_step(own, timed, optimizer)
        totals.append(time.perf_counter() - start)
    per_step = {k: v / steps for k, v in seconds.items()}
    per_step["(the models' own NumPy between ops)"] = max(
        0.0, float(np.mean(totals)) - sum(per_step.values()))
    return float(np.median(totals)), sorted(per_step.items(), key=lambda kv: -kv[1])


def profile_torch(inputs: training.TrainingInputs, steps: int
                  ) -> tuple[float, list[tuple[str, float]]]:
    """(median step seconds, [(aten op, self CPU seconds per step)] largest first)."""
    run = training._prepare_torch(inputs, TRAINING_STEP, device="cpu").run
    for _ in range(2):
        run()
    totals = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            run()
            totals.append(time.perf_counter() - start)
    ops = [(e.key, e.self_cpu_time_total / 1e6 / steps) for e in prof.key_averages()]
    return float(np.median(totals)), sorted(ops, key=lambda kv: -kv[1])


def main(argv: list[str] | None = None) -> int:
    """Print the profile of every default-size training problem (or those --filter keeps)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per backend")
    parser.add_argument("--top", type=int, default=10, help="ops listed per backend")
    parser.add_argument("--sizes", choices=("default", "quick"), default="default",
                        help="the benchmark's default sizes, or its tiny ones")
    parser.add_argument("--filter", default="", help="only problems whose size contains this")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = [p for p in cases.PROBLEMS
                if p.op == "train" and args.sizes in p.suites and args.filter in p.size]
    for problem in problems:
        inputs = problem.make(np.dtype(np.float32), np.random.default_rng(SEED))
        results = {"torch": profile_torch(inputs, args.steps)}
        for name, module in (("numpy_ref", training.numpy_ref), ("kernels", training.kernels)):
            results[name] = profile_module(inputs, module, args.steps)
        base = results["torch"][0]
        print(f"\n{problem.size} float32, one training step (median of {args.steps}):")
        for name, (total, ops) in results.items():
            print(f"  {name}: {1e3 * total:.1f} ms ({base / total:.2f}x torch)")
            for op, s in ops[:args.top]:
                print(f"    {op:44s} {1e3 * s:8.2f} ms  {100 * s / total:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
