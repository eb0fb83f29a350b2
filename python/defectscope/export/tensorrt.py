"""Tensorrt."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from defectscope.artifacts.metadata import (
    INPUT_NAME,
    ArtifactMetadata,
)
from defectscope.artifacts.provenance import check_weights
from defectscope.engines.dense import (
    DENSE_DIR,
    DENSE_INPUT,
    NATIVE_STRIDES,
    check_dense_file,
    dense_engine_file,
    dense_file,
)
from defectscope.engines.tensorrt import ENGINE_SHA256, tensorrt_available
from defectscope.export.int8 import INT8_FILES
from defectscope.export.onnx import ExportError, read_onnx_metadata
from defectscope.io.files import atomic_write_bytes, atomic_write_json
from defectscope.tiling.tiler import dense_channels


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
    The metadata goes to ``<output>.json``, with the SHA-256 of the engine and of the
    weights the ONNX model was made from; an ONNX model made from other weights than its
    model directory's ``weights.pt`` is refused before anything is built.
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
    checked = ArtifactMetadata.from_record(metadata, str(onnx_path))
    check_weights(onnx_path, checked.weights_sha256)
    config = checked.config
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
    data = bytes(serialized)
    extra[ENGINE_SHA256] = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(output, data)
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
        check_dense_file(source)  # an engine of a stale graph would be stale too
        engine = build_tensorrt_engine(
            source, folder / dense_engine_file(native, precision), precision, max_side=max_side
        )
        record = {"path": str(engine), "precision": precision, "max_side": max_side}
        built.append({**record, "native_stride": native})
    if not built:
        raise ValueError(f"{model_dir}: no dense graphs; make them with 'defectscope densify'")
    return built
