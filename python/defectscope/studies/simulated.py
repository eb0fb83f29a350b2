"""Score a detector against a simulated dataset's truth: regions found at known defects.

A region is a hit when its centroid lies within ``tolerance`` (default half the
lattice spacing) of a defect not yet matched, nearest pairs first; recall is hits
over defects, precision hits over regions. Regions of unknown windows count as found
(the map says "look here", see :mod:`rois`) unless ``known_only``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.io.frames import read_frame
from defectscope.maps.detector import Detector
from defectscope.maps.options import MapOptions
from defectscope.simulate.truth import match_pairs, read_truth


def score_simulated(
    detector: Detector,
    directory: str | os.PathLike,
    stride: int = 16,
    tolerance: float | None = None,
    known_only: bool = False,
    mode: str = "auto",
    scale: str | float = "auto",
) -> dict[str, Any]:
    """Map every frame of a ``simulate`` output and match its regions to the truth.

    Parameters
    ----------
    detector : Detector
    directory : path-like
        Holds ``truth.json`` and ``frames/``.
    stride : int
    tolerance : float, optional
        In pixels; default half the lattice spacing.
    known_only : bool
        Leave regions of unknown windows out.
    mode : {'auto', 'dense', 'window'}
        See :meth:`Detector.map`.
    scale : 'auto', 'off' or float
        Scale matching (:attr:`MapOptions.scale
        <defectscope.maps.options.MapOptions.scale>`): each frame is mapped as every
        map is, by :meth:`Detector.find`; regions stay in the frame's pixels.

    Returns
    -------
    dict
        ``recall``, ``precision``, ``defects``, ``regions``, ``matched``, the
        tolerance in pixels, per-type recall and label accuracy of matched regions, and
        one entry per frame (with its ``scale`` record and ``unknown_share``).
    """
    options = MapOptions(stride=stride, mode=mode, scale=scale)
    directory = Path(directory)
    truth = read_truth(directory)
    pixel = float(truth["settings"]["pixel_size"])
    if tolerance is None:
        tolerance = 0.5 * float(truth["lattice_spacing"]) / pixel
    if not (np.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a positive number of pixels, got {tolerance}")
    per_frame, found_types, true_types = [], [], []
    totals = {"defects": 0, "regions": 0, "matched": 0}
    started = time.perf_counter()
    for frame_record in truth["frames"]:
        frame = read_frame(directory / frame_record["file"])  # with its calibration, if any
        result = detector.find(frame, options).result
        regions = [r for r in result.regions() if not (known_only and r.get("unknown"))]
        centres = np.array([r["centroid"] for r in regions]).reshape(-1, 2)
        defects = frame_record["defects"]
        positions = np.array([(d["row"], d["col"]) for d in defects]).reshape(-1, 2)
        pairs = match_pairs(centres, positions, tolerance)
        matched = len(pairs)
        for i, j in pairs:
            found_types.append(regions[i]["label"])
            true_types.append(defects[j]["type"])
        hit = {j for _, j in pairs}
        for j, d in enumerate(defects):
            if j not in hit:
                true_types.append(d["type"])
                found_types.append(None)
        per_frame.append(
            {
                "file": frame_record["file"],
                "defects": len(defects),
                "regions": len(regions),
                "matched": matched,
                "recall": matched / len(defects) if defects else 1.0,
                "precision": matched / len(regions) if regions else 1.0,
                "scale": result.info.get("scale"),
                "unknown_share": result.unknown_share if result.unknown is not None else None,
            }
        )
        totals["defects"] += len(defects)
        totals["regions"] += len(regions)
        totals["matched"] += matched
    per_type = {}
    for kind in sorted(set(true_types)):
        rows = [f for f, t in zip(found_types, true_types, strict=True) if t == kind]
        matched_rows = [f for f in rows if f is not None]
        per_type[kind] = {
            "defects": len(rows),
            "recall": len(matched_rows) / len(rows),
            "label_accuracy": (
                float(np.mean([f == kind for f in matched_rows])) if matched_rows else None
            ),
        }
    return {
        "recall": totals["matched"] / max(totals["defects"], 1),
        "precision": totals["matched"] / totals["regions"] if totals["regions"] else 1.0,
        **totals,
        "tolerance_px": tolerance,
        "stride": stride,
        "scale": scale,
        "per_type": per_type,
        "frames": per_frame,
        "seconds": time.perf_counter() - started,
    }
