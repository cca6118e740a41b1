"""What the machine can do, measured in the same run: the ceiling every row is a percentage of.

A row's ceiling is the least time any library on this machine takes to do the work the row
must do (its `ceiling_s`); its "% of ceiling" is ceiling_s / the row's median time. A correct
ceiling cannot be beaten, so a row above 100% is a measurement problem (the ceiling was timed
while something else ran, or the op does less work than it is credited with), and the runner
flags it instead of printing it as a success.

GEMM-bound rows (the LSTM, the many-query attention, SDPA's heads layout, the training steps):
the op is written as the list of matrix products it cannot avoid (`Product`, the shapes come
from the op's math: an LSTM step's recurrent product has only B rows, the attention's two
batched products are q k^T and w v, and so on). Each product is timed with NumPy's ``matmul``
(the BLAS NumPy links) and with ``torch.matmul`` (torch's BLAS: MKL on x86), on the same
operands, and the faster library's best time counts; the ceiling is the sum over the products.
Products the op must compute one after another with the same weight (an LSTM's T recurrent
steps) are timed together, in one call, as if no step waited for the previous one: a bound no
recurrence can beat (timed one call per step, they were beaten by torch's fused oneDNN LSTM,
which runs the whole recurrence in one call). So the ceiling is what the best BLAS on the
machine needs for exactly those shapes, with nothing else in between. The pointwise work
(gates, softmax) is not in it: a real op can only be slower.

Memory-bound rows (the single-query attention, the seed's case): the least traffic the op needs
is reading V once forward, and forward+backward once more plus writing d_values, a fresh array
of V's size (README, "Performance"). The ceiling is the time of exactly that on an array of V's
shape: a streaming read (per-row sums, so that the read cannot be skipped) and a copy into a
freshly allocated array (allocation and page faults included: every backend allocates its
gradient), each the faster of a parallel Numba kernel and torch (``sum``, ``copy_``).

Memory-bound ops over whole arrays (the layer norm): the pass's least traffic as a number of
fresh copies and streaming reads of one array of the input's shape (`stream_ceilings`), each
timed as above: a layer norm's forward reads x and writes y, one fresh copy; its backward reads
x^ (or x) and d_y and writes d_x, one read and one fresh copy more.

On CUDA the same rows are measured against the device's own streaming rates, timed with CUDA
events in the same run on two buffers of V's bytes: the device-to-device copy bandwidth (torch
``copy_`` from one to the other; its rate counts the bytes read and the bytes written, as CUDA's
bandwidth test does) and a read (torch ``sum`` of V's valid keys). The ceiling of a pass is the
bytes the row must move (`memory_work`) at the faster of the two rates; each row also reports
its rate as a percentage of the copy bandwidth alone (``pct_of_copy_bandwidth``), the measure
the GPU kernels' target is set in. (A fresh allocation, which the CPU ceiling includes, means
nothing under torch's caching allocator; the CUDA kernels write into preallocated buffers.)

The CPU's nominal peak (`nominal_peak`: cores x SIMD lanes x 2 flops per FMA x FMA units x
clock) is printed in the header, with the fastest BLAS ceiling of the run as a fraction of it,
and each GEMM-bound CPU row's JSON record has its ``pct_of_peak``. A BLAS faster than the peak
means the clock /proc/cpuinfo gives is below the one the cores run at (boost); the header says
so.

Every library's time is the minimum over calls, not the median: the ceiling is the best the
machine was seen to do, so that noise makes it higher (harder to reach), never lower.
"""

from __future__ import annotations

import math
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numba import njit, prange

from benchmarks.core import Ceiling, cuda_event_clock, time_calls
from kernels._config import FASTMATH
from torch_impl.precision import true_float32

# Timing of one library on one product or one memory pass: a few samples of at least 2 ms
# each (`time_calls` loops a fast call), few enough that a default run measures every ceiling
# in seconds.
_REPEAT, _MIN_TIME, _WARMUP = 5, 0.04, 1

# The kernels' one fast-math set (`kernels._config.FASTMATH`, no nnan/ninf): the memory
# ceilings must not be slower than a kernel could be, so they get the same freedom;
# reassociation lets LLVM vectorize the sum.
_NJIT = {"parallel": True, "fastmath": set(FASTMATH), "cache": True}


