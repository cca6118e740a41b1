"""Validate, then time, every case: the loop that turns cases into rows (`Row`), and what makes
a row's status.

For each case, in order:

1. The problem's inputs are built once (fixed seed) in the requested dtype, and its float64
   reference once per pass, from those same inputs upcast; both are dropped when the next
   problem starts (cases come grouped by problem).
2. The backend is prepared (module built, arrays copied to the device: outside any clock).
3. The first call is validated: every array it returns is compared with the reference, and the
   row's error is the largest ``max|got - ref| / max|ref|`` over those arrays. A row above
   ``sqrt(eps)`` of its dtype is FAIL: a correct float32 LSTM lands near 1e-6 here, so 3.5e-4
   means the backend computes something else, not that it rounds differently. The first call
   also gives ``compile_s``: its time minus the median (JIT compilation or loading from the
   cache, first touches of fresh memory).
4. More untimed calls, then timed samples (`benchmarks.core.time_calls`: a call faster than
   2 ms is looped) until there are `repeat` of them and `min_time` seconds; the row reports
   their median, min and interquartile range. A CPU row is timed with ``perf_counter``; a
   "cuda" row with CUDA events after synchronizing (`benchmarks.core.EventClock`), its first
   call too, so that its calls run asynchronously as they would in a program.
5. One more call measures the peak memory the call allocates beyond what existed before it
   (`benchmarks.measure.peak_memory`, which says which counter measures which backend).
6. The ceiling of the problem's pass (`benchmarks.ceilings`) is measured once per device and
   dtype; the row's "% of ceiling" is the ceiling's time over the row's median. A CUDA
   single-query row also keeps the device-to-device copy bandwidth measured in the run
   (`Row.copy_gbps`); the goals in `benchmarks.cases.TARGETS` (a percentage of that bandwidth,
   a speedup over another backend on the same device) are checked under the table
   (`benchmarks.report.target_lines`) and in the JSON header's ``targets``
   (`benchmarks.report.target_results`).

A row's status: ``FAIL`` (validation); ``too small`` when its ceiling is under `MIN_CEILING_S`
(the work is less than one library call's overhead, so a percentage of it measures overheads);
``noisy`` when its interquartile range is more than `MAX_REL_IQR` (half) of its median, or its
median more than `MAX_OVER_MIN` (twice) its fastest sample (the machine was too busy to time
it); ``above ceiling`` when it beat its ceiling even after the ceiling was timed a second time
(a measurement problem: the ceiling is not one); else ``ok``. Neither a too small nor a noisy
row prints a percentage of its ceiling.

Why those two tests of the spread: the IQR alone misses a few samples that disagree wildly, as
(768, 742, 866, 1173, 190) ms under load (IQR 16% of the median, yet a median 4x the fastest
sample: most samples were slowed, or the fast one is wrong; either way the median does not
stand for the row). Identical calls on identical inputs do not vary 2x by themselves, so a
median above twice the minimum is the machine. The slowest sample is not used: among hundreds
of samples one preemption makes a slow outlier, which moves neither the median nor the IQR
(max / min > 2 would have called 18 of the 79 rows of docs/benchmarks' default run noisy, with
IQRs of 6-32%; median / min > 2 calls none of them noisy).

Every timing (rows, ceilings, the probe) starts after `benchmarks.core.QUIET_S` of idle time,
so that the thread pool of the library timed before has gone to sleep.

The rows' table, header and JSON file are `benchmarks.report`'s; the peak memory, the run's
noise and the machine's facts are `benchmarks.measure`'s.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.cases import BASELINES
from benchmarks.ceilings import nominal_peak
from benchmarks.core import Case, clock_for, time_calls
from benchmarks.measure import peak_memory

SEED = 0  # every backend of a problem sees the same inputs, run after run
MIN_CEILING_S = 20e-6  # below this, the ceiling is one library call's overhead
MAX_REL_IQR = 0.5  # samples spread wider than this (IQR / median) were not timed reliably
MAX_OVER_MIN = 2.0  # a median more than this times the fastest sample: most were slowed


@dataclass(frozen=True)
class Row:
    """One validated and timed case: the fields of a JSON record (`benchmarks/schema.json`)."""

    op: str
    size: str
    shape: Mapping[str, Any]
    backend: str
    device: str
    pass_: str
    dtype: str
    median_s: float
    min_s: float
    iqr_s: float
    times_s: list[float]
    loops: int
    max_err: float  # max over the compared arrays of max|got - ref| / max|ref| (NaN possible)
    worst: str  # the array with that error
    tolerance: float  # sqrt(eps) of dtype; above it the row FAILs
    work: float
    work_unit: str  # "GFLOP" or "GB"
    ceiling_s: float
    ceiling_name: str
    ceiling_detail: str  # e.g. every product's shape
    ceiling_by: str
    peak_gflops: float | None  # the CPU's nominal peak for GEMM-bound CPU rows
    peak_bytes: int | None
    peak_bytes_by: str
    compile_s: float
    sweep: tuple[str, str, float] | None  # (family, swept size's name, its value)
    copy_gbps: float | None = None  # the device-to-device copy bandwidth its ceiling measured
    #                                 (CUDA memory-bound rows), GB/s of bytes read + written

    @property
    def pct_of_copy_bandwidth(self) -> float | None:
        """rate / the copy bandwidth, in percent (CUDA memory-bound rows; else None)."""
        if self.copy_gbps is None or self.work_unit != "GB":
            return None
        return 100 * self.rate / self.copy_gbps

    @property
    def id(self) -> str:
        """``op/size/backend/device/pass``, as `benchmarks.core.Case.id`."""
        return f"{self.op}/{self.size}/{self.backend}/{self.device}/{self.pass_}"

    @property
    def rate(self) -> float:
        """work / median, in `rate_unit`."""
        return self.work / self.median_s

    @property
    def rate_unit(self) -> str:
        """"GFLOP/s" or "GB/s"."""
        return f"{self.work_unit}/s"

    @property
    def ceiling(self) -> float:
        """The ceiling as a rate: work / ceiling_s."""
        return self.work / self.ceiling_s

    @property
    def pct_of_ceiling(self) -> float:
        """ceiling_s / median_s, in percent: 100 means the row runs at the ceiling."""
        return 100 * self.ceiling_s / self.median_s

    @property
    def pct_of_peak(self) -> float | None:
        """rate / the CPU's nominal peak, in percent, for GEMM-bound CPU rows (else None)."""
        return None if self.peak_gflops is None else 100 * self.rate / self.peak_gflops

    @property
    def rel_iqr(self) -> float:
        """iqr_s / median_s: the spread of the samples."""
        return self.iqr_s / self.median_s

    @property
    def noisy(self) -> bool:
        """Whether the samples spread too wide for the median to stand for the row: an IQR above
        `MAX_REL_IQR` of the median, or a median above `MAX_OVER_MIN` times the fastest
        sample (the module docstring says why)."""
        return self.rel_iqr > MAX_REL_IQR or self.median_s > MAX_OVER_MIN * self.min_s

    @property
    def ok(self) -> bool:
        """Whether the result validated (a NaN error does not)."""
        return bool(self.max_err <= self.tolerance)

    @property
    def status(self) -> str:
        """"FAIL", "too small", "noisy", "above ceiling" or "ok" (the module docstring)."""
        if not self.ok:
            return "FAIL"
        if self.ceiling_s < MIN_CEILING_S:
            return "too small"
        if self.noisy:
            return "noisy"
        if self.pct_of_ceiling > 100:
            return "above ceiling"
        return "ok"

    def record(self, rows: Sequence[Row]) -> dict[str, Any]:
        """The row as a JSON record of `benchmarks/schema.json`; `rows` gives the baseline."""
        base = baseline(self, rows)
        return {
            "id": self.id, "op": self.op, "size": self.size, "shape": dict(self.shape),
            "backend": self.backend, "device": self.device, "dtype": self.dtype,
            "pass": self.pass_, "median_s": self.median_s, "min_s": self.min_s,
            "iqr_s": self.iqr_s,
            # 4 significant digits: the machine's noise is far above that, the file 3x smaller
            "times_s": [float(f"{t:.4g}") for t in self.times_s], "loops": self.loops,
            "max_err": self.max_err if math.isfinite(self.max_err) else None,
            "worst": self.worst,
            "tolerance": self.tolerance, "work": self.work, "work_unit": self.work_unit,
            "rate": self.rate, "rate_unit": self.rate_unit, "ceiling": self.ceiling,
            "ceiling_s": self.ceiling_s, "ceiling_name": self.ceiling_name
            + (f": {self.ceiling_detail}" if self.ceiling_detail else ""),
            "ceiling_by": self.ceiling_by, "pct_of_ceiling": self.pct_of_ceiling,
            "pct_of_peak": self.pct_of_peak, "peak_bytes": self.peak_bytes,
            "peak_bytes_by": self.peak_bytes_by, "compile_s": self.compile_s,
            "vs_baseline": None if base is None else base.median_s / self.median_s,
            "status": self.status,
            "sweep": None if self.sweep is None else dict(zip(("family", "x", "value"),
                                                              self.sweep, strict=True)),
        }


