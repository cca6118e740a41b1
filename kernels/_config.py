"""The one place that sets Numba's compilation options for every kernel in this package.

fastmath: only the flags that let reductions vectorize and math calls be approximated
(``reassoc`` is what turns a dot-product loop into SIMD lanes, about 2x here). Never ``nnan``
or ``ninf``: the masked softmax relies on a real -inf, and with those flags LLVM may assume
it cannot occur and fold comparisons against it away.

Elementwise updates that must round exactly as NumPy and torch do (the optimizer step) use
`EXACT_JIT`: no fast-math at all. They have no reduction to vectorize, so they lose no speed,
and without ``contract`` (fused multiply-adds) and ``arcp`` (reciprocals) every operation rounds
as the same NumPy expression does.

error_model "numpy": a float division by zero gives inf or NaN, as in NumPy, instead of
raising ZeroDivisionError out of the compiled code (Numba's default, "python", also tests every
divisor, a branch that keeps LLVM from vectorizing a loop). NaN and inf in the data propagate
as NaN; they never become an exception.

cache: compiled machine code is written next to the source (``__pycache__``), so a fresh
process pays the compile once per machine, not once per run. Numba keys a kernel's cache on its
own file's timestamp only: a jitted helper of another module that the kernel calls (and
compiles into itself) is not tracked, so after editing such a helper (`_util.py`,
`attention_additive.py`'s block kernels) delete ``kernels/__pycache__/*.nbi`` and ``*.nbc``, or
the kernels that call it keep the old machine code. A fresh install starts with no cache.
"""

from __future__ import annotations

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

JIT = {"cache": True, "fastmath": set(FASTMATH), "error_model": "numpy"}
PARALLEL_JIT = {**JIT, "parallel": True}
EXACT_JIT = {"cache": True, "error_model": "numpy"}
