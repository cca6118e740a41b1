r"""Layer normalisation, forward and backward by hand: `torch.nn.LayerNorm` over the last axis,
and the Annotated Transformer's LayerNorm as an option of the same pair.

Shapes
------
x, y  [..., E]: every leading axis is a row of its own        weight (gamma), bias (beta)  [E]

Forward
-------
torch's (``variant="torch"``, nn.LayerNorm(E, eps, elementwise_affine, bias)):

    mu = mean(x),   var = mean((x - mu)^2)          (the biased variance, over E)
    r  = 1 / sqrt(var + eps),   x^ = (x - mu) r
    y  = x^ * gamma + beta                          (gamma, beta each optional)

the Annotated Transformer's (``variant="annotated"``: ``a_2 * (x - mean) / (std + eps) + b_2``
with ``std = x.std(-1)``, its params a_2 and b_2 being weight and bias here):

    sigma = sqrt(sum((x - mu)^2) / (E - 1))         (the unbiased std)
    r  = 1 / (sigma + eps),   x^ = (x - mu) r,      y = x^ * gamma + beta

Backward
--------
With g = dy * gamma (dy without a weight) and per row the means over E,

    d_gamma = sum over rows of dy * x^,   d_beta = sum over rows of dy
    torch's:      dx = r (g - mean(g) - x^ mean(g * x^))
    annotated:    dx = r (g - mean(g)) - x^ sum(g * x^) / ((E - 1) sigma)

The three terms of torch's dx: g passes through the scale r; the mean's gradient takes the
row's mean of g back out (every x_i moves mu); the variance's takes out the part of g along
x^ (every x_i moves var, by 2 (x_i - mu) / E). The annotated variant's last term is the same
projection through d sigma / dx_j = (x_j - mu) / ((E - 1) sigma) instead of var's. A constant
row has sigma = 0 there and its dx is NaN, as torch's autograd of ``x.std()`` gives; torch's
variant gives x^ = 0 and a finite dx (r = 1/sqrt(eps)).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from numpy_ref.contract import checks, unchanged
from numpy_ref.contract import layers as layers_contract
from numpy_ref.contract import transformer as contract
from numpy_ref.contract.fields import documented
from numpy_ref.precision import emulated, rounded, same_precision

__all__ = ["LayerNormCache", "layer_norm_backward", "layer_norm_forward"]


@documented
class LayerNormCache(NamedTuple):
    """What `layer_norm_backward` needs."""

    x_hat: np.ndarray  # [..., E]  the normalised input (x - mu) r; read
    r: np.ndarray  # [..., 1]  1 / sqrt(var + eps) (torch's) or 1 / (sigma + eps); read
    sigma: np.ndarray | None  # [..., 1]  the unbiased std (annotated variant; else None); read
    weight: np.ndarray | None  # [E]  gamma, or None without elementwise_affine; read
    has_bias: bool  # whether params had a bias (then d_params has one)
    variant: str  # "torch" or "annotated"
    fingerprints: unchanged.Fingerprints | None = None  # the weight as the forward saw it; the
    #   backward checks it first (`numpy_ref.contract.unchanged`)


@same_precision()
def layer_norm_forward(
    x: np.ndarray,
    params: Mapping[str, np.ndarray],
    *,
    eps: float = 1e-5,
    variant: str = "torch",
) -> tuple[np.ndarray, LayerNormCache]:
    """``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last axis
    (`torch.nn.LayerNorm`); the math and both variants: the `numpy_ref.layer_norm` module docstring.

    Parameters
    ----------
    x : [..., E], float32 or float64 (each leading position is a row).
    params : ``weight`` [E] and ``bias`` [E], each optional (``elementwise_affine=False``: an
        empty dict; ``bias=False``: the weight alone).
    eps : added to the variance (torch's), or to the std (annotated; that code's default is
        1e-6, pass it).
    variant : "torch" (biased variance, eps inside the root) or "annotated" (the Annotated
        Transformer's: unbiased std, eps added to it; needs E >= 2).

    Returns
    -------
    y : like x.  cache.
    """
    x, weight, bias, eps, variant = contract.layer_norm(x, params, eps, variant)
    E = x.shape[-1]
    with checks.quiet():
        centred = x - x.mean(axis=-1, keepdims=True)
        squares = (centred * centred).sum(axis=-1, keepdims=True)
        if variant == "torch":
            sigma = None
            r = 1 / np.sqrt(squares / E + eps)
        else:
            sigma = np.sqrt(squares / (E - 1))
            r = 1 / (sigma + eps)
        x_hat = centred * r
        y = x_hat if weight is None else x_hat * weight
        if bias is not None:
            y = y + bias
        if emulated() is not None and variant == "torch":
            # float16/bfloat16: torch saves the mean and 1/std in the dtype for its backward
            r = rounded(r)
            x_hat = (x - rounded(x.mean(axis=-1, keepdims=True))) * r
    fingerprints = unchanged.record("layer_norm_forward", "layer_norm_backward",
                                    [("params['weight']", weight)])
    return y, LayerNormCache(x_hat, r, sigma, weight, bias is not None, variant, fingerprints)


def _rowwise_sums(rows: np.ndarray, x_hat: np.ndarray, d_params: dict) -> dict:
    """d_weight = sum_i dy_i x^_i and d_bias = sum_i dy_i ([N, E] -> [E]) as torch's CPU layer
    norm backward forms them for float16/bfloat16: a row at a time into a buffer of the dtype
    (each addition rounded; exactly torch's result on one thread)."""
    sums = {}
    for key, term in (("weight", lambda i: rows[i] * x_hat[i]), ("bias", lambda i: rows[i])):
        if key in d_params:
            acc = np.zeros(rows.shape[1], np.float32)
            for i in range(rows.shape[0]):
                acc = rounded(acc + term(i))
            sums[key] = acc
    return sums


@same_precision(backward=True)
def layer_norm_backward(d_y: np.ndarray, cache: LayerNormCache
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward of `layer_norm_forward`: d_y [..., E] -> (d_x [..., E], d_params with the
    params' keys: ``weight`` and ``bias`` [E] where they were given).

    ``dx = r (g - mean(g) - x^ mean(g x^))`` with ``g = dy * weight`` (torch's variant; the
    annotated one's last term and the derivation: the `numpy_ref.layer_norm` module docstring).
    """
    x_hat, r, sigma, weight, has_bias, variant, fingerprints = checks.cache_of(
        cache, LayerNormCache, "layer_norm_forward")
    unchanged.check(fingerprints)
    d_y = layers_contract.cotangent("d_y", d_y, x_hat.shape, x_hat.dtype, "the layer norm output")
    E = x_hat.shape[-1]
    d_params = {}
    with checks.quiet():
        rows = d_y.reshape(-1, E)
        if weight is not None:
            d_params["weight"] = (rows * x_hat.reshape(-1, E)).sum(axis=0)
        if has_bias:
            d_params["bias"] = rows.sum(axis=0)
        if emulated() is not None:  # float16/bfloat16: torch's CPU kernel adds row by row
            d_params.update(_rowwise_sums(rows, x_hat.reshape(-1, E), d_params))
        g = d_y if weight is None else d_y * weight
        g_mean = g.mean(axis=-1, keepdims=True)
        projection = (g * x_hat).sum(axis=-1, keepdims=True)
        if variant == "torch":
            d_x = r * (g - g_mean - x_hat * (projection / E))
        else:
            d_x = r * (g - g_mean) - x_hat * (projection / ((E - 1) * sigma))
    return d_x, d_params