@dataclass(frozen=True)
class Product:
    """`count` matrix products [M, K] @ [K, N] with one right-hand side each (an LSTM's steps,
    timed together as one batched call), each batched over `batch` independent pairs."""

    M: int
    K: int
    N: int
    batch: int = 1
    count: int = 1

    @property
    def gflop(self) -> float:
        """2 flops per multiply-add, all of them."""
        return 2 * self.count * self.batch * self.M * self.K * self.N / 1e9

    def __str__(self) -> str:
        batch = f"{self.batch} x " if self.batch > 1 else ""
        count = f"{self.count} x " if self.count > 1 else ""
        return f"{count}{batch}[{self.M},{self.K}]@[{self.K},{self.N}]"


# (product, device, dtype) -> (seconds of all its products, library): shapes repeat across
# problems (the heads problems share theirs), so each is timed once per run.
_PRODUCT_TIMES: dict[tuple, tuple[float, str]] = {}


def _time_product(p: Product, device: str, dtype: np.dtype, *, again: bool = False
                  ) -> tuple[float, str]:
    """The best seconds of all of `p`'s products in one call, [count, batch, M, K] @ [batch, K,
    N] (the count sharing their right-hand side), and the library that took them."""
    key = (p.M, p.K, p.N, p.batch, p.count, device, np.dtype(dtype).name)
    if key in _PRODUCT_TIMES and not again:
        return _PRODUCT_TIMES[key]
    rng = np.random.default_rng(0)
    lead = (p.batch,) if p.batch > 1 else ()
    a = rng.standard_normal(((p.count,) if p.count > 1 else ()) + (*lead, p.M, p.K)
                            ).astype(dtype)
    b = rng.standard_normal((*lead, p.K, p.N)).astype(dtype)
    candidates: dict[str, Callable[[], object]] = {}
    clock = None  # perf_counter
    if device == "cpu":
        out = np.empty((*a.shape[:-1], p.N), dtype)
        candidates["numpy"] = lambda: np.matmul(a, b, out=out)
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out.copy())
        candidates["torch"] = lambda: torch.matmul(ta, tb, out=tout)
    elif device == "cuda":
        true_float32()  # the rows run with TF32 off too
        ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        tout = torch.empty((*a.shape[:-1], p.N), dtype=ta.dtype, device="cuda")
        candidates["torch"] = lambda: torch.matmul(ta, tb, out=tout)
        clock = cuda_event_clock()  # as the CUDA rows: events, no synchronize per call
    else:
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    timing = {} if clock is None else {"clock": clock}
    best = min((min(time_calls(run, repeat=_REPEAT, min_time=_MIN_TIME, warmup=_WARMUP,
                               **timing).times),
                name) for name, run in candidates.items())
    if again and key in _PRODUCT_TIMES:  # a second look may only lower the ceiling's time
        best = min(best, _PRODUCT_TIMES[key])
    _PRODUCT_TIMES[key] = best
    return best


def gemm_ceiling(products: Sequence[Product], *, scale: float = 1.0, name: str = "") -> Ceiling:
    """The sum over `products` of the best library's time for each, times `scale`.

    `scale` < 1 credits work that a good kernel may skip (a causal mask hides about half of
    every product); `scale` > 1 stretches one representative product over a row's whole
    work (the training steps, whose dozens of products are summarized by their largest).
    """
    products = tuple(products)

    def seconds(device: str, dtype: np.dtype, again: bool = False) -> tuple[float, str]:
        total, winners = 0.0, []
        for p in products:
            s, library = _time_product(p, device, dtype, again=again)
            total += s
            winners.append(library)
        # "torch", or "torch on 4 of 6 shapes, numpy on 2" when the shapes' winners differ
        wins = {w: winners.count(w) for w in dict.fromkeys(winners)}
        by = winners[0] if len(wins) == 1 else ", ".join(
            f"{w} on {n}" + (f" of {len(winners)} shapes" if i == 0 else "")
            for i, (w, n) in enumerate(wins.items()))
        return scale * total, by

    count = sum(p.count * p.batch for p in products)
    label = name or f"BLAS on its {count} matrix product{'s' if count > 1 else ''}"
    return Ceiling(name=label, unit="GFLOP/s", seconds=seconds,
                   detail=" + ".join(str(p) for p in products))


def gemm_work(products: Sequence[Product]) -> float:
    """GFLOP of `products`: a GEMM-bound row's work."""
    return sum(p.gflop for p in products)


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


