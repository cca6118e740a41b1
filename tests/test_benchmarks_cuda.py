"""The benchmark suite's GPU part, as far as it can be checked without a GPU.

What runs everywhere: the ``kernels_cuda`` backend is registered for the single-query problems
only and is unavailable without a GPU (and under numba's CUDA simulator); the event clock that
times every "cuda" row, driven by a fake device timeline (work queued asynchronously, events
recorded on it); the runner's CUDA path with that fake clock; the CUDA memory ceiling (the row's
bytes at the faster of the measured read and copy rates) with fake rates; the target lines
under the table; numba's allocation counter on a fake context. Under ``NUMBA_ENABLE_CUDASIM=1``
(a subprocess, when ``kernels/cuda`` exists): the backend's prepare/run/collect at the quick
sizes, validated against numpy_ref. On a GPU (tests marked ``cuda``): the quick kernels_cuda
rows through the whole runner, and the device's measured rates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from benchmarks import attention, cases, ceilings, core, measure, report, runner
from benchmarks.core import OP_PASSES, Ceiling, EventClock, Prepared, time_calls

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "benchmarks" / "schema.json").read_text())


def _single_query(problem) -> bool:
    return problem.op == "attention" and "Tq" not in problem.shape


# --------------------------------------------------------------------------------------------
# registration and availability


def test_kernels_cuda_is_registered_for_the_single_query_problems_only(monkeypatch):
    assert attention.KERNELS_CUDA in cases.BACKENDS and "kernels_cuda" in cases.BACKEND_NAMES
    backend = attention.KERNELS_CUDA
    assert (backend.device, backend.op, backend.passes) == ("cuda", "attention", OP_PASSES)
    gpu = {backend, attention.TORCH_BMM_CUDA}  # as if there were a GPU
    monkeypatch.setattr(cases, "BACKENDS", [
        dataclasses.replace(b, available=lambda: True) if b in gpu else b
        for b in cases.BACKENDS])
    for suite in cases.SUITES:
        chosen = cases.select_cases(suite, backends=["kernels_cuda"])
        expected = {(p.id, pass_) for p in cases.PROBLEMS if suite in p.suites
                    and _single_query(p) for pass_ in OP_PASSES}
        assert {(c.problem.id, c.pass_) for c in chosen} == expected and expected
    ids = {c.id for c in cases.select_cases("default", backends=["kernels_cuda", "torch_bmm"])}
    for pass_ in OP_PASSES:  # the target's row and the one it is compared with
        assert f"attention/B256,T512,H256/kernels_cuda/cuda/{pass_}" in ids
        assert f"attention/B256,T512,H256/torch_bmm/cuda/{pass_}" in ids
    # the many-query problems are not its layout
    assert not any("Tq" in i and "kernels_cuda" in i for i in ids)


def test_kernels_cuda_is_unavailable_here_and_under_the_simulator(monkeypatch):
    # this machine: torch sees no GPU, so neither the backend nor its cases exist
    if not torch.cuda.is_available():
        assert not attention.kernels_cuda_available()
        assert not any(c.backend.name == "kernels_cuda" for c in cases.select_cases("quick"))
        assert not any(c.backend.device == "cuda" for c in cases.select_cases("default"))
    # each condition on its own: a GPU, kernels.cuda importing and available, no simulator
    fake = types.SimpleNamespace(is_available=lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "kernels.cuda", fake)
    monkeypatch.setattr(numba.config, "ENABLE_CUDASIM", 0)
    assert attention.kernels_cuda_available()
    monkeypatch.setattr(numba.config, "ENABLE_CUDASIM", 1)  # the simulator is not a GPU
    assert not attention.kernels_cuda_available()
    monkeypatch.setattr(numba.config, "ENABLE_CUDASIM", 0)
    fake.is_available = lambda: False  # numba-cuda sees no device
    assert not attention.kernels_cuda_available()
    fake.is_available = lambda: 1 / 0  # a broken driver probe is unavailable, not a crash
    assert not attention.kernels_cuda_available()
    monkeypatch.setitem(sys.modules, "kernels.cuda", None)  # import fails (ImportError)
    assert not attention.kernels_cuda_available()
    fake.is_available = lambda: True
    monkeypatch.setitem(sys.modules, "kernels.cuda", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not attention.kernels_cuda_available()


def test_kernels_cuda_refuses_the_many_query_layout():
    problem = next(p for p in cases.PROBLEMS if p.op == "attention" and "Tq" in p.shape
                   and "quick" in p.suites)
    inputs = problem.make(np.dtype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="single-query"):
        attention.KERNELS_CUDA.prepare(inputs, "forward")


# --------------------------------------------------------------------------------------------
# the event clock, on a fake device


class FakeDevice:
    """A device timeline: `launch(d)` queues `d` seconds of work and returns at once; an event
    completes when the work queued before it is done. The host's own time advances by `host`
    per launch (none by default).
    A perf_counter around a launch sees only the Python call, none of the work."""

    def __init__(self, host: float = 0.0) -> None:
        self.queue_end = 0.0  # device time at which the queued work is done
        self.host_now = 0.0  # the host's time, on the same axis
        self.host = host
        self.events = 0

    def launch(self, seconds: float) -> None:
        self.host_now += self.host
        self.queue_end = max(self.queue_end, self.host_now) + seconds

    def synchronize(self) -> None:
        self.host_now = max(self.host_now, self.queue_end)

    def event(self) -> FakeEvent:
        self.events += 1
        return FakeEvent(self)

    def clock(self) -> EventClock:
        return EventClock(self.event, self.synchronize)


class FakeEvent:
    """``torch.cuda.Event``'s interface: elapsed_time in milliseconds."""

    def __init__(self, device: FakeDevice) -> None:
        self.device, self.at = device, None

    def record(self) -> None:
        self.at = max(self.device.queue_end, self.device.host_now)

    def synchronize(self) -> None:
        self.device.host_now = max(self.device.host_now, self.at)

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at is not None and end.at is not None, "an event was never recorded"
        return 1e3 * (end.at - self.at)


