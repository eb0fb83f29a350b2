"""Tensorrt."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from defectscope.artifacts.metadata import (
    INPUT_NAME,
    OUTPUT_NAMES,
    ArtifactMetadata,
    check_sha256,
    read_sidecar,
)
from defectscope.artifacts.provenance import cached_file_hash, check_weights
from defectscope.engines.base import Engine, EngineError

ENGINE_SHA256 = "engine_sha256"


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT and a CUDA GPU can be used here, and why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt Python package is not installed"
    try:
        cudart = _cudart()
    except ImportError:
        return False, "cuda-python is not installed (pip install cuda-python)"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        return False, "no CUDA GPU is visible"
    return True, ""


class TensorRTSession:
    """A deserialized TensorRT engine with its execution context, CUDA stream and buffers.

    Device buffers are allocated once, for the largest shapes the caller will run.
    :meth:`execute` queues the input copies, the inference and the output copies on
    one stream, so they run in order; every TensorRT and CUDA call's result is checked.
    """

    def __init__(self, path: str | os.PathLike):
        ok, reason = tensorrt_available()
        if not ok:
            raise EngineError(f"{path}: cannot run a TensorRT engine here: {reason}")
        import tensorrt as trt

        self.path = Path(path)
        self.cudart = _cudart()
        self.device: dict[str, int] = {}
        self.capacity: dict[str, int] = {}
        self.stream = None
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{path}: TensorRT could not create an execution context")
        self.stream = self.check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")

    def check(self, result, what: str):
        """The value(s) of a cuda-python call, or EngineError with CUDA's message."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, message = self.cudart.cudaGetErrorString(err)
            raise EngineError(f"CUDA {what} failed: {message}")
        return values[0] if len(values) == 1 else values

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Fix the input's shape; returns the output shapes that follow from it."""
        if not self.context.set_input_shape(name, tuple(int(v) for v in shape)):
            raise EngineError(
                f"{self.path}: TensorRT refused the input shape {tuple(shape)} (outside the "
                "engine's optimization profile)"
            )
        return {n: tuple(int(v) for v in self.context.get_tensor_shape(n)) for n in OUTPUT_NAMES}

    def allocate(self, nbytes: dict[str, int]) -> None:
        """One device buffer per tensor, bound to the context."""
        for name, size in nbytes.items():
            pointer = self.check(self.cudart.cudaMalloc(int(size)), "cudaMalloc")
            self.device[name], self.capacity[name] = pointer, int(size)
            if not self.context.set_tensor_address(name, int(pointer)):
                raise EngineError(f"{self.path}: TensorRT has no tensor named {name!r}")

    def execute(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Copy ``inputs`` in, run, copy into ``outputs`` (C-contiguous host arrays)."""
        cudart = self.cudart
        for name, host in (*inputs.items(), *outputs.items()):
            if not host.flags.c_contiguous or host.nbytes > self.capacity[name]:
                raise EngineError(
                    f"{name}: {host.nbytes} bytes do not fit the {self.capacity[name]}-byte "
                    "device buffer (or the host array is not contiguous)"
                )
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, host in inputs.items():
            self.check(
                cudart.cudaMemcpyAsync(
                    self.device[name], host.ctypes.data, host.nbytes, to_device, self.stream
                ),
                "cudaMemcpyAsync",
            )
        if not self.context.execute_async_v3(self.stream):
            raise EngineError("TensorRT inference failed (execute_async_v3 returned False)")
        for name, host in outputs.items():
            self.check(
                cudart.cudaMemcpyAsync(
                    host.ctypes.data, self.device[name], host.nbytes, to_host, self.stream
                ),
                "cudaMemcpyAsync",
            )
        self.check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def __del__(self):
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for pointer in getattr(self, "device", {}).values():
            cudart.cudaFree(pointer)
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)


def read_engine_metadata(path: str | os.PathLike) -> ArtifactMetadata:
    """The checked ``<engine>.json`` of a TensorRT engine, bound to the engine and its weights.

    The sidecar records the SHA-256 of the engine it was written with (``engine_sha256``)
    and of the weights the engine was made from; an engine that is not the one its
    sidecar describes, or one made from other weights than its model directory's
    ``weights.pt``, is refused.
    """
    metadata = read_sidecar(path)
    try:
        recorded = check_sha256(metadata.raw.get(ENGINE_SHA256), ENGINE_SHA256)
    except ValueError as exc:
        raise EngineError(f"{path}.json: {exc}") from None
    if recorded is not None and recorded != (actual := cached_file_hash(path)):
        raise EngineError(
            f"{path}: engine sha256 {actual}, but {Path(path).name}.json describes the engine "
            f"sha256 {recorded}; export the engine again"
        )
    check_weights(path, metadata.weights_sha256)
    return metadata


class TensorRTEngine(Engine):
    """A serialized TensorRT engine of the per-window model (batches of patches)."""

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike):
        self.session = TensorRTSession(path)
        metadata = read_engine_metadata(path)
        super().__init__(**self.fields_of(metadata))
        self.precision = metadata.precision
        self.max_batch = int(metadata.raw.get("max_batch", 256))
        widths = {
            INPUT_NAME: int(np.prod(self.input_shape)),
            OUTPUT_NAMES[0]: len(self.classes),
            OUTPUT_NAMES[1]: self.config.embedding_dim,
        }
        self.session.allocate({name: self.max_batch * width * 4 for name, width in widths.items()})

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        probs = np.empty((len(inputs), len(self.classes)), np.float32)
        emb = np.empty((len(inputs), self.config.embedding_dim), np.float32)
        for start in range(0, len(inputs), self.max_batch):
            chunk = inputs[start : start + self.max_batch]
            n = len(chunk)
            self.session.set_input_shape(INPUT_NAME, (n, *self.input_shape))
            rows = slice(start, start + n)
            outputs = {OUTPUT_NAMES[0]: probs[rows], OUTPUT_NAMES[1]: emb[rows]}
            self.session.execute({INPUT_NAME: chunk}, outputs)
        return probs, emb
