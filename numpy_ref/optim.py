r"""Optimizers with `torch.optim`'s update rules and defaults, and gradient-norm clipping.

Each optimizer holds a params dict (the arrays themselves, updated in place by ``step``) and
its own state (momentum buffers, moment estimates) keyed like it. ``step(grads)`` takes a dict
with the same keys. g is a gradient, p a parameter, lr the learning rate, wd the weight decay,
and k counts the steps from 1.

SGD (torch.optim.SGD)
---------------------
    g = g + wd p
    b = g (first step), else  b = mu b + (1 - dampening) g          (when momentum mu > 0)
    g = g + mu b (nesterov),  else  g = b
    p = p - lr g

Adam (torch.optim.Adam; AdamW below)
------------------------------------
    g = g + wd p                                    (Adam's L2 weight decay)
    m = m + (1 - beta1) (g - m)                     (torch's lerp: beta1 m + (1 - beta1) g)
    v = beta2 v + (1 - beta2) g^2
    v_max = max(v_max, v)                           (amsgrad; then v_max replaces v below)
    p = p - (lr / (1 - beta1^k)) m / (sqrt(v) / sqrt(1 - beta2^k) + eps)

AdamW: the same with decoupled weight decay: ``p = p (1 - lr wd)`` first, and no ``wd p`` in g.
The products are evaluated in torch's order (``p + (step * m) / denom``), so float64 runs
agree with torch's to the last bits for many steps.

clip_grad_norm (torch.nn.utils.clip_grad_norm_)
-----------------------------------------------
    total = || (||g_1||, ||g_2||, ...) ||           (the norm of the per-array norms)
    g = g * min(1, max_norm / (total + 1e-6))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from numpy_ref.contract import optim as contract


class SGD:
    """Stochastic gradient descent with momentum, as `torch.optim.SGD` (same defaults).

    ``b = mu b + (1 - dampening) g``; ``p -= lr b`` (``g + mu b`` with nesterov);
    the `numpy_ref.optim` module docstring."""

    def __init__(self, params: Mapping[str, np.ndarray], lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
                 ) -> None:
        self.params = contract.params_dict(params)
        self.lr = contract.hyper("lr", lr)
        self.momentum = contract.hyper("momentum", momentum)
        self.dampening = float(dampening)
        self.weight_decay = contract.hyper("weight_decay", weight_decay)
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov: needs momentum > 0 and dampening = 0 (as torch), got "
                             f"momentum={momentum}, dampening={dampening}")
        self.nesterov = bool(nesterov)
        self.momentum_buffer: dict[str, np.ndarray] = {}

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """Update every parameter in place from its gradient (same keys as params)."""
        grads = contract.grads_like(grads, self.params)
        for k, p in self.params.items():
            g = grads[k]
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                b = self.momentum_buffer.get(k)
                if b is None:
                    b = self.momentum_buffer[k] = g.copy()
                else:
                    b *= self.momentum
                    b += (1 - self.dampening) * g
                g = g + self.momentum * b if self.nesterov else b
            p -= self.lr * g


class Adam:
    """Adam (Kingma & Ba), as `torch.optim.Adam` (same defaults, L2 weight decay).

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr / (1 - b1^k) m / (sqrt(v / (1 - b2^k)) + eps)``;
    the `numpy_ref.optim` module docstring."""

    decoupled = False  # AdamW sets this: weight decay applied to p, not added to g

    def __init__(self, params: Mapping[str, np.ndarray], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        self.params = contract.params_dict(params)
        self.lr = contract.hyper("lr", lr)
        self.betas = contract.betas(betas)
        self.eps = contract.hyper("eps", eps)
        self.weight_decay = contract.hyper("weight_decay", weight_decay)
        self.amsgrad = bool(amsgrad)
        self.steps = 0
        self.exp_avg = {k: np.zeros_like(p) for k, p in self.params.items()}  # m
        self.exp_avg_sq = {k: np.zeros_like(p) for k, p in self.params.items()}  # v
        self.max_exp_avg_sq = ({k: np.zeros_like(p) for k, p in self.params.items()}
                               if self.amsgrad else {})

    def _begin_step(self, grads: Mapping[str, np.ndarray]):
        """Check grads, count the step k; return (grads, lr / (1 - beta1^k),
        sqrt(1 - beta2^k)), the step's bias corrections as torch computes them."""
        grads = contract.grads_like(grads, self.params)
        beta1, beta2 = self.betas
        self.steps += 1
        return (grads, self.lr / (1 - beta1**self.steps), (1 - beta2**self.steps) ** 0.5)

    def step(self, grads: Mapping[str, np.ndarray]) -> None:
        """Update every parameter in place from its gradient (same keys as params)."""
        grads, step_size, bias_correction2_sqrt = self._begin_step(grads)
        beta1, beta2 = self.betas
        for k, p in self.params.items():
            g = grads[k]
            if self.weight_decay and self.decoupled:
                p *= 1 - self.lr * self.weight_decay
            elif self.weight_decay:
                g = g + self.weight_decay * p
            m, v = self.exp_avg[k], self.exp_avg_sq[k]
            m += (1 - beta1) * (g - m)
            v *= beta2
            v += (1 - beta2) * (g * g)
            if self.amsgrad:
                np.maximum(self.max_exp_avg_sq[k], v, out=self.max_exp_avg_sq[k])
                v = self.max_exp_avg_sq[k]
            denom = np.sqrt(v) / bias_correction2_sqrt + self.eps
            p -= (step_size * m) / denom


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter), as `torch.optim.AdamW`: decoupled weight decay, default
    1e-2: ``p *= 1 - lr wd`` first, then Adam's step without ``wd p`` in g (the
    `numpy_ref.optim` module docstring)."""

    decoupled = True

    def __init__(self, params: Mapping[str, np.ndarray], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)


def clip_grad_norm(grads: Mapping[str, np.ndarray], max_norm: float,
                   norm_type: float = 2.0) -> Any:
    """``g *= min(1, max_norm / (total + 1e-6))``, total the norm of the per-array norms:
    scale `grads` in place so that their total norm is at most `max_norm`, as
    `torch.nn.utils.clip_grad_norm_`; returns the total norm before clipping (the
    `numpy_ref.optim` module docstring).

    grads : name -> array (any shapes, one float dtype).  norm_type : p >= 1 or math.inf.
    The scale is ``min(1, max_norm / (total + 1e-6))`` (torch's 1e-6 included); the arrays
    are multiplied by it even when it is 1, as torch does (exact: a product with 1).
    """
    grads = contract.params_dict(grads)
    max_norm = contract.hyper("max_norm", max_norm)
    norm_type = contract.hyper("norm_type", norm_type, low=1.0) if norm_type != math.inf \
        else math.inf
    dtype = next(iter(grads.values())).dtype
    norms = np.array([np.linalg.norm(g.reshape(-1), norm_type) for g in grads.values()], dtype)
    total = dtype.type(np.linalg.norm(norms, norm_type))
    coef = min(dtype.type(max_norm) / (total + dtype.type(1e-6)), dtype.type(1.0))
    for g in grads.values():
        g *= coef
    return total