def test_the_event_clock_times_the_device_work_not_the_launch():
    device = FakeDevice()
    device.launch(0.5)  # queued before the region (an input's copy): must not count
    clock = device.clock()
    started = clock.start()
    for _ in range(3):
        device.launch(1e-3)
    assert clock.stop(started) == pytest.approx(3e-3)


def test_time_calls_with_events_measures_asynchronous_calls():
    device = FakeDevice()
    device.launch(0.25)  # pending work from before: excluded by the first synchronize
    timing = time_calls(lambda: device.launch(1e-3), repeat=4, min_time=0.0, warmup=1,
                        quiet=0.0, clock=device.clock())
    # 1 ms of device work per call: the calibration loops 2 calls to reach a 2 ms sample
    assert timing.loops == 2
    assert timing.times == pytest.approx([1e-3] * len(timing.times))
    assert len(timing.times) == 4
    # perf_counter around the same calls sees only their launch, not the work
    wall = time_calls(lambda: device.launch(1e-3), repeat=3, min_time=0.0, warmup=1,
                      quiet=0.0)
    assert max(wall.times) < 1e-4 and wall.loops > 2
    assert core.clock_for("cpu") is core.WALL_CLOCK


def _numpy_ref_case(pass_: str, masked: bool = False):
    return next(c for c in cases.select_cases("quick") if c.backend.name == "numpy_ref"
                and _single_query(c.problem) and c.pass_ == pass_
                and c.problem.shape["lengths"] == masked)


