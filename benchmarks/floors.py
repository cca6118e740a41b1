"""Hardware rates the problems are measured against, measured in the same run.

GEMM-bound ops (the LSTM, the multi-query attention core) are compared with the rate of one
matrix product of a comparable shape: numpy's ``matmul`` (the BLAS numpy links) on the CPU,
``torch.matmul`` on CUDA with TF32 off.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.core import Floor, time_calls

# Timing of a floor: enough calls that the median is stable, few enough to keep the run short.
_REPEAT, _MIN_TIME, _WARMUP = 5, 0.2, 2


def gemm_floor(M: int, K: int, N: int) -> Floor:
    """The rate, in GFLOP/s, of one product [M, K] @ [K, N] (2*M*K*N flops), median of calls."""

    def measure(device: str, dtype: np.dtype) -> float:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((M, K)).astype(dtype)
        b = rng.standard_normal((K, N)).astype(dtype)
        if device == "cpu":
            out = np.empty((M, N), dtype)

            def run() -> None:
                np.matmul(a, b, out=out)

        elif device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # the rows run with TF32 off too
            ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
            tout = torch.empty((M, N), dtype=ta.dtype, device="cuda")

            def run() -> None:
                torch.matmul(ta, tb, out=tout)
                torch.cuda.synchronize()

        else:
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
        times = time_calls(run, repeat=_REPEAT, min_time=_MIN_TIME, warmup=_WARMUP)
        return 2 * M * K * N / float(np.median(times)) / 1e9

    return Floor(name=f"GEMM [{M}, {K}] @ [{K}, {N}]", unit="GFLOP/s", measure=measure)
