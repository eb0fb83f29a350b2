"""``one_blas_thread``: BLAS on one thread inside, the original limits after, also when
blocks overlap in several threads or raise."""

from __future__ import annotations

import threading

import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

from defectscope.util.blas import one_blas_thread  # noqa: E402


def blas_threads() -> set[int]:
    return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}


@pytest.fixture
def two_blas_threads():
    """At least two BLAS threads (a test worker runs on OMP_NUM_THREADS=1: raised to two
    for the test), so that a limit of one can be seen."""
    import numpy as np

    np.ones((4, 4)) @ np.ones((4, 4))  # numpy's BLAS is loaded
    found = blas_threads()
    if not found:
        pytest.skip("threadpoolctl finds no BLAS library in this process")
    if min(found) >= 2:
        yield found
        return
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        found = blas_threads()
        if min(found) < 2:
            pytest.skip(f"BLAS cannot run on two threads here ({found})")
        yield found


def test_one_thread_inside_and_the_original_after(two_blas_threads):
    with one_blas_thread():
        assert blas_threads() == {1}
        with one_blas_thread():  # nested: still one, and the outer block restores
            assert blas_threads() == {1}
        assert blas_threads() == {1}
    assert blas_threads() == two_blas_threads


def test_a_block_that_raises_restores(two_blas_threads):
    with pytest.raises(RuntimeError, match="inside"), one_blas_thread():
        raise RuntimeError("inside")
    assert blas_threads() == two_blas_threads


def test_overlapping_blocks_in_threads_limit_once_first_and_restore_once_last(monkeypatch):
    # The count, with a recording controller (whether a BLAS honours a limit set in
    # another thread is the library's business): A enters, B enters, A leaves while B
    # is inside, B leaves.
    from defectscope.util import blas

    calls = []

    class Limiter:
        def restore_original_limits(self):
            calls.append("restore")

    class Controller:
        def limit(self, limits, user_api):
            calls.append(("limit", limits, user_api))
            return Limiter()

    monkeypatch.setattr(blas, "_controller", Controller)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with one_blas_thread():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with one_blas_thread():
            b_in.set()
            a_out.wait(10)
            seen["after A left"] = list(calls)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["after A left"] == [("limit", 1, "blas")]
    assert calls == [("limit", 1, "blas"), "restore"]
    with one_blas_thread():  # and the next block limits again
        pass
    assert calls[2:] == [("limit", 1, "blas"), "restore"]
