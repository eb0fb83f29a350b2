"""napari plugin (npe2, manifest ``napari.yaml``): microscope files in, defects out.

- Reader: every file :func:`~defectscope.io.frames.read_frame` opens, as an Image layer with
  the calibration's ``scale``, ``translate`` and ``units``; a stack of frames as one
  layer with a frame slider (its leading axis) and, hidden, the sum of its frames; a
  ``map`` output folder as its layers.
- Widget "Find defects": maps the selected image layer (each frame of a stack) in a
  worker thread with progress and cancel, and adds the class Labels, confidence
  Image, ROI Points and region-box Shapes layers in the frame's physical coordinates.
- Writer: an ROI Points layer back to ``rois.json`` (the documented schema), after
  the user deleted or added ROIs by hand.
- Sample data: a synthetic lattice with vacancies, and a small model trained on
  first use (the ``train`` extra), so a new user sees a result without a file.

napari is the ``napari`` extra; nothing else in the package imports this module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.io.files import atomic_write_text
from defectscope.io.frames import FRAME_SUFFIXES, Calibration, ImageReadError, read_frame

LayerData = tuple  # (data, kwargs, layer_type)


def _geometry(calibration: Calibration | None) -> dict[str, Any]:
    """Layer keyword arguments placing pixels at their physical positions."""
    if calibration is None:
        return {}
    geometry = {"scale": tuple(calibration.scale), "translate": tuple(calibration.offset)}
    try:
        import pint

        pint.UnitRegistry()(calibration.unit)
        geometry["units"] = (calibration.unit, calibration.unit)
    except Exception:  # a unit pint does not know is kept in the metadata only
        pass
    return geometry


def get_reader(path: str | list[str]):
    """npe2 reader: a function for a frame file or a ``map`` output folder, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    candidate = Path(path)
    if candidate.is_dir():
        return read_map_folder if (candidate / "windows.csv").is_file() else None
    if candidate.suffix.lower() in FRAME_SUFFIXES:
        return read_microscope_file
    return None


def _frame_metadata(path, frame) -> dict[str, Any]:
    metadata = {"source": str(path), "title": frame.title}
    if frame.calibration is not None:
        metadata["calibration"] = {
            "scale": list(frame.calibration.scale),
            "offset": list(frame.calibration.offset),
            "unit": frame.calibration.unit,
        }
    return metadata


def read_microscope_file(path: str | list[str]) -> list[LayerData]:
    """The frame of a microscope file as an Image layer with its calibration.

    A stack of frames (``(n, H, W)``: ``.npy``, TIFF, ``.dm4``, ``.ser`` ...) gives two
    layers: the stack, whose leading axis napari shows as a frame slider, and the sum
    of its frames (hidden), each as :func:`~defectscope.io.frames.read_frame` reads
    them (``frame=i``, ``sum_frames=True``).
    """
    path = path[0] if isinstance(path, list) else path
    try:
        frame = read_frame(path)
    except ImageReadError as error:
        layers = _read_stack(path)
        if layers is None:
            raise error from None
        return layers
    metadata = _frame_metadata(path, frame)
    kwargs = {"name": Path(path).name, "metadata": metadata, **_geometry(frame.calibration)}
    return [(frame.data, kwargs, "image")]


def _read_stack(path) -> list[LayerData] | None:
    """The stack layer and the sum layer of a stack file, or None when it is no stack."""
    try:
        total = read_frame(path, sum_frames=True)  # refuses anything but a stack
    except ImageReadError:
        return None
    frames = []
    # read_frame takes a stack one frame at a time; the first index it refuses ends it.
    while True:
        try:
            frames.append(read_frame(path, frame=len(frames)).data)
        except ImageReadError:
            if not frames:
                raise
            break
    stack = np.stack(frames)
    name = Path(path).name
    geometry = _geometry(total.calibration)
    stack_geometry = {}
    if geometry:
        # One more axis in front: the frame index, one step per frame.
        stack_geometry = {
            "scale": (1.0, *geometry["scale"]),
            "translate": (0.0, *geometry["translate"]),
        }
        if "units" in geometry:
            stack_geometry["units"] = ("pixel", *geometry["units"])
    metadata = {**_frame_metadata(path, total), "frames": len(frames)}
    return [
        (stack, {"name": name, "metadata": metadata, **stack_geometry}, "image"),
        (
            total.data,
            {
                "name": f"{name} (sum of {len(frames)})",
                "metadata": {**metadata, "sum": True},
                "visible": False,
                **geometry,
            },
            "image",
        ),
    ]


