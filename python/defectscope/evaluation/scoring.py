"""Scoring patches with any engine: a model directory, an ONNX file or a TensorRT engine.

The one runtime behind ``defectscope evaluate`` and ``defectscope predict``: patches are
normalized the way the artifact says (:func:`defectscope.tiling.tiler.patches_to_inputs`)
and run through an :class:`~defectscope.engines.base.Engine`, which returns probabilities
already divided by the artifact's softmax temperature. Nothing here imports PyTorch: an
ONNX file or a TensorRT engine is scored on a machine without it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.engines.base import Engine, EngineError, artifact_kind
from defectscope.engines.loader import BACKENDS, load_engine
from defectscope.evaluation.metrics import classification_metrics
from defectscope.io.datasets import PatchSet, load_patches
from defectscope.io.frames import read_image
from defectscope.tiling.tiler import patches_to_inputs


def _torch_installed() -> bool:
    # find_spec does not import torch; a blocking import hook raises ImportError here.
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def open_engine(
    artifact: str | os.PathLike,
    backend: str = "auto",
    threads: int = 0,
    precision: str = "fp32",
) -> Engine:
    """Open an artifact for scoring.

    Parameters
    ----------
    artifact : path-like
        A model directory (``model.json``), an ``.onnx`` file or a TensorRT engine
        (``.engine``/``.plan``/``.trt`` with its ``<engine>.json``).
    backend : {'auto', 'torch', 'onnxruntime', 'tensorrt'}
        As in :func:`defectscope.engines.loader.load_engine`, except ``auto`` on a model
        directory: it scores the FP32 model the directory holds, with PyTorch when it is
        installed, else with ``model.onnx`` beside the weights. It never picks the INT8
        model, whose numbers are the quantized approximation; pass its ``.onnx`` path to
        score it.
    threads : int
        ONNX Runtime's intra-op threads; 0 leaves the choice to ONNX Runtime.
    precision : {'fp32', 'bf16', 'auto'}
        PyTorch engine only (CPU autocast).

    Returns
    -------
    Engine

    Raises
    ------
    EngineError
        The artifact is missing, of an unknown kind, or cannot run on ``backend``.
    """
    path = Path(artifact)
    if not path.exists():
        raise EngineError(
            f"{path}: model directory not found (nor an .onnx file or a TensorRT engine)"
        )
    if backend not in BACKENDS:
        raise EngineError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto" and artifact_kind(path) == "model_dir":
        if not _torch_installed() and (path / "model.onnx").is_file():
            return load_engine(path / "model.onnx", "onnxruntime", threads=threads)
        # Without torch and model.onnx the torch engine names both ways out.
        backend = "torch"
    return load_engine(path, backend, threads=threads, precision=precision)


def _as_engine(artifact: Engine | str | os.PathLike, backend: str, threads: int) -> Engine:
    return artifact if isinstance(artifact, Engine) else open_engine(artifact, backend, threads)


def classify_patches(
    engine: Engine, images: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated class probabilities and embeddings of gray patches.

    Parameters
    ----------
    engine : Engine
        From :func:`open_engine` or :func:`defectscope.engines.loader.load_engine`.
    images : ndarray, shape (n, P, P) or (P, P)
        Raw gray patches of the artifact's patch size ``P``, in any dtype the tiler
        reads (uint8, uint16, int16, int32, float32, float64). They are normalized with
        the artifact's normalization, ``batch_size`` at a time.
    batch_size : int
        Patches per engine call (bounds the memory of the normalized inputs).

    Returns
    -------
    probabilities : ndarray of float32, shape (n, n_classes)
        Softmax of the logits divided by the artifact's temperature, columns in
        ``engine.classes`` order.
    embeddings : ndarray of float32, shape (n, embedding_dim)

    Raises
    ------
    ValueError
        Wrong shape, dtype, non-finite pixels or a bad ``batch_size``.

    Examples
    --------
    >>> engine = open_engine("runs/cdte/model.onnx")                 # doctest: +SKIP
    >>> probabilities, embeddings = classify_patches(engine, patches)  # doctest: +SKIP
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size}")
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    size = engine.config.patch_size
    if images.ndim != 3 or images.shape[1:] != (size, size):
        raise ValueError(f"patches must have shape (n, {size}, {size}), got {images.shape}")
    n = len(images)
    if n == 0:
        return (
            np.empty((0, len(engine.classes)), np.float32),
            np.empty((0, engine.config.embedding_dim), np.float32),
        )
    normalization = engine.config.normalization
    probabilities, embeddings = [], []
    for start in range(0, n, batch_size):
        inputs = patches_to_inputs(images[start : start + batch_size], normalization)
        p, e = engine.run(inputs)
        probabilities.append(np.asarray(p, dtype=np.float32))
        embeddings.append(np.asarray(e, dtype=np.float32))
    return np.concatenate(probabilities), np.concatenate(embeddings)


def labels_for_model(patches: PatchSet, classes: Sequence[str], source: object) -> np.ndarray:
    """The patches' labels as indices into a model's ``classes``.

    Parameters
    ----------
    patches : PatchSet
        Labelled patches (their own class list, sorted by name).
    classes : sequence of str
        The model's classes, in its output order.
    source : object
        Named in the error (the dataset folder).

    Returns
    -------
    ndarray of int64, shape (n,)

    Raises
    ------
    ValueError
        Some of the patches' classes are not among the model's.
    """
    classes = list(classes)
    unknown = sorted(set(patches.classes) - set(classes))
    if unknown:
        raise ValueError(f"{source}: classes {unknown} are not among the model's {classes}")
    lookup = np.array([classes.index(c) for c in patches.classes], dtype=np.int64)
    return lookup[np.asarray(patches.labels, dtype=np.int64)]


def evaluate_artifact(
    artifact: Engine | str | os.PathLike,
    data: PatchSet | str | os.PathLike,
    backend: str = "auto",
    batch_size: int = 64,
    skip_bad: bool = False,
    threads: int = 0,
    source: object = None,
) -> dict[str, Any]:
    """Score an artifact on labelled patches: what ``defectscope evaluate`` writes.

    Parameters
    ----------
    artifact : Engine or path-like
        An open engine, or a model directory, ``.onnx`` file or TensorRT engine opened
        with :func:`open_engine` (``backend``, ``threads``).
    data : PatchSet or path-like
        Labelled patches, or a patch dataset folder read with
        :func:`defectscope.io.datasets.load_patches` (``skip_bad``). Pass a PatchSet to
        report its ``skipped`` files yourself.
    backend : {'auto', 'torch', 'onnxruntime', 'tensorrt'}
        See :func:`open_engine`.
    batch_size : int
        Patches per engine call.
    skip_bad : bool
        Leave out unreadable or odd-sized files when ``data`` is a folder.
    threads : int
        ONNX Runtime's intra-op threads (0: its default).
    source : object, optional
        What the errors call the data (the folder a PatchSet was read from); by default
        ``data`` when it is a path, else ``"patches"``.

    Returns
    -------
    dict
        :func:`defectscope.evaluation.metrics.classification_metrics` over the model's
        classes (``accuracy``, ``macro_f1``, ``per_class``, ``confusion``, ``classes``),
        plus ``engine``: the engine's description without its classes (``backend``,
        ``patch_size``; ONNX Runtime adds ``providers`` and ``precision``).

    Raises
    ------
    ValueError
        Missing or unreadable artifact or data, classes the model lacks, patch sizes
        that differ from the model's (``EngineError`` and ``DatasetError`` are
        ValueErrors).

    Examples
    --------
    >>> metrics = evaluate_artifact("runs/cdte/model.onnx", "data/cdte")  # doctest: +SKIP
    >>> metrics["accuracy"], metrics["engine"]["backend"]                  # doctest: +SKIP
    (0.98, 'onnxruntime')
    """
    engine = _as_engine(artifact, backend, threads)
    patches = data if isinstance(data, PatchSet) else load_patches(data, skip_bad=skip_bad)
    if source is None:
        source = data if not isinstance(data, PatchSet) else "patches"
    labels = labels_for_model(patches, engine.classes, source)
    if patches.patch_size != engine.config.patch_size:
        size = engine.config.patch_size
        raise ValueError(
            f"{source}: patches are {patches.patch_size}x{patches.patch_size} px, the model "
            f"takes {size}x{size}"
        )
    probabilities, _ = classify_patches(engine, patches.images, batch_size)
    metrics = classification_metrics(labels, probabilities.argmax(axis=1), engine.classes)
    metrics["engine"] = {k: v for k, v in engine.describe().items() if k != "classes"}
    return metrics


def predict_files(
    artifact: Engine | str | os.PathLike,
    files: Sequence[str | os.PathLike],
    backend: str = "auto",
    batch_size: int = 64,
    threads: int = 0,
) -> list[dict[str, Any]]:
    """Classify patch image files: the records ``defectscope predict`` writes.

    Parameters
    ----------
    artifact : Engine or path-like
        An open engine, or a model directory, ``.onnx`` file or TensorRT engine opened
        with :func:`open_engine` (``backend``, ``threads``).
    files : sequence of path-like
        Gray (or RGB/RGBA, read as gray) patch images of the model's patch size:
        ``.tif``, ``.png``, ``.jpg`` or ``.npy``. All are read before any is scored.
    backend : {'auto', 'torch', 'onnxruntime', 'tensorrt'}
        See :func:`open_engine`.
    batch_size : int
        Patches per engine call.
    threads : int
        ONNX Runtime's intra-op threads (0: its default).

    Returns
    -------
    list of dict
        One per file, in order: ``{"file": str, "label": str, "confidence": float,
        "probabilities": {class: float}}``; ``confidence`` is the largest probability
        and ``label`` its class.

    Raises
    ------
    ValueError
        An unreadable file (``ImageReadError`` names it) or one whose size differs
        from the model's patch size.

    Examples
    --------
    >>> predict_files("runs/cdte/model", ["a.tif", "b.tif"])  # doctest: +SKIP
    [{'file': 'a.tif', 'label': 'Bulk', 'confidence': 0.99, 'probabilities': {...}}, ...]
    """
    engine = _as_engine(artifact, backend, threads)
    size = engine.config.patch_size
    images = []
    for path in files:
        image = np.asarray(read_image(path))
        if image.shape != (size, size):
            raise ValueError(
                f"{path}: patch shape {image.shape} differs from the model's {size}x{size}"
            )
        images.append(image)
    if not images:
        return []
    # One common dtype, as load_patches stacks a dataset: the patches are normalized as
    # ``evaluate`` normalizes them.
    dtype = np.result_type(*{image.dtype for image in images})
    probabilities, _ = classify_patches(engine, np.stack(images).astype(dtype), batch_size)
    classes = engine.classes
    return [
        {
            "file": str(Path(path)),
            "label": classes[int(p.argmax())],
            "confidence": float(p.max()),
            "probabilities": {c: float(v) for c, v in zip(classes, p, strict=True)},
        }
        for path, p in zip(files, probabilities, strict=True)
    ]
