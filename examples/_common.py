"""What the two demos share: their command-line options, the backend switch, the thread
limit, how busy the machine was while they ran, and the JSON they write.

The demos themselves (``seed_classifier.py``, ``alignment.py``) hold the models, the training
loops and the figures; nothing here is needed to follow the math.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import numpy_ref

BACKENDS = ("numpy_ref", "kernels")


def int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (``--epochs 0`` is an error, not an empty run)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)  # epochs, sizes
non_negative_int = int_at_least(0)  # a random seed, a thread count


def add_common_options(parser: argparse.ArgumentParser, *, demo: str, epochs: int,
                       seed: int = 0) -> None:
    """--backend, --out, --epochs, --seed: the options every demo has."""
    parser.add_argument("--backend", choices=BACKENDS, default="numpy_ref",
                        help="the op module the models run on: numpy_ref (pure NumPy, the "
                             "default) or kernels (Numba, faster on large sizes)")
    parser.add_argument("--out", type=Path, default=Path("examples-out") / demo,
                        help=f"folder for the figures and results.json (default: "
                             f"examples-out/{demo})")
    parser.add_argument("--epochs", type=positive_int, default=epochs,
                        help=f"training epochs, >= 1 (default {epochs})")
    parser.add_argument("--seed", type=non_negative_int, default=seed,
                        help=f"random seed of the initial weights (and data) (default {seed})")
    parser.add_argument("--threads", type=non_negative_int, default=1,
                        help="threads of NumPy's BLAS and of the kernels' parallel loops; 0 "
                             "leaves the libraries' defaults (default 1: robust on a shared "
                             "machine)")


def limit_threads(n: int, backend: str) -> None:
    """Limit NumPy's BLAS (and Numba, for the kernels backend) to n threads for the rest of
    the process; n = 0 leaves them alone.

    The demos' matrices have tens of rows. On this 2-core machine, idle, two threads were
    only 8-20% faster than one (the alignment demo 34 s instead of 37 s); with another
    process busy they were 2-12x slower (a seq2seq training step: 25 ms on one BLAS thread,
    55-300 ms on two; the classifier's epoch on the kernels: 1.5 ms on one Numba thread,
    10 ms on two), the threads waiting on each other for the cores. So the default is one.
    Results are repeatable for a given thread count; another count may change the last bits
    of the sums, and after thousands of steps the printed figures a little.
    """
    if n == 0:
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")  # not undone: no `with`
    if backend == "kernels":
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def backend_module(name: str) -> ModuleType:
    """The op module called `name`: numpy_ref, or kernels (imported only when asked for)."""
    if name == "kernels":
        import kernels

        return kernels
    return numpy_ref


def _busy_cpu_seconds() -> float | None:
    """CPU-seconds every process on the machine has spent since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class MachineLoad:
    """How busy the machine was over a stretch of time, this process apart.

    ``start()`` then ``stop()`` -> a dict: wall seconds, this process's CPU-seconds, the
    CPU-seconds every other process took meanwhile (from /proc/stat, Linux only), the number
    of CPUs and the load averages at the end. On a shared machine the other processes' share
    says how far the wall time is to be trusted.
    """

    def start(self) -> MachineLoad:
        """Record the starting clocks."""
        self.wall0 = time.perf_counter()
        self.own0 = time.process_time()
        self.busy0 = _busy_cpu_seconds()
        self.load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
        return self

    def stop(self) -> dict[str, Any]:
        """The figures since ``start()``."""
        wall = time.perf_counter() - self.wall0
        own = time.process_time() - self.own0
        busy1 = _busy_cpu_seconds()
        others = None
        if busy1 is not None and self.busy0 is not None:
            others = max(0.0, busy1 - self.busy0 - own)
        cpus = os.cpu_count() or 1
        return {
            "wall_s": round(wall, 3),
            "own_cpu_s": round(own, 3),
            "other_processes_cpu_s": None if others is None else round(others, 2),
            "other_processes_cpus_busy": None if others is None else round(others / wall, 2),
            "cpus": cpus,
            "loadavg_start": None if self.load0 is None else [round(x, 2) for x in self.load0],
            "loadavg_end": ([round(x, 2) for x in os.getloadavg()]
                            if hasattr(os, "getloadavg") else None),
            "python": platform.python_version(),
            "numpy": np.__version__,
        }


def describe_load(load: dict[str, Any]) -> str:
    """One line for the terminal: wall time, and how much CPU other processes took."""
    line = f"wall time {load['wall_s']:.1f} s on {load['cpus']} CPUs"
    if load["other_processes_cpu_s"] is not None:
        line += (f"; other processes took {load['other_processes_cpu_s']:.1f} CPU-s "
                 f"({load['other_processes_cpus_busy']:.2f} CPUs busy on average)")
    if load["loadavg_end"] is not None:
        line += f"; load average {load['loadavg_end'][0]:.2f} at the end"
    return line


def _plain(x: Any) -> Any:
    """NumPy scalars and arrays as Python numbers and lists, for json."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else str(x)
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write `results` as indented JSON (non-finite floats as strings: JSON has none)."""
    path.write_text(json.dumps(_plain(results), indent=2) + "\n")
