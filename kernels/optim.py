r"""Numba optimizers: `numpy_ref.optim`'s classes with a fused Adam/AdamW step.

numpy_ref's Adam step makes about ten passes over each parameter (the lerp, the square, the
sqrt, the division, each a NumPy call with a temporary); `_adam_update` makes one, reading g,
m, v (and v_max) and writing p, m, v once, with the same operations in the same order (torch's:
``m += (1 - beta1) (g - m)``, ``v = beta2 v + (1 - beta2) g^2``,
``p -= (step_size m) / (sqrt(v) / sqrt(1 - beta2^k) + eps)``), compiled without fast-math
(`kernels._config.EXACT_JIT`), so every parameter comes out bit for bit as numpy_ref's. SGD and
clip_grad_norm are numpy_ref's own (one or two passes already).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numba import njit

from kernels._config import EXACT_JIT
from kernels._util import as_type_of
from numpy_ref import optim as reference
from numpy_ref.optim import SGD, clip_grad_norm

__all__ = ["SGD", "Adam", "AdamW", "clip_grad_norm"]


@njit(**EXACT_JIT)
def _adam_update(p, g, m, v, v_max, step_size, beta1, beta2, bc2_sqrt, eps, weight_decay,
                 decay_factor, amsgrad):
    """One Adam step over flat arrays p, g, m, v (and v_max when amsgrad), in place.

    weight_decay > 0: L2 decay (g + wd p); decay_factor != 1: AdamW's p (1 - lr wd) first.
    The scalars arrive in float64 and are cast to the data's dtype, as torch casts its
    Python-float arguments."""
    zero = as_type_of(0.0, p[0])
    one_b1 = as_type_of(1.0 - beta1, zero)
    b2, one_b2 = as_type_of(beta2, zero), as_type_of(1.0 - beta2, zero)
    size, c2, ep = as_type_of(step_size, zero), as_type_of(bc2_sqrt, zero), as_type_of(eps, zero)
    wd, keep = as_type_of(weight_decay, zero), as_type_of(decay_factor, zero)
    for i in range(p.shape[0]):
        pi, gi = p[i], g[i]
        if decay_factor != 1.0:  # loop-invariant tests: LLVM hoists them out of the loop
            pi = pi * keep
        if weight_decay != 0.0:
            gi = gi + wd * pi
        mi = m[i] + one_b1 * (gi - m[i])
        vi = b2 * v[i] + one_b2 * (gi * gi)
        m[i], v[i] = mi, vi
        if amsgrad:
            vi = max(v_max[i], vi)
            v_max[i] = vi
        # np.divide, not `/`: numba's `/` tests for a zero divisor and raises, a branch that
        # keeps LLVM from vectorizing the loop (3x slower here); the rounding is the same
        p[i] = pi - np.divide(size * mi, np.divide(np.sqrt(vi), c2) + ep)


class Adam(reference.Adam):
    """`numpy_ref.optim.Adam` with a one-pass fused step (same arguments, same updates)."""

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """Update every parameter in place from its gradient (same keys as params)."""
        grads, step_size, bc2_sqrt = self._begin_step(grads)  # the base class's bookkeeping
        beta1, beta2 = self.betas
        l2 = 0.0 if self.decoupled else self.weight_decay
        keep = 1.0 - self.lr * self.weight_decay if self.decoupled else 1.0
        for k, p in self.params.items():
            if not p.size:
                continue
            flat = p.reshape(-1)
            if not np.shares_memory(flat, p):  # a strided parameter: update through a copy
                flat = flat.copy()
            v_max = self.max_exp_avg_sq[k].reshape(-1) if self.amsgrad else flat[:0]
            _adam_update(flat, np.ascontiguousarray(grads[k]).reshape(-1),
                         self.exp_avg[k].reshape(-1), self.exp_avg_sq[k].reshape(-1), v_max,
                         step_size, beta1, beta2, bc2_sqrt, self.eps, l2, keep, self.amsgrad)
            if not np.shares_memory(flat, p):
                p[...] = flat.reshape(p.shape)


class AdamW(Adam):
    """`numpy_ref.optim.AdamW` with the fused step: decoupled weight decay, default 1e-2."""

    decoupled = True

    def __init__(self, params: Mapping[str, np.ndarray], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)
