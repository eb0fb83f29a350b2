"""The one export recipe: FP32 ONNX, both INT8 models and TensorRT engines of a model directory.

``defectscope export`` and the main job call :func:`export_model`. It splits the
calibration patches, checks the FP32 ONNX model against PyTorch, makes the two INT8
models (U8S8 for ONNX Runtime on x86 CPUs, symmetric signed for TensorRT), compares
each with FP32 on held-out patches, builds TensorRT engines when asked, and merges
what it did into ``<model_dir>/export.json`` after each step: entries another call
wrote stay, entries this call remade are replaced, and a step that fails loses none
of the steps before it. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.artifacts.metadata import read_model_dir
from defectscope.engines.tensorrt import tensorrt_available
from defectscope.evaluation.scoring import labels_for_model
from defectscope.export.compare import compare_engines
from defectscope.export.int8 import INT8_FILES, quantize_onnx_int8
from defectscope.export.onnx import ExportError, export_onnx
from defectscope.export.tensorrt import build_dense_tensorrt_engines, build_tensorrt_engine
from defectscope.io.datasets import PatchSet, load_patches
from defectscope.io.files import atomic_write_json
from defectscope.tiling.tiler import patches_to_inputs

EXPORT_FORMATS = ("onnx", "int8", "tensorrt")
EXPORT_RECORD = "export.json"
FP32_FILE = "model.onnx"
# Patches of the FP32 parity check against PyTorch.
CHECK_PATCHES = 64


@dataclasses.dataclass(frozen=True)
class CalibrationSplit:
    """Which of the data's patches calibrate INT8, score it, and check the FP32 export.

    Attributes
    ----------
    calibration : ndarray of int
        Indices of the patches INT8's activation ranges are calibrated on.
    held_out : ndarray of int
        Indices of the patches each INT8 model is compared with FP32 on.
    check : ndarray of int
        Indices of the patches of the FP32 ONNX vs PyTorch parity check.
    notes : dict
        Recorded in the ``int8`` and ``int8_tensorrt`` entries of ``export.json``
        (where the patches came from).
    """

    calibration: np.ndarray
    held_out: np.ndarray
    check: np.ndarray
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def seeded(cls, n: int, calibration_size: int = 256, seed: int = 0) -> CalibrationSplit:
        """``defectscope export``'s split: one seeded permutation of ``n`` patches.

        Its first ``calibration_size`` calibrate, the rest are held out; the parity
        check takes its first :data:`CHECK_PATCHES`.
        """
        order = np.random.default_rng(seed).permutation(n)
        return cls(order[:calibration_size], order[calibration_size:], order[:CHECK_PATCHES])

    def checked(self, n: int, source: object) -> CalibrationSplit:
        """The split as int64 arrays, each index in ``0..n-1``; ValueError otherwise."""
        arrays = {}
        for name in ("calibration", "held_out", "check"):
            index = np.asarray(getattr(self, name))
            if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
                raise ValueError(
                    f"{source}: split {name} must be a 1-D array of patch indices, got "
                    f"{index.dtype} with shape {index.shape}"
                )
            index = index.astype(np.int64)
            if index.size and (index.min() < 0 or index.max() >= n):
                raise ValueError(
                    f"{source}: split {name} holds indices outside 0..{n - 1} ({n} patches)"
                )
            arrays[name] = index
        return dataclasses.replace(self, **arrays)


def read_export_record(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``<model_dir>/export.json`` as a dict; ``{}`` when there is none.

    Raises
    ------
    ValueError
        The file exists but is not a JSON object (it is left as it is).
    """
    path = Path(model_dir) / EXPORT_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(record).__name__}")
    return record


