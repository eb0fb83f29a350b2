"""Exporting a model directory to ONNX (FP32 and static INT8) and TensorRT engines.

Every artifact carries the model's metadata (classes, patch size, normalization,
temperature): ONNX files in their ``metadata_props`` under ``defectscope``, TensorRT
engines in a ``<engine>.json`` file beside them (a serialized engine has no room
for it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defectscope.artifacts.metadata import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    ArtifactMetadata,
    ModelConfig,
    parse_metadata_json,
)
from defectscope.engines.base import tensorrt_available
from defectscope.engines.dense import (
    DENSE_DIR,
    DENSE_INPUT,
    NATIVE_STRIDES,
    dense_engine_file,
    dense_file,
)
from defectscope.io.frames import atomic_write_bytes, atomic_write_json
from defectscope.nets.checkpoint import load_checkpoint
from defectscope.tiling.tiler import dense_channels

# Where each INT8 model goes: ONNX Runtime on x86 CPUs runs U8S8 (unsigned activations,
# VNNI); TensorRT takes only symmetric signed INT8 Q/DQ.
INT8_FILES = {"cpu": "model.int8.onnx", "tensorrt": "model.int8.trt.onnx"}
# float32 ONNX Runtime against PyTorch on the same inputs: larger means a broken export.
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """An export failed or its parity check did not hold."""


class _ExportWrapper(nn.Module):
    """Calibrated probabilities and the embedding, the two outputs every engine gives."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = self.model.forward_with_embedding(x)
        return torch.softmax(logits / self.temperature, dim=1), embedding


def artifact_metadata(config: ModelConfig, record: dict[str, Any]) -> dict[str, Any]:
    """What a runtime needs beside the network: config, temperature and the density."""
    temperature = record.get("calibration", {}).get("temperature", 1.0)
    metadata = {"model": config.to_dict(), "temperature": float(temperature), "format_version": 1}
    if record.get("density") is not None:
        metadata["density"] = record["density"]  # uncertainty travels with every artifact
    return metadata


def export_onnx(
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    check_inputs: np.ndarray | None = None,
    opset: int = 18,
) -> dict[str, Any]:
    """Export a model directory to ONNX with a dynamic batch axis and check parity.

    Parameters
    ----------
    model_dir : path-like
        Written by ``defectscope train``.
    output : path-like
        The ``.onnx`` file (written atomically).
    check_inputs : ndarray of float32, shape (n, C, P, P), optional
        Normalized real patches for the parity check; random normal ones otherwise.
    opset : int
        ONNX opset.

    Returns
    -------
    dict
        ``{"path", "max_abs_diff_probabilities", "max_abs_diff_embedding", "tolerance"}``.

    Raises
    ------
    ExportError
        When ONNX Runtime and PyTorch differ by more than ``PARITY_TOLERANCE``.
    """
    import onnx

    model, config, record = load_checkpoint(model_dir)
    metadata = artifact_metadata(config, record)
    wrapper = _ExportWrapper(model, metadata["temperature"]).eval()
    channels, size = config.normalization.channels, config.patch_size
    example = torch.zeros(2, channels, size, size)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            wrapper,
            (example,),
            str(raw),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        proto = onnx.load(str(raw))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.checker.check_model(proto)
        atomic_write_bytes(output, proto.SerializeToString())

    if check_inputs is None:
        check_inputs = np.random.default_rng(0).normal(size=(8, channels, size, size))
    check_inputs = np.ascontiguousarray(check_inputs, dtype=np.float32)
    with torch.inference_mode():
        want = [t.numpy() for t in wrapper(torch.from_numpy(check_inputs))]
    got = _onnx_session(output).run(list(OUTPUT_NAMES), {INPUT_NAME: check_inputs})
    diffs = [float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)]
    report = {
        "path": str(output),
        "max_abs_diff_probabilities": diffs[0],
        "max_abs_diff_embedding_relative": diffs[1] / max(float(np.abs(want[1]).max()), 1e-6),
        "tolerance": PARITY_TOLERANCE,
        "n_check_patches": len(check_inputs),
    }
    if diffs[0] > PARITY_TOLERANCE or report["max_abs_diff_embedding_relative"] > PARITY_TOLERANCE:
        output.unlink(missing_ok=True)
        raise ExportError(f"ONNX parity check failed: {report}")
    return report


