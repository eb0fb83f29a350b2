"""A frame's map: per-window predictions (:class:`MapResult`) and the regions they form.

Nothing here draws or writes files (see :mod:`defectscope.outputs`).
"""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np
from scipy import ndimage

from defectscope.io import Calibration


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

    def regions(self, min_windows: int = 1) -> list[dict]:
        """Connected regions of non-background windows, best first (see :mod:`maps`)."""
        return find_regions(self, min_windows=min_windows)


def scan_fraction(y: float, x: float, shape: tuple[int, int]) -> list[float]:
    """Pixel position ``(y, x)`` as a fraction of the scan field, ``[y, x]`` in 0..1.

    Pixel ``i`` covers ``[i, i + 1)`` of an ``n``-pixel field, so its centre sits at
    ``(i + 0.5) / n``: the convention of scan controllers (Nion Swift's
    ``probe_position``, origin top-left). Clamped to the field.
    """
    height, width = shape
    return [min(max((y + 0.5) / height, 0.0), 1.0), min(max((x + 0.5) / width, 0.0), 1.0)]


def label_regions(result: MapResult) -> tuple[np.ndarray, int]:
    """Connected components (8-neighbourhood) of non-background windows on the grid."""
    labels = result.labels
    if result.background is not None:
        defect = labels != result.classes.index(result.background)
    else:
        defect = np.ones_like(labels, dtype=bool)
    return ndimage.label(defect, structure=np.ones((3, 3), dtype=int))


def region_records(result: MapResult, components: np.ndarray, count: int) -> list[dict]:
    """The JSON record of every labelled region of ``components``, in label order.

    Properties come from ``scipy.ndimage`` over the whole label image at once
    (``sum_labels``, ``find_objects``), not one mask per region.
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
    weight = result.defect_probability.astype(np.float64)
    grid = result.origins.reshape(*result.grid_shape, 2).astype(np.float64) + (size - 1) / 2.0
    n_windows = ndimage.sum_labels(np.ones_like(weight), components, index)
    weight_sum = ndimage.sum_labels(weight, components, index)
    weighted = [ndimage.sum_labels(weight * grid[..., a], components, index) for a in (0, 1)]
    plain = [ndimage.sum_labels(grid[..., a], components, index) for a in (0, 1)]
    row_origins = result.origins.reshape(*result.grid_shape, 2)[:, 0, 0]
    col_origins = result.origins.reshape(*result.grid_shape, 2)[0, :, 1]
    records = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(components, max_label=count)):
        if weight_sum[k] > 1e-12:
            cy, cx = weighted[0][k] / weight_sum[k], weighted[1][k] / weight_sum[k]
        else:
            cy, cx = plain[0][k] / n_windows[k], plain[1][k] / n_windows[k]
        record = {
            "label": result.classes[int(class_sums[k].argmax())],
            "score": float(weight_sum[k] / n_windows[k]),
            "centroid": [float(cy), float(cx)],
            "bbox": [
                int(row_origins[rows.start]),
                int(col_origins[cols.start]),
                int(row_origins[rows.stop - 1] + size),
                int(col_origins[cols.stop - 1] + size),
            ],
            "n_windows": int(n_windows[k]),
            "centroid_norm": scan_fraction(float(cy), float(cx), (height, width)),
        }
        if result.calibration is not None:
            record["centroid_calibrated"] = result.calibration.to_physical(cy, cx)
            record["unit"] = result.calibration.unit
        records.append(record)
    return records


def find_regions(result: MapResult, min_windows: int = 1) -> list[dict]:
    """Connected regions (8-neighbourhood on the window grid) of non-background windows.

    Each region is ``{"label", "score", "centroid": [y, x], "bbox": [y0, x0, y1, x1],
    "n_windows", "centroid_norm": [(y+0.5)/H, (x+0.5)/W]}`` (:func:`scan_fraction`).
    ``label`` is the class with the largest summed probability over the region's
    windows; ``score`` is the mean defect probability (1 - p(background)) of its
    windows; the centroid is the defect-probability-weighted mean of window centres;
    the bbox spans the windows' pixels (end exclusive). Sorted by score, highest first.
    """
    components, count = label_regions(result)
    regions = [
        r for r in region_records(result, components, count) if r["n_windows"] >= min_windows
    ]
    regions.sort(key=lambda r: (-r["score"], -r["n_windows"]))
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

    Columns: those of :func:`window_coordinates`, then ``label,confidence,p_<class>...``.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header, coordinates = window_coordinates(result)
    writer.writerow(header + ["label", "confidence"] + [f"p_{c}" for c in result.classes])
    probs = result.probabilities.reshape(-1, len(result.classes))
    labels = result.labels.ravel()
    for cells, label, p in zip(coordinates, labels, probs, strict=True):
        writer.writerow(
            cells + [result.classes[label], f"{p[label]:.6f}"] + [f"{v:.6f}" for v in p]
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
