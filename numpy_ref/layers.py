r"""The layers around the LSTM and attention, forward and backward by hand: embedding, linear,
cross-entropy. Parameters are `torch.nn` state_dict entries (``weight``, ``bias``).

Shapes
------
V  vocabulary rows          E  embedding size        ...  any leading axes
I  input features           O  output features
N  batch                    C  classes               d...  extra axes of [N, C, d...] inputs
M  = N * d1 * ...: the cross-entropy's rows, each a distribution over C classes

Embedding (torch.nn.Embedding)
------------------------------
    out[..., :] = W[ids[...], :]                    W [V, E], ids integer [...], out [..., E]
    dW[v] = sum over the positions p with ids[p] = v of d_out[p]      (0 at padding_idx)

Linear (torch.nn.Linear)
------------------------
    y = x W^T + b                                   x [..., I], W [O, I], b [O], y [..., O]
    dx = dy W,   dW = dy^T x,   db = sum dy         (the leading axes flattened into rows)

Cross-entropy (torch.nn.functional.cross_entropy)
-------------------------------------------------
With logits z [M, C] (the class axis moved last), log p = z - logsumexp(z) (the row max
subtracted first), and per row a nonnegative target weighting q [M, C]:

    class indices t:  q_ic = (1 - ls) w_t 1[c = t_i] + (ls / C) w_c,   q_i = 0 where t_i is
                      ignore_index
    probabilities P:  q_ic = w_c ((1 - ls) P_ic + ls / C)

    loss_i = -sum_c q_ic log p_ic

w are the class weights (1 when not given), ls the label smoothing. Reduction "none" returns
loss_i shaped like the targets, "sum" their sum, "mean" their sum over a denominator: the sum of
w_{t_i} over the rows not ignored (class indices; their count without weights: an all-ignored
batch gives NaN, as torch) or M (probabilities). Since d log p_ic / dz_ij = 1[c = j] - p_ij,

    dz_ij = d_loss_i (p_ij sum_c q_ic - q_ij)           (d_loss_i = d_loss / denominator for
                                                          "mean", d_loss for "sum")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from numpy_ref.contract import checks, unchanged
from numpy_ref.contract import layers as contract
from numpy_ref.contract.fields import documented
from numpy_ref.precision import emulated, rounded, same_precision

# --------------------------------------------------------------------------------------------
# embedding


@documented
class EmbeddingCache(NamedTuple):
    """What `embedding_backward` needs."""

    ids: np.ndarray  # [...] integer, every entry in 0..V-1; read
    weight_shape: tuple[int, int]  # (V, E)
    dtype: np.dtype  # the weight's dtype: d_weight's
    padding_idx: int | None  # in 0..V-1; its row gets no gradient
    fingerprints: unchanged.Fingerprints | None = None  # ids as the forward saw them (unless
    #   it converted them to an array); the backward checks them first
    #   (`numpy_ref.contract.unchanged`)


@same_precision()
def embedding_forward(
    ids: np.ndarray, params: Mapping[str, np.ndarray], *, padding_idx: int | None = None
) -> tuple[np.ndarray, EmbeddingCache]:
    """Look up rows of ``params["weight"]`` [V, E]: out [..., E] for integer ids [...].

    ``out[...] = W[ids[...]]`` (see the `numpy_ref.layers` module docstring).

    Every id must be in 0..V-1 (a negative one is an error, not a count from the end).
    `padding_idx` (in -V..V-1, as torch) only stops that row's gradient; its output is the row
    as stored, which torch initialises to zeros.
    """
    given = ids
    ids, weight, padding_idx = contract.embedding(ids, params, padding_idx)
    out = weight[ids]  # [..., E]
    fingerprints = unchanged.record("embedding_forward", "embedding_backward",
                                    [("ids", ids if ids is given else None)])
    return out, EmbeddingCache(ids, weight.shape, weight.dtype, padding_idx, fingerprints)


@same_precision(backward=True)
def embedding_backward(d_out: np.ndarray, cache: EmbeddingCache) -> dict[str, np.ndarray]:
    """Backward of `embedding_forward`: d_out [..., E] -> {"weight": [V, E]}.

    ``dW[v] = sum of d_out[p] over the positions p with ids[p] = v`` (0 at padding_idx); see
    the `numpy_ref.layers` module docstring."""
    ids, (V, E), dtype, padding_idx, fingerprints = checks.cache_of(cache, EmbeddingCache,
                                                                    "embedding_forward")
    unchanged.check(fingerprints)
    d_out = contract.cotangent("d_out", d_out, (*ids.shape, E), dtype, "the embedding output")
    d_weight = np.zeros((V, E), dtype)
    if emulated() is None:
        np.add.at(d_weight, ids.reshape(-1), d_out.reshape(-1, E))  # out = W[ids]: scatter-add
    else:  # float16/bfloat16: torch's CPU backward adds the rows in the dtype, in order
        for i, row in zip(ids.reshape(-1), d_out.reshape(-1, E), strict=True):
            d_weight[i] = rounded(d_weight[i] + row)
    if padding_idx is not None:
        d_weight[padding_idx] = 0
    return {"weight": d_weight}


# --------------------------------------------------------------------------------------------
# linear


@documented
class LinearCache(NamedTuple):
    """What `linear_backward` needs."""

    x: np.ndarray  # [..., I]  the input; read for dW
    weight: np.ndarray  # [O, I]  read for dx
    has_bias: bool  # whether params had a bias (then d_params has one)
    fingerprints: unchanged.Fingerprints | None = None  # x and the weight as the forward saw
    #   them; the backward checks them first (`numpy_ref.contract.unchanged`)


@same_precision()
def linear_forward(x: np.ndarray, params: Mapping[str, np.ndarray]
                   ) -> tuple[np.ndarray, LinearCache]:
    """``y = x W^T + b``: x [..., I], params {"weight": [O, I], "bias": [O] (optional)} ->
    y [..., O]. Its backward and derivation: `linear_backward`,
    the `numpy_ref.layers` module docstring."""
    x, weight, bias = contract.linear(x, params)
    # one GEMM over all leading axes: a stacked [B, T, I] @ [I, O] is a loop of small ones
    y = x.reshape(-1, x.shape[-1]) @ weight.T  # [rows, O]
    if bias is not None:
        y += bias
    fingerprints = unchanged.record("linear_forward", "linear_backward",
                                    [("x", x), ("params['weight']", weight)])
    return y.reshape(*x.shape[:-1], weight.shape[0]), LinearCache(x, weight, bias is not None,
                                                                  fingerprints)


@same_precision(backward=True)
def linear_backward(d_y: np.ndarray, cache: LinearCache
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward of `linear_forward`: d_y [..., O] -> (d_x [..., I], {"weight", "bias"}).

    ``dx = dy W``, ``dW = dy^T x``, ``db = sum dy`` over the leading axes flattened into rows
    (the `numpy_ref.layers` module docstring)."""
    x, weight, has_bias, fingerprints = checks.cache_of(cache, LinearCache, "linear_forward")
    unchanged.check(fingerprints)
    d_y = contract.cotangent("d_y", d_y, (*x.shape[:-1], weight.shape[0]), x.dtype,
                             "the linear output")
    rows_dy = d_y.reshape(-1, weight.shape[0])  # [rows, O]
    d_params = {"weight": rows_dy.T @ x.reshape(-1, weight.shape[1])}  # y = x W^T
    if has_bias:
        d_params["bias"] = rows_dy.sum(axis=0)
    return (rows_dy @ weight).reshape(x.shape), d_params


