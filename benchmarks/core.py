"""The benchmark's vocabulary: problems, backends, floors, the cases they form, and the timer.

A `Problem` is one op at one size: it builds the inputs and computes the float64 reference every
backend is validated against. A `Backend` is one implementation of one op on one device: given a
problem's inputs and a pass, it does everything that must stay out of the timed region (build a
module, copy to the device, compile) and returns the zero-argument call to time. A `Floor` is
the hardware rate a problem is measured against (a GEMM rate for GEMM-bound ops, a memory rate
for memory-bound ones), measured in the same run; a problem names one floor per pass. A `Case`
is one (problem, backend, pass) row of the table. The registry that lists problems and backends
is `benchmarks.cases`; the loop that validates and times the cases is `benchmarks.runner`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Floor:
    """A hardware rate measured in the same run; a row's rate is reported as a fraction of it."""

    name: str  # what is measured, e.g. "GEMM [8192, 512] @ [512, 1024]"
    unit: str  # the rate's unit, e.g. "GFLOP/s" or "GB/s"
    measure: Callable[[str, np.dtype], float]  # (device, dtype) -> rate in `unit`
    size: Callable[[np.dtype], str] | None = None  # what it moves at a dtype, e.g. "128 MiB"

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
    suites: tuple[str, ...]  # the --sizes choices that include it ("default", "small")
    make: Callable[[np.dtype, np.random.Generator], Any]  # (dtype, rng) -> inputs
    reference: Callable[[Any, str], Mapping[str, np.ndarray]]  # (inputs, pass) -> float64 arrays
    work: Callable[[str, np.dtype], float]  # (pass, dtype) -> work of one call, in the
    # pass's floor unit times seconds (GFLOP, GB): work / seconds is a rate in that unit
    floors: Mapping[str, Floor]  # pass -> the floor its rate is measured against

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


def time_calls(run: Callable[[], Any], *, repeat: int, min_time: float, warmup: int) -> list[float]:
    """Call `run` `warmup` times untimed, then time calls until there are at least `repeat` of
    them and they add up to at least `min_time` seconds. Returns the seconds of each timed call.

    The garbage collector is off while timing (as in `timeit`): autograd allocates many small
    objects, and a collection landing inside one call would be noise, not the op's cost.
    """
    for _ in range(warmup):
        run()
    times: list[float] = []
    total = 0.0
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < repeat or total < min_time:
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
            total += times[-1]
    finally:
        if was_enabled:
            gc.enable()
    return times
