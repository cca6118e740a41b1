"""Small jitted helpers shared by the kernels.

The cores keep vector work (dot products, axpys) in the data's dtype, so that float32 loops run
on float32 SIMD lanes, and keep scalar statistics (softmax sums, log-sum-exp, delta) in float64,
so that float32 results are as accurate as torch's. `as_type_of` is the cast between the two
that works for either dtype inside one generic kernel. `exp_nonpositive` and
`expm1_nonpositive` are exp and expm1 for arguments <= 0 (softmax after the max is subtracted,
sigmoid and tanh of -|x|) written so that LLVM vectorizes a loop calling them; `sigmoid` and
`tanh` are built on them (accuracy measured in `kernels.lstm`'s docstring).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

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


# --------------------------------------------------------------------------------------------
# an exp that vectorizes (numba has no vector math library here: np.exp stays scalar libm)
#
# exp(y) for y <= 0: n = floor(y log2(e) + 1/2), r = y - n ln2 in [-ln2/2, ln2/2],
# q = expm1(r) by its Taylor series (degree 7 in float32, 13 in float64: truncation below
# half an ulp), exp(y) = 2^n (1 + q) and expm1(y) = 2^n q + (2^n - 1) (exactly q when n = 0).
# ln2 = ln2_hi + ln2_lo (fdlibm's split): ln2_hi has few enough bits that n ln2_hi is exact, so
# r is accurate with or without a fused multiply-add. Arguments below `low` (where 2^n would
# leave the normal range) give exp = 0, expm1 = -1.

_EXP_CONSTANTS = {
    np.dtype(dt): (
        dt(low),
        dt(1.4426950408889634),  # log2(e)
        dt(ln2_hi),
        dt(ln2_lo),
        tuple(dt(1.0 / math.factorial(k)) for k in range(degree, 1, -1)),  # 1/k!, Horner order
    )
    for dt, low, ln2_hi, ln2_lo, degree in (
        (np.float32, -87.6, 6.9314575195e-01, 1.4286067653e-06, 7),
        (np.float64, -708.7, 6.93147180369123816490e-01, 1.90821492927058770002e-10, 13),
    )
}


def _pow2(n):
    """2.0 ** n for an integral float n in the normal exponent range, in n's dtype."""
    return type(n)(2.0**int(n))


@intrinsic
def _pow2_bits(typingctx, n):
    """2^n by writing n + bias into the exponent field (fptosi, add, shift, bitcast)."""
    if not isinstance(n, types.Float):
        return None

    def codegen(context, builder, signature, args):
        int_type, bias, shift = ((ir.IntType(32), 127, 23) if n == types.float32
                                 else (ir.IntType(64), 1023, 52))
        biased = builder.add(builder.fptosi(args[0], int_type), ir.Constant(int_type, bias))
        bits = builder.shl(biased, ir.Constant(int_type, shift))
        return builder.bitcast(bits, context.get_value_type(n))

    return n(n), codegen


@overload(_pow2, jit_options=JIT)
def _pow2_jit(n):
    def impl(n):
        return _pow2_bits(n)

    return impl


@njit(**JIT)
def _exp_reduce(y, low, log2e, ln2_hi, ln2_lo, coefficients):
    """y <= 0 -> (s = 2^n, q = expm1(r), n) with exp(y) = s (1 + q); y is clamped to low."""
    yc = y if y > low else low  # also maps NaN to low: the callers return NaN themselves
    n = np.floor(yc * log2e + as_type_of(0.5, y))
    r = (yc - n * ln2_hi) - n * ln2_lo
    p = coefficients[0]
    for c in coefficients[1:]:
        p = p * r + c
    return _pow2(n), r + r * r * p, n


@njit(**JIT)
def _exp_with(y, low, log2e, ln2_hi, ln2_lo, coefficients):
    """exp(y) for y <= 0: 0 below `low`, NaN for NaN; branch-free (selects), so that a loop
    calling it vectorizes."""
    s, q, _ = _exp_reduce(y, low, log2e, ln2_hi, ln2_lo, coefficients)
    e = s * q + s
    e = as_type_of(0.0, y) if y < low else e
    return y if y != y else e


@njit(**JIT)
def _expm1_with(y, low, log2e, ln2_hi, ln2_lo, coefficients):
    """expm1(y) for y <= 0: -1 below `low`, NaN for NaN; exactly q near 0 (n = 0)."""
    one = as_type_of(1.0, y)
    s, q, n = _exp_reduce(y, low, log2e, ln2_hi, ln2_lo, coefficients)
    m = q if n == 0 else s * q + (s - one)
    m = -one if y < low else m
    return y if y != y else m


def exp_nonpositive(y):
    """exp(y) for a float32/float64 scalar y <= 0 (or NaN), in y's dtype."""
    return _exp_with(y, *_EXP_CONSTANTS[np.asarray(y).dtype])


def expm1_nonpositive(y):
    """exp(y) - 1 for a float32/float64 scalar y <= 0 (or NaN), in y's dtype."""
    return _expm1_with(y, *_EXP_CONSTANTS[np.asarray(y).dtype])


# Inside jitted code the constants are picked by the argument's type while compiling.
@overload(exp_nonpositive, jit_options=JIT)
def _exp_nonpositive_jit(y):
    constants = _EXP_CONSTANTS[np.dtype(y.name)]
    return lambda y: _exp_with(y, *constants)