def test_the_runner_times_cuda_rows_with_events_and_cpu_rows_with_perf_counter(monkeypatch):
    device = FakeDevice()
    monkeypatch.setattr(core, "cuda_event_clock", device.clock)
    cpu = _numpy_ref_case("forward")

    def prepare(inputs, pass_):  # numpy_ref's result, 3 ms of "device" work per call
        right = cpu.backend.prepare(inputs, pass_)

        def run():
            device.launch(3e-3)
            return right.run()

        return Prepared(run=run, collect=right.collect)

    def seconds(device_name, dtype, again=False):
        return 1e-3, f"fake on {device_name}"

    ceiling = Ceiling(name="fake", unit="GB/s", seconds=seconds, names={"cuda": "fake gpu"},
                      bandwidth=lambda device_name, dtype: 2000.0 if device_name == "cuda"
                      else None)
    problem = dataclasses.replace(cpu.problem, ceilings={"forward": ceiling})
    gpu_backend = dataclasses.replace(cpu.backend, name="fake_gpu", device="cuda",
                                      prepare=prepare)
    gpu = dataclasses.replace(cpu, problem=problem, backend=gpu_backend)
    cpu = dataclasses.replace(cpu, problem=problem)
    rows = runner.run_cases([gpu], dtype=np.float32, repeat=3, min_time=0.0, memory=False)
    events = device.events
    rows += runner.run_cases([cpu], dtype=np.float32, repeat=3, min_time=0.0, memory=False)
    assert device.events == events  # the CPU row used no event
    g, c = rows
    assert g.ok and g.device == "cuda" and g.median_s == pytest.approx(3e-3)
    assert g.min_s == pytest.approx(3e-3) and g.loops == 1
    assert c.median_s < 2e-3  # numpy_ref at 3x7x5 on the CPU: not the fake device's 3 ms
    assert (g.ceiling_name, g.ceiling_by, c.ceiling_name) == ("fake gpu", "fake on cuda", "fake")
    assert g.copy_gbps == 2000.0 and c.copy_gbps is None and c.pct_of_copy_bandwidth is None
    assert g.pct_of_copy_bandwidth == pytest.approx(100 * g.rate / 2000.0)
    jsonschema = pytest.importorskip("jsonschema")
    head = _header(rows)
    assert "targets" not in head  # the fake problem is not a target's
    jsonschema.validate({"schema": report.SCHEMA, "header": head,
                         "rows": [r.record(rows) for r in rows]}, SCHEMA)


def _header(rows):
    return report.header(argv=["x"], options={"sizes": "quick", "dtype": "float32", "repeat": 3,
                                              "min_time": 0.0, "threads": 1},
                         started=report.utc_now(), rows=rows, other_cpu_s=None, drift=None,
                         wall_s=1.0)


# --------------------------------------------------------------------------------------------
# the CUDA memory ceiling, with fake rates


def test_the_cuda_memory_ceiling_is_the_rows_bytes_at_the_best_measured_rate():
    shape, lengths = (3, 7, 5), np.array([7, 2, 4])
    looks = []
    rates = iter([(900.0, 1000.0), (1200.0, 800.0)])  # GB/s: (read, copy), first and second

    def measure(values, n_valid):
        looks.append((values.shape, values.dtype, n_valid))
        return next(rates)

    ceil = ceilings.memory_ceilings(shape, lengths, cuda_rates=measure)
    dtype = np.dtype(np.float32)
    n_valid, n_full = int(lengths.sum()) * 5, 3 * 7 * 5
    fwd, fwd_bwd = (ceilings.memory_work(n_valid, n_full, p, dtype) for p in OP_PASSES)
    s, by = ceil["forward"].seconds("cuda", dtype)
    assert s == pytest.approx(fwd / 1000.0) and by.startswith("torch copy_")
    s, _ = ceil["forward+backward"].seconds("cuda", dtype)
    assert s == pytest.approx(fwd_bwd / 1000.0)
    assert ceil["forward"].copy_bandwidth("cuda", dtype) == 1000.0
    assert looks == [((3, 7, 5), dtype, n_valid)]  # measured once for both passes
    # a second look keeps the best of each rate: read 1200 now sets it, copy stays 1000
    s, by = ceil["forward"].seconds("cuda", dtype, again=True)
    assert s == pytest.approx(fwd / 1200.0) and by.startswith("torch sum")
    assert ceil["forward+backward"].copy_bandwidth("cuda", dtype) == 1000.0
    assert len(looks) == 2
    # the CPU keeps its own ceiling and name, and has no copy bandwidth
    assert ceil["forward"].copy_bandwidth("cpu", dtype) is None
    assert ceil["forward"].describe(dtype) == "stream read of V [3, 7, 5]'s valid keys, " \
        "260 B of 420 B"
    assert ceil["forward"].describe(dtype, "cuda") == ("read of V [3, 7, 5]'s valid keys at "
                                                       "the GPU's best rate, 260 B of 420 B")
    assert ceil["forward+backward"].describe(dtype, "cuda").startswith(
        "2 reads of V [3, 7, 5]'s valid keys + a write of V [3, 7, 5] at the GPU's best rate")
    whole = ceilings.memory_ceilings(shape, cuda_rates=measure)
    assert whole["forward+backward"].describe(dtype, "cuda") == (
        "2 reads + a write of V [3, 7, 5] at the GPU's best rate, 420 B")


