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
left, for the duration of one kernel call. Measured here: 5.5 us per enter and exit (two
OpenBLAS libraries), against a kernel call of 0.1 ms and more.

Calls may overlap (two threads of the caller, or a kernel inside another's call): the setting is
counted, the first entry sets it and the last exit restores what the first found. The counts
are set through the library's own setter (threadpoolctl's `_real_set_num_threads` where it has
one): threadpoolctl's public setter gives OpenBLAS to the first Python thread that sets a count
and silently ignores every other thread (its `threadpool_limits` in the main thread would make
a call from a worker thread a no-op), and this scoping restores what it changed itself.

The libraries (threadpoolctl's scan, ~0.6 ms) are found on the first call, after SciPy's BLAS
is loaded; `refresh` makes the next call scan again (a BLAS library loaded later, by another
package, is not limited until then).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import scipy.linalg.cython_blas  # noqa: F401  (loads the BLAS Numba's np.dot calls)
from threadpoolctl import ThreadpoolController

_libraries: list[Any] | None = None  # threadpoolctl's controllers of the loaded BLAS
_lock = threading.Lock()
_depth = 0  # calls inside the setting now
_saved: list[tuple[Any, int]] = []  # (library, count) as the first entry found them


def refresh() -> None:
    """Scan the loaded BLAS libraries again on the next call."""
    global _libraries
    _libraries = None


def _set(library: Any, count: int) -> None:
    getattr(library, "_real_set_num_threads", library.set_num_threads)(count)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Every loaded BLAS on one thread inside the ``with`` block; the previous counts after the
    last of overlapping blocks ends."""
    global _libraries, _depth, _saved
    with _lock:
        if _depth == 0:
            if _libraries is None:
                _libraries = ThreadpoolController().select(user_api="blas").lib_controllers
            _saved = [(lib, lib.num_threads) for lib in _libraries]
            for lib, _ in _saved:
                _set(lib, 1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for lib, count in _saved:
                    _set(lib, count)
                _saved = []
