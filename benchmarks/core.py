"""The benchmark's vocabulary: problems, backends, ceilings, the cases they form, and the timer.

A `Problem` is one op at one size: it builds the inputs and computes the float64 reference every
backend is validated against. A `Backend` is one implementation of one op on one device: given a
problem's inputs and a pass, it does everything that must stay out of the timed region (build a
module, copy to the device, compile) and returns the zero-argument call to time. A `Ceiling` is
the least time the machine's libraries take for a problem's work (the best BLAS on the op's
matrix products for GEMM-bound ops, a streaming read and copy for memory-bound ones), measured in
the same run (`benchmarks.ceilings`); a problem names one ceiling per pass. A `Case` is one
(problem, backend, pass) row of the table. The registry that lists problems and backends is
`benchmarks.cases`; the loop that validates and times the cases is `benchmarks.runner`.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OP_PASSES = ("forward", "forward+backward")  # what an op's rows time
TRAINING_STEP = "training step"  # a model's rows: forward, loss, backward and an Adam step
PASSES = (*OP_PASSES, TRAINING_STEP)


@dataclass(frozen=True)
class Prepared:
    """A backend made ready for one problem and pass."""

    run: Callable[[], Any]  # the timed call; on an asynchronous device it synchronizes
    collect: Callable[[Any], Mapping[str, np.ndarray]]  # run's result -> named host arrays


@dataclass(frozen=True)
class Backend:
    """One implementation of one op on one device."""

    name: str  # "numpy_ref", "torch", "torch_bmm", "kernels"...
    op: str  # the `Problem.op` it implements
    device: str  # "cpu" or "cuda"
    passes: tuple[str, ...]  # the subset of PASSES it supports
    prepare: Callable[[Any, str], Prepared]  # (problem inputs, pass) -> Prepared
    available: Callable[[], bool] = lambda: True  # False skips its cases (no GPU, no numba-cuda)
    memory: str = "tracemalloc"  # the counter of its allocations: "tracemalloc" (NumPy) or
    #                              "torch" (torch's profiler on the CPU; CUDA has its own)


@dataclass(frozen=True)
class Ceiling:
    """The least time this machine's libraries take for a row's work, measured in the run."""

    name: str  # what is timed, e.g. "BLAS on its 2 products" or "stream read of V [...]"
    unit: str  # the rate's unit: "GFLOP/s" or "GB/s"
    # (device, dtype, again) -> (seconds, the library that set them). ``again=True`` times it
    # once more and keeps the better of the two looks (a row above its ceiling asks for that).
    seconds: Callable[..., tuple[float, str]]
    size: Callable[[np.dtype], str] | None = None  # what it moves at a dtype, e.g. "128 MiB"
    detail: str = ""  # the whole list of what is timed, e.g. every product's shape

    def describe(self, dtype: np.dtype) -> str:
        """The name, with the size it moves at `dtype` when it has one."""
        return self.name if self.size is None else f"{self.name}, {self.size(np.dtype(dtype))}"


@dataclass(frozen=True)
class Problem:
    """One op at one size.

    The names of the arrays `reference` returns are the names every backend's `collect` must
    return, for the same pass.
    """

    op: str  # "lstm", "attention"
    size: str  # short label without spaces, e.g. "T128,B64,I256,H256,bi"
    suites: tuple[str, ...]  # the --sizes choices that include it ("default", "quick", "sweep")
    make: Callable[[np.dtype, np.random.Generator], Any]  # (dtype, rng) -> inputs
    reference: Callable[[Any, str], Mapping[str, np.ndarray]]  # (inputs, pass) -> float64 arrays
    work: Callable[[str, np.dtype], float]  # (pass, dtype) -> work of one call, in the
    # pass's ceiling unit times seconds (GFLOP, GB): work / seconds is a rate in that unit
    ceilings: Mapping[str, Ceiling]  # pass -> the ceiling its rate is measured against
    shape: Mapping[str, int | bool | str] = field(default_factory=dict)  # the sizes, by name
    sweep: tuple[str, str] | None = None  # (family, swept size's name) in a size sweep

    @property
    def id(self) -> str:
        """``op/size``, unique in the registry."""
        return f"{self.op}/{self.size}"


@dataclass(frozen=True)
class Case:
    """One row of the table: a problem, a backend that implements its op, and a pass."""

    problem: Problem
    backend: Backend
    pass_: str

    @property
    def id(self) -> str:
        """``op/size/backend/device/pass``; ``--filter`` matches substrings of it."""
        b = self.backend
        return f"{self.problem.id}/{b.name}/{b.device}/{self.pass_}"


@dataclass(frozen=True)
class Timing:
    """The timed samples of one call: each is the mean seconds of `loops` consecutive calls."""

    times: list[float]
    loops: int


# A sample is at least this long: a call faster than this is looped (as pyperf calibrates its
# loops), so that the timer's own cost and resolution stay far below the figure.
SAMPLE_S = 2e-3

# The thread pools of NumPy's OpenBLAS, torch and Numba keep their workers spinning for a while
# after a parallel call. A library timed inside that window competes with them for the cores:
# torch's matmul right after NumPy's ran 2-4x slower on 2 cores. Waiting this long first lets
# the previous library's workers go to sleep.
QUIET_S = 0.2


def time_calls(run: Callable[[], Any], *, repeat: int, min_time: float, warmup: int,
               loops: int | None = None, quiet: float = QUIET_S) -> Timing:
    """Wait `quiet` seconds, call `run` `warmup` times untimed (at least once), then take
    samples until there are at least `repeat` of them adding up to at least `min_time` seconds.

    A sample times `loops` consecutive calls and records their mean. By default `loops` is
    calibrated after the warm-up: the fastest of three timed calls sets it so that a sample
    lasts at least `SAMPLE_S` (the first calls after the wait are slow, waking the thread
    pools, and would set it too low). The garbage collector is off while timing (as in
    `timeit`): autograd allocates many small objects, and a collection landing inside one
    call would be noise, not the op's cost.
    """
    time.sleep(quiet)
    for _ in range(max(1, warmup)):
        run()
    if loops is None:
        fastest = math.inf
        for _ in range(3):
            start = time.perf_counter()
            run()
            fastest = min(fastest, time.perf_counter() - start)
            if fastest >= SAMPLE_S:
                break
        loops = max(1, min(10_000, math.ceil(SAMPLE_S / max(fastest, 1e-9))))
    times: list[float] = []
    total = 0.0
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < repeat or total < min_time:
            start = time.perf_counter()
            for _ in range(loops):
                run()
            elapsed = time.perf_counter() - start
            times.append(elapsed / loops)
            total += elapsed
    finally:
        if was_enabled:
            gc.enable()
    return Timing(times=times, loops=loops)
