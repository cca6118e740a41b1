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

Clocks: a CPU call is timed with ``time.perf_counter`` around it (`WallClock`). A CUDA call
returns before the GPU has done its work, so a "cuda" row is timed with CUDA events
(`EventClock`): synchronize (nothing queued before counts), record a start event on the current
stream, make the calls, record an end event, wait for it, and take the events' elapsed time.
The calls themselves do not synchronize, so a sample of looped calls measures the GPU's
throughput, not a host round trip per call.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

OP_PASSES = ("forward", "forward+backward")  # what an op's rows time
TRAINING_STEP = "training step"  # a model's rows: forward, loss, backward and an Adam step
PASSES = (*OP_PASSES, TRAINING_STEP)


@dataclass(frozen=True)
class Prepared:
    """A backend made ready for one problem and pass."""

    run: Callable[[], Any]  # the timed call; on CUDA it may return before the GPU is done
    #                         (the runner's event clock waits for it)
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
    handles: Callable[[Problem], bool] = lambda problem: True  # the op's problems it takes
    #                                                             (kernels_cuda: one query)
    memory: str = "tracemalloc"  # the counter of its allocations: "tracemalloc" (NumPy),
    #                              "torch" (torch's profiler on the CPU, its CUDA allocator's
    #                              peak on CUDA) or "numba" (numba's CUDA allocations)


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
    names: Mapping[str, str] = field(default_factory=dict)  # device -> its own name, where the
    #                                                         device's ceiling is another one
    # (device, dtype) -> the device-to-device copy bandwidth in GB/s (read + write bytes) that
    # this ceiling measured on that device, or None (the CPU, GEMM-bound ceilings)
    bandwidth: Callable[[str, np.dtype], float | None] | None = None

    def describe(self, dtype: np.dtype, device: str = "cpu") -> str:
        """The name on `device`, with the size it moves at `dtype` when it has one."""
        name = self.names.get(device, self.name)
        return name if self.size is None else f"{name}, {self.size(np.dtype(dtype))}"

    def copy_bandwidth(self, device: str, dtype: np.dtype) -> float | None:
        """`bandwidth` on `device` at `dtype`, None where the ceiling has none."""
        return None if self.bandwidth is None else self.bandwidth(device, np.dtype(dtype))


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


class Clock(Protocol):
    """What `time_calls` reads: ``stop(start())`` is the seconds of the calls in between."""

    def start(self) -> Any:
        """Begin a timed region; returns the token `stop` takes."""

    def stop(self, started: Any) -> float:
        """End the region `started` began: its seconds."""


class WallClock:
    """``time.perf_counter`` around the calls: the clock of every CPU row."""

    def start(self) -> float:
        """The current perf_counter."""
        return time.perf_counter()

    def stop(self, started: float) -> float:
        """Seconds since `started`."""
        return time.perf_counter() - started


class EventClock:
    """Events on a device's current stream around the calls: the clock of the CUDA rows.

    `event()` makes a timing event (``record()``, ``synchronize()``, and
    ``elapsed_time(end)`` in milliseconds, as ``torch.cuda.Event``); `synchronize()` waits for
    all the device's work. `start` synchronizes first, so that work queued before the region
    (an input's copy, the previous sample) is not counted, then records the start event; `stop`
    records the end event after the calls, waits for it, and returns the elapsed time between
    the two on the device, in seconds.
    """

    def __init__(self, event: Callable[[], Any], synchronize: Callable[[], None]) -> None:
        self._event = event
        self._synchronize = synchronize

    def start(self) -> Any:
        """Synchronize, then record and return the start event."""
        self._synchronize()
        started = self._event()
        started.record()
        return started

    def stop(self, started: Any) -> float:
        """Record the end event, wait for it: seconds from `started` to it on the device."""
        end = self._event()
        end.record()
        end.synchronize()
        return started.elapsed_time(end) / 1e3


WALL_CLOCK = WallClock()


def cuda_event_clock() -> EventClock:
    """An `EventClock` of ``torch.cuda`` events on the current stream (torch's default stream
    is the legacy default stream numba launches on too, so it times numba kernels as well)."""
    import torch

    return EventClock(lambda: torch.cuda.Event(enable_timing=True), torch.cuda.synchronize)


def clock_for(device: str) -> Clock:
    """The clock of a row on `device`: CUDA events on "cuda", perf_counter elsewhere."""
    return cuda_event_clock() if device == "cuda" else WALL_CLOCK


def time_calls(run: Callable[[], Any], *, repeat: int, min_time: float, warmup: int,
               loops: int | None = None, quiet: float = QUIET_S,
               clock: Clock = WALL_CLOCK) -> Timing:
    """Wait `quiet` seconds, call `run` `warmup` times untimed (at least once), then take
    samples until there are at least `repeat` of them adding up to at least `min_time` seconds.

    A sample times `loops` consecutive calls with `clock` (perf_counter by default; CUDA
    events for a CUDA call, `EventClock`) and records their mean. By default `loops` is
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
            started = clock.start()
            run()
            fastest = min(fastest, clock.stop(started))
            if fastest >= SAMPLE_S:
                break
        loops = max(1, min(10_000, math.ceil(SAMPLE_S / max(fastest, 1e-9))))
    times: list[float] = []
    total = 0.0
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(times) < repeat or total < min_time:
            started = clock.start()
            for _ in range(loops):
                run()
            elapsed = clock.stop(started)
            times.append(elapsed / loops)
            total += elapsed
    finally:
        if was_enabled:
            gc.enable()
    return Timing(times=times, loops=loops)
