"""The error budget catches broken low-precision kernels.

A budget that torch's float16/bfloat16 results pass (test_low_precision.py) is only worth
something if it fails the mistakes people make in such kernels. Each kernel here is written the
way a hand-written kernel would be, correct but for one deliberate bug, and must be over its
budget; the same kernel with the bug fixed must be within it (so the failure is the bug's, not
the harness's):

- accumulating a dot product in bfloat16 instead of float32 (a linear layer, attention's q k^T);
- a softmax without the row max subtracted (exp overflows: inf / inf);
- an online (flash) softmax that forgets to rescale its running sum and output when a later
  block raises the row max.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import numpy_ref as ref
from numpy_ref.testing import error_budget

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)


def r(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round to the dtype, back in float32 (what storing a value in the dtype does)."""
    return np.asarray(x, np.float32).astype(dtype).astype(np.float32)


def dot_accumulated_in(a: np.ndarray, b: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    """a [M, K] @ b [K, N] with the running sum held in `dtype` (the bug) or float32 (None)."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    acc = np.zeros((a.shape[0], b.shape[1]), np.float32)
    for k in range(a.shape[1]):
        acc = acc + np.outer(a[:, k], b[k])
        if dtype is not None:
            acc = r(acc, dtype)
    return acc


# --------------------------------------------------------------------------------------------
# accumulation in bfloat16


@pytest.mark.parametrize("bug", [True, False])
def test_a_linear_layer_accumulating_in_bfloat16_is_over_budget(bug: bool) -> None:
    rng = np.random.default_rng(0)
    N, K, O = 16, 512, 24
    x = rng.standard_normal((N, K)).astype(BF16)
    params = {"weight": (rng.standard_normal((O, K)) / np.sqrt(K)).astype(BF16),
              "bias": rng.standard_normal(O).astype(BF16)}
    y = dot_accumulated_in(x, params["weight"].T, BF16 if bug else None)
    y = (y + params["bias"].astype(np.float32)).astype(BF16)
    report = error_budget(ref.linear_forward, (x, params), got={"y": y})
    assert report.ok is not bug, str(report)


def attention_by_hand(q, k, v, *, accumulate=None, subtract_max=True, block=None,
                      rescale=True, dtype=BF16):
    """A hand-written [B, h, Tq, D] attention in the dtype's style: scores q k^T * D^-1/2 (a
    float32 accumulator unless `accumulate` names the dtype), a softmax in float32, the
    probabilities rounded to the dtype before p V. With `block`, an online softmax over key
    blocks of that size (FlashAttention's), which must rescale what it has summed whenever a
    block raises the row max; the bugs: `subtract_max=False`, `rescale=False`."""
    B, h, Tq, D = q.shape
    Tk = k.shape[2]
    out = np.zeros((B, h, Tq, v.shape[3]), np.float32)
    for b in range(B):
        for i in range(h):
            s = dot_accumulated_in(q[b, i], k[b, i].T, accumulate) / np.float32(np.sqrt(D))
            if block is None:
                m = s.max(axis=1, keepdims=True) if subtract_max else np.float32(0)
                with np.errstate(over="ignore", invalid="ignore"):
                    e = r(np.exp(s - m), dtype)  # the exponentials stored in the dtype
                    p = e / e.sum(axis=1, keepdims=True)
                out[b, i] = r(p, dtype) @ v[b, i].astype(np.float32)
                continue
            m = np.full((Tq, 1), -np.inf, np.float32)
            total = np.zeros((Tq, 1), np.float32)
            acc = np.zeros((Tq, v.shape[3]), np.float32)
            for j in range(0, Tk, block):
                sj = s[:, j:j + block]
                m_new = np.maximum(m, sj.max(axis=1, keepdims=True))
                pj = np.exp(sj - m_new)
                if rescale:
                    c = np.exp(m - m_new)
                    total, acc = total * c, acc * c
                total = total + pj.sum(axis=1, keepdims=True)
                acc = acc + r(pj, dtype) @ v[b, i, j:j + block].astype(np.float32)
                m = m_new
            out[b, i] = acc / total
    return out.astype(dtype)


def _qkv(dtype, *, B=1, h=2, Tq=16, Tk=64, D=64, score_size=1.0, rising=False, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, h, Tq, D)) * score_size
    k = rng.standard_normal((B, h, Tk, D))
    if rising:  # later keys score higher: each block raises the row max
        k = k * 0.3 + np.linspace(0, 3, Tk)[None, None, :, None] * np.sign(q.mean(axis=(2, 3)))[
            :, :, None, None]
    v = rng.standard_normal((B, h, Tk, D))
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype))


@pytest.mark.parametrize("bug", [True, False])
def test_attention_scores_accumulated_in_bfloat16_are_over_budget(bug: bool) -> None:
    q, k, v = _qkv(BF16, D=256)
    got = attention_by_hand(q, k, v, accumulate=BF16 if bug else None)
    report = error_budget(ref.attention_forward, (q, k, v), {"score": "scaled_dot"},
                          got={"context": got})
    assert report.ok is not bug, str(report)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("bug", [True, False])
def test_a_softmax_without_the_max_subtracted_is_over_budget(dtype, bug: bool) -> None:
    # scores near 100 (bfloat16's exp overflows past 88.7) or 15 (float16's past 11.1)
    q, k, v = _qkv(dtype, D=16, score_size=35.0 if dtype == BF16 else 5.0)
    got = attention_by_hand(q, k, v, subtract_max=not bug, dtype=dtype)
    report = error_budget(ref.attention_forward, (q, k, v), {"score": "scaled_dot"},
                          got={"context": got})
    assert report.ok is not bug, str(report)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("bug", [True, False])
def test_an_online_softmax_without_the_rescale_is_over_budget(dtype, bug: bool) -> None:
    q, k, v = _qkv(dtype, D=32, rising=True)
    got = attention_by_hand(q, k, v, block=16, rescale=not bug, dtype=dtype)
    report = error_budget(ref.attention_forward, (q, k, v), {"score": "scaled_dot"},
                          got={"context": got})
    assert report.ok is not bug, str(report)