@overload(expm1_nonpositive, jit_options=JIT)
def _expm1_nonpositive_jit(y):
    constants = _EXP_CONSTANTS[np.dtype(y.name)]
    return lambda y: _expm1_with(y, *constants)


# --------------------------------------------------------------------------------------------
# activations that vectorize (on `exp_nonpositive` / `expm1_nonpositive` above)


@njit(**JIT)
def sigmoid(x):
    """1 / (1 + exp(-x)) from e = exp(-|x|) in (0, 1]: no overflow, relative accuracy."""
    one = as_type_of(1.0, x)
    e = exp_nonpositive(-abs(x))
    # np.divide, not `/`: Python's division checks for a zero divisor and raises, a branch
    # out of the loop that stops LLVM from vectorizing it (10x slower); here 1 + e >= 1
    return np.divide(one if x >= 0 else e, one + e)


@njit(**JIT)
def tanh(x):
    """tanh(x) = sign(x) (-m / (2 + m)), m = expm1(-2|x|) in [-1, 0]."""
    a = abs(x)
    a = as_type_of(40.0, x) if a > 40 else a  # tanh(40) is 1 in float64; 2|x| cannot overflow
    m = expm1_nonpositive(-(a + a))
    t = np.divide(-m, as_type_of(2.0, x) + m)  # np.divide: see sigmoid; 2 + m >= 1
    return t if x >= 0 else -t


# --------------------------------------------------------------------------------------------
# a max that vectorizes
#
# LLVM turns `m = x if x > m else m` into SIMD lanes only under `nnan`, which _config leaves
# off (and which, in a reduction, would also drop a NaN). Integers have no such problem, and
# IEEE floats are ordered like their bit patterns read as sign-magnitude integers: `_flip`,
# b ^ ((b >> (bits - 1)) & 0x7f..f), flips the magnitude bits of negative numbers, so a
# negative float with magnitude bits M becomes -1 - M, below every non-negative pattern and
# decreasing in M; it is its own inverse. Keyed this way, -inf < finite < +inf and
# -0.0 < +0.0; a NaN of either sign is given the largest key, so the max of a vector holding a
# NaN is NaN (as np.max). At (8192 rows x 256) float32: 0.20 ms against 0.90 ms for the float
# compare loop (vpmaxsd on zmm registers instead of vmaxss).

_INT_OF = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}


def _flip(b):
    """Sign-magnitude <-> the ordered integer: flips the magnitude bits of a negative `b` (an
    int32 or int64). Its own inverse."""
    bits = 8 * np.dtype(type(b)).itemsize
    return type(b)(b ^ ((b >> (bits - 1)) & ((1 << (bits - 1)) - 1)))


@overload(_flip, jit_options=JIT)
def _flip_jit(b):
    target, bits = b, b.bitwidth
    shift, magnitude = bits - 1, (1 << (bits - 1)) - 1
    return lambda b: target(b ^ ((b >> shift) & magnitude))  # numba widens; cast back


def _exponent_ones(b):
    """The bit pattern of +inf for the float the integer type of `b` holds."""
    return (0xFF << 23) if np.dtype(type(b)).itemsize == 4 else (0x7FF << 52)


def _order_key(b):
    """The key of a float's bit pattern `b` for `max_prefix`: `_flip(b)`, or the largest
    integer for a NaN of either sign."""
    magnitude = np.iinfo(type(b)).max
    return type(b)(magnitude) if (b & magnitude) > _exponent_ones(b) else _flip(b)


@overload(_order_key, jit_options=JIT)
def _order_key_jit(b):
    target = b
    magnitude = (1 << (b.bitwidth - 1)) - 1
    inf_bits = (0xFF << 23) if b.bitwidth == 32 else (0x7FF << 52)
    return lambda b: target(magnitude) if (b & magnitude) > inf_bits else _flip(b)


def _float_from_bits(b):
    """The float32/float64 whose bit pattern is the int32/int64 `b`."""
    return np.array(b).view({np.int32: np.float32, np.int64: np.float64}[type(b)])[()]


@intrinsic
def _float_from_bits_intrinsic(typingctx, b):
    if b not in (types.int32, types.int64):
        return None
    out = types.float32 if b == types.int32 else types.float64

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(out))

    return out(b), codegen


@overload(_float_from_bits, jit_options=JIT)
def _float_from_bits_jit(b):
    return lambda b: _float_from_bits_intrinsic(b)


def max_prefix(row, n):
    """max(row[:n]) of a contiguous float32/float64 vector, n >= 1, through integer keys: NaN
    when any of them is NaN (then a NaN with the sign bit clear), +0.0 over -0.0."""
    bits = row[:n].view(_INT_OF[row.dtype])
    m = _order_key(bits[0])
    for j in range(1, n):
        m = max(m, _order_key(bits[j]))
    return _float_from_bits(_flip(m))


@overload(max_prefix, jit_options=JIT)
def _max_prefix_jit(row, n):
    int_type = _INT_OF[np.dtype(row.dtype.name)]

    def impl(row, n):
        bits = row[:n].view(int_type)
        m = _order_key(bits[0])
        for j in range(1, n):
            m = max(m, _order_key(bits[j]))
        return _float_from_bits(_flip(m))

    return impl
