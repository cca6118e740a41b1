"""Validate, then time, every case; measure its memory and its ceiling; render table and JSON.

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
5. One more call measures the peak memory the call allocates beyond what existed before it:
   `tracemalloc` for the NumPy backends (every NumPy array is traced; the few scratch arrays a
   compiled Numba kernel allocates inside itself are not), torch's profiler with
   ``profile_memory`` for torch on the CPU (the running sum of its allocation and free
   events), ``torch.cuda.max_memory_allocated`` for torch on CUDA, and for numba's CUDA
   kernels the bytes numba allocates on the device during the call.
6. The ceiling of the problem's pass (`benchmarks.ceilings`) is measured once per device and
   dtype; the row's "% of ceiling" is the ceiling's time over the row's median. A CUDA
   single-query row also keeps the device-to-device copy bandwidth measured in the run
   (`Row.copy_gbps`); the goals in `benchmarks.cases.TARGETS` (a percentage of that bandwidth,
   a speedup over another backend on the same device) are checked under the table
   (`target_lines`) and in the JSON header's ``targets`` (`target_results`).

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numba
import numpy as np
import scipy
import threadpoolctl
import torch

from benchmarks.cases import BASELINES, TARGETS, Target
from benchmarks.ceilings import nominal_peak
from benchmarks.core import Case, clock_for, time_calls

SEED = 0  # every backend of a problem sees the same inputs, run after run
SCHEMA = "lstm-attention-reference/benchmarks/1"
MIN_CEILING_S = 20e-6  # below this, the ceiling is one library call's overhead
MAX_REL_IQR = 0.5  # samples spread wider than this (IQR / median) were not timed reliably
MAX_OVER_MIN = 2.0  # a median more than this times the fastest sample: most were slowed
REPO = Path(__file__).resolve().parents[1]


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


def peak_memory(run: Callable[[], Any], device: str, *, counter: str) -> tuple[int | None, str]:
    """The bytes one call of `run` allocates at its peak beyond what was allocated before it,
    and the counter that measured them (see the module docstring, step 5). `counter` is the
    backend's `benchmarks.core.Backend.memory`: "tracemalloc" or "torch"."""
    gc.collect()  # garbage freed during the call would count against it
    if device == "cuda":
        torch.cuda.synchronize()
        if counter == "numba":
            with numba_cuda_allocations() as allocated:
                run()
            torch.cuda.synchronize()
            return allocated[0], "numba's device allocations during the call"
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "torch.cuda.max_memory_allocated"
    if counter == "torch":
        from torch.profiler import ProfilerActivity, profile

        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                         profile_memory=True) as prof:
            run()
        # every allocation (+bytes) and free (-bytes) of torch's CPU allocator, in time order
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        current = peak = 0
        for _, nbytes in events:
            current += nbytes
            peak = max(peak, current)
        return peak, "torch.profiler(profile_memory=True)"
    tracemalloc.start()
    try:
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, "tracemalloc"


@contextlib.contextmanager
def numba_cuda_allocations(context_class: type | None = None) -> Iterator[list[int]]:
    """Count the bytes numba allocates on the device inside the block: yields a one-element
    list whose entry grows by each ``memalloc`` of numba's CUDA context (`context_class`,
    default ``numba.cuda.cudadrv.driver.Context``: every device array numba makes goes through
    it). numba defers its frees, so the count is what the block had live at its peak, or more
    where numba flushed its pending frees inside it."""
    if context_class is None:
        from numba.cuda.cudadrv.driver import Context as context_class
    allocated = [0]
    original = context_class.memalloc

    def memalloc(self: Any, bytesize: int) -> Any:
        allocated[0] += int(bytesize)
        return original(self, bytesize)

    context_class.memalloc = memalloc
    try:
        yield allocated
    finally:
        context_class.memalloc = original


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null: torch's profiler (kineto) prints a line to it from C++ at
    every start and stop, which would scroll the progress bar away."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
    return _find(rows, row, *BASELINES[row.op]) if row.op in BASELINES else None


def _find(rows: Sequence[Row], like: Row, backend: str, device: str) -> Row | None:
    """The row of `backend` on `device` with `like`'s op, size, pass and dtype, or None."""
    for b in rows:
        if ((b.backend, b.device, b.op, b.size, b.pass_, b.dtype)
                == (backend, device, like.op, like.size, like.pass_, like.dtype)):
            return b
    return None


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
            other = None if row is None else _find(rows, row, t.versus, t.device)
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
# the run's own noise


