"""Ranking regions of interest for closed-loop microscopy.

A region of interest (ROI) is a defect region of the map (see :mod:`maps`) with
a score that says where to look next:

``score = w_p * defect_probability + w_s * size + w_n * novelty``

- ``defect_probability``: mean 1 - p(background) of the region's windows;
- ``size = n / (n + 4)`` for a region of ``n`` windows (0.5 at four windows);
- ``novelty = d / (d + d_bulk)``: ``d`` is the distance of the region's mean
  embedding from the bulk centroid (mean embedding of background windows, or the
  median embedding of all windows when none are labelled background) and
  ``d_bulk`` the mean distance of background windows from that centroid; 0.5
  means "as far as ordinary bulk varies", near 1 means unlike anything in bulk.

Default weights are 0.5, 0.2 and 0.3. Regions are those of
:func:`~defectscope.maps.result.find_regions`: a defect region includes the ring of
unknown windows that see part of it (its ``n_windows`` and ``bbox``), while its
probability and novelty come from its own windows. With a model that carries a density,
regions of unknown windows (unlike anything trained on) are left out
(``unknown="ignore"``), or compete with their mean uncertainty in place of the defect
probability (``unknown="explore"``). Regions are taken best first, skipping any
whose centre lies closer than ``min_spacing`` pixels (default: the window's side in the
frame, :attr:`~defectscope.maps.result.MapResult.window_size`) to one already taken, so
a microscope is not sent to the same place twice.

A frame that is out of distribution as a whole
(:attr:`~defectscope.maps.result.MapResult.out_of_distribution`: more of its windows
unknown, away from the rings of known defects, than ``ood_threshold``; say a
magnification or material the model never saw)
gives no ROI unless the user asks to explore the unknown: its known regions are the
classifier's guesses on data unlike its training, and ranking them would send the
microscope to noise. With ``unknown="explore"`` its regions compete as on any frame, each
ROI then marked ``"frame_out_of_distribution": true``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from defectscope.maps.options import UNKNOWN_POLICIES
from defectscope.maps.result import MapResult, group_regions, region_records, scan_fraction


@dataclasses.dataclass(frozen=True)
class RoiWeights:
    """Weights of the ROI score's three terms."""

    probability: float = 0.5
    size: float = 0.2
    novelty: float = 0.3


def _bulk_reference(result: MapResult) -> tuple[np.ndarray, float]:
    embeddings = result.embeddings.reshape(-1, result.embeddings.shape[-1]).astype(np.float64)
    if result.background is not None:
        known_bulk = (result.labels == result.classes.index(result.background)) & ~(
            result.unknown_mask
        )
        bulk = embeddings[known_bulk.ravel()]
    else:
        bulk = embeddings[:0]
    if len(bulk) == 0:
        centroid = np.median(embeddings, axis=0)
        spread = float(np.median(np.linalg.norm(embeddings - centroid, axis=1)))
    else:
        centroid = bulk.mean(axis=0)
        spread = float(np.linalg.norm(bulk - centroid, axis=1).mean())
    return centroid, max(spread, 1e-9)