def _merge_record(model_dir: Path, entries: dict[str, Any]) -> None:
    atomic_write_json(model_dir / EXPORT_RECORD, {**read_export_record(model_dir), **entries})


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def export_model(
    model_dir: str | os.PathLike,
    formats: Sequence[str] | str = ("onnx",),
    data: PatchSet | str | os.PathLike | None = None,
    *,
    calibration_size: int = 256,
    seed: int = 0,
    split: CalibrationSplit | None = None,
    precision: str = "fp16",
    dense: bool = False,
    max_side: int = 1536,
) -> dict[str, Any]:
    """Export a model directory and merge what was made into its ``export.json``.

    Steps run in the order ``onnx``, ``int8``, ``tensorrt``, whatever the order of
    ``formats``; every argument is checked before the first step writes anything.

    Parameters
    ----------
    model_dir : path-like
        Written by ``defectscope train``; the exports go beside its weights.
    formats : str or sequence of {'onnx', 'int8', 'tensorrt'}
        ``onnx``: ``model.onnx`` (FP32), checked against PyTorch on the ``check``
        patches (random normal inputs when ``data`` is None); entry ``onnx``.
        ``int8``: ``model.int8.onnx`` (U8S8, ONNX Runtime on x86 CPUs) and
        ``model.int8.trt.onnx`` (symmetric, what TensorRT takes), both calibrated on the
        ``calibration`` patches from ``model.onnx`` (of this call, or an earlier one)
        and compared with it on the ``held_out`` patches; entries ``int8`` and
        ``int8_tensorrt``. Needs ``data``.
        ``tensorrt``: ``model.<precision>.engine`` from ``model.onnx`` (fp16) or
        ``model.int8.trt.onnx`` (int8), entry ``tensorrt``; with ``dense``, the dense
        graphs' engines ``dense/dense<N>.<precision>.engine`` (made by ``densify``),
        entry ``tensorrt_dense``. Needs TensorRT and a GPU.
        ``defectscope export --format onnx [--int8]`` is ``("onnx",)`` or
        ``("onnx", "int8")``; ``--format tensorrt`` is ``("tensorrt",)``.
    data : PatchSet or path-like, optional
        Real labelled patches (a dataset folder is read with ``load_patches``), of the
        model's classes and patch size; normalized as the model says.
    calibration_size : int
        Patches that calibrate INT8 in the default split (``--calib-size``); >= 1 and
        fewer than the data's patches when ``int8`` is asked for, unused otherwise.
    seed : int
        Seed of the default split's permutation (``--seed``).
    split : CalibrationSplit, optional
        Indices into ``data`` overriding the default
        ``CalibrationSplit.seeded(len(data), calibration_size, seed)``.
    precision : {'fp16', 'int8'}
        TensorRT engine precision.
    dense : bool
        TensorRT: build the dense graphs' engines instead of the per-window one.
    max_side : int
        TensorRT dense: the largest region side an engine takes.

    Returns
    -------
    dict
        The entries this call made (a subset of ``onnx``, ``int8``, ``int8_tensorrt``,
        ``tensorrt``, ``tensorrt_dense``), as merged into ``export.json``:
        ``onnx``: ``{"path", "max_abs_diff_probabilities",
        "max_abs_diff_embedding_relative", "tolerance", "n_check_patches"}``;
        ``int8``/``int8_tensorrt``: ``{"path", "n_calibration", **notes, "n_patches",
        "agreement", "max_abs_diff_probabilities", "accuracy_reference",
        "accuracy_candidate"}``; ``tensorrt``: ``{"path", "precision"}``;
        ``tensorrt_dense``: a list of ``{"path", "precision", "max_side",
        "native_stride"}``.

    Raises
    ------
    ValueError
        Bad arguments, data, split or ``export.json``; a source model a step needs is
        missing. ``ExportError`` (a RuntimeError): the parity check failed, or TensorRT
        is not available or failed.

    Examples
    --------
    >>> export_model("runs/cdte/model", ("onnx", "int8"), "data/cdte")  # doctest: +SKIP
    >>> export_model("runs/cdte/model", "tensorrt", precision="int8")   # doctest: +SKIP
    """
    model_dir = Path(model_dir)
    wanted = {formats} if isinstance(formats, str) else set(formats)
    unknown = sorted(wanted - set(EXPORT_FORMATS))
    if unknown or not wanted:
        raise ValueError(
            f"formats must be among {', '.join(EXPORT_FORMATS)}, got {sorted(wanted) or 'none'}"
        )
    metadata = read_model_dir(model_dir)  # names the directory when it is not a model
    read_export_record(model_dir)  # a broken export.json fails before any work
    config = metadata.config
    fp32_path = model_dir / FP32_FILE
    int8_path = model_dir / INT8_FILES["cpu"]
    int8_trt_path = model_dir / INT8_FILES["tensorrt"]

    if "int8" in wanted:
        if data is None:
            raise ValueError(
                f"{model_dir}: INT8 export needs real patches to calibrate on (--calib DATA)"
            )
        if "onnx" not in wanted and not fp32_path.is_file():
            raise ValueError(
                f"{fp32_path}: missing; run 'defectscope export {model_dir} --format onnx' first"
            )
    if "tensorrt" in wanted:
        if precision not in ("fp16", "int8"):
            raise ValueError(f"TensorRT precision must be fp16 or int8, got {precision!r}")
        if not dense:
            source = int8_trt_path if precision == "int8" else fp32_path
            made_here = "int8" in wanted if precision == "int8" else "onnx" in wanted
            if not made_here and not source.is_file():
                raise ValueError(
                    f"{source}: missing; run 'defectscope export {model_dir} --format onnx'"
                    + (" --int8 --calib DATA" if precision == "int8" else "")
                    + " first"
                )
        else:
            _positive_int(max_side, "max side")
        ok, reason = tensorrt_available()
        if not ok:
            raise ExportError(f"TensorRT export needs TensorRT and a GPU: {reason}")

    inputs = labels = None
    if data is not None and wanted & {"onnx", "int8"}:
        patches = data if isinstance(data, PatchSet) else load_patches(data)
        source_name = data if not isinstance(data, PatchSet) else "calibration patches"
        labels = labels_for_model(patches, config.classes, source_name)
        if patches.patch_size != config.patch_size:
            raise ValueError(
                f"{source_name}: patches are {patches.patch_size} px, the model takes "
                f"{config.patch_size}"
            )
        if split is None:
            # The size matters only to INT8; an FP32 export takes its check patches alone.
            size = _positive_int(calibration_size, "calibration size") if "int8" in wanted else 0
            split = CalibrationSplit.seeded(len(labels), size, seed)
        split = split.checked(len(labels), source_name)
        if "int8" in wanted:
            if len(split.calibration) == 0:
                raise ValueError(f"{source_name}: no patches to calibrate INT8 on")
            if len(split.held_out) == 0:
                raise ValueError(f"{source_name}: needs more than {len(split.calibration)} patches")
        inputs = patches_to_inputs(patches.images, config.normalization)

    report: dict[str, Any] = {}

    def record(entries: dict[str, Any]) -> None:
        report.update(entries)
        _merge_record(model_dir, entries)

    if "onnx" in wanted:
        check = inputs[split.check] if inputs is not None and len(split.check) else None
        record({"onnx": export_onnx(model_dir, fp32_path, check_inputs=check)})
    if "int8" in wanted:
        calib, held = inputs[split.calibration], inputs[split.held_out]
        held_labels = labels[split.held_out]
        for key, target, path in (
            ("int8", "cpu", int8_path),
            ("int8_tensorrt", "tensorrt", int8_trt_path),
        ):
            quantize_onnx_int8(fp32_path, path, calib, target=target)
            entry = {"path": str(path), "n_calibration": len(calib), **split.notes}
            record({key: {**entry, **compare_engines(fp32_path, path, held, held_labels)}})
    if "tensorrt" in wanted:
        if dense:
            record({"tensorrt_dense": build_dense_tensorrt_engines(model_dir, precision, max_side)})
        else:
            source = int8_trt_path if precision == "int8" else fp32_path
            engine = build_tensorrt_engine(
                source, model_dir / f"model.{precision}.engine", precision=precision
            )
            record({"tensorrt": {"path": str(engine), "precision": precision}})
    return report