def read_map_folder(path: str | list[str]) -> list[LayerData]:
    """A ``defectscope map`` folder: its regions as Shapes and its ROIs as Points."""
    folder = Path(path[0] if isinstance(path, list) else path)
    layers: list[LayerData] = []
    regions_file = folder / "regions.json"
    if regions_file.is_file():
        regions = json.loads(regions_file.read_text())
        layers.append(_region_layer(regions, {}, folder.name))
    rois_file = folder / "rois.json"
    if rois_file.is_file():
        rois = json.loads(rois_file.read_text())
        layers.append(_roi_layer(rois, {}, folder.name, frame_shape=None))
    return layers


def _region_layer(regions: list[dict], geometry: dict, name: str) -> LayerData:
    boxes = [
        np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float) - 0.5
        for y0, x0, y1, x1 in (r["bbox"] for r in regions)
    ]
    features = {
        "label": [r["label"] for r in regions],
        "unknown": [bool(r.get("unknown", False)) for r in regions],
        "n_windows": [int(r.get("n_windows", 0)) for r in regions],
        # Unknown windows joined to the region: the ring that sees part of the defect.
        "absorbed_unknown": [int(r.get("absorbed_unknown", 0)) for r in regions],
        "frame_out_of_distribution": [
            bool(r.get("frame_out_of_distribution", False)) for r in regions
        ],
    }
    kwargs = {
        "name": f"{name} regions",
        "shape_type": "rectangle",
        "edge_color": "yellow",
        "face_color": "transparent",
        "edge_width": 2,
        "features": features,
        **geometry,
    }
    return (boxes, kwargs, "shapes")


def _roi_layer(rois: list[dict], geometry: dict, name: str, frame_shape) -> LayerData:
    import pandas as pd  # napari's own dependency

    centres = np.array([r["center"] for r in rois], float).reshape(-1, 2)
    # Typed columns: with no ROI, napari would read empty lists as floats and then
    # refuse the "manual" label default of a point added by hand.
    features = pd.DataFrame(
        {
            "rank": pd.Series([int(r["rank"]) for r in rois], dtype="int64"),
            "label": pd.Series([str(r["label"]) for r in rois], dtype=object),
            "score": pd.Series(
                [np.nan if r.get("score") is None else float(r["score"]) for r in rois],
                dtype="float64",
            ),
        }
    )
    kwargs = {
        "name": f"{name} ROIs",
        "features": features,
        "feature_defaults": {"rank": 0, "label": "manual", "score": float("nan")},
        "text": {"string": "{rank}: {label}", "color": "yellow", "size": 10},
        "face_color": "transparent",
        "border_color": "yellow",
        "size": 12,
        "metadata": {
            "frame_shape": None if frame_shape is None else list(frame_shape),
            # What the detector proposed: the writer tells these from points added by hand.
            "detected": [[int(r["rank"]), [float(v) for v in r["center"]]] for r in rois],
        },
        **geometry,
    }
    return (centres, kwargs, "points")


