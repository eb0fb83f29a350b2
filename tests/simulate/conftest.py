"""Shared helpers for the simulation tests."""

from __future__ import annotations

import contextlib
import signal

import pytest


@pytest.fixture
def deadline():
    """``with deadline(s):`` fails the test with ``TimeoutError`` past ``s`` seconds.

    For steps whose cost must stay near-linear: at the sizes used, the quadratic
    versions they replace run for many minutes, the new ones for seconds (the limit
    leaves a wide margin for slow or busy machines).
    """

    @contextlib.contextmanager
    def limit(seconds: int):
        def expire(signum, frame):
            raise TimeoutError(f"over {seconds} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return limit
