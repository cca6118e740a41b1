"""`kernels.warmup()` compiles every kernel of the package, for float32 and float64."""

from __future__ import annotations

import numba
import pytest
from numba.core.registry import CPUDispatcher

import kernels
from kernels import (
    attention,
    attention_additive,
    attention_flash,
    attention_single,
    layers,
    lstm,
    optim,
    recurrent,
    softmax,
)


def test_warmup_calls_every_op_in_both_dtypes() -> None:
    seconds = kernels.warmup(progress=False)
    names = {name.rsplit(", ", 1)[0] for name in seconds}
    assert {name + ", float32" for name in names} | {name + ", float64" for name in names} \
        == set(seconds)
    assert {"attention, one query", "attention, heads (grouped)", "LSTM", "optimizers"} <= names
    assert all(s >= 0 for s in seconds.values())


# Called only from inside other kernels, where they compile as part of their caller (their own
# dispatchers record no signature), or kept as a measured baseline.
INNER = {"dot", "tanh", "sigmoid", "_clamp_length", "_single_finish", "_padded_forward_row",
         "_sigmoid_libm", "_clamp", "_row_limit", "_mask_row", "_write_weights",
         "_recompute_weights", "_softcap_slope", "additive_block", "additive_block_backward",
         "_tanh_rounded",
         "_cell_forward_v2", "_emit_hidden", "_cell_backward", "_hidden_backward", "_gemm",
         # the flash kernels' per-item bodies: when their callers load from Numba's on-disk
         # cache, these never compile on their own, so their signatures depend on the cache
         "_forward_item", "_backward_item",
         # the GRU/RNN steps' pointwise passes, inside the compiled recurrences
         "_gru_rz", "_gru_n", "_gru_step_backward", "_gru_reset_backward", "_carry",
         "_rnn_cell", "_rnn_cell_backward"}


@pytest.mark.skipif(bool(numba.config.DISABLE_JIT), reason="no compiled dispatchers without JIT")
def test_after_warmup_every_jitted_kernel_has_both_dtypes() -> None:
    """Each compiled kernel of the modules users call has been compiled for float32 and
    float64 inputs (a kernel the warm-up never reaches would compile on a user's first call)."""
    kernels.warmup(progress=False)
    missing = []
    for module in (attention, attention_additive, attention_flash, attention_single, layers,
                   lstm, optim, recurrent, softmax):
        for name, obj in vars(module).items():
            if not isinstance(obj, CPUDispatcher) or name in INNER or name.endswith("_v1") \
                    or name.startswith("_check"):
                continue
            text = " ".join(str(sig) for sig in obj.signatures)
            for dtype in ("float32", "float64"):
                if dtype not in text:
                    missing.append(f"{module.__name__}.{name} ({dtype})")
    assert not missing, f"not compiled by warmup: {missing}"
