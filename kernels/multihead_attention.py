"""`numpy_ref.multihead_attention` on the Numba kernels: the same two functions, defaulting to
``backend=kernels`` (the projections are BLAS products either way; the attention core is
`kernels.attention_forward`'s batched heads path). Read `numpy_ref.multihead_attention` for
the math, shapes, options and the one difference from torch (a query that sees no key).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

import numpy as np

from numpy_ref import multihead_attention as _reference
from numpy_ref.contract.backend import op_module
from numpy_ref.multihead_attention import MultiheadAttentionCache

__all__ = ["MultiheadAttentionCache", "multihead_attention_backward",
           "multihead_attention_forward"]


def multihead_attention_forward(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    num_heads: int,
    key_padding_mask: np.ndarray | None = None,
    attn_mask: np.ndarray | None = None,
    is_causal: bool = False,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    batch_first: bool = True,
    backend: ModuleType | None = None,
) -> tuple[np.ndarray, np.ndarray | None, MultiheadAttentionCache]:
    """`numpy_ref.multihead_attention_forward` with ``backend=kernels`` by default (None).

    query [N, Tq, E] / [Tq, N, E] / [Tq, E]; key [.., Tk, kdim], value [.., Tk, vdim] likewise.
    Returns output (like query), weights ([N, Tq, Tk], [N, h, Tq, Tk] or None) and the cache.
    """
    return _reference.multihead_attention_forward(
        query, key, value, params, num_heads=num_heads, key_padding_mask=key_padding_mask,
        attn_mask=attn_mask, is_causal=is_causal, need_weights=need_weights,
        average_attn_weights=average_attn_weights, batch_first=batch_first,
        backend=op_module(backend, "kernels"))


def multihead_attention_backward(
    d_output: np.ndarray,
    cache: MultiheadAttentionCache,
    *,
    d_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """`numpy_ref.multihead_attention_backward` (it runs on the forward's backend).

    d_output like the output, d_weights like the weights or None -> (d_query, d_key, d_value,
    d_params with the params' keys).
    """
    return _reference.multihead_attention_backward(d_output, cache, d_weights=d_weights)
