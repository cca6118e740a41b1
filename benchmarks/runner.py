"""Validate, then time, every case; render the rows as a table and as JSON.

For each case, in order:

1. The problem's inputs are built once (fixed seed) in the requested dtype, and its float64
   reference once per pass, from those same inputs upcast; both are dropped when the next
   problem starts (cases come grouped by problem).
2. The backend is prepared (module built, arrays copied to the device: outside any clock).
3. One untimed call is validated: every array it returns is compared with the reference, and
   the row's error is the largest ``max|got - ref| / max|ref|`` over those arrays. A row above
   ``sqrt(eps)`` of its dtype is flagged FAIL: a correct float32 LSTM lands near 1e-6 here, so
   3.5e-4 means the backend computes something else, not that it rounds differently.
4. `warmup` more untimed calls (JIT compilation, allocator and cache warm-up), then timed calls
   until there are `repeat` of them and `min_time` seconds; the row reports median and min.
5. The floor of the problem's pass (a GEMM rate for the LSTM and the multi-query attention, a
   memory rate for the single-query attention) is measured once per device, and the row's rate
   (the problem's work / median time) is reported as a percentage of it: the floor's time for
   the same work over the row's time.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import numpy as np
import torch

from benchmarks.cases import BASELINES
from benchmarks.core import Case, time_calls

SEED = 0  # every backend of a problem sees the same inputs, run after run


@dataclass(frozen=True)
class Row:
    """One validated and timed case."""

    op: str
    size: str
    backend: str
    device: str
    pass_: str
    dtype: str
    median_ms: float
    min_ms: float
    calls: int  # timed calls
    work: float  # the problem's work of one call: GFLOP or GB (floor_unit times seconds)
    rate: float  # work / median time, in floor_unit
    floor: str  # what the floor measures, e.g. "GEMM [8192, 512] @ [512, 1024]"
    floor_unit: str  # "GFLOP/s" or "GB/s"
    floor_rate: float  # the floor measured in this run on this device, in floor_unit
    floor_ms: float  # work / floor_rate: the floor's time for this row's work
    error: float  # max over the compared arrays of max|got - ref| / max|ref|
    worst: str  # the array with that error
    tolerance: float  # sqrt(eps) of dtype; above it the row is flagged

    @property
    def ok(self) -> bool:
        """Whether the error is within the tolerance (a NaN error is not)."""
        return bool(self.error <= self.tolerance)

    @property
    def pct_floor(self) -> float:
        """floor_ms / median_ms, in percent: 100 means the row runs at the floor."""
        return 100 * self.rate / self.floor_rate

    def to_dict(self) -> dict[str, object]:
        """The row as plain JSON-ready values, with ``pass`` for ``pass_``, and ``ok`` and
        ``pct_floor`` added."""
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        d["ok"] = self.ok
        d["pct_floor"] = self.pct_floor
        return d


def tolerance(dtype: np.dtype) -> float:
    """The largest relative error a row may have before it is flagged: sqrt(eps) of `dtype`."""
    return float(np.sqrt(np.finfo(dtype).eps))


def relative_errors(
    got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """``max|got - ref| / max|ref|`` for each name (``max|got - ref|`` where ref is all zero).

    Raises ValueError when the names or the shapes differ: that is a bug in a backend's
    `collect`, not a numerical error.
    """
    if set(got) != set(ref):
        raise ValueError(f"got arrays {sorted(got)}, expected {sorted(ref)}")
    errors = {}
    for name, r in ref.items():
        g = np.asarray(got[name])
        if g.shape != r.shape:
            raise ValueError(f"{name}: expected shape {r.shape}, got {g.shape}")
        scale = float(np.max(np.abs(r))) or 1.0
        errors[name] = float(np.max(np.abs(g.astype(np.float64) - r))) / scale
    return errors


def run_cases(
    cases: Sequence[Case],
    *,
    dtype: np.dtype,
    repeat: int,
    min_time: float,
    warmup: int = 1,
) -> list[Row]:
    """Validate and time `cases` in order (see the module docstring); one row per case."""
    dtype = np.dtype(dtype)
    inputs, references, floors = {}, {}, {}
    rows = []
    for case in cases:
        problem, backend = case.problem, case.backend
        if problem.id not in inputs:
            inputs.clear()  # the single-query attention's float64 arrays are 256 MiB each
            references.clear()
            inputs[problem.id] = problem.make(dtype, np.random.default_rng(SEED))
        if (problem.id, case.pass_) not in references:
            references[problem.id, case.pass_] = problem.reference(inputs[problem.id], case.pass_)
        floor = problem.floors[case.pass_]
        if (floor, backend.device) not in floors:
            floors[floor, backend.device] = floor.measure(backend.device, dtype)
        floor_rate = floors[floor, backend.device]

        prepared = backend.prepare(inputs[problem.id], case.pass_)
        got = prepared.collect(prepared.run())
        errors = relative_errors(got, references[problem.id, case.pass_])
        worst = max(errors, key=lambda name: errors[name])
        times = time_calls(prepared.run, repeat=repeat, min_time=min_time, warmup=warmup)
        median = float(np.median(times))
        work = problem.work(case.pass_, dtype)
        rows.append(Row(
            op=problem.op, size=problem.size, backend=backend.name, device=backend.device,
            pass_=case.pass_, dtype=dtype.name, median_ms=1e3 * median, min_ms=1e3 * min(times),
            calls=len(times), work=work, rate=work / median, floor=floor.describe(dtype),
            floor_unit=floor.unit, floor_rate=floor_rate, floor_ms=1e3 * work / floor_rate,
            error=errors[worst], worst=worst, tolerance=tolerance(dtype),
        ))
    return rows


class OtherProcesses:
    """The CPU time other processes take from the moment this is created.

    Every backend runs on all cores, so a test suite or a compiler running beside the benchmark
    does not just take its share: parallel regions whose threads spin at their barriers wait
    for a whole scheduler time slice (several ms), and figures can be off tenfold or more. The
    header says how much CPU was taken, so that such a run is recognized as one.
    """

    def __init__(self) -> None:
        self._start = (self._busy_seconds(), time.process_time(), time.perf_counter())

    @staticmethod
    def _busy_seconds() -> float | None:
        """CPU seconds all processes have used since boot, from /proc/stat (None without)."""
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def report(self) -> str:
        """E.g. "0.4 CPU-s during this 58 s run on 2 cores"; "unknown" without /proc/stat."""
        busy, own, wall = self._busy_seconds(), time.process_time(), time.perf_counter()
        busy0, own0, wall0 = self._start
        if busy is None or busy0 is None:
            return "unknown"
        others = max(0.0, (busy - busy0) - (own - own0))
        return f"{others:.1f} CPU-s during this {wall - wall0:.0f} s run on {os.cpu_count()} cores"


def machine_info() -> dict[str, str]:
    """What the figures depend on: CPU, core count, library versions and thread counts."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")]
        cpu = models[0] if models else cpu
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    blas_env = [f"{k}={os.environ[k]}" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                  "MKL_NUM_THREADS") if k in os.environ]
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": f"{blas.get('name')} {blas.get('version')}",
        # numpy's BLAS reads its thread count from the environment when it loads.
        "blas_threads": ", ".join(blas_env) or "from BLAS default (no *_NUM_THREADS set)",
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "numba": numba.__version__,
        "numba_threads": str(numba.get_num_threads()),  # kernels and the memory floors
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }


