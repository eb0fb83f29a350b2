"""Clustering a patch dataset or a frame's windows with a model's embeddings, plus outputs.

Writes ``clusters.csv``, ``silhouette.png``, ``pca.png``, ``montage.png``,
``cluster.json`` and, for frames, ``cluster_map.png``. Where labels exist, the
same clustering of raw pixels is run as a baseline so the value of the learned
embedding is measured.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from defectscope.io.files import atomic_write_json, atomic_write_text
from defectscope.io.frames import FRAME_SUFFIXES, Frame, read_frame
from defectscope.maps.cluster import Clustering, cluster_embeddings
from defectscope.outputs import figures


def _clusters_csv(
    header: list[str], items: list[list[str]], clustering: Clustering, n_coords: int = 3
) -> str:
    """``header`` columns naming each item, then ``cluster,pc1..pc<n_coords>``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    n_coords = min(n_coords, clustering.coordinates.shape[1])
    writer.writerow([*header, "cluster", *[f"pc{i + 1}" for i in range(n_coords)]])
    rows = zip(items, clustering.labels, clustering.coordinates, strict=True)
    for cells, cluster, coords in rows:
        writer.writerow([*cells, int(cluster), *[f"{v:.5f}" for v in coords[:n_coords]]])
    return buffer.getvalue()


def _summary(clustering: Clustering) -> dict:
    return {
        "k": clustering.k,
        "silhouette": {str(k): v for k, v in clustering.silhouette.items()},
        "pca_components": int(clustering.coordinates.shape[1]),
        "pca_explained_variance": clustering.explained_variance,
        "cluster_sizes": np.bincount(clustering.labels).tolist(),
    }


def raw_pixel_features(patches: np.ndarray) -> np.ndarray:
    """Per-patch z-scored pixels, flattened: the baseline the embeddings must beat."""
    x = patches.reshape(len(patches), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.maximum(x.std(axis=1, keepdims=True), 1e-8)
    return x


def cluster_dataset(
    data: str | os.PathLike,
    artifact: str | os.PathLike,
    out_dir: str | os.PathLike,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 10),
    variance: float = 0.95,
    backend: str = "auto",
    seed: int = 0,
) -> dict:
    """Cluster the patches under ``data`` by the model's embeddings; compare with raw pixels."""
    from defectscope.engines.loader import load_engine
    from defectscope.io.datasets import load_patches
    from defectscope.tiling.tiler import patches_to_inputs

    engine = load_engine(artifact, backend)
    patches = load_patches(data)
    inputs = patches_to_inputs(patches.images, engine.config.normalization)
    embeddings = np.concatenate(
        [engine.run(inputs[i : i + 64])[1] for i in range(0, len(inputs), 64)]
    )
    learned = cluster_embeddings(embeddings, k, k_range, variance, seed)
    raw = cluster_embeddings(raw_pixel_features(patches.images), k, k_range, variance, seed)
    n_classes = len(patches.classes)
    at_n_classes = {
        "learned": cluster_embeddings(embeddings, n_classes, variance=variance, seed=seed),
        "raw_pixels": cluster_embeddings(
            raw_pixel_features(patches.images), n_classes, variance=variance, seed=seed
        ),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = [[Path(p).name] for p in patches.paths]
    atomic_write_text(out / "clusters.csv", _clusters_csv(["item"], items, learned))
    figures.silhouette_curve(learned.silhouette, learned.k, out / "silhouette.png")
    figures.pca_scatter(
        learned.coordinates, learned.labels, out / "pca.png", patches.labels, patches.classes
    )
    figures.montage(patches.images, learned.labels, out / "montage.png")
    report = {
        "source": str(data),
        "kind": "dataset",
        "n_items": len(items),
        "backend": engine.name,
        "learned": {**_summary(learned), **learned.agreement(patches.labels)},
        "raw_pixels": {**_summary(raw), **raw.agreement(patches.labels)},
        "at_n_classes": {
            "k": n_classes,
            **{name: c.agreement(patches.labels) for name, c in at_n_classes.items()},
        },
    }
    atomic_write_json(out / "cluster.json", report)
    return report


def cluster_frame(
    frame: str | os.PathLike | Frame,
    artifact: str | os.PathLike,
    out_dir: str | os.PathLike,
    stride: int = 16,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 10),
    variance: float = 0.95,
    backend: str = "auto",
    seed: int = 0,
    scale: str | float = "auto",
) -> dict:
    """Cluster the windows of a frame by the model's embeddings and map the clusters.

    ``frame`` is a file (read with :func:`~defectscope.io.frames.read_frame`) or a
    :class:`~defectscope.io.frames.Frame`; with a calibration, ``clusters.csv`` gains the
    window centres in physical units and ``cluster.json`` the calibration. The frame is
    mapped as every map is (:meth:`Detector.find
    <defectscope.maps.detector.Detector.find>`), resampled to the model's scale by
    ``scale`` (:attr:`MapOptions.scale <defectscope.maps.options.MapOptions.scale>`);
    window positions and the montage's crops are in the original frame's pixels, each
    window ``result.window_size`` pixels wide, and ``cluster.json`` records the scale
    matching under ``scale``.
    """
    from defectscope.maps.detector import Detector
    from defectscope.maps.options import MapOptions
    from defectscope.maps.result import pixel_grid_index, window_coordinates

    options = MapOptions(stride=stride, scale=scale)
    if not isinstance(frame, Frame):
        frame = read_frame(frame)
    image = frame.data
    with Detector.load(artifact, backend=backend) as det:
        result = det.find(frame, options).result
    rows, cols = result.grid_shape
    embeddings = result.embeddings.reshape(rows * cols, -1)
    learned = cluster_embeddings(embeddings, k, k_range, variance, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, items = window_coordinates(result)
    atomic_write_text(out / "clusters.csv", _clusters_csv(header, items, learned))
    figures.silhouette_curve(learned.silhouette, learned.k, out / "silhouette.png")
    predicted = result.labels.ravel()
    figures.pca_scatter(
        learned.coordinates, learned.labels, out / "pca.png", predicted, result.classes
    )
    # Crops of the original frame, one window wide (clamped: a rounded window origin
    # may put its far edge a pixel past the frame's).
    size = min(result.window_extent, *image.shape[:2])
    height, width = image.shape[:2]
    windows = np.stack(
        [
            image[min(y, height - size) : min(y, height - size) + size,
                  min(x, width - size) : min(x, width - size) + size]
            for y, x in result.origins
        ]
    )  # fmt: skip
    figures.montage(windows, learned.labels, out / "montage.png")
    grid_rows, grid_cols = pixel_grid_index(result)
    figures.grid_map(
        image,
        learned.labels.reshape(rows, cols),
        grid_rows,
        grid_cols,
        out / "cluster_map.png",
        f"clusters of window embeddings (k = {learned.k})",
    )
    report = {
        "source": frame.source,
        "kind": "frame",
        "stride": stride,
        "n_items": len(items),
        "backend": det.engine.name,
        "calibration": frame.calibration.to_dict() if frame.calibration else None,
        "scale": result.info.get("scale"),
        "window_size": float(result.window_size),
        "learned": {**_summary(learned), **learned.agreement(predicted)},
        "note": "ARI/NMI here compare clusters with the classifier's own predictions",
    }
    atomic_write_json(out / "cluster.json", report)
    return report


def is_frame(source: str | os.PathLike) -> bool:
    """A file is a frame; a folder is a patch dataset."""
    path = Path(source)
    return path.is_file() and path.suffix.lower() in FRAME_SUFFIXES
