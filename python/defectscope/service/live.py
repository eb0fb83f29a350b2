"""In-process live detection for acquisition software written in Python.

``LiveDetector`` keeps one warmed engine, takes frames as they are acquired,
maps them in a worker thread and hands back regions and ROIs per frame. A
bounded queue decides what happens when frames arrive faster than they are
processed:

- ``block``: :meth:`LiveDetector.submit` waits for room (no frame is lost);
- ``drop_oldest``: the oldest waiting frame is discarded to make room;
- ``latest_only``: only the newest frame waits; any older waiting frame is discarded.

Discarded frames are counted in :attr:`LiveDetector.dropped`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import numbers
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from defectscope.io.frames import Calibration
from defectscope.maps.detector import Detector, check_subregion
from defectscope.maps.options import MapOptions, resolve_options

log = logging.getLogger(__name__)
Policy = Literal["block", "drop_oldest", "latest_only"]


@dataclasses.dataclass
class LiveResult:
    """What one frame gave.

    ``scale`` is the scale matching record (``MapResult.info["scale"]``: factor,
    source, applied, measured periods, warning); ``out_of_distribution`` and
    ``unknown_share`` say whether the frame as a whole is unlike the training data
    (None without a feature density). Regions and ROIs are in the frame's own pixels.
    """

    frame_id: Any
    regions: list[dict]
    rois: list[dict]
    latency_ms: float
    map_ms: float
    subregion: tuple[int, int, int, int] | None
    options: MapOptions | None = None  # how the frame was mapped
    scale: dict | None = None
    out_of_distribution: bool | None = None
    unknown_share: float | None = None


@dataclasses.dataclass
class _Job:
    frame_id: Any
    frame: np.ndarray
    calibration: Calibration | None
    subregion: tuple[int, int, int, int] | None
    submitted: float


class LiveDetector:
    """Map frames as they arrive, with a bounded queue and latency statistics.

    Parameters
    ----------
    detector : Detector
        A loaded detector (its engine is warmed on load).
    stride : int, optional
        Window stride for every frame (default 16; ``options.stride``).
    top : int, optional
        ROIs returned per frame (default 5; ``options.top_k``).
    queue_size : int
        Frames that may wait (``latest_only`` uses 1).
    policy : {'block', 'drop_oldest', 'latest_only'}
    on_result : callable, optional
        Called with each :class:`LiveResult` from the worker thread; results are
        also kept for :meth:`get`. An exception it raises is logged and kept in
        :attr:`callback_errors`; the detector goes on.
    unknown : {'ignore', 'explore'}, optional
        Whether regions unlike the training data can be ROIs (default 'ignore';
        ``options.unknown``, see :func:`~defectscope.maps.rois.select_rois`).
    options : MapOptions, optional
        How every frame is mapped (:meth:`Detector.find`); ``stride``, ``top`` and
        ``unknown``, when given, must agree with it.

    Examples
    --------
    >>> det = Detector.load("runs/cdte/model")                       # doctest: +SKIP
    >>> live = LiveDetector(det, policy="latest_only")               # doctest: +SKIP
    >>> live = LiveDetector(det, options=MapOptions(stride=8, top_k=3))  # doctest: +SKIP
    >>> live.submit(frame, pixel_size=0.02, unit="nm")               # doctest: +SKIP
    >>> result = live.get(timeout=1.0)                               # doctest: +SKIP
    >>> live.latency_percentiles()                                   # doctest: +SKIP
    """

    def __init__(
        self,
        detector: Detector,
        stride: int | None = None,
        top: int | None = None,
        queue_size: int = 4,
        policy: Policy = "block",
        on_result: Callable[[LiveResult], None] | None = None,
        unknown: str | None = None,
        options: MapOptions | None = None,
    ):
        if policy not in ("block", "drop_oldest", "latest_only"):
            raise ValueError(f"policy must be block, drop_oldest or latest_only, got {policy!r}")
        if (
            isinstance(queue_size, bool)
            or not isinstance(queue_size, numbers.Integral)
            or queue_size < 1
        ):
            raise ValueError(f"queue_size must be a positive integer, got {queue_size!r}")
        self.detector = detector
        self.options = resolve_options(options, stride=stride, top=top, unknown=unknown)
        self.policy = policy
        self.capacity = 1 if policy == "latest_only" else queue_size
        self.on_result = on_result
        self.dropped = 0
        self.processed = 0
        self._pending: collections.deque[_Job] = collections.deque()
        self._results: collections.deque[LiveResult] = collections.deque()
        self._latencies: list[float] = []
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._errors: list[BaseException] = []
        self.callback_errors: list[BaseException] = []
        self._stopped: BaseException | None = None  # why the worker ended, if it did early
        self._worker = threading.Thread(target=self._run, name="defectscope-live", daemon=True)
        self._worker.start()

    @property
    def stride(self) -> int:
        """``options.stride``; setting it applies to the frames mapped from then on."""
        return self.options.stride

    @stride.setter
    def stride(self, value: int) -> None:
        self.options = self.options.replace(stride=value)

    @property
    def top(self) -> int:
        """``options.top_k``; setting it applies to the frames mapped from then on."""
        return self.options.top_k

    @top.setter
    def top(self, value: int) -> None:
        self.options = self.options.replace(top_k=value)

    @property
    def unknown(self) -> str:
        """``options.unknown``; setting it applies to the frames mapped from then on."""
        return self.options.unknown

    @unknown.setter
    def unknown(self, value: str) -> None:
        self.options = self.options.replace(unknown=value)

    def submit(
        self,
        frame: np.ndarray,
        frame_id: Any = None,
        pixel_size: float | None = None,
        unit: str = "nm",
        subregion: tuple[int, int, int, int] | None = None,
    ) -> None:
        """Queue a frame (any dtype, 2-D); ``subregion = (y0, x0, y1, x1)`` maps only that part.

        The frame is referenced, not copied: do not overwrite it until its result
        arrives (or pass a copy).
        """
        frame = np.asarray(frame)
        if frame.ndim != 2:
            raise ValueError(f"frame must be 2-D, got shape {frame.shape}")
        if subregion is not None:
            subregion = check_subregion(subregion, frame.shape)
        calibration = None
        if pixel_size is not None:
            calibration = Calibration.square(pixel_size, unit)
            calibration.check_extent(frame.shape)
        job = _Job(frame_id, frame, calibration, subregion, time.perf_counter())
        with self._cond:
            self._raise_if_unusable()
            if self.policy == "block":
                self._cond.wait_for(
                    lambda: len(self._pending) < self.capacity or self._closed or self._stopped
                )
                self._raise_if_unusable()
            else:
                while len(self._pending) >= self.capacity:
                    self._pending.popleft()
                    self.dropped += 1
            self._pending.append(job)
            self._cond.notify_all()

    def _raise_if_unusable(self) -> None:
        if self._stopped is not None:
            raise RuntimeError(f"LiveDetector worker stopped: {self._stopped!r}")
        if self._closed:
            raise RuntimeError("LiveDetector is closed")

    def _process(self, job: _Job) -> LiveResult:
        # Positions stay in the full frame's pixels when only a subregion is mapped.
        found = self.detector.find(
            job.frame, self.options, calibration=job.calibration, subregion=job.subregion
        )
        result = found.result
        latency = (time.perf_counter() - job.submitted) * 1000
        density = result.unknown is not None
        return LiveResult(
            job.frame_id,
            result.regions(),
            found.rois,
            latency,
            result.timing_ms["total"],
            job.subregion,
            found.options,
            scale=result.info.get("scale"),
            out_of_distribution=bool(result.out_of_distribution) if density else None,
            unknown_share=result.unknown_share if density else None,
        )

    def _run(self) -> None:
        try:
            self._serve_jobs()
        except BaseException as exc:  # the worker must never end silently
            with self._cond:
                self._stopped = exc
                self._busy = False
                self._cond.notify_all()

    def _serve_jobs(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                job = self._pending.popleft()
                self._busy = True
                self._cond.notify_all()
            try:
                live = self._process(job)
            except BaseException as exc:  # SystemExit from an engine too: reported by get()
                with self._cond:
                    self._errors.append(exc)
                    self._busy = False
                    self._cond.notify_all()
                continue
            if self.on_result is not None:
                try:
                    self.on_result(live)
                except BaseException as exc:  # a callback's failure is the caller's to see
                    log.warning("on_result raised %r for frame %r", exc, live.frame_id)
                    with self._cond:
                        self.callback_errors.append(exc)
            with self._cond:
                self._results.append(live)
                self._latencies.append(live.latency_ms)
                self.processed += 1
                self._busy = False
                self._cond.notify_all()

    def _finished(self) -> bool:
        """Nothing queued, nothing running, and no more frames can come."""
        idle = not self._pending and not self._busy
        return (self._closed and idle) or self._stopped is not None

    def get(self, timeout: float | None = None) -> LiveResult:
        """The next result, waiting up to ``timeout`` seconds.

        Raises the exception a frame's mapping raised; TimeoutError after
        ``timeout``; RuntimeError when the detector is closed (or its worker
        stopped) and no result is left.
        """
        with self._cond:
            ready = self._cond.wait_for(
                lambda: self._results or self._errors or self._finished(), timeout
            )
            if self._errors:
                raise self._errors.pop(0)
            if self._results:
                return self._results.popleft()
            if self._finished():
                self._raise_if_unusable()
            if not ready:
                raise TimeoutError("no result within the timeout")
            raise RuntimeError("LiveDetector has no result")

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued frame has been processed; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (not self._pending and not self._busy) or self._stopped is not None,
                timeout,
            )

    def latency_percentiles(self) -> dict[str, float]:
        """p50, p95 and p99 of submit-to-result latency in ms over the frames so far."""
        with self._cond:
            values = np.asarray(self._latencies)
        if len(values) == 0:
            return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}

    def close(self) -> None:
        """Finish the queued frames and stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join()

    def __enter__(self) -> LiveDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