def test_cuda_memory_ceiling_arithmetic():
    s, by = ceilings.cuda_memory_ceiling(3.0, read_gbps=1500.0, copy_gbps=3000.0)
    assert s == 1e-3 and by == "torch copy_; device-to-device copy_ 3000 GB/s, sum 1500 GB/s"
    assert ceilings.cuda_memory_ceiling(3.0, 6000.0, 3000.0)[0] == 5e-4
    with pytest.raises(ValueError, match="> 0"):
        ceilings.cuda_memory_ceiling(1.0, 0.0, 3000.0)
    with pytest.raises(ValueError, match="> 0"):
        ceilings.cuda_memory_ceiling(1.0, 1.0, math.nan)


# --------------------------------------------------------------------------------------------
# the target lines


def _row(**fields) -> runner.Row:
    base = dict(op="attention", size="B256,T512,H256", shape={}, backend="kernels_cuda",
                device="cuda", pass_="forward", dtype="float32", median_s=1e-4, min_s=1e-4,
                iqr_s=1e-6, times_s=[1e-4], loops=10, max_err=1e-7, worst="context",
                tolerance=3e-4, work=0.134217728, work_unit="GB", ceiling_s=4e-5,
                ceiling_name="x", ceiling_detail="", ceiling_by="y", peak_gflops=None,
                peak_bytes=0, peak_bytes_by="z", compile_s=0.0, sweep=None, copy_gbps=3000.0)
    return runner.Row(**(base | fields))


def test_target_lines_say_whether_each_pass_met_its_goals():
    # forward: 1342 GB/s of 3000 is 44.7%, MISSED; 5x torch_bmm, met.
    # forward+backward: 0.4027 GB in 0.16 ms is 2517 GB/s, 83.9%, met; 1.5x torch_bmm, MISSED.
    rows = [_row(), _row(backend="torch_bmm", median_s=5e-4),
            _row(pass_="forward+backward", work=3 * 0.134217728, median_s=1.6e-4),
            _row(pass_="forward+backward", backend="torch_bmm", median_s=2.4e-4)]
    lines = report.target_lines(rows)
    assert lines[0].startswith("target: attention B256,T512,H256 float32, kernels_cuda on cuda")
    assert ">= 70% of the device-to-device copy bandwidth" in lines[0]
    assert lines[1].startswith("  forward: 44.7% of the copy bandwidth (3000 GB/s), MISSED; "
                               "5.00x torch_bmm")
    assert lines[1].endswith("met")
    assert lines[2].startswith("  forward+backward: 83.9% of the copy bandwidth (3000 GB/s), "
                               "met; 1.50x torch_bmm")
    assert lines[2].endswith("MISSED")
    table = report.format_table(rows)
    assert table.endswith("\n".join(lines))
    # a missing or failed row says so instead of a figure
    lines = report.target_lines([rows[0], _row(pass_="forward+backward", max_err=1.0)])
    assert "no torch_bmm cuda row" in lines[1] and "FAIL (context)" in lines[2]
    lines = report.target_lines([_row(backend="torch_bmm")])
    assert "no kernels_cuda row" in lines[1]
    # the JSON header carries the same results, valid against the schema
    head = _header(rows)
    forward, both = head["targets"]
    assert (forward["pass"], forward["met"], both["pass"], both["met"]) == (
        "forward", False, "forward+backward", False)
    assert forward["pct_of_copy_bandwidth"] == pytest.approx(44.74, abs=0.01)
    assert forward["speedup"] == pytest.approx(5.0) and both["speedup"] == pytest.approx(1.5)
    met = [_row(median_s=4e-5, ceiling_s=3e-5), _row(backend="torch_bmm", median_s=1e-4)]
    (forward, both) = report.target_results(met)
    assert forward["met"] is True and forward["why"] == ""
    assert both["met"] is None and both["why"].startswith("no kernels_cuda row")
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate({"schema": report.SCHEMA, "header": head,
                         "rows": [r.record(rows) for r in rows]}, SCHEMA)