def memory_ceilings(shape: tuple[int, int, int], lengths: np.ndarray | None = None, *,
                    cuda_rates: Callable[[np.ndarray, int], tuple[float, float]] | None = None
                    ) -> dict[str, Ceiling]:
    """The ceilings of a single-query attention over values of `shape` [B, T, H], per pass.

    On the CPU: forward, the streaming read of V's valid keys, ``n_valid`` elements (all of V
    without `lengths`); forward+backward, that read, then the fresh copy (read the valid keys,
    write all of V). A row's work, in GB, counts the same bytes (`memory_work`).

    On CUDA: the row's bytes at the faster of the device's read and device-to-device copy
    rates (`cuda_memory_ceiling`), measured by `cuda_rates` (values [B, T, H], n_valid) ->
    (read GB/s, copy GB/s), by default `torch_cuda_rates`; each look keeps the best rates seen.
    The ceilings' `bandwidth` gives the copy rate on CUDA (None on the CPU).
    """
    B, T, H = shape
    lengths = np.full(B, T, np.int64) if lengths is None else np.asarray(lengths, np.int64)
    n_valid, n_full = int(lengths.sum()) * H, B * T * H
    measured: dict[tuple[str, str], tuple[tuple[float, str], tuple[float, str]]] = {}
    rates: dict[str, tuple[float, float]] = {}  # dtype -> the best (read, copy) GB/s on CUDA
    measure_cuda = torch_cuda_rates if cuda_rates is None else cuda_rates

    def cuda_read_copy(dtype: np.dtype, again: bool) -> tuple[float, float]:
        key = np.dtype(dtype).name
        if key not in rates or again:
            values = np.random.default_rng(0).standard_normal(shape).astype(dtype)
            read, copy = measure_cuda(values, n_valid)
            if key in rates:  # a second look may only raise the rates
                read, copy = max(read, rates[key][0]), max(copy, rates[key][1])
            rates[key] = (read, copy)
        return rates[key]

    def read_and_copy(device: str, dtype: np.dtype, again: bool) -> tuple:
        key = (device, np.dtype(dtype).name)
        if key not in measured or again:
            values = np.random.default_rng(0).standard_normal(shape).astype(dtype)
            candidates = _torch_read_copy(values, n_valid, device)
            candidates.update(_numba_read_copy(values, lengths))
            best = []
            for op in ("read", "copy"):
                best.append(min(
                    (min(time_calls(runs[op], repeat=_REPEAT, min_time=_MIN_TIME,
                                    warmup=_WARMUP).times), library)
                    for library, runs in candidates.items()))
            if key in measured:
                best = [min(new, old) for new, old in zip(best, measured[key], strict=True)]
            measured[key] = tuple(best)
        return measured[key]

    def on_cuda(pass_: str, dtype: np.dtype, again: bool) -> tuple[float, str]:
        read, copy = cuda_read_copy(dtype, again)
        return cuda_memory_ceiling(memory_work(n_valid, n_full, pass_, dtype), read, copy)

    def forward(device: str, dtype: np.dtype, again: bool = False) -> tuple[float, str]:
        if device == "cuda":
            return on_cuda("forward", dtype, again)
        read, _ = read_and_copy(device, dtype, again)
        return read

    def forward_backward(device: str, dtype: np.dtype, again: bool = False
                         ) -> tuple[float, str]:
        if device == "cuda":
            return on_cuda("forward+backward", dtype, again)
        (read, read_by), (copy, copy_by) = read_and_copy(device, dtype, again)
        return read + copy, read_by if read_by == copy_by else f"read {read_by}, copy {copy_by}"

    def bandwidth(device: str, dtype: np.dtype) -> float | None:
        return cuda_read_copy(dtype, False)[1] if device == "cuda" else None

    def size(dtype: np.dtype) -> str:
        full = _binary_size(n_full * dtype.itemsize)
        return full if n_valid == n_full else f"{_binary_size(n_valid * dtype.itemsize)} of {full}"

    whole = f"V [{B}, {T}, {H}]"
    what = whole + ("" if n_valid == n_full else "'s valid keys")
    on_cuda_names = {  # the same bytes as the CPU's ceilings, at the device's best rate
        "forward": f"read of {what} at the GPU's best rate",
        "forward+backward": f"2 reads of {what} + a write of {whole} at the GPU's best rate"
        if n_valid != n_full else f"2 reads + a write of {whole} at the GPU's best rate",
    }
    return {
        "forward": Ceiling(name=f"stream read of {what}", unit="GB/s", seconds=forward,
                           size=size, bandwidth=bandwidth,
                           names={"cuda": on_cuda_names["forward"]}),
        "forward+backward": Ceiling(name=f"read + fresh copy of {what}", unit="GB/s",
                                    seconds=forward_backward, size=size, bandwidth=bandwidth,
                                    names={"cuda": on_cuda_names["forward+backward"]}),
    }


