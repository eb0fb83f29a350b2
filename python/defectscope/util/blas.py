"""BLAS on one thread for a while, safely from several threads at once.

A multi-threaded OpenBLAS keeps its threads spinning for a while after each matrix
product. Between two dense maps that spin takes cores from the network that maps the
next frame, and the lattice residual's own threads: a 512^2 dense map took 1.78x its
time with the residual's scoring, 1.57x with BLAS on one thread
(``benchmarks/bench_novelty.py``). Code whose products are small, or already split over
threads of its own, runs inside :func:`one_blas_thread`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_users = 0
_limiter = None


@functools.cache
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit every loaded BLAS to one thread inside the block, then restore it.

    For the pthreads OpenBLAS that NumPy's wheels ship the limit is process-wide: while a
    block runs, other threads' products run on one thread too. The limit is counted:
    blocks that overlap in several threads set it once, first, and restore the original
    limits once, when the last of them ends, also when a block raises. Another
    ``threadpoolctl`` limit that overlaps a block out of order (set inside it, restored
    after it) restores what it found, one thread: keep such limits around whole blocks.
    """
    global _users, _limiter
    with _lock:
        if _users == 0:
            _limiter = _controller().limit(limits=1, user_api="blas")
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _limiter is not None:
                _limiter.restore_original_limits()
                _limiter = None