# --------------------------------------------------------------------------------------------
# cross-entropy


@documented
class CrossEntropyCache(NamedTuple):
    """What `cross_entropy_backward` needs."""

    probs: np.ndarray  # [M, C]  softmax of the logits; read
    targets: np.ndarray  # [M] int64 class indices, or [M, C] probabilities; read
    probabilities: bool  # which of the two `targets` holds
    class_weight: np.ndarray | None  # [C]
    label_smoothing: float  # ls in the module docstring's q
    ignore_index: int  # the class-index target whose rows contribute nothing
    reduction: str  # "mean", "sum" or "none"
    denominator: float  # what "mean" divided by (1 otherwise)
    logits_shape: tuple[int, ...]  # [C], [N, C] or [N, C, d...]: d_logits is shaped so
    fingerprints: unchanged.Fingerprints | None = None  # probability targets (unless copied)
    #   and the class weights as the forward saw them; the backward checks them first
    #   (`numpy_ref.contract.unchanged`)


def _target_weights(targets, probabilities, class_weight, ls, ignore_index, C, dtype):
    """q [M, C] of the module docstring (0 on the ignored rows)."""
    w = np.ones(C, dtype) if class_weight is None else class_weight
    if probabilities:
        return w * ((1 - ls) * targets + ls / C)
    rows = np.nonzero(targets != ignore_index)[0]
    t = targets[rows]
    q = np.zeros((len(targets), C), dtype)
    q[rows] = (ls / C) * w
    q[rows, t] += (1 - ls) * w[t]
    return q