def tolerance(dtype: np.dtype) -> float:
    """The largest relative error a row may have before it FAILs: sqrt(eps) of `dtype`."""
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
    memory: bool = True,
    progress: Callable[[Case], None] | None = None,
) -> list[Row]:
    """Validate and time `cases` in order (see the module docstring); one row per case.

    `progress` is called with each case as it starts; ``memory=False`` skips step 5. A backend
    that raises, or returns arrays of the wrong names or shapes, gives a FAIL row naming the
    error instead of ending the run. Every row's ceiling is read once more at the end, so
    that a ceiling a later row lowered (a second look) applies to every row that shares it.
    """
    dtype = np.dtype(dtype)
    peak, _ = nominal_peak()  # the machine's, read once
    inputs, references = {}, {}
    rows = []
    for case in cases:
        if progress is not None:
            progress(case)
        problem = case.problem
        if problem.id not in inputs:
            inputs.clear()  # the single-query attention's float64 arrays are 256 MiB each
            references.clear()
            inputs[problem.id] = problem.make(dtype, np.random.default_rng(SEED))
        if (problem.id, case.pass_) not in references:
            references[problem.id, case.pass_] = problem.reference(inputs[problem.id], case.pass_)
        rows.append(_run_case(case, inputs[problem.id], references[problem.id, case.pass_],
                              dtype=dtype, repeat=repeat, min_time=min_time, warmup=warmup,
                              memory=memory, peak=peak))
    final = []
    for case, row in zip(cases, rows, strict=True):
        ceiling = case.problem.ceilings[case.pass_]
        ceiling_s, ceiling_by = ceiling.seconds(row.device, dtype)
        final.append(dataclasses.replace(row, ceiling_s=ceiling_s, ceiling_by=ceiling_by,
                                         copy_gbps=ceiling.copy_bandwidth(row.device, dtype)))
    return final


