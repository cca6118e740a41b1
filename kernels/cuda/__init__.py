"""CUDA kernels (numba-cuda) of the single-query attention core, forward and backward.

Import it explicitly (``from kernels import cuda as kcuda``); ``import kernels`` does not. The
import itself touches no driver: the kernels are compiled on their first call, so this package
imports on a machine without a GPU, where `is_available` is False. With
``NUMBA_ENABLE_CUDASIM=1`` (set before numba is first imported) everything runs on numba's
CUDA simulator instead, slowly, which is how the tests exercise it without a GPU.

The math and the launch layout: `kernels.cuda.attention_kernels` (the device kernels); what
is supported, the checks and the transfers: `kernels.cuda.attention` (the host side).
"""

from __future__ import annotations

from numba import cuda

from kernels.cuda.attention import CudaAttentionCache, attention_backward, attention_forward


def is_available() -> bool:
    """Whether the kernels can run here: ``numba.cuda.is_available()`` (a usable GPU and
    driver, or the simulator under ``NUMBA_ENABLE_CUDASIM=1``)."""
    return bool(cuda.is_available())


__all__ = ["CudaAttentionCache", "attention_backward", "attention_forward", "is_available"]
