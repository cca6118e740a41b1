"""One BLAS thread for the length of a call: `single_threaded_blas`.

A kernel that runs its own threads (a ``prange`` over blocks of queries, the two directions of
an LSTM layer) and calls ``np.dot`` inside them wants each call to be one thread's work:
OpenBLAS would otherwise start its own workers for every product, two pools would fight over
the two cores, and concurrent calls into a multi-threaded OpenBLAS serialize on its lock.

OpenBLAS has no per-call thread count, only a process-wide one. So the setting is scoped to
the call: `single_threaded_blas` sets every BLAS library loaded in the process (NumPy's, and
SciPy's, which is the one Numba's ``np.dot`` calls) to one thread on entry and puts back the
counts it found on exit, also when the kernel raises. While it is in effect, another thread of
the caller's process that calls a BLAS product gets one thread too: that is the side effect
left, for the duration of one kernel call. Measured here: 12 us per enter and exit (two
OpenBLAS libraries), against a kernel call of 0.1 ms and more.

The controller (threadpoolctl's scan of the loaded libraries, ~0.6 ms) is made on the first
call, after SciPy's BLAS is loaded; `refresh` makes the next call scan again (a BLAS library
loaded later, by another package, is not limited until then).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS Numba's np.dot calls)
from threadpoolctl import ThreadpoolController

_blas = None


def refresh() -> None:
    """Scan the loaded BLAS libraries again on the next call."""
    global _blas
    _blas = None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Every loaded BLAS on one thread inside the ``with`` block; the previous counts after."""
    global _blas
    if _blas is None:
        _blas = ThreadpoolController().select(user_api="blas")
    with _blas.limit(limits=1):
        yield