class Probe:
    """A fixed workload timed at the start and at the end of a run: a 384^3 float32 GEMM and a
    32 MiB copy. Their relative change (`drift`) is the run's own noise: how much the machine's
    speed moved while the rows were timed (another process, a frequency change).

    The copy goes into the same preallocated array every time: a fresh 32 MiB array is a
    fresh mmap with its page faults early in a process and recycled heap memory later (glibc
    raises its mmap threshold as large blocks are freed), which alone moved the probe by half.
    """

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self._a = rng.standard_normal((384, 384)).astype(np.float32)
        self._big = rng.standard_normal(8 * 2**20).astype(np.float32)  # 32 MiB
        self._out, self._big_out = np.empty_like(self._a), np.empty_like(self._big)
        self._start = self._measure()

    def _measure(self) -> tuple[float, float]:
        a, big, out, big_out = self._a, self._big, self._out, self._big_out
        gemm = time_calls(lambda: np.matmul(a, a, out=out), repeat=5, min_time=0.1, warmup=2)
        copy = time_calls(lambda: np.copyto(big_out, big), repeat=5, min_time=0.1, warmup=2)
        return float(np.median(gemm.times)), float(np.median(copy.times))

    def drift(self) -> float:
        """The largest relative change of the two probes between now and the start."""
        end = self._measure()
        return max(abs(e / s - 1) for s, e in zip(self._start, end, strict=True))


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

    def seconds(self) -> tuple[float | None, float]:
        """(CPU seconds other processes took, wall seconds) since creation."""
        busy, own, wall = self._busy_seconds(), time.process_time(), time.perf_counter()
        busy0, own0, wall0 = self._start
        if busy is None or busy0 is None:
            return None, wall - wall0
        return max(0.0, (busy - busy0) - (own - own0)), wall - wall0


# --------------------------------------------------------------------------------------------
# the header


def _git() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    return model.group(1).strip() if model else platform.processor() or platform.machine()


def _torch_blas() -> str:
    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    info = re.search(r"BLAS_INFO=(\w+)", config)
    if mkl:
        return f"MKL {mkl.group(1)}"
    return info.group(1) if info else "unknown"


def _numpy_blas_threads() -> int | None:
    """The thread count of the BLAS NumPy links, as threadpoolctl reads it."""
    for pool in threadpoolctl.threadpool_info():
        if pool.get("user_api") == "blas" and "numpy" in pool.get("filepath", "").lower():
            return int(pool["num_threads"])
    blas = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    return int(blas[0]["num_threads"]) if blas else None


def _threading_layer() -> str | None:
    try:
        return numba.threading_layer()  # known once a parallel kernel has run
    except ValueError:
        return None


def header(*, argv: Sequence[str], options: Mapping[str, Any], started: datetime,
           rows: Sequence[Row], other_cpu_s: float | None, drift: float | None,
           wall_s: float) -> dict[str, Any]:
    """The JSON header (`benchmarks/schema.json`): what the figures depend on."""
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    peak, how = nominal_peak()
    rel_iqrs = [r.rel_iqr for r in rows]
    return {
        "date": started.isoformat(timespec="seconds"),
        "git": _git(),
        "argv": list(argv),
        "options": dict(options),
        "machine": {"cpu": _cpu_model(), "logical_cpus": os.cpu_count() or 1,
                    "platform": platform.platform(),
                    "cuda_device": torch.cuda.get_device_name()
                    if torch.cuda.is_available() else None},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "scipy": scipy.__version__, "torch": torch.__version__,
                     "numba": numba.__version__},
        "threads": {"torch": torch.get_num_threads(), "numba": numba.get_num_threads(),
                    "numpy_blas": _numpy_blas_threads(),
                    "numba_threading_layer": _threading_layer(),
                    # numpy's BLAS reads its thread count from the environment when it loads
                    "blas_env": {k: os.environ[k] for k in (
                        "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                        "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER") if k in os.environ}},
        "blas": {"numpy": f"{blas.get('name')} {blas.get('version')}", "torch": _torch_blas()},
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
    commit = _git()["commit"]
    return started.strftime("%Y%m%d-%H%M%S") + ("" if commit is None else f"-{commit[:7]}")