def _onnx_session(path: str | os.PathLike):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The defectscope metadata stored in an exported ONNX file."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path}: not an ONNX model ({exc})") from exc
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            record = parse_metadata_json(entry.value, str(path))
            ArtifactMetadata.from_record(record, str(path))
            return record
    raise ExportError(
        f"{path}: ONNX model has no defectscope metadata (not exported by defectscope)"
    )


class _PatchReader:
    """Feeds calibration batches to ONNX Runtime's quantizer."""

    def __init__(self, inputs: np.ndarray, batch_size: int = 16, input_name: str = INPUT_NAME):
        self.batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
        self.position = 0
        self.input_name = input_name

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0


def quantize_onnx_int8(
    fp32_path: str | os.PathLike,
    output: str | os.PathLike,
    calibration_inputs: np.ndarray,
    target: str = "cpu",
    input_name: str = INPUT_NAME,
    batch_size: int = 16,
) -> Path:
    """Static INT8 quantization with ONNX Runtime: QDQ, per-channel weights.

    ``target="cpu"``: activations unsigned 8-bit, weights signed 8-bit (U8S8), the
    pairing that runs on x86 VNNI. ``target="tensorrt"``: signed, symmetric
    activations and weights (QInt8, ``ActivationSymmetric``), the only INT8 Q/DQ form
    TensorRT takes. Ranges come from MinMax calibration on real patches (for a dense
    graph, ``input_name='frame'``, ``batch_size=1`` and normalized frame regions).
    """
    if target not in INT8_FILES:
        raise ExportError(f"INT8 target must be one of {', '.join(INT8_FILES)}, got {target!r}")
    symmetric = target == "tensorrt"
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(_PatchReader, CalibrationDataReader):
        pass

    output = Path(output)
    metadata = read_onnx_metadata(fp32_path)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(
                np.ascontiguousarray(calibration_inputs, dtype=np.float32), batch_size, input_name
            ),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )
        import onnx

        proto = onnx.load(str(quantized))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key = METADATA_KEY
        entry.value = json.dumps({**metadata, "precision": "int8", "target": target})
        atomic_write_bytes(output, proto.SerializeToString())
    return output


