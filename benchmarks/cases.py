"""The registry: every problem (op x size) and every backend the benchmark knows.

Adding a size is one `PROBLEMS` entry, a backend one `BACKENDS` entry, an op a module like
`benchmarks.lstm` plus its entries here. Cases are every (problem, backend, pass) with the same
op, a pass the backend supports, and a backend available on this machine, in registry order:
by problem, then pass, then backend.
"""

from __future__ import annotations

from benchmarks import lstm
from benchmarks.core import PASSES, Backend, Case, Problem

SUITES = ("default", "small")

PROBLEMS: list[Problem] = [
    lstm.lstm_problem(128, 64, 256, 256, suites=("default",)),
    lstm.lstm_problem(32, 16, 64, 64, suites=("default",)),
    # Odd sizes, so that a shape or transpose mistake cannot hide behind a square matrix.
    lstm.lstm_problem(7, 3, 5, 11, suites=("small",)),
]

# The first backend is the baseline of the "vs torch cpu" column, so it leads each group.
BACKENDS: list[Backend] = [
    lstm.TORCH_CPU,
    lstm.TORCH_CUDA,
    lstm.NUMPY_REF,
]

BASELINE = ("torch", "cpu")  # (backend name, device) that speeds are relative to


def select_cases(suite: str, substring: str = "") -> list[Case]:
    """The cases of `suite` whose `Case.id` contains `substring`, in registry order."""
    if suite not in SUITES:
        raise ValueError(f"suite: expected one of {SUITES}, got {suite!r}")
    cases = [
        Case(problem, backend, pass_)
        for problem in PROBLEMS
        if suite in problem.suites
        for pass_ in PASSES
        for backend in BACKENDS
        if backend.op == problem.op and pass_ in backend.passes and backend.available()
    ]
    return [case for case in cases if substring in case.id]
