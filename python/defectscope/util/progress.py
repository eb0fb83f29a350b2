"""Named steps of a long job: a spinner while each runs, and how long each took."""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import time
from collections.abc import Iterator


class StepTimer:
    """Times named steps; shows a spinner with the step's name on a terminal.

    Examples
    --------
    >>> steps = StepTimer(spinner=False)
    >>> with steps("grouping"):
    ...     pass
    >>> list(steps.seconds)
    ['grouping']
    """

    def __init__(self, spinner: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.spinner = self.stream.isatty() if spinner is None else spinner
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, spin: bool = True) -> Iterator[None]:
        """Time the step ``name``; ``spin=False`` for steps with their own progress bar."""
        started = time.perf_counter()
        stop = threading.Event()
        thread = None
        if self.spinner and spin:
            thread = threading.Thread(target=self._spin, args=(name, started, stop), daemon=True)
            thread.start()
        else:
            print(f"[{name}] ...", file=self.stream, flush=True)
        try:
            yield
        finally:
            stop.set()
            if thread is not None:
                thread.join()
            elapsed = time.perf_counter() - started
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            print(f"[{name}] done in {elapsed:.1f} s", file=self.stream, flush=True)

    def _spin(self, name: str, started: float, stop: threading.Event) -> None:
        for mark in itertools.cycle("|/-\\"):
            if stop.wait(0.25):
                break
            elapsed = time.perf_counter() - started
            self.stream.write(f"\r{mark} {name} ({elapsed:.0f} s)")
            self.stream.flush()
        self.stream.write("\r")

    def table(self) -> str:
        """A Markdown table of the steps and their seconds, with the total."""
        lines = ["| step | seconds |", "|---|---|"]
        lines += [f"| {name} | {s:.1f} |" for name, s in self.seconds.items()]
        lines.append(f"| total | {sum(self.seconds.values()):.1f} |")
        return "\n".join(lines)