def compare_engines(
    reference_path: str | os.PathLike,
    candidate_path: str | os.PathLike,
    inputs: np.ndarray,
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Agreement (and accuracy, given labels) of two ONNX models on the same patches."""
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    ref = _run_batched(_onnx_session(reference_path), inputs)
    cand = _run_batched(_onnx_session(candidate_path), inputs)
    result = {
        "n_patches": len(inputs),
        "agreement": float(np.mean(ref.argmax(1) == cand.argmax(1))),
        "max_abs_diff_probabilities": float(np.abs(ref - cand).max()),
    }
    if labels is not None:
        result["accuracy_reference"] = float(np.mean(ref.argmax(1) == labels))
        result["accuracy_candidate"] = float(np.mean(cand.argmax(1) == labels))
    return result


def _run_batched(session, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    parts = [
        session.run([OUTPUT_NAMES[0]], {INPUT_NAME: inputs[i : i + batch_size]})[0]
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(parts)


def dense_profile(dense: dict[str, Any], patch_size: int, max_side: int, opt_side: int = 512):
    """Smallest, typical and largest region side a dense graph's TensorRT engine takes.

    The runtime cuts a frame into regions whose sides are multiples of the graph's
    ``align``, from one window (the patch, rounded up) to the crop it is given; a crop
    must hold a window plus the receptive margin on both sides. ``max_side`` bounds the
    crop (and the engine's memory); returns ``(min, opt, max)``.
    """
    align, margin = int(dense["align"]), int(dense["margin"])
    smallest = -(-patch_size // align) * align
    needed = -(-(patch_size + 2 * margin) // align) * align + align
    if max_side % align or max_side < needed:
        raise ExportError(
            f"max side {max_side}: must be a multiple of {align} and at least {needed} "
            f"(a {patch_size}-px window plus the {margin}-px receptive margin on each side)"
        )
    opt = min(max(opt_side // align * align, smallest), max_side)
    return smallest, opt, max_side


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike,
    precision: str = "fp16",
    max_batch: int = 256,
    workspace_gib: float = 4.0,
    max_side: int = 1536,
) -> Path:
    """Build a serialized TensorRT engine from an exported ONNX model.

    ``precision`` is ``fp16``, or ``int8`` for a symmetric QDQ model from
    :func:`quantize_onnx_int8` with ``target="tensorrt"`` (TensorRT takes the scales
    from its Q/DQ nodes). A per-window model gets an optimization profile over batches
    of 1 to ``max_batch`` patches; a dense graph (``defectscope densify``) one over
    regions of one window up to ``max_side`` squared (see :func:`dense_profile`).
    The metadata goes to ``<output>.json``.
    """
    ok, reason = tensorrt_available()
    if not ok:
        raise ExportError(f"TensorRT export needs TensorRT and a GPU: {reason}")
    import tensorrt as trt

    metadata = read_onnx_metadata(onnx_path)
    if precision == "int8" and metadata.get("target", "cpu") != "tensorrt":
        raise ExportError(
            f"{onnx_path}: is an INT8 model for the CPU (asymmetric activations); TensorRT "
            "needs the symmetric one (export --int8 writes "
            f"{INT8_FILES['tensorrt']}, densify --int8 dense<N>.int8.trt.onnx)"
        )
    if precision not in ("fp16", "int8"):
        raise ExportError(f"precision must be fp16 or int8, got {precision!r}")
    config = ArtifactMetadata.from_record(metadata, str(onnx_path)).config
    patch = config.patch_size
    dense = metadata.get("dense")
    extra: dict[str, Any] = {"precision": precision}
    if dense is None:
        name, shape = INPUT_NAME, (config.normalization.channels, patch, patch)
        shapes = [(1, *shape), (min(64, max_batch), *shape), (max_batch, *shape)]
        extra["max_batch"] = max_batch
    else:
        name = DENSE_INPUT
        sides = dense_profile(dense, patch, max_side)
        shapes = [(1, dense_channels(config.normalization), side, side) for side in sides]
        extra["max_side"] = max_side
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT cannot parse the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path}: TensorRT engine build failed")
    output = Path(output)
    atomic_write_bytes(output, bytes(serialized))
    atomic_write_json(output.with_suffix(output.suffix + ".json"), {**metadata, **extra})
    return output


def build_dense_tensorrt_engines(
    model_dir: str | os.PathLike, precision: str = "fp16", max_side: int = 1536
) -> list[dict[str, Any]]:
    """TensorRT engines of the dense graphs ``densify`` wrote, one per native stride.

    FP16 is built from ``dense<N>.onnx``, INT8 from the symmetric
    ``dense<N>.int8.trt.onnx``; each goes to ``dense/dense<N>.<precision>.engine``.
    """
    folder = Path(model_dir) / DENSE_DIR
    built = []
    for native in NATIVE_STRIDES:
        if not (folder / dense_file(native)).is_file():
            continue
        source = folder / dense_file(native, "int8" if precision == "int8" else "fp32", "tensorrt")
        if not source.is_file():
            raise ValueError(f"{source}: missing; run 'defectscope densify' with --int8 first")
        engine = build_tensorrt_engine(
            source, folder / dense_engine_file(native, precision), precision, max_side=max_side
        )
        record = {"path": str(engine), "precision": precision, "max_side": max_side}
        built.append({**record, "native_stride": native})
    if not built:
        raise ValueError(f"{model_dir}: no dense graphs; make them with 'defectscope densify'")
    return built
