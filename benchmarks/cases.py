"""The registry: every problem (op x size) and every backend the benchmark knows.

Adding a size is one `PROBLEMS` entry, a backend one `BACKENDS` entry, an op a module like
`benchmarks.lstm` plus its entries here. Cases are every (problem, backend, pass) with the same
op, a pass the backend supports, a problem it handles (``kernels_cuda``: one query per row
only) and a backend available on this machine (the CUDA ones need a GPU), in registry order:
by problem, then pass, then backend. `TARGETS` are the goals the GPU kernels must reach, checked
under the table of a run on a GPU.

Three suites (``--sizes``): ``default``, realistic sizes of every op and model (the README's
main job); ``quick``, every op, backend and model at tiny odd sizes (a smoke test: the numbers
time Python overhead, not the math); ``sweep``, the same op at a range of sizes, one size
varied at a time, for the plots of how cost grows with the work.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import kernels
import numpy_ref
from benchmarks import attention, layer_norm, lstm, training
from benchmarks.core import OP_PASSES, PASSES, Backend, Case, Problem

SUITES = ("default", "quick", "sweep")

PROBLEMS: list[Problem] = [
    lstm.lstm_problem(128, 64, 256, 256, suites=("default",)),
    lstm.lstm_problem(32, 16, 64, 64, suites=("default",)),
    # Odd sizes, so that a shape or transpose mistake cannot hide behind a square matrix.
    lstm.lstm_problem(7, 3, 5, 11, suites=("quick",)),
    # The rest of the recurrent family at the LSTM's sizes: GRU (torch's) and tanh RNN.
    *(lstm.lstm_problem(*size, suites=suites, mode=mode)
      for mode in ("gru", "rnn")
      for size, suites in (((128, 64, 256, 256), ("default",)), ((32, 16, 64, 64), ("default",)),
                           ((7, 3, 5, 11), ("quick",)))),
    # Single query (the seed's case): memory-bound, V is 128 MiB in float32, then 1 MiB.
    attention.attention_problem(256, 512, 256),
    attention.attention_problem(256, 512, 256, masked=True),
    attention.attention_problem(32, 64, 128),
    # Many queries: GEMM-bound.
    attention.attention_problem(32, 256, 128, Tq=256),
    attention.attention_problem(3, 7, 5, suites=("quick",)),
    attention.attention_problem(3, 7, 5, masked=True, suites=("quick",)),
    attention.attention_problem(3, 7, 5, Tq=4, masked=True, suites=("quick",)),
    # Heads (SDPA's layout): plain, causal, grouped-query with 2 kv heads.
    attention.heads_problem(8, 8, 512, 64),
    attention.heads_problem(8, 8, 512, 64, causal=True),
    attention.heads_problem(8, 8, 512, 64, h_kv=2),
    # Scale: long sequences, where only the paths that form no [T, T] weights run (the peak
    # memory column grows with T, not T^2).
    attention.heads_problem(1, 4, 2048, 64),
    attention.heads_problem(1, 4, 8192, 64),
    attention.heads_problem(2, 4, 7, 5, h_kv=2, causal=True, suites=("quick",)),
    # The Transformer's layer norm: memory-bound, at the training step's activations [B, T, E]
    # (2 MiB in float32, held in cache) and at [M, E] of 32 MiB (from memory).
    layer_norm.layer_norm_problem((32, 64, 256)),
    layer_norm.layer_norm_problem((8192, 1024)),
    layer_norm.layer_norm_problem((3, 5, 7), suites=("quick",)),
    # A training step of each model (forward, loss, backward, Adam) at a realistic size.
    training.training_problem("classifier", B=64, T=64, E=128, H=256, V=1000),
    training.training_problem("luong", B=32, T=32, E=128, H=256, V=4000),
    training.training_problem("bahdanau", B=32, T=32, E=128, H=256, V=4000),
    training.training_problem("classifier", B=64, T=64, E=128, H=256, V=1000, cell="gru"),
    training.training_problem("luong", B=32, T=32, E=128, H=256, V=4000, cell="gru"),
    training.training_problem("transformer", B=32, T=64, E=256, H=1024, V=4000, nhead=8,
                              layers=2),
    training.training_problem("transformer", B=2, T=5, E=12, H=16, V=11, nhead=3, layers=1,
                              suites=("quick",)),
    training.training_problem("classifier", B=3, T=5, E=4, H=3, V=11, suites=("quick",)),
    training.training_problem("luong", B=3, T=4, E=4, H=3, V=13, suites=("quick",)),
    training.training_problem("bahdanau", B=3, T=4, E=4, H=3, V=13, suites=("quick",)),
    training.training_problem("classifier", B=3, T=5, E=4, H=3, V=11, cell="gru",
                              suites=("quick",)),
    # The sweeps: the single-query core over T at fixed B and H, and over B at fixed T and H;
    # the LSTM over T and over H (= I). Powers of two, as the plots' log axes.
    *(attention.attention_problem(32, T, 256, suites=("sweep",),
                                  sweep=("attention single query B32,H256", "T"))
      for T in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)),
    *(attention.attention_problem(B, 256, 256, suites=("sweep",),
                                  sweep=("attention single query T256,H256", "B"))
      for B in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)),
    *(lstm.lstm_problem(T, 32, 128, 128, suites=("sweep",), sweep=("lstm B32,I128,H128,bi", "T"))
      for T in (8, 16, 32, 64, 128, 256, 512)),
    *(lstm.lstm_problem(32, 32, H, H, suites=("sweep",), sweep=("lstm T32,B32,I=H,bi", "H"))
      for H in (16, 32, 64, 128, 256, 512)),
    # The heads layout over T (SDPA's flash kernel against ours).
    *(attention.heads_problem(1, 8, T, 64, suites=("sweep",), sweep=("sdpa B1,h8,D64", "T"))
      for T in (128, 256, 512, 1024, 2048, 4096)),
]

# Each op's baseline (see BASELINES) leads its group.
BACKENDS: list[Backend] = [
    lstm.TORCH_CPU,
    lstm.TORCH_CUDA,
    lstm.NUMPY_REF,
    lstm.module_backend("kernels", kernels),
    *(backend for op in ("gru", "rnn")
      for backend in (lstm.torch_backend(op, "cpu"), lstm.torch_backend(op, "cuda"),
                      lstm.module_backend("numpy_ref", numpy_ref, op),
                      lstm.module_backend("kernels", kernels, op))),
    attention.TORCH_BMM_CPU,
    attention.TORCH_SDPA_CPU,
    attention.TORCH_BMM_CUDA,
    attention.TORCH_SDPA_CUDA,
    attention.module_backend("numpy_ref", numpy_ref),
    attention.module_backend("kernels", kernels),
    attention.module_backend("kernels_sum_kv", kernels, sum_kv=True),
    attention.module_backend("kernels_no_weights", kernels, need_weights=False),
    attention.KERNELS_CUDA,
    attention.TORCH_HEADS_CPU,
    attention.TORCH_HEADS_CUDA,
    attention.TORCH_SOFTMAX_HEADS_CPU,
    attention.heads_module_backend("numpy_ref", numpy_ref, need_weights=True),
    attention.heads_module_backend("numpy_ref_no_weights", numpy_ref, need_weights=False,
                                   max_T=2048),
    attention.heads_module_backend("kernels", kernels, need_weights=True),
    attention.heads_module_backend("kernels_no_weights", kernels, need_weights=False),
    layer_norm.TORCH_CPU,
    layer_norm.module_backend("numpy_ref", numpy_ref),
    layer_norm.module_backend("kernels", kernels),
    training.TORCH_CPU,
    training.TORCH_CUDA,
    training.NUMPY_REF,
    training.KERNELS,
]

# op -> (backend name, device) that the "vs base" column divides by: the usual counterpart.
BASELINES = {"lstm": ("torch", "cpu"), "gru": ("torch", "cpu"), "rnn": ("torch", "cpu"),
             "attention": ("torch_bmm", "cpu"),
             "sdpa": ("torch_sdpa", "cpu"), "layer_norm": ("torch", "cpu"),
             "train": ("torch", "cpu")}




@dataclass(frozen=True)
class Target:
    """A goal a row must reach on hardware, printed under the table when the run has the row's
    problem on CUDA (`benchmarks.report.target_lines`): the backend's rate as a percentage of
    the device-to-device copy bandwidth measured in the run, and its speed over another
    backend's on the same device, in each of `passes`."""

    op: str
    size: str  # the problem's `Problem.size`
    dtype: str
    backend: str
    device: str
    min_pct_of_copy_bandwidth: float
    versus: str  # the backend it must beat on the same device, `min_speedup` times
    min_speedup: float
    passes: tuple[str, ...] = OP_PASSES