def map_layers(
    result, rois: list[dict], name: str, geometry: dict[str, Any] | None = None
) -> list[LayerData]:
    """Labels (class per pixel), confidence, ROI points and region boxes of a map.

    All in the original frame's pixels (then ``geometry``'s physical ones), whatever
    the frame was resampled by for the model: pixels take their nearest window's
    values, boxes span windows ``result.window_size`` wide. The labels layer's
    metadata says the resampling factor and whether the frame is out of distribution.
    """
    from defectscope.maps.result import pixel_grid_index
    from defectscope.outputs.figures import class_colors

    geometry = geometry or {}
    rows, cols = pixel_grid_index(result)
    # Label value = class index + 1, so 0 stays "no label"; the background is transparent.
    labels = (result.labels[np.ix_(rows, cols)] + 1).astype(np.uint8)
    colors = class_colors(result.classes, result.background)
    color_dict = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    for index, cls in enumerate(result.classes):
        rgba = tuple(colors[cls])
        color_dict[index + 1] = (0, 0, 0, 0) if cls == result.background else rgba
    label_kwargs = {
        "name": f"{name} classes",
        "colormap": _direct_colormap(color_dict),
        "opacity": 0.5,
        "features": {
            "index": [0, *range(1, len(result.classes) + 1)],
            "class": ["none", *result.classes],
        },
        "metadata": {
            "classes": list(result.classes),
            "background": result.background,
            "scale": float(result.scale),
            "window_size": float(result.window_size),
            "out_of_distribution": bool(result.out_of_distribution),
            "unknown_share": float(result.unknown_share),
            "unexplained_share": float(result.unexplained_share),
        },
        **geometry,
    }
    confidence = result.confidence[np.ix_(rows, cols)].astype(np.float32)
    confidence_kwargs = {
        "name": f"{name} confidence",
        "colormap": "viridis",
        "contrast_limits": (0.0, 1.0),
        "opacity": 0.5,
        "visible": False,
        **geometry,
    }
    return [
        (labels, label_kwargs, "labels"),
        (confidence, confidence_kwargs, "image"),
        _region_layer(result.regions(), geometry, name),
        _roi_layer(rois, geometry, name, result.frame_shape),
    ]


def _direct_colormap(color_dict: dict):
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=color_dict)


