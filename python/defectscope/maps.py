"""From window predictions to defect regions, and the files ``defectscope map`` writes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from defectscope.detector import MapResult


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


def region_record(result: MapResult, mask: np.ndarray) -> dict:
    """The JSON record of the region made of the windows in ``mask`` (rows, cols)."""
    height, width = result.frame_shape
    size = result.patch_size
    probs = result.probabilities[mask]
    if result.background is not None:
        probs = probs.copy()
        probs[:, result.classes.index(result.background)] = 0
    weight = result.defect_probability[mask].astype(np.float64)
    corners = result.origins.reshape(*result.grid_shape, 2)[mask]
    centers = corners + (size - 1) / 2.0
    cy, cx = (centers * weight[:, None]).sum(0) / max(weight.sum(), 1e-12)
    record = {
        "label": result.classes[int(probs.sum(0).argmax())],
        "score": float(weight.mean()),
        "centroid": [float(cy), float(cx)],
        "bbox": [
            int(corners[:, 0].min()),
            int(corners[:, 1].min()),
            int(corners[:, 0].max() + size),
            int(corners[:, 1].max() + size),
        ],
        "n_windows": int(mask.sum()),
        "centroid_norm": scan_fraction(float(cy), float(cx), (height, width)),
    }
    if result.calibration is not None:
        record["centroid_calibrated"] = result.calibration.to_physical(cy, cx)
        record["unit"] = result.calibration.unit
    return record


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
        region_record(result, components == index)
        for index in range(1, count + 1)
        if (components == index).sum() >= min_windows
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


def class_colors(classes: list[str], background: str | None) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colors, k = {}, 0
    for name in classes:
        if name == background:
            colors[name] = (0.6, 0.6, 0.6, 1.0)
        else:
            colors[name] = cmap(k % 10)
            k += 1
    return colors


def render_overlay(frame: np.ndarray, result: MapResult, path: Path) -> None:
    """Frame in gray with defect classes coloured, alpha by confidence, and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows, cols = pixel_grid_index(result)
    labels = result.labels[np.ix_(rows, cols)]
    confidence = result.confidence[np.ix_(rows, cols)]
    colors = class_colors(result.classes, result.background)
    palette = np.array([colors[c] for c in result.classes])
    rgba = palette[labels].copy()
    rgba[..., 3] = 0.55 * confidence
    if result.background is not None:
        rgba[labels == result.classes.index(result.background), 3] = 0.0
    height, width = frame.shape
    fig, ax = plt.subplots(figsize=(8, 8 * height / width + 0.6), dpi=110)
    ax.imshow(frame, cmap="gray", interpolation="nearest")
    ax.imshow(rgba, interpolation="nearest")
    handles = [Patch(color=colors[c], label=c) for c in result.classes if c != result.background]
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.8)
    ax.set_axis_off()
    ax.set_title("defect classes (alpha = confidence)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_confidence(result: MapResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = pixel_grid_index(result)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    image = ax.imshow(result.confidence[np.ix_(rows, cols)], vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(image, ax=ax, label="confidence of predicted class")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_map_outputs(frame: np.ndarray, result: MapResult, out_dir: str | os.PathLike) -> Path:
    """Write ``windows.csv``, ``regions.json``, ``overlay.png`` and ``confidence.png``.

    Everything is written in a temporary folder beside ``out_dir`` first and then
    moved in, so a failure leaves nothing partial in ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        (staging / "windows.csv").write_text(windows_csv(result))
        regions = result.regions()
        (staging / "regions.json").write_text(json.dumps(regions, indent=2) + "\n")
        render_overlay(np.asarray(frame), result, staging / "overlay.png")
        render_confidence(result, staging / "confidence.png")
        if not out_dir.exists():
            os.replace(staging, out_dir)
        else:
            for item in staging.iterdir():
                os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