# The GPU kernels' goal: the seed's single-query core at B256, T512, H256 in float32 at 70% of
# the device's copy bandwidth or more, and at least twice as fast as torch's bmm path on CUDA.
TARGETS = [Target(op="attention", size="B256,T512,H256", dtype="float32", backend="kernels_cuda",
                  device="cuda", min_pct_of_copy_bandwidth=70.0, versus="torch_bmm",
                  min_speedup=2.0)]


OPS = tuple(dict.fromkeys(p.op for p in PROBLEMS))
BACKEND_NAMES = tuple(dict.fromkeys(b.name for b in BACKENDS))


def select_cases(suite: str, substring: str = "", *, ops: Collection[str] | None = None,
                 backends: Collection[str] | None = None) -> list[Case]:
    """The cases of `suite` whose `Case.id` contains `substring`, of the ops in `ops` and the
    backends named in `backends` (None: all), in registry order."""
    if suite not in SUITES:
        raise ValueError(f"suite: expected one of {SUITES}, got {suite!r}")
    for name, given, known in (("ops", ops, OPS), ("backends", backends, BACKEND_NAMES)):
        unknown = sorted(set(given or ()) - set(known))
        if unknown:
            raise ValueError(f"{name}: unknown {unknown}, expected some of {list(known)}")
    cases = [
        Case(problem, backend, pass_)
        for problem in PROBLEMS
        if suite in problem.suites and (ops is None or problem.op in ops)
        for pass_ in PASSES
        for backend in BACKENDS
        if backend.op == problem.op and pass_ in backend.passes and backend.handles(problem)
        and backend.available() and (backends is None or backend.name in backends)
    ]
    return [case for case in cases if substring in case.id]