def write_rois(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: an ROI Points layer to ``rois.json``.

    Points keep their order as ranks; a point added or moved by hand (not where the
    detector put it) gets the label "manual" and no score. ``center`` is in frame
    pixels (the layer's data coordinates) and ``center_norm`` its scan fraction when
    the frame shape is known.
    """
    from defectscope.maps.result import scan_fraction

    points = np.asarray(data, dtype=float).reshape(-1, 2)
    features = meta.get("features")
    features = features.to_dict("list") if hasattr(features, "to_dict") else dict(features or {})
    metadata = meta.get("metadata") or {}
    frame_shape = metadata.get("frame_shape")
    detected = {int(rank): centre for rank, centre in metadata.get("detected", [])}
    n = len(points)
    labels = list(features.get("label", [None] * n))
    scores = list(features.get("score", [None] * n))
    ranks = list(features.get("rank", [0] * n))
    rois, seen = [], set()
    for index, (cy, cx) in enumerate(points):
        if not (np.isfinite(cy) and np.isfinite(cx)):
            raise ValueError(f"ROI point {index} is not finite: {(cy, cx)}")
        # napari gives a point added by hand the features of the last one selected, so a
        # point is the detector's only where its rank's detected centre still is.
        rank = ranks[index]
        centre = detected.get(int(rank)) if rank is not None and np.isfinite(rank) else None
        manual = centre is None or rank in seen or not np.allclose(centre, (cy, cx), atol=1e-6)
        seen.add(rank)
        score = scores[index]
        record = {
            "rank": index + 1,
            "label": "manual" if manual or not labels[index] else str(labels[index]),
            "score": None if manual or score is None or not np.isfinite(score) else float(score),
            "center": [float(cy), float(cx)],
        }
        if frame_shape:
            record["center_norm"] = scan_fraction(cy, cx, tuple(frame_shape))
        rois.append(record)
    target = os.fspath(path)
    if not target.endswith(".json"):
        target += ".json"
    atomic_write_text(target, json.dumps(rois, indent=2, allow_nan=False) + "\n")
    return [target]


# The sample: a 0.4 nm square lattice scanned at 0.05 nm per pixel (8 px per column).
SAMPLE_SPACING_NM = 0.4
SAMPLE_PIXEL_NM = 0.05


def _sample_specimen(vacancies_nm=()):
    from defectscope.simulate.lattice import LatticeSample

    return LatticeSample(spacing_nm=SAMPLE_SPACING_NM, vacancies_nm=tuple(vacancies_nm))


def sample_frame(seed: int = 0) -> tuple[np.ndarray, Calibration, np.ndarray]:
    """A 256^2 scan of the sample lattice with three 2x2 vacancy clusters.

    Returns the frame, its calibration and the clusters' centres in pixels.
    """
    from defectscope.simulate.lattice import ScanField

    side = 256 * SAMPLE_PIXEL_NM
    cells = [(5, 6), (16, 22), (25, 9)]  # a cluster's centre sits where four columns meet
    vacancies = [((m + 1) * SAMPLE_SPACING_NM, (n + 1) * SAMPLE_SPACING_NM) for m, n in cells]
    field = ScanField((side / 2, side / 2), (side, side), (256, 256))
    frame = _sample_specimen(vacancies).render(field, rng=np.random.default_rng(seed))
    centres = np.array([field.pixel_of(y, x) for y, x in vacancies])
    return frame, Calibration.square(SAMPLE_PIXEL_NM, "nm"), centres


def _sample_patches(n_per_class: int = 16, seed: int = 1):
    """Bulk and Vacancy patches (64 px) scanned like :func:`sample_frame`."""
    from defectscope.io.datasets import PatchSet
    from defectscope.simulate.lattice import ScanField

    rng = np.random.default_rng(seed)
    side = 64 * SAMPLE_PIXEL_NM
    images, labels = [], []
    for _ in range(n_per_class):
        # A window at stride 16 sees a cluster up to 8 px (0.4 nm) off its centre.
        m, n = rng.integers(10, 50, 2)
        y, x = (m + 1) * SAMPLE_SPACING_NM, (n + 1) * SAMPLE_SPACING_NM
        shift = rng.integers(-1, 2, 2) * SAMPLE_SPACING_NM
        field = ScanField((y + shift[0], x + shift[1]), (side, side), (64, 64))
        images.append(_sample_specimen().render(field, rng=rng))
        images.append(_sample_specimen([(y, x)]).render(field, rng=rng))
        labels += [0, 1]
    paths = [f"sample-{i}" for i in range(len(labels))]
    return PatchSet(np.stack(images), np.array(labels), ["Bulk", "Vacancy"], paths)


def sample_lattice() -> list[LayerData]:
    """npe2 sample data: the sample frame, with the path of its model in the metadata."""
    return sample_lattice_layer(sample_model())


def sample_lattice_layer(model: str | os.PathLike) -> list[LayerData]:
    """The sample frame as an Image layer whose metadata names ``model``."""
    frame, calibration, _ = sample_frame()
    metadata = {
        "defectscope_model": str(model),
        "calibration": {
            "scale": list(calibration.scale),
            "offset": list(calibration.offset),
            "unit": calibration.unit,
        },
    }
    kwargs = {"name": "defectscope sample lattice", "metadata": metadata, **_geometry(calibration)}
    return [(frame, kwargs, "image")]


def sample_model(directory: str | os.PathLike | None = None) -> Path:
    """A small Bulk/Vacancy model for the sample, trained once (seconds) and cached."""
    from defectscope.io.datasets import cache_dir

    directory = Path(directory) if directory is not None else cache_dir() / "napari-sample-model"
    if (directory / "model.json").is_file():
        return directory
    try:
        from defectscope.training.loop import TrainConfig, save_training, train_classifier
    except ImportError as exc:
        raise RuntimeError(
            "the sample model is trained on first use and needs the 'train' extra "
            "(pip install defectscope[train])"
        ) from exc
    config = TrainConfig(epochs=4, batch_size=8, precision="fp32", seed=0)
    result = train_classifier(_sample_patches(), None, config, progress=False)
    save_training(directory, result, config, extra_record={"note": "napari sample model"})
    return directory
