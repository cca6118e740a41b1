"""Hardware rates the problems are measured against, measured in the same run.

GEMM-bound ops (the LSTM, the multi-query attention core) are compared with the rate of one
matrix product of a comparable shape: numpy's ``matmul`` (the BLAS numpy links) on the CPU,
``torch.matmul`` on CUDA with TF32 off.

Memory-bound ops (the single-query attention core) are compared with the time the least memory
traffic they need takes (the README's "Performance" section): forward reads the values
V once; backward reads V once more and writes d_values, a fresh array of V's shape, once. The
floor times exactly that on an array of V's shape and dtype: a streaming read (per-row sums, so
that the read cannot be optimized away) and a copy into a freshly allocated array (allocation,
page faults and all: every backend allocates its gradient). With `lengths`, only each row's
first lengths[b] keys need to be read, and the copy reads those and zero-fills the rest. On the
CPU both are Numba kernels parallel over the batch, on as many threads as the backends get
(``numba.set_num_threads``, set by ``python -m benchmarks --threads``); on CUDA, torch's sum and
copy.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from benchmarks.core import Floor, time_calls

# Timing of a floor: enough calls that the median is stable, few enough to keep the run short.
_REPEAT, _MIN_TIME, _WARMUP = 5, 0.2, 2

# The kernels' one fast-math set (no nnan/ninf); the floors must not be slower than a kernel could
# be, so they get the same freedom: reassociation lets LLVM vectorize the sum.
_NJIT = {"parallel": True, "fastmath": {"nsz", "arcp", "contract", "afn", "reassoc"},
         "cache": True}


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


@njit(**_NJIT)
def _read_rows(values, lengths, sums):
    """sums[b] = the sum of values[b, :lengths[b]]: each of those elements read once."""
    B, H = values.shape[0], values.shape[2]
    for b in prange(B):
        row = values[b].ravel()  # [T*H], contiguous: a flat loop vectorizes
        acc = sums.dtype.type(0)
        for i in range(lengths[b] * H):
            acc += row[i]
        sums[b] = acc


@njit(**_NJIT)
def _copy_rows(values, lengths, out):
    """out[b, :lengths[b]] = values[b, :lengths[b]], out[b, lengths[b]:] = 0."""
    B, T, H = values.shape
    for b in prange(B):
        src, dst = values[b].ravel(), out[b].ravel()  # [T*H]
        n = lengths[b] * H
        for i in range(n):
            dst[i] = src[i]
        for i in range(n, T * H):
            dst[i] = 0


def memory_floors(shape: tuple[int, int, int], lengths: np.ndarray | None = None
                  ) -> dict[str, Floor]:
    """The floors, in GB/s, of a single-query attention over values of `shape` [B, T, H].

    forward: the streaming read of V's valid keys, ``n_valid`` elements (all of V without
    `lengths`). forward+backward: that read, then the fresh copy (read the valid keys, write all
    of V): ``2 * n_valid + B*T*H`` elements in the sum of the two times. A row's work, in GB,
    must count the same bytes (`memory_work`).
    """
    B, T, H = shape
    lengths = np.full(B, T, np.int64) if lengths is None else np.asarray(lengths, np.int64)
    n_valid, n_full = int(lengths.sum()) * H, B * T * H
    times: dict[tuple[str, str], tuple[float, float]] = {}  # (device, dtype) -> (read, copy) s

    def read_and_copy_seconds(device: str, dtype: np.dtype) -> tuple[float, float]:
        key = (device, np.dtype(dtype).name)
        if key not in times:
            values = np.random.default_rng(0).standard_normal(shape).astype(dtype)
            if device == "cpu":
                read, copy = _cpu_read_copy(values, lengths)
            elif device == "cuda":
                read, copy = _torch_read_copy(values, n_valid, "cuda")
            else:
                raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
            times[key] = tuple(
                float(np.median(time_calls(run, repeat=_REPEAT, min_time=_MIN_TIME,
                                           warmup=_WARMUP)))
                for run in (read, copy)
            )
        return times[key]

    def forward(device: str, dtype: np.dtype) -> float:
        read, _ = read_and_copy_seconds(device, dtype)
        return memory_work(n_valid, n_full, "forward", dtype) / read

    def forward_backward(device: str, dtype: np.dtype) -> float:
        read, copy = read_and_copy_seconds(device, dtype)
        return memory_work(n_valid, n_full, "forward+backward", dtype) / (read + copy)

    def size(dtype: np.dtype) -> str:
        full = _binary_size(n_full * dtype.itemsize)
        return full if n_valid == n_full else f"{_binary_size(n_valid * dtype.itemsize)} of {full}"

    what = f"V [{B}, {T}, {H}]" + ("" if n_valid == n_full else "'s valid keys")
    return {
        "forward": Floor(name=f"stream read of {what}", unit="GB/s", measure=forward,
                         size=size),
        "forward+backward": Floor(name=f"read + fresh copy of {what}", unit="GB/s",
                                  measure=forward_backward, size=size),
    }


def memory_work(n_valid: int, n_full: int, pass_: str, dtype: np.dtype) -> float:
    """GB the single-query attention core must move: forward reads the `n_valid` elements of V
    it attends to; forward+backward reads them twice and writes d_values, `n_full` elements."""
    elements = n_valid if pass_ == "forward" else 2 * n_valid + n_full
    return elements * np.dtype(dtype).itemsize / 1e9


def _binary_size(nbytes: int) -> str:
    """``nbytes`` in MiB, KiB or bytes, e.g. "128 MiB"."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g} {unit}"
    return f"{nbytes} B"


def _cpu_read_copy(values: np.ndarray, lengths: np.ndarray):
    """The zero-argument read and fresh-copy calls of `memory_floors` on the CPU (Numba)."""
    sums = np.empty(values.shape[0], values.dtype)

    def read() -> None:
        _read_rows(values, lengths, sums)

    def copy() -> None:
        _copy_rows(values, lengths, np.empty_like(values))

    return read, copy


def _torch_read_copy(values: np.ndarray, n_valid: int, device: str):
    """The read and fresh-copy calls with torch on `device`. The valid keys are the first
    `n_valid` elements of the flat array: the same bytes as the ragged rows, in one piece."""
    flat = torch.from_numpy(values).to(device).reshape(-1)

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def read() -> None:
        torch.sum(flat[:n_valid])
        synchronize()

    def copy() -> None:
        out = torch.empty_like(flat)
        out[:n_valid].copy_(flat[:n_valid])
        out[n_valid:].zero_()
        synchronize()

    return read, copy
