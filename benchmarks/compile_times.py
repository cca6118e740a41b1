"""Numba compile times: each kernel cold, and a fresh process with a warm on-disk cache.

``python -m benchmarks.compile_times`` runs, in child processes with a private
``NUMBA_CACHE_DIR``:

1. cold: an empty cache; every public kernel entry point is called once on a tiny float32
   problem, and the time of each call (compilation dominates it) is reported per kernel;
2. warm: a new process, the same cache, timing ``import kernels`` and the same first calls,
   which now load machine code from disk instead of compiling it.

Only the float32 signatures are compiled here, the ones the benchmark suite times; float64
compiles as much again on first use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
import kernels
from kernels import attention as ka
import_s = time.perf_counter() - t0
rng = np.random.default_rng(0)
f32 = np.float32
q1, q3 = rng.standard_normal((2, 4)).astype(f32), rng.standard_normal((2, 3, 4)).astype(f32)
k = rng.standard_normal((2, 5, 4)).astype(f32)
add = {"W_query": rng.standard_normal((3, 4)).astype(f32),
       "W_key": rng.standard_normal((3, 4)).astype(f32), "v": rng.standard_normal(3).astype(f32)}
calls = {
    "attention single query forward (fused, parallel)":
        lambda: kernels.attention_forward(q1, k, k),
    "attention single query backward (forward cached above)":
        lambda: kernels.attention_backward(q1, kernels.attention_forward(q1, k, k)[2]),
    "attention many queries (softmax rows forward + backward)":
        lambda: kernels.attention_backward(q3, kernels.attention_forward(q3, k, k)[2]),
    "attention additive (scores + backward)":
        lambda: kernels.attention_backward(
            q3, kernels.attention_forward(q3, k, k, score="additive", params=add)[2]),
}
if hasattr(kernels, "lstm_forward"):
    from numpy_ref import init_lstm_params
    p = init_lstm_params(4, 5, bidirectional=True, rng=0, dtype=f32)
    x = rng.standard_normal((3, 2, 4)).astype(f32)

    def lstm():
        out, _, cache = kernels.lstm_forward(x, p, bidirectional=True)
        kernels.lstm_backward(out, cache)

    calls["lstm forward (step kernel)"] = lambda: kernels.lstm_forward(x, p, bidirectional=True)
    calls["lstm backward (step kernel; forward cached above)"] = lstm
logits, labels = rng.standard_normal((6, 5)).astype(f32), np.array([0, 1, 2, 3, 4, 0])
ids = np.array([[0, 1], [2, 0]])
w = np.full((2, 5), 0.2, f32)
calls.update({
    "cross-entropy (forward + backward)": lambda: kernels.cross_entropy_backward(
        f32(1), kernels.cross_entropy_forward(logits, labels)[1]),
    "embedding backward (scatter)": lambda: kernels.embedding_backward(
        rng.standard_normal((2, 2, 5)).astype(f32),
        kernels.embedding_forward(ids, {"weight": logits})[1]),
    "additive scores (forward + backward)": lambda: kernels.additive_scores_backward(
        w, kernels.additive_scores_forward(q1, k, q1[0])[1]),
    "weighted sum (forward + backward)": lambda: kernels.weighted_sum_backward(
        q1, kernels.weighted_sum_forward(w, k)[1]),
    "Adam step (fused)": lambda: kernels.Adam({"w": logits.copy()}).step({"w": logits}),
})
times = {}
for name, call in calls.items():
    t = time.perf_counter()
    call()
    times[name] = time.perf_counter() - t
print(json.dumps({"import_s": import_s, "calls": times}))
"""


def _child(cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print cold compile time per kernel, then a warm-cache fresh process's figures."""
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = _child(cache_dir)
        warm = _child(cache_dir)
    print("kernel (float32 signatures)                                cold s   warm s")
    for name, seconds in cold["calls"].items():
        print(f"{name:58s} {seconds:6.2f}   {warm['calls'][name]:6.3f}")
    print(f"{'import kernels':58s} {cold['import_s']:6.2f}   {warm['import_s']:6.3f}")
    total = warm["import_s"] + sum(warm["calls"].values())
    print(f"fresh process, warm cache: import + first calls = {total:.2f} s")


if __name__ == "__main__":
    main()