def select_rois(
    result: MapResult,
    top: int = 5,
    min_spacing: float | None = None,
    weights: RoiWeights = RoiWeights(),
    unknown: str = "ignore",
    max_frame_fraction: float = 0.5,
) -> list[dict]:
    """The ``top`` regions of interest of a map, best first.

    Parameters
    ----------
    result : MapResult
        A map made with embeddings kept.
    top : int
        Number of ROIs wanted.
    min_spacing : float, optional
        Least distance in pixels between ROI centres (default: the window's side in
        the frame, :attr:`~defectscope.maps.result.MapResult.window_size`).
    weights : RoiWeights
    unknown : {'ignore', 'explore'}
        What to do with regions of unknown windows (unlike anything trained on, see
        :mod:`~defectscope.artifacts.density`). ``ignore``: they are never ROIs, so the
        microscope goes only where the classifier can be trusted. ``explore``: they
        compete with defect regions, their mean ``uncertainty`` standing in for the
        defect probability in the score (``"unknown": true`` in the record), for a
        scientist who wants to see what the model has not. A frame that is
        :attr:`~defectscope.maps.result.MapResult.out_of_distribution` gives no ROI
        under ``ignore``; under ``explore`` its ROIs carry
        ``"frame_out_of_distribution": true``.
    max_frame_fraction : float
        A region holding more than this share of the frame's windows is not a place
        to look at but a sign that the model calls the whole frame a defect (a frame
        unlike its training data): it is never an ROI.

    Returns
    -------
    list of dict
        ``{"rank", "label", "score", "defect_probability", "size", "novelty",
        "center": [y, x], "center_norm": [(y+0.5)/H, (x+0.5)/W]
        (:func:`~defectscope.maps.result.scan_fraction`), "center_norm_xy": the same as [x, y],
        "bbox", "n_windows"}``, plus ``"center_calibrated": [y, x]`` (offset + index
        times pixel size), ``"size_calibrated": [height, width]`` of the bbox and
        ``"unit"`` when the map has a calibration.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {', '.join(UNKNOWN_POLICIES)}, got {unknown!r}")
    if result.embeddings is None:
        raise ValueError("ROI novelty needs embeddings: map with keep_embeddings=True")
    out_of_distribution = result.out_of_distribution
    if out_of_distribution and unknown != "explore":
        return []
    spacing = float(result.window_size if min_spacing is None else min_spacing)
    centroid, spread = _bulk_reference(result)
    candidates = []
    groups = group_regions(result)
    kinds = [False, True] if unknown == "explore" and groups.unknown is not None else [False]
    flat = result.embeddings.reshape(-1, result.embeddings.shape[-1]).astype(np.float64)
    for is_unknown in kinds:
        if is_unknown:
            components, count, absorbed = groups.unknown, groups.n_unknown, None
        else:
            components, count = groups.known, groups.n_known
            absorbed = groups.absorbed if groups.unknown is not None else None
        records = region_records(result, components, count, is_unknown, absorbed)
        # Mean embedding of every region's own windows at once: sums over the label image.
        sums = np.zeros((count + 1, flat.shape[1]))
        np.add.at(sums, components.ravel(), flat)
        own = np.bincount(components.ravel(), minlength=count + 1)
        for index, record in enumerate(records, start=1):
            if record["frame_fraction"] > max_frame_fraction:
                continue
            distance = float(np.linalg.norm(sums[index] / own[index] - centroid))
            novelty = distance / (distance + spread)
            size = record["n_windows"] / (record["n_windows"] + 4.0)
            score = (
                weights.probability * record["score"]
                + weights.size * size
                + weights.novelty * novelty
            )
            cy, cx = record["centroid"]
            roi = {
                "label": record["label"],
                "score": float(score),
                "defect_probability": None if is_unknown else record["score"],
                "size": float(size),
                "novelty": float(novelty),
                "center": [cy, cx],
                "center_norm": scan_fraction(cy, cx, result.frame_shape),
                "bbox": record["bbox"],
                "n_windows": record["n_windows"],
            }
            roi["center_norm_xy"] = roi["center_norm"][::-1]
            if "uncertainty" in record:
                roi["uncertainty"] = record["uncertainty"]
                roi["unknown"] = is_unknown
            if out_of_distribution:
                roi["frame_out_of_distribution"] = True
            if result.calibration is not None:
                roi["center_calibrated"] = result.calibration.to_physical(cy, cx)
                roi["unit"] = result.calibration.unit
                y0, x0, y1, x1 = roi["bbox"]
                scale_y, scale_x = result.calibration.scale
                roi["size_calibrated"] = [(y1 - y0) * scale_y, (x1 - x0) * scale_x]
            candidates.append(roi)
    candidates.sort(key=lambda r: -r["score"])
    chosen: list[dict] = []
    for roi in candidates:
        y, x = roi["center"]
        if all(np.hypot(y - c["center"][0], x - c["center"][1]) >= spacing for c in chosen):
            chosen.append({"rank": len(chosen) + 1, **roi})
        if len(chosen) == top:
            break
    return chosen
