"""A frame's map: per-window predictions (:class:`MapResult`) and the regions they form.

Nothing here draws or writes files (see :mod:`defectscope.outputs.map_files`).
"""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np
from scipy import ndimage

from defectscope.io.frames import Calibration


@dataclasses.dataclass
class MapResult:
    """Per-window predictions over a frame, on the grid of window positions.

    Attributes
    ----------
    origins : ndarray of int64, shape (rows * cols, 2)
        Top-left ``(row, col)`` of each window, row-major over the grid.
    grid_shape : (int, int)
        Windows along rows and columns.
    probabilities : ndarray of float32, shape (rows, cols, classes)
    embeddings : ndarray of float32, shape (rows, cols, d) or None
    classes : list of str
    background : str or None
        The defect-free class, if the model has one.
    frame_shape : (int, int)
    patch_size : int
    timing_ms : dict
        ``total``, ``tiling`` (time the engine waited for patches) and ``engine``.
    calibration : Calibration or None
        Physical pixel coordinates, when the frame carried them.
    uncertainty : ndarray of float32, shape (rows, cols), or None
        How unlike the training data each window's embedding is, 0..1: the share of
        held-out in-distribution windows closer to the training classes (see
        :mod:`~defectscope.artifacts.density`). None when the model carries no density.
    unknown : ndarray of bool, shape (rows, cols), or None
        Windows beyond the density's threshold: "not like anything trained on". They
        form their own regions, labelled ``"unknown"``, whatever their softmax says.
    info : dict
        How the map was made: ``mode`` ('dense' or 'window'), the dense graph's
        ``native_stride`` and ``precision``, and ``reason`` when a dense map was not
        possible.
    """

    origins: np.ndarray
    grid_shape: tuple[int, int]
    probabilities: np.ndarray
    embeddings: np.ndarray | None
    classes: list[str]
    background: str | None
    frame_shape: tuple[int, int]
    patch_size: int
    timing_ms: dict[str, float]
    calibration: Calibration | None = None
    uncertainty: np.ndarray | None = None
    unknown: np.ndarray | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        """Class index of each window, shape (rows, cols)."""
        return self.probabilities.argmax(axis=-1)

    @property
    def confidence(self) -> np.ndarray:
        """Probability of the predicted class, shape (rows, cols)."""
        return self.probabilities.max(axis=-1)

    @property
    def centers(self) -> np.ndarray:
        """Window centres ``(cy, cx)`` in pixels, shape (rows * cols, 2)."""
        return self.origins + (self.patch_size - 1) / 2.0

    @property
    def defect_probability(self) -> np.ndarray:
        """1 - p(background) per window (rows, cols); the top class's confidence without one."""
        if self.background is None:
            return self.confidence
        return 1.0 - self.probabilities[..., self.classes.index(self.background)]

    @property
    def unknown_mask(self) -> np.ndarray:
        """``unknown``, or all False when the model has no density."""
        if self.unknown is None:
            return np.zeros(self.grid_shape, dtype=bool)
        return self.unknown

    def regions(self, min_windows: int = 1) -> list[dict]:
        """Connected regions of defect windows, then of unknown windows (see :mod:`maps`)."""
        return find_regions(self, min_windows=min_windows)


def scan_fraction(y: float, x: float, shape: tuple[int, int]) -> list[float]:
    """Pixel position ``(y, x)`` as a fraction of the scan field, ``[y, x]`` in 0..1.

    Pixel ``i`` covers ``[i, i + 1)`` of an ``n``-pixel field, so its centre sits at
    ``(i + 0.5) / n``: the convention of scan controllers (Nion Swift's
    ``probe_position``, origin top-left). Clamped to the field.
    """
    height, width = shape
    return [min(max((y + 0.5) / height, 0.0), 1.0), min(max((x + 0.5) / width, 0.0), 1.0)]


