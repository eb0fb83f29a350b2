"""Reading a batch frame's size from its header, and large frames as memory maps.

A frame too large for one worker is mapped in bands (:mod:`.batch_bands`); it is found
from its header without reading it, and opened as a read-only memory map so each band
is read where it is mapped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def frame_pixels(path: str | os.PathLike) -> int | None:
    """Pixels of a 2-D ``.npy`` or TIFF frame from its header (None for other formats)."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        elif suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
        else:
            return None
    except Exception:  # unreadable: the normal path reports why
        return None
    return int(np.prod(shape[:2])) if len(shape) == 2 else None


def open_large_frame(path: str | os.PathLike) -> np.ndarray:
    """A 2-D ``.npy`` or uncompressed TIFF frame as a read-only memory map (else read)."""
    from defectscope.io.frames import read_frame

    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if suffix in (".tif", ".tiff"):
            import tifffile

            return tifffile.memmap(path, mode="r")
    except (ValueError, OSError):  # compressed or tiled: read it whole
        pass
    return read_frame(path).data