@same_precision()
def cross_entropy_forward(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, CrossEntropyCache]:
    """`torch.nn.functional.cross_entropy` of logits and targets.

    ``loss_i = -sum_c q_ic log softmax(z_i)_c``, q the target weighting (one-hot times the
    class weight, label-smoothed; or probabilities), reduced by mean, sum or none. The
    weighting and the reductions: the `numpy_ref.layers` module docstring.

    Parameters
    ----------
    logits : [N, C], [N, C, d...] or [C] (one unbatched row), float32 or float64.
    targets : integer class indices [N] / [N, d...] / [] (each in 0..C-1 or ignore_index), or
        float class probabilities shaped like logits.
    ignore_index : rows whose target is this index take no part (class indices only).
    reduction : "mean", "sum" or "none".
    label_smoothing : ls in [0, 1]: the target becomes (1 - ls) onehot + ls / C.
    weight : optional class weights [C].

    Returns
    -------
    loss : a scalar of the logits' dtype ("mean", "sum") or [N, d...] ("none").  cache.
    """
    z, t, class_weight, probabilities = contract.cross_entropy(
        logits, targets, ignore_index, reduction, label_smoothing, weight)
    dtype, C = logits.dtype, z.shape[1]
    s = z - z.max(axis=1, keepdims=True)  # [M, C], max-subtracted
    # float16/bfloat16 (`rounded`): torch's CPU log_softmax keeps each row's sum of
    # exponentials in the dtype, and writes its output in it
    log_sum = np.log(rounded(np.exp(s).sum(axis=1, keepdims=True)))
    log_p = rounded(s - log_sum)  # log softmax
    q = _target_weights(t, probabilities, class_weight, label_smoothing, ignore_index, C, dtype)
    loss_rows = -(q * log_p).sum(axis=1)  # [M]
    denominator = contract.cross_entropy_denominator(reduction, t, probabilities, class_weight,
                                                     ignore_index)
    if reduction == "none":
        loss = loss_rows.reshape(contract.row_shape(logits.shape))
    else:  # all ignored: the mean is NaN, as torch's
        total = loss_rows.sum()
        if emulated() is not None:  # float16/bfloat16: torch's nll_loss adds rows in the dtype
            total = np.float32(0)
            for row in rounded(loss_rows):
                total = rounded(np.asarray(total + row))
        loss = dtype.type(total / denominator if denominator else np.nan)
    fingerprints = unchanged.record("cross_entropy_forward", "cross_entropy_backward", [
        ("targets", unchanged.shared(targets, t) if probabilities else None),
        ("weight", class_weight)])
    cache = CrossEntropyCache(np.exp(log_p), t, probabilities, class_weight, float(label_smoothing),
                              int(ignore_index), reduction, denominator, logits.shape,
                              fingerprints)
    return loss, cache


@same_precision(backward=True)
def cross_entropy_backward(d_loss: Any, cache: CrossEntropyCache) -> np.ndarray:
    """Backward of `cross_entropy_forward`: d_loss (a scalar, or [N, d...] for reduction
    "none") -> d_logits, shaped like the logits.

    ``dz_ij = d_loss_i (p_ij sum_c q_ic - q_ij)`` with p = softmax(z) (``p - onehot`` for
    plain targets, mean reduction divided by its denominator); derivation:
    the `numpy_ref.layers` module docstring."""
    (probs, t, probabilities, class_weight, ls, ignore_index, reduction, denominator,
     logits_shape, fingerprints) = checks.cache_of(cache, CrossEntropyCache,
                                                   "cross_entropy_forward")
    unchanged.check(fingerprints)
    dtype, C = probs.dtype, probs.shape[1]
    d_rows = contract.cross_entropy_cotangent(d_loss, reduction, denominator, logits_shape, dtype)
    q = _target_weights(t, probabilities, class_weight, ls, ignore_index, C, dtype)
    d_z = d_rows[:, None] * (probs * q.sum(axis=1, keepdims=True) - q)  # [M, C]
    return contract.logits_layout(d_z, logits_shape)
