"""What a run measures besides the rows' times: one call's peak memory, the run's own noise, and
the machine it ran on.

Peak memory (`peak_memory`, step 5 of `benchmarks.runner`): the bytes one call allocates at
its peak beyond what existed before it. `tracemalloc` for the NumPy backends (every NumPy array
is traced; the few scratch arrays a compiled Numba kernel allocates inside itself are not),
torch's profiler with ``profile_memory`` for torch on the CPU (the running sum of its
allocation and free events), ``torch.cuda.max_memory_allocated`` for torch on CUDA, and for
numba's CUDA kernels the bytes numba allocates on the device during the call
(`numba_cuda_allocations`).

The run's noise: `Probe`, a fixed workload timed at the start and at the end of the run (how
far the machine's speed moved while the rows were timed), and `OtherProcesses`, the CPU time
other processes took meanwhile.

The machine: the git commit (`git_state`), the CPU and platform (`machine`), the libraries'
versions (`versions`), their thread counts (`threads`) and BLAS builds (`blas`), the facts
that `benchmarks.report.header` puts in the JSON header.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numba
import numpy as np
import scipy
import threadpoolctl
import torch

from benchmarks.core import time_calls

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# peak memory


def peak_memory(run: Callable[[], Any], device: str, *, counter: str) -> tuple[int | None, str]:
    """The bytes one call of `run` allocates at its peak beyond what was allocated before it,
    and the counter that measured them (see the module docstring). `counter` is the
    backend's `benchmarks.core.Backend.memory`: "tracemalloc", "torch" or "numba"."""
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
# the machine


def git_state() -> dict[str, Any]:
    """The repository's commit and whether tracked files differ from it (None where git
    cannot say)."""

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


def machine() -> dict[str, Any]:
    """The CPU's model, its logical CPUs, the platform, and the CUDA device (None without)."""
    return {"cpu": _cpu_model(), "logical_cpus": os.cpu_count() or 1,
            "platform": platform.platform(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def versions() -> dict[str, str]:
    """The versions of Python and of the libraries timed."""
    return {"python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "torch": torch.__version__, "numba": numba.__version__}


def threads() -> dict[str, Any]:
    """The thread counts of torch, numba and NumPy's BLAS, numba's threading layer (known once
    a parallel kernel has run, else None), and the environment variables that set them."""
    return {"torch": torch.get_num_threads(), "numba": numba.get_num_threads(),
            "numpy_blas": _numpy_blas_threads(),
            "numba_threading_layer": _threading_layer(),
            # numpy's BLAS reads its thread count from the environment when it loads
            "blas_env": {k: os.environ[k] for k in (
                "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER") if k in os.environ}}


def blas() -> dict[str, str]:
    """The BLAS NumPy was built with and the one torch links, each as name and version."""
    numpy_blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return {"numpy": f"{numpy_blas.get('name')} {numpy_blas.get('version')}",
            "torch": _torch_blas()}
