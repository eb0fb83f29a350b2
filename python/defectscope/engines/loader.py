"""Loader."""

from __future__ import annotations

import os
from pathlib import Path

from defectscope.engines.base import Engine, EngineError, artifact_kind
from defectscope.engines.onnx import GPU_PROVIDERS, OnnxEngine
from defectscope.engines.pytorch import TorchEngine
from defectscope.engines.tensorrt import TensorRTEngine

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def gpu_providers_available() -> bool:
    """True when ONNX Runtime here can run on a GPU (TensorRT or CUDA provider)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return any(p in ort.get_available_providers() for p in GPU_PROVIDERS)


def load_engine(
    artifact: str | os.PathLike, backend: str = "auto", threads: int = 0, precision: str = "fp32"
) -> Engine:
    """Open ``artifact`` with ``backend``.

    ``auto`` picks the fastest that can run it: a TensorRT engine runs on TensorRT;
    an ONNX file on ONNX Runtime (TensorRT/CUDA providers first); a model directory
    on ONNX Runtime when a model exported beside it exists, else on PyTorch. On the
    CPU the INT8 model (``model.int8.onnx``, U8S8 for VNNI) is preferred; with a GPU
    provider the FP32 ``model.onnx`` is taken (the TensorRT provider builds FP16 from
    it), since the CPU INT8 model's asymmetric activations do not suit TensorRT.
    """
    if backend not in BACKENDS:
        raise EngineError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    kind = artifact_kind(artifact)
    artifact = Path(artifact)
    if kind == "tensorrt":
        if backend not in ("auto", "tensorrt"):
            raise EngineError(f"{artifact}: a TensorRT engine runs only on the tensorrt backend")
        return TensorRTEngine(artifact)
    if kind == "onnx":
        if backend not in ("auto", "onnxruntime"):
            raise EngineError(f"{artifact}: an ONNX model runs on the onnxruntime backend")
        return OnnxEngine(artifact, threads=threads)
    if backend == "tensorrt":
        for name in ("model.int8.engine", "model.fp16.engine"):
            if (artifact / name).is_file():
                return TensorRTEngine(artifact / name)
        raise EngineError(f"{artifact}: export a TensorRT engine first (defectscope export)")
    if backend == "auto":
        names = ["model.onnx"] if gpu_providers_available() else ["model.int8.onnx", "model.onnx"]
        for name in names:
            if (artifact / name).is_file():
                return OnnxEngine(artifact / name, threads=threads)
        backend = "torch"
    if backend == "onnxruntime":
        onnx_path = artifact / "model.onnx"
        if not onnx_path.is_file():
            raise EngineError(f"{artifact}: no model.onnx; run 'defectscope export' first")
        return OnnxEngine(onnx_path, threads=threads)
    return TorchEngine(artifact, precision=precision)
