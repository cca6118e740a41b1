"""`kernels._blas.single_threaded_blas`: one BLAS thread inside the block, the caller's counts
after it, also when calls overlap or raise."""

from __future__ import annotations

import threading

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from kernels._blas import single_threaded_blas


def blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


@pytest.fixture
def two_threads():
    """Every BLAS at 2 threads for the test (restored after), so that 1 inside is visible."""
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() and set(blas_threads()) == {2}
        yield


def test_one_thread_inside_and_the_counts_back_after(two_threads) -> None:
    with single_threaded_blas():
        assert set(blas_threads()) == {1}
    assert set(blas_threads()) == {2}


def test_the_counts_come_back_after_a_raise(two_threads) -> None:
    with pytest.raises(RuntimeError, match="in the kernel"), single_threaded_blas():
        raise RuntimeError("in the kernel")
    assert set(blas_threads()) == {2}


def test_overlapping_calls_restore_the_first_ones_counts_when_the_last_ends(two_threads) -> None:
    """Thread A enters, then this thread, then A leaves: still one thread here (a plain
    save-and-restore per call would have put 2 back under this one, or 1 after both)."""
    entered, leave = threading.Event(), threading.Event()

    def other() -> None:
        with single_threaded_blas():
            entered.set()
            leave.wait(10)

    worker = threading.Thread(target=other)
    worker.start()
    assert entered.wait(10)
    with single_threaded_blas():
        assert set(blas_threads()) == {1}
        leave.set()
        worker.join(10)
        assert set(blas_threads()) == {1}, "the other call's exit restored the counts too early"
    assert set(blas_threads()) == {2}
    with single_threaded_blas(), single_threaded_blas():  # nested on one thread
        assert set(blas_threads()) == {1}
    assert set(blas_threads()) == {2}