def stream_ceilings(shape: tuple[int, ...], passes: dict[str, tuple[int, int]],
                    name: str = "x") -> dict[str, Ceiling]:
    """The ceilings of an op that streams whole arrays of `shape` (a layer norm): pass ->
    (copies, reads), the pass's least traffic as that many fresh copies of one such array
    (read it, write a fresh one: allocation and page faults included) and that many streaming
    reads of one. Each copy and read is timed on an array of `shape` as `memory_ceilings`'
    are (the faster of a parallel Numba kernel and torch; best samples, a second look only
    lowering them). On the CPU only."""
    size = math.prod(shape)
    lanes = (shape[0], math.prod(shape[1:-1]), shape[-1]) if len(shape) > 1 else (1, 1, size)
    measured: dict[str, tuple[tuple[float, str], tuple[float, str]]] = {}

    def read_and_copy(device: str, dtype: np.dtype, again: bool) -> tuple:
        if device != "cpu":
            raise ValueError(f"device: the CPU's read and copy only, got {device!r}")
        key = np.dtype(dtype).name
        if key not in measured or again:
            values = np.random.default_rng(0).standard_normal(lanes).astype(dtype)
            candidates = _torch_read_copy(values, size, device)
            candidates.update(_numba_read_copy(values, np.full(lanes[0], lanes[1], np.int64)))
            best = [min((min(time_calls(runs[op], repeat=_REPEAT, min_time=_MIN_TIME,
                                        warmup=_WARMUP).times), library)
                        for library, runs in candidates.items()) for op in ("read", "copy")]
            if key in measured:
                best = [min(new, old) for new, old in zip(best, measured[key], strict=True)]
            measured[key] = tuple(best)
        return measured[key]

    def timed(copies: int, reads: int) -> Callable[..., tuple[float, str]]:
        def seconds(device: str, dtype: np.dtype, again: bool = False) -> tuple[float, str]:
            (read, read_by), (copy, copy_by) = read_and_copy(device, dtype, again)
            by = [f"copy {copy_by}"] * bool(copies) + [f"read {read_by}"] * bool(reads)
            same = len(by) == 1 or read_by == copy_by
            return copies * copy + reads * read, (copy_by if copies else read_by) if same \
                else ", ".join(by)
        return seconds

    def describe(copies: int, reads: int) -> str:
        parts = [one if n == 1 else f"{n} {many}" for n, one, many in (
            (copies, "fresh copy", "fresh copies"), (reads, "stream read", "stream reads")) if n]
        return " + ".join(parts) + f" of {name} [{', '.join(map(str, shape))}]"

    return {pass_: Ceiling(name=describe(copies, reads), unit="GB/s",
                           seconds=timed(copies, reads),
                           size=lambda dtype: _binary_size(size * np.dtype(dtype).itemsize))
            for pass_, (copies, reads) in passes.items()}


def cuda_memory_ceiling(work_gb: float, read_gbps: float, copy_gbps: float
                        ) -> tuple[float, str]:
    """The seconds `work_gb` GB take at the faster of a device's measured read and copy rates
    (GB/s), and what set them: the CUDA memory ceiling of `memory_ceilings`."""
    if not (read_gbps > 0 and copy_gbps > 0):
        raise ValueError(f"rates must be > 0 GB/s, got read {read_gbps}, copy {copy_gbps}")
    best, by = max((copy_gbps, "copy_"), (read_gbps, "sum"))
    return work_gb / best, (f"torch {by}; device-to-device copy_ {copy_gbps:.0f} GB/s, sum "
                            f"{read_gbps:.0f} GB/s")


def torch_cuda_rates(values: np.ndarray, n_valid: int) -> tuple[float, float]:
    """The device's (read, copy) rates in GB/s on `values` moved to the GPU, timed with CUDA
    events: read, ``torch.sum`` of the first `n_valid` elements (the valid keys' bytes in one
    piece); copy, ``dst.copy_(src)`` between two buffers of all of V's bytes, counting the bytes
    read and written (2 |V| per copy). Each is the best sample's rate."""
    src = torch.from_numpy(values).cuda().reshape(-1)
    dst = torch.empty_like(src)
    clock = cuda_event_clock()
    nbytes = src.element_size()

    def best_seconds(run: Callable[[], object]) -> float:
        return min(time_calls(run, repeat=_REPEAT, min_time=_MIN_TIME, warmup=_WARMUP,
                              clock=clock).times)

    read = best_seconds(lambda: torch.sum(src[:n_valid]))
    copy = best_seconds(lambda: dst.copy_(src))
    return n_valid * nbytes / read / 1e9, 2 * src.numel() * nbytes / copy / 1e9


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