def _run_case(case: Case, inputs: Any, reference: Mapping[str, np.ndarray], *, dtype: np.dtype,
              repeat: int, min_time: float, warmup: int, memory: bool,
              peak: Mapping[str, float | None]) -> Row:
    """Steps 2-6 of the module docstring for one case."""
    problem, backend = case.problem, case.backend
    clock = clock_for(backend.device)  # perf_counter, or CUDA events on "cuda"
    start = time.perf_counter()
    try:
        prepared = backend.prepare(inputs, case.pass_)
        start = time.perf_counter()
        started = clock.start()
        result = prepared.run()
        first_s = clock.stop(started)
        errors = relative_errors(prepared.collect(result), reference)
    except Exception as error:  # a broken backend is a FAIL row, not the end of the run
        first_s = time.perf_counter() - start
        errors = {f"error: {type(error).__name__}: {error}"[:300]: math.inf}
        prepared = None
    else:
        del result
    # the worst array: a NaN error is the worst of all (max() would never pick it)
    worst = max(errors, key=lambda name: math.inf if math.isnan(errors[name]) else errors[name])
    if prepared is not None:
        timing = time_calls(prepared.run, repeat=repeat, min_time=min_time, warmup=warmup,
                            clock=clock)
        times, loops = np.asarray(timing.times), timing.loops
        peak_bytes, peak_by = (peak_memory(prepared.run, backend.device, counter=backend.memory)
                               if memory else (None, "not measured"))
    else:  # nothing to time: the one sample is the time until the error
        times, loops, peak_bytes, peak_by = np.array([max(first_s, 1e-9)]), 1, None, "failed"
    median = float(np.median(times))
    q1, q3 = np.percentile(times, [25, 75])
    ceiling = problem.ceilings[case.pass_]
    ceiling_s, ceiling_by = ceiling.seconds(backend.device, dtype)
    if ceiling_s > median:  # faster than the machine's best: look at the ceiling again
        ceiling_s, ceiling_by = ceiling.seconds(backend.device, dtype, again=True)
    gemm = ceiling.unit == "GFLOP/s" and backend.device == "cpu"
    x = None
    if problem.sweep is not None:
        family, name = problem.sweep
        x = (family, name, float(problem.shape[name]))
    return Row(
        op=problem.op, size=problem.size, shape=problem.shape, backend=backend.name,
        device=backend.device, pass_=case.pass_, dtype=dtype.name, median_s=median,
        min_s=float(times.min()), iqr_s=float(q3 - q1), times_s=times.tolist(), loops=loops,
        max_err=errors[worst], worst=worst, tolerance=tolerance(dtype),
        work=problem.work(case.pass_, dtype), work_unit=ceiling.unit.split("/")[0],
        ceiling_s=ceiling_s, ceiling_name=ceiling.describe(dtype, backend.device),
        ceiling_detail=ceiling.detail, ceiling_by=ceiling_by,
        peak_gflops=peak[dtype.name] if gemm else None,
        peak_bytes=peak_bytes, peak_bytes_by=peak_by, compile_s=max(0.0, first_s - median),
        sweep=x, copy_gbps=ceiling.copy_bandwidth(backend.device, dtype),
    )


def baseline(row: Row, rows: Sequence[Row]) -> Row | None:
    """The op's baseline row (`benchmarks.cases.BASELINES`) at the same size, pass and dtype."""
    return find_row(rows, row, *BASELINES[row.op]) if row.op in BASELINES else None


def find_row(rows: Sequence[Row], like: Row, backend: str, device: str) -> Row | None:
    """The row of `backend` on `device` with `like`'s op, size, pass and dtype, or None."""
    for b in rows:
        if ((b.backend, b.device, b.op, b.size, b.pass_, b.dtype)
                == (backend, device, like.op, like.size, like.pass_, like.dtype)):
            return b
    return None

