"""defectscope: find defects in atomic-resolution STEM images, fast.

The public face is lazy (PEP 562): ``import defectscope`` imports nothing heavy and
changes no process state; each name below imports its subpackage on first use.

>>> from defectscope import Detector, read_frame
>>> found = Detector.load("runs/cdte/model").find(read_frame("frame.dm4"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from defectscope._version import __version__

# name -> module that defines it; the layout reads io -> tiling -> engines -> maps -> service.
_PUBLIC = {
    "read_frame": "defectscope.io.frames",
    "Frame": "defectscope.io.frames",
    "Calibration": "defectscope.io.frames",
    "tile": "defectscope.tiling.tiler",
    "window_origins": "defectscope.tiling.tiler",
    "Normalization": "defectscope.tiling.tiler",
    "load_engine": "defectscope.engines.loader",
    "MapOptions": "defectscope.maps.options",
    "MapResult": "defectscope.maps.result",
    "Detector": "defectscope.maps.detector",
    "LiveDetector": "defectscope.service.live",
    "run_batch": "defectscope.service.batch",
}

__all__ = [
    "Calibration",
    "Detector",
    "Frame",
    "LiveDetector",
    "MapOptions",
    "MapResult",
    "Normalization",
    "__version__",
    "load_engine",
    "read_frame",
    "run_batch",
    "tile",
    "window_origins",
]

if TYPE_CHECKING:
    from defectscope.engines.loader import load_engine
    from defectscope.io.frames import Calibration, Frame, read_frame
    from defectscope.maps.detector import Detector
    from defectscope.maps.options import MapOptions
    from defectscope.maps.result import MapResult
    from defectscope.service.batch import run_batch
    from defectscope.service.live import LiveDetector
    from defectscope.tiling.tiler import Normalization, tile, window_origins


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'defectscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
