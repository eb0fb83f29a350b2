"""Inference engines behind one interface: PyTorch, ONNX Runtime and TensorRT.

An engine takes normalized float32 NCHW patches and returns calibrated class
probabilities and embeddings. It owns its device, precision and session, so a
caller only passes arrays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.checkpoint import META_FILE, ModelConfig, load_checkpoint
from defectscope.export import INPUT_NAME, OUTPUT_NAMES, read_onnx_metadata, tensorrt_available

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


class EngineError(ValueError):
    """An artifact cannot be loaded by the requested backend."""


class Engine:
    """Common interface; subclasses implement :meth:`run`."""

    name = "engine"

    def __init__(self, config: ModelConfig, temperature: float = 1.0):
        self.config = config
        self.temperature = float(temperature)

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.config.patch_size
        return (self.config.normalization.channels, size, size)

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(n, classes)`` and embeddings ``(n, d)`` for ``inputs``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "classes": self.classes, "patch_size": self.config.patch_size}


class TorchEngine(Engine):
    """PyTorch on the CPU (bf16 autocast optional) or CUDA."""

    name = "torch"

    def __init__(self, model_dir: str | os.PathLike, precision: str = "fp32", threads: int = 0):
        import torch

        model, config, record = load_checkpoint(model_dir)
        super().__init__(config, record.get("calibration", {}).get("temperature", 1.0))
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.precision = precision
        if threads > 0:
            torch.set_num_threads(threads)

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        from defectscope.train import autocast_dtype

        dtype = autocast_dtype(self.precision) if self.device.type == "cpu" else None
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device)
            with torch.autocast(
                self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
            ):
                logits, embedding = self.model.forward_with_embedding(x)
            probabilities = torch.softmax(logits.float() / self.temperature, dim=1)
        return probabilities.cpu().numpy(), embedding.float().cpu().numpy()


class OnnxEngine(Engine):
    """ONNX Runtime: TensorRT and CUDA execution providers when present, else CPU.

    On the CPU, inputs and outputs are bound to preallocated numpy buffers (IO
    binding), so ONNX Runtime reads the tiler's buffer in place.
    """

    name = "onnxruntime"

    def __init__(
        self, path: str | os.PathLike, threads: int = 0, providers: list[str] | None = None
    ):
        import onnxruntime as ort

        metadata = read_onnx_metadata(path)
        super().__init__(ModelConfig.from_dict(metadata["model"]), metadata.get("temperature", 1.0))
        self.precision = metadata.get("precision", "fp32")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        if providers is None:
            preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
            providers = [p for p in preferred if p in available] + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.providers = self.session.get_providers()
        self._outputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.ort = ort

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers, "precision": self.precision}

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        n = len(inputs)
        if self.providers[0] != "CPUExecutionProvider":
            probs, emb = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: inputs})
            return probs, emb
        if n not in self._outputs:
            self._outputs[n] = (
                np.empty((n, len(self.classes)), np.float32),
                np.empty((n, self.config.embedding_dim), np.float32),
            )
        probs, emb = self._outputs[n]
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, inputs)
        for name, array in zip(OUTPUT_NAMES, (probs, emb), strict=True):
            binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        self.session.run_with_iobinding(binding)
        return probs.copy(), emb.copy()


class TensorRTEngine(Engine):
    """A serialized TensorRT engine run through its Python API with torch CUDA buffers."""

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike):
        ok, reason = tensorrt_available()
        if not ok:
            raise EngineError(f"{path}: cannot run a TensorRT engine here: {reason}")
        import tensorrt as trt
        import torch

        sidecar = Path(str(path) + ".json")
        if not sidecar.is_file():
            raise EngineError(f"{path}: missing metadata file {sidecar.name}")
        metadata = json.loads(sidecar.read_text())
        super().__init__(ModelConfig.from_dict(metadata["model"]), metadata.get("temperature", 1.0))
        self.max_batch = int(metadata.get("max_batch", 256))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.torch = torch
        self.stream = torch.cuda.Stream()

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        outs_p, outs_e = [], []
        for start in range(0, len(inputs), self.max_batch):
            chunk = torch.from_numpy(np.ascontiguousarray(inputs[start : start + self.max_batch]))
            x = chunk.cuda(non_blocking=True)
            n = len(x)
            probs = torch.empty((n, len(self.classes)), device="cuda")
            emb = torch.empty((n, self.config.embedding_dim), device="cuda")
            self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
            for name, tensor in ((INPUT_NAME, x), (OUTPUT_NAMES[0], probs), (OUTPUT_NAMES[1], emb)):
                self.context.set_tensor_address(name, tensor.data_ptr())
            self.context.execute_async_v3(self.stream.cuda_stream)
            self.stream.synchronize()
            outs_p.append(probs.cpu().numpy())
            outs_e.append(emb.cpu().numpy())
        return np.concatenate(outs_p), np.concatenate(outs_e)


def artifact_kind(path: str | os.PathLike) -> str:
    """'model_dir', 'onnx' or 'tensorrt' for an artifact path."""
    path = Path(path)
    if path.is_dir():
        if not (path / META_FILE).is_file():
            raise EngineError(f"{path}: not a defectscope model directory (no {META_FILE})")
        return "model_dir"
    if not path.is_file():
        raise EngineError(f"{path}: artifact not found")
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix in (".engine", ".plan", ".trt"):
        return "tensorrt"
    raise EngineError(
        f"{path}: unknown artifact type; give a model directory, an .onnx file or an .engine file"
    )


def load_engine(
    artifact: str | os.PathLike, backend: str = "auto", threads: int = 0, precision: str = "fp32"
) -> Engine:
    """Open ``artifact`` with ``backend``.

    ``auto`` picks the fastest that can run it: a TensorRT engine runs on
    TensorRT; an ONNX file on ONNX Runtime (TensorRT/CUDA providers first); a
    model directory on PyTorch, or on ONNX Runtime when a ``model.onnx`` /
    ``model.int8.onnx`` exported beside it exists (INT8 preferred on the CPU).
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
        raise EngineError(f"{artifact}: export a TensorRT engine first (defectscope export)")
    if backend == "auto":
        for name in ("model.int8.onnx", "model.onnx"):
            if (artifact / name).is_file():
                return OnnxEngine(artifact / name, threads=threads)
        backend = "torch"
    if backend == "onnxruntime":
        onnx_path = artifact / "model.onnx"
        if not onnx_path.is_file():
            raise EngineError(f"{artifact}: no model.onnx; run 'defectscope export' first")
        return OnnxEngine(onnx_path, threads=threads)
    return TorchEngine(artifact, precision=precision, threads=threads)