def label_regions(result: MapResult, unknown: bool = False) -> tuple[np.ndarray, int]:
    """Connected components (8-neighbourhood) on the window grid.

    Of the known windows whose label is not the background (``unknown=False``), or of
    the unknown windows (``unknown=True``).
    """
    if unknown:
        mask = result.unknown_mask
    else:
        labels = result.labels
        if result.background is not None:
            mask = labels != result.classes.index(result.background)
        else:
            mask = np.ones_like(labels, dtype=bool)
        mask = mask & ~result.unknown_mask
    return ndimage.label(mask, structure=np.ones((3, 3), dtype=int))


def region_records(
    result: MapResult, components: np.ndarray, count: int, unknown: bool = False
) -> list[dict]:
    """The JSON record of every labelled region of ``components``, in label order.

    Properties come from ``scipy.ndimage`` over the whole label image at once
    (``sum_labels``, ``find_objects``), not one mask per region. Regions of unknown
    windows (``unknown=True``) are labelled ``"unknown"``, score their mean
    uncertainty and are centred on their windows' plain mean.
    """
    if count == 0:
        return []
    height, width = result.frame_shape
    size = result.patch_size
    index = np.arange(1, count + 1)
    probs = result.probabilities.astype(np.float64)
    if result.background is not None:
        probs = probs.copy()
        probs[..., result.classes.index(result.background)] = 0
    class_sums = np.stack(
        [ndimage.sum_labels(probs[..., c], components, index) for c in range(probs.shape[-1])],
        axis=1,
    )
    if unknown:
        weight = result.uncertainty.astype(np.float64)
    else:
        weight = result.defect_probability.astype(np.float64)
    uncertainty_sum = (
        ndimage.sum_labels(result.uncertainty.astype(np.float64), components, index)
        if result.uncertainty is not None
        else None
    )
    grid = result.origins.reshape(*result.grid_shape, 2).astype(np.float64) + (size - 1) / 2.0
    n_windows = ndimage.sum_labels(np.ones_like(weight), components, index)
    weight_sum = ndimage.sum_labels(weight, components, index)
    weighted = [ndimage.sum_labels(weight * grid[..., a], components, index) for a in (0, 1)]
    plain = [ndimage.sum_labels(grid[..., a], components, index) for a in (0, 1)]
    row_origins = result.origins.reshape(*result.grid_shape, 2)[:, 0, 0]
    col_origins = result.origins.reshape(*result.grid_shape, 2)[0, :, 1]
    records = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(components, max_label=count)):
        if weight_sum[k] > 1e-12 and not unknown:
            cy, cx = weighted[0][k] / weight_sum[k], weighted[1][k] / weight_sum[k]
        else:
            cy, cx = plain[0][k] / n_windows[k], plain[1][k] / n_windows[k]
        record = {
            "label": "unknown" if unknown else result.classes[int(class_sums[k].argmax())],
            "score": float(weight_sum[k] / n_windows[k]),
            "centroid": [float(cy), float(cx)],
            "bbox": [
                int(row_origins[rows.start]),
                int(col_origins[cols.start]),
                int(row_origins[rows.stop - 1] + size),
                int(col_origins[cols.stop - 1] + size),
            ],
            "n_windows": int(n_windows[k]),
            "frame_fraction": float(n_windows[k] / components.size),
            "centroid_norm": scan_fraction(float(cy), float(cx), (height, width)),
        }
        if uncertainty_sum is not None:
            record["uncertainty"] = float(uncertainty_sum[k] / n_windows[k])
            record["unknown"] = unknown
            if unknown:
                # What the softmax would have called it, for the record.
                record["nearest_class"] = result.classes[int(class_sums[k].argmax())]
        if result.calibration is not None:
            record["centroid_calibrated"] = result.calibration.to_physical(cy, cx)
            record["unit"] = result.calibration.unit
        records.append(record)
    return records