def test_target_lines_stay_out_of_a_cpu_run():
    rows = [_row(device="cpu", copy_gbps=None), _row(device="cpu", backend="torch_bmm"),
            _row(size="B3,T7,H5")]  # a CUDA row, but not the target's problem
    assert report.target_lines(rows) == [] and report.target_results(rows) == []
    assert "target:" not in report.format_table(rows)
    assert "targets" not in _header(rows)  # a CPU run's header is as it was


# --------------------------------------------------------------------------------------------
# numba's device allocations


def test_numba_allocation_counter_counts_and_restores():
    class Context:
        def memalloc(self, bytesize):
            return ("pointer", bytesize)

    original = Context.memalloc
    with measure.numba_cuda_allocations(Context) as allocated:
        assert Context().memalloc(100) == ("pointer", 100)
        Context().memalloc(28)
    assert allocated == [128] and Context.memalloc is original
    with pytest.raises(RuntimeError), measure.numba_cuda_allocations(Context):
        raise RuntimeError("the call failed")
    assert Context.memalloc is original


# --------------------------------------------------------------------------------------------
# numba's CUDA simulator: the backend's calls, validated (kernels.cuda needed)


def _check_quick_rows_validate(dtypes=(np.float32,)) -> None:
    """prepare, run and collect kernels_cuda on each quick single-query problem (unmasked,
    masked) and pass, and compare with numpy_ref in float64 as the runner does; the masked
    forward+backward twice (its out= buffers reused). The simulator runs each GPU thread in
    Python: a few calls only."""
    problems = [p for p in cases.PROBLEMS if "quick" in p.suites and _single_query(p)]
    assert [p.shape["lengths"] for p in problems] == [False, True]
    for problem in problems:
        for dtype in dtypes:
            inputs = problem.make(np.dtype(dtype), np.random.default_rng(runner.SEED))
            for pass_ in OP_PASSES:
                prepared = attention.KERNELS_CUDA.prepare(inputs, pass_)
                calls = 2 if problem.shape["lengths"] and pass_ != "forward" else 1
                for _ in range(calls):
                    got = prepared.collect(prepared.run())
                errors = runner.relative_errors(got, problem.reference(inputs, pass_))
                tol = runner.tolerance(np.dtype(dtype))
                assert max(errors.values()) < tol, (problem.id, pass_, dtype, errors)


def test_kernels_cuda_backend_validates_under_the_simulator():
    if not numba.config.ENABLE_CUDASIM:  # numba reads the variable once: a fresh process
        env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"{Path(__file__).relative_to(REPO)}::"
             "test_kernels_cuda_backend_validates_under_the_simulator"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
        return
    assert not attention.kernels_cuda_available()  # forced below, never chosen by itself
    _check_quick_rows_validate()


# --------------------------------------------------------------------------------------------
# on a GPU


@pytest.mark.cuda
def test_kernels_cuda_rows_validate_and_time_on_the_gpu():
    assert attention.kernels_cuda_available(), "a GPU, but kernels.cuda is not available"
    _check_quick_rows_validate((np.float32, np.float64))
    chosen = [c for c in cases.select_cases("quick", backends=["kernels_cuda", "torch_bmm"])
              if c.backend.device == "cuda"]
    assert {c.backend.name for c in chosen} == {"kernels_cuda", "torch_bmm"}
    rows = runner.run_cases(chosen, dtype=np.float32, repeat=3, min_time=0.0)
    for r in rows:
        assert r.ok, (r.id, r.worst, r.max_err)
        assert r.copy_gbps is not None and r.copy_gbps > 0 and r.peak_bytes is not None
        assert "at the GPU's best rate" in r.ceiling_name
        assert r.pct_of_copy_bandwidth == pytest.approx(100 * r.rate / r.copy_gbps)
    # the target's problem (not in the quick suite) stays out of the table and the header
    assert report.target_lines(rows) == [] and "targets" not in _header(rows)


@pytest.mark.cuda
def test_the_device_rates_are_measured_with_events():
    values = np.random.default_rng(0).standard_normal((64, 256, 256)).astype(np.float32)
    read, copy = ceilings.torch_cuda_rates(values, values.size)
    # 16 MiB: any GPU of the last decade streams it at more than 50 GB/s, none at 20 TB/s
    assert 50 < read < 20_000 and 50 < copy < 20_000