def header_lines(
    info: Mapping[str, str], rows: Sequence[Row], *, repeat: int, min_time: float, warmup: int
) -> list[str]:
    """The lines above the table: machine, timing and error rules, and the measured floors."""
    lines = [
        f"machine: {info['cpu']}, {info['cores']} cores, {info['platform']}, "
        f"python {info['python']}, CUDA device: {info['cuda']}",
        f"numpy {info['numpy']} (BLAS {info['blas']}, threads {info['blas_threads']}); "
        f"torch {info['torch']} (threads {info['torch_threads']}); "
        f"numba {info['numba']} (threads {info['numba_threads']})",
        *([f"other processes took {info['other_processes']}: near 0 when figures can be trusted"]
          if "other_processes" in info else []),
        f"timing: {warmup + 1} untimed calls (the first one validated), then the median and min "
        f"of >= {repeat} calls and >= {min_time:g} s per row",
        "max err: max over every array a row returns (the outputs; for forward+backward also "
        "the gradient of every input and parameter) of max|got - ref| / max|ref|,",
        "  ref = numpy_ref in float64 on the same inputs; FAIL above sqrt(eps) of the dtype",
        "vs base: the median of the op's baseline row (same size and pass) / this row's; "
        + ", ".join(f"{op}: {' '.join(base)}" for op, base in BASELINES.items()),
        "rate: work / median; GFLOP/s counts matrix-product flops, GB/s the bytes of V the op "
        "must move (benchmarks/attention.py); % floor: the floor's time for that work / median",
    ]
    groups: dict[tuple[str, ...], dict[str, Row]] = {}  # (op, size, device, dtype) -> floors
    for r in rows:
        floors = groups.setdefault((r.op, r.size, r.device, r.dtype), {})
        floors.setdefault(r.floor, r)
    for (op, size, device, dtype), floors in groups.items():
        for floor, r in floors.items():
            # A floor particular to one pass (the memory floors) is also given as a time.
            detail = "" if len(floors) == 1 else f", {r.pass_}"
            ms = "" if len(floors) == 1 else f" ({r.floor_ms:.3g} ms per call)"
            lines.append(f"floor of {op} {size} {dtype} on {device}{detail}: {floor} = "
                         f"{_figure(r.floor_rate)} {r.floor_unit}{ms}")
    return lines


def _speedup(row: Row, rows: Sequence[Row]) -> str:
    """The baseline row's median / this row's median, or '-' without a baseline row."""
    for b in rows:
        if ((b.backend, b.device) == BASELINES.get(row.op) and (b.op, b.size, b.pass_, b.dtype)
                == (row.op, row.size, row.pass_, row.dtype)):
            return f"{b.median_ms / row.median_ms:.2f}x"
    return "-"


def _figure(x: float) -> str:
    """A rate with at least three significant digits and at most two decimals above 1."""
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table, one line per row, failures flagged in the last column."""
    head = ("op", "size", "backend", "device", "pass", "dtype", "median ms", "min ms",
            "vs base", "rate", "% floor", "max err", "check")
    body = [
        (r.op, r.size, r.backend, r.device, r.pass_, r.dtype, f"{r.median_ms:.3f}",
         f"{r.min_ms:.3f}", _speedup(r, rows), f"{_figure(r.rate)} {r.floor_unit}",
         f"{r.pct_floor:.1f}", f"{r.error:.1e}",
         "ok" if r.ok else f"FAIL ({r.worst})")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    numeric = set(range(6, 12))  # right-align the figures so their digits line up

    def fmt(line: Sequence[str]) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *(fmt(line) for line in body)])


def write_json(path: str | Path, info: Mapping[str, str], rows: Sequence[Row]) -> None:
    """Write ``{"machine": info, "rows": [...]}`` to `path`."""
    data = {"machine": dict(info), "argv": sys.argv, "rows": [r.to_dict() for r in rows]}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
