"""Shared test configuration: hypothesis profiles, the device parametrization, CUDA policy.

CUDA: every test marked ``cuda`` (and the ``cuda`` case of the ``device`` fixture, which carries
the mark) compares ours with torch on a GPU; without one they are collected and skipped, so
``pytest -m cuda`` lists every CUDA comparison on any machine. TF32 is off for all of them.

Hypothesis profile, chosen by ``HYPOTHESIS_PROFILE`` (default: ``ci`` when ``CI`` is set, else
``dev``):
- ``ci``: hypothesis' own ``ci`` profile (derandomized, no database) with our settings on top.
- ``ci-jit-off``: the same with 25 examples, for CI's run of the kernels with Numba's JIT off.
- ``dev``: fewer examples, for a quick local loop.
- ``thorough``: 500 examples per property, for a long run before a release.
No profile has a deadline: a Numba kernel's first call compiles for about a second.
"""

from __future__ import annotations

import os

import error_report
import pytest
import torch
from hypothesis import HealthCheck, settings

from torch_impl.precision import true_float32

_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", parent=settings.get_profile("ci"), max_examples=100, **_common)
# CI's second pass, the kernels' Python source with Numba's JIT off: it is there for coverage of
# their logic (indexing, masks, remainders), which a quarter of the examples reach at a
# quarter of the cost of interpreted kernels.
settings.register_profile("ci-jit-off", parent=settings.get_profile("ci"), max_examples=25,
                          **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# CPU-vs-CUDA comparisons are made in true float32: TF32 would lose 13 mantissa bits.
true_float32()

HAS_CUDA = torch.cuda.is_available()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the largest errors the parity properties saw (`error_report`), when any ran."""
    lines = error_report.summary_lines()
    if lines:
        terminalreporter.write_sep("-", "largest errors against torch over this run")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` cleanly when torch sees no GPU."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    """The torch device of the trusted float32 result: ``cpu``, and ``cuda``.

    The ``cuda`` case carries the ``cuda`` mark, so ``pytest -m cuda`` selects it with the
    tests marked ``cuda``, and it is skipped cleanly (by the hook above) where torch sees no
    GPU.
    """
    return request.param
