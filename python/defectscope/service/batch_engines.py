"""One detector per worker process, kept between the frames it maps.

Loading an engine costs more than mapping a frame, so a Dask worker loads it on its
first frame and keeps it. The cache is keyed by the artifact's hash too: a worker of a
long-lived cluster never maps with a model that changed on disk since it was loaded.
"""

from __future__ import annotations

import os
import threading

from defectscope.maps.detector import Detector

_DETECTORS: dict[tuple, Detector] = {}
_LOCK = threading.Lock()


def cached_detector(
    artifact: str,
    model_hash: str,
    backend: str = "auto",
    threads: int = 0,
    background: str | None = None,
    batch_size: int = 64,
) -> Detector:
    """This process's detector for ``artifact`` as it was when hashed ``model_hash``.

    Detectors of an older hash of the same artifact are closed and dropped.
    """
    key = (artifact, model_hash, backend, threads, background, batch_size)
    with _LOCK:
        if key not in _DETECTORS:
            for old in [k for k in _DETECTORS if k[0] == artifact and k[1] != model_hash]:
                _DETECTORS.pop(old).close()
            _DETECTORS[key] = Detector.load(
                artifact,
                backend=backend,
                threads=threads,
                background=background,
                batch_size=batch_size,
            )
        return _DETECTORS[key]


def clear_detectors() -> None:
    """Close and forget every cached detector (benchmarks, tests)."""
    with _LOCK:
        for detector in _DETECTORS.values():
            detector.close()
        _DETECTORS.clear()


def engine_threads(workers: int, cores: int | None = None) -> int:
    """Engine threads per worker so that workers x threads does not exceed the cores."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, workers))