def _numba_read_copy(values: np.ndarray, lengths: np.ndarray) -> dict[str, dict]:
    """The read and fresh-copy calls of `memory_ceilings` as parallel Numba kernels."""
    sums = np.empty(values.shape[0], values.dtype)
    return {"numba": {"read": lambda: _read_rows(values, lengths, sums),
                      "copy": lambda: _copy_rows(values, lengths, np.empty_like(values))}}


def _torch_read_copy(values: np.ndarray, n_valid: int, device: str) -> dict[str, dict]:
    """The read and fresh-copy calls with torch on the CPU (`device`; CUDA's rates are
    `torch_cuda_rates`). The valid keys are the first `n_valid` elements of the flat array: the
    same bytes as the ragged rows, in one piece."""
    if device != "cpu":
        raise ValueError(f"device: the CPU's read and copy only, got {device!r}")
    flat = torch.from_numpy(values).reshape(-1)

    def read() -> None:
        torch.sum(flat[:n_valid])

    def copy() -> None:
        out = torch.empty_like(flat)
        out[:n_valid].copy_(flat[:n_valid])
        out[n_valid:].zero_()

    return {"torch": {"read": read, "copy": copy}}


# --------------------------------------------------------------------------------------------
# the nominal peak


def nominal_peak() -> tuple[dict[str, float | None], str]:
    """The CPU's nominal peak GFLOP/s per dtype, and how it was derived.

    peak = logical CPUs x SIMD lanes of the dtype x 2 flops per FMA x FMA units per core x
    clock. The lanes come from the widest vector extension /proc/cpuinfo lists (AVX-512: 512
    bits, AVX/AVX2: 256, SSE2 or NEON: 128); two FMA units per core is assumed (what current
    x86 server cores have); the clock is the one in the model name, else cpufreq's maximum,
    else /proc/cpuinfo's current "cpu MHz". Where hyperthreads share a core's FMA units the
    true peak is half; a virtual machine may not say.
    """
    text = _read("/proc/cpuinfo")
    flags = set(re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M).group(1).split()) \
        if re.search(r"^(?:flags|Features)\s*:", text, re.M) else set()
    if "avx512f" in flags:
        bits, ext = 512, "AVX-512"
    elif "avx2" in flags or "avx" in flags:
        bits, ext = 256, "AVX2" if "avx2" in flags else "AVX"
    elif "sse2" in flags or "asimd" in flags or platform.machine() in ("arm64", "aarch64"):
        bits, ext = 128, "SSE2" if "sse2" in flags else "NEON"
    else:
        return {"float32": None, "float64": None}, "unknown: no SIMD flags in /proc/cpuinfo"
    fma = "fma" in flags or "avx512f" in flags or "asimd" in flags
    ghz, clock_from = _clock_ghz(text)
    if ghz is None:
        return {"float32": None, "float64": None}, "unknown: no clock in /proc/cpuinfo"
    cpus = os.cpu_count() or 1
    units = 2
    per_lane = (2 if fma else 1) * units
    peak = {name: cpus * (bits // (8 * size)) * per_lane * ghz
            for name, size in (("float32", 4), ("float64", 8))}
    unit = "FMA" if fma else "vector"
    how = (f"{cpus} logical CPUs x {bits // 32} float32 ({bits // 64} float64) lanes ({ext}) x "
           f"{'2 flops per FMA x ' if fma else ''}{units} {unit} units per core (assumed) x "
           f"{ghz:.3g} GHz ({clock_from})")
    return peak, how


def _clock_ghz(cpuinfo: str) -> tuple[float | None, str]:
    """The clock in GHz and where it was read."""
    model = re.search(r"^model name\s*:.*@\s*([\d.]+)\s*GHz", cpuinfo, re.M)
    if model:
        return float(model.group(1)), "the model name's nominal clock"
    khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").strip()
    if khz.isdigit():
        return int(khz) / 1e6, "cpufreq's maximum"
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    if mhz:
        return float(mhz.group(1)) / 1e3, "/proc/cpuinfo's cpu MHz, no boost known"
    return None, ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