def find_regions(result: MapResult, min_windows: int = 1) -> list[dict]:
    """Connected regions (8-neighbourhood on the window grid) of defect windows, then unknown.

    Each region is ``{"label", "score", "centroid": [y, x], "bbox": [y0, x0, y1, x1],
    "n_windows", "frame_fraction" (its share of all windows),
    "centroid_norm": [(y+0.5)/H, (x+0.5)/W]}`` (:func:`scan_fraction`),
    plus ``"uncertainty"`` (mean over its windows) and ``"unknown"`` when the model has
    a density. Defect regions: known windows whose label is not the background;
    ``label`` is the class with the largest summed probability over the region's
    windows; ``score`` the mean defect probability (1 - p(background)); the centroid is
    the defect-probability-weighted mean of window centres; the bbox spans the
    windows' pixels (end exclusive); sorted by score, highest first. Unknown regions
    (``"label": "unknown"``, ``"unknown": true``, ``"nearest_class"``) follow, made of
    windows unlike anything trained on whatever their softmax says, scored by their
    mean uncertainty.
    """
    regions = []
    for unknown in (False, True) if result.unknown is not None else (False,):
        components, count = label_regions(result, unknown=unknown)
        found = [
            r
            for r in region_records(result, components, count, unknown=unknown)
            if r["n_windows"] >= min_windows
        ]
        found.sort(key=lambda r: (-r["score"], -r["n_windows"]))
        regions += found
    return regions


def window_coordinates(result: MapResult) -> tuple[list[str], list[list[str]]]:
    """Header and per-window cells locating every window of a map.

    ``row,col`` (window top-left), ``cy,cx`` (centre, pixels), ``cy_norm,cx_norm``
    (centre as a fraction of the frame, :func:`scan_fraction`) and, with a
    calibration, ``cy_<unit>,cx_<unit>`` (centre in physical units).
    """
    cal = result.calibration
    header = ["row", "col", "cy", "cx", "cy_norm", "cx_norm"]
    if cal is not None:
        header += [f"cy_{cal.unit}", f"cx_{cal.unit}"]
    rows = []
    for (row, col), (cy, cx) in zip(result.origins, result.centers, strict=True):
        cells = [str(int(row)), str(int(col)), f"{cy:.1f}", f"{cx:.1f}"]
        cells += [f"{v:.6f}" for v in scan_fraction(cy, cx, result.frame_shape)]
        if cal is not None:
            cells += [f"{v:.6g}" for v in cal.to_physical(cy, cx)]
        rows.append(cells)
    return header, rows


def windows_csv(result: MapResult) -> str:
    """One CSV row per window: where it is, its label, confidence and probabilities.

    Columns: those of :func:`window_coordinates`, then ``label,confidence,p_<class>...``,
    and ``uncertainty,unknown`` (0/1) when the model has a density.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header, coordinates = window_coordinates(result)
    extra = ["uncertainty", "unknown"] if result.uncertainty is not None else []
    writer.writerow(header + ["label", "confidence"] + [f"p_{c}" for c in result.classes] + extra)
    probs = result.probabilities.reshape(-1, len(result.classes))
    labels = result.labels.ravel()
    if result.uncertainty is not None:
        tails = [
            [f"{u:.6f}", str(int(k))]
            for u, k in zip(result.uncertainty.ravel(), result.unknown_mask.ravel(), strict=True)
        ]
    else:
        tails = [[]] * len(labels)
    for cells, label, p, tail in zip(coordinates, labels, probs, tails, strict=True):
        writer.writerow(
            cells + [result.classes[label], f"{p[label]:.6f}"] + [f"{v:.6f}" for v in p] + tail
        )
    return buffer.getvalue()


def pixel_grid_index(result: MapResult) -> tuple[np.ndarray, np.ndarray]:
    """For each frame row/column, the index of the window whose centre is nearest."""
    origins = result.origins.reshape(*result.grid_shape, 2)
    centers_y = origins[:, 0, 0] + (result.patch_size - 1) / 2.0
    centers_x = origins[0, :, 1] + (result.patch_size - 1) / 2.0

    def nearest(centers: np.ndarray, length: int) -> np.ndarray:
        midpoints = (centers[1:] + centers[:-1]) / 2.0
        return np.searchsorted(midpoints, np.arange(length), side="right")

    return nearest(centers_y, result.frame_shape[0]), nearest(centers_x, result.frame_shape[1])
