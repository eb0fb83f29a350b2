"""Int8."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from defectscope.artifacts.metadata import (
    INPUT_NAME,
    METADATA_KEY,
)
from defectscope.export.onnx import ExportError, read_onnx_metadata
from defectscope.io.files import atomic_write_bytes


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


# Where each INT8 model goes: ONNX Runtime on x86 CPUs runs U8S8 (unsigned activations,
# VNNI); TensorRT takes only symmetric signed INT8 Q/DQ.
INT8_FILES = {"cpu": "model.int8.onnx", "tensorrt": "model.int8.trt.onnx"}
