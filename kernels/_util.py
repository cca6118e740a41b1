"""Small jitted helpers shared by the kernels.

The cores keep vector work (dot products, axpys) in the data's dtype, so that float32 loops run
on float32 SIMD lanes, and keep scalar statistics (softmax sums, log-sum-exp, delta) in float64,
so that float32 results are as accurate as torch's. `as_type_of` is the cast between the two
that works for either dtype inside one generic kernel.
"""

from __future__ import annotations

from numba import njit
from numba.extending import overload

from kernels._config import JIT


def as_type_of(x, like):
    """``x`` cast to the scalar type of ``like`` (float32 or float64)."""
    return type(like)(x)


@overload(as_type_of, jit_options=JIT)
def _as_type_of_jit(x, like):
    target = like  # the numba type of `like`, e.g. float32; calling it casts

    def impl(x, like):
        return target(x)

    return impl


@njit(**JIT)
def dot(a, b, zero):
    """``sum_h a[h] * b[h]`` over a's length, accumulated in the type of `zero`."""
    s = zero
    for h in range(a.shape[0]):
        s += a[h] * b[h]
    return s
