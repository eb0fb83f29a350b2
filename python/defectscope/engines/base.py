"""Inference engines behind one interface: ONNX Runtime, TensorRT and PyTorch.

An engine takes normalized float32 NCHW patches and returns calibrated class
probabilities and embeddings. It owns its device, precision and session, so a
caller only passes arrays. This module imports neither PyTorch nor ONNX: the
ONNX Runtime and TensorRT engines run on an instrument PC without them, and
PyTorch is imported only when a model directory is run on the ``torch`` backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.artifacts.density import FeatureDensity
from defectscope.artifacts.metadata import (
    INPUT_NAME,
    META_FILE,
    METADATA_KEY,
    OUTPUT_NAMES,
    ArtifactMetadata,
    MetadataError,
    ModelConfig,
    parse_metadata_json,
    read_sidecar,
)

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class EngineError(ValueError):
    """An artifact cannot be loaded by the requested backend."""


class Engine:
    """Common interface; subclasses implement :meth:`run`."""

    name = "engine"

    def __init__(
        self, config: ModelConfig, temperature: float = 1.0, density: FeatureDensity | None = None
    ):
        self.config = config
        self.temperature = float(temperature)
        # The embedding's training density, when the artifact carries one (uncertainty).
        self.density = density

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
    """PyTorch on the CPU (bf16 autocast optional) or CUDA; needs the ``train`` extra.

    Thread counts are left to the process (``torch.set_num_threads`` is global
    state, which a library constructor must not change).
    """

    name = "torch"

    def __init__(self, model_dir: str | os.PathLike, precision: str = "fp32"):
        try:
            import torch
        except ImportError as exc:
            raise EngineError(
                f"{model_dir}: running a model directory needs PyTorch (pip install "
                "'defectscope[train]'); or export it to ONNX and load model.onnx"
            ) from exc
        from defectscope.nets.checkpoint import load_checkpoint
        from defectscope.nets.device import autocast_dtype

        model, config, record = load_checkpoint(model_dir)
        metadata = ArtifactMetadata.from_record(record, str(Path(model_dir) / META_FILE))
        super().__init__(config, metadata.temperature, metadata.density)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.precision = precision
        self._autocast = autocast_dtype(precision) if self.device.type == "cpu" else None

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        dtype = self._autocast
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device)
            with torch.autocast(
                self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
            ):
                logits, embedding = self.model.forward_with_embedding(x)
            probabilities = torch.softmax(logits.float() / self.temperature, dim=1)
        return probabilities.cpu().numpy(), embedding.float().cpu().numpy()


def default_cache_dir() -> Path:
    """Where engines built at load time (ONNX Runtime's TensorRT provider) are kept."""
    root = os.environ.get("DEFECTSCOPE_CACHE") or Path.home() / ".cache" / "defectscope"
    return Path(root)


def onnx_metadata(session, path: str | os.PathLike) -> ArtifactMetadata:
    """The checked defectscope record of an ONNX Runtime session's model."""
    custom = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in custom:
        raise EngineError(
            f"{path}: ONNX model has no defectscope metadata (not exported by defectscope)"
        )
    record = parse_metadata_json(custom[METADATA_KEY], str(path))
    return ArtifactMetadata.from_record(record, str(path))


class OnnxEngine(Engine):
    """ONNX Runtime: TensorRT and CUDA execution providers when present, else CPU.

    On CUDA the outputs stay on the device until the batch is done (IO binding); on
    the CPU a plain ``run`` is as fast and copies less. The TensorRT provider keeps
    the engines it builds in a cache folder (``DEFECTSCOPE_CACHE``), so a process
    does not rebuild them for every start and batch size.
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int = 0,
        providers: list[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError(f"{path}: needs onnxruntime (pip install onnxruntime)") from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "ort-tensorrt"
        provider_list: list = []
        for provider in providers:
            if provider == "TensorrtExecutionProvider":
                cache.mkdir(parents=True, exist_ok=True)
                provider_list.append(
                    (
                        provider,
                        {
                            "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(cache),
                            "trt_timing_cache_enable": True,
                            "trt_timing_cache_path": str(cache),
                            "trt_fp16_enable": True,
                        },
                    )
                )
            else:
                provider_list.append(provider)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=provider_list)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"{path}: not a loadable ONNX model ({exc})") from exc
        metadata = onnx_metadata(self.session, path)
        super().__init__(metadata.config, metadata.temperature, metadata.density)
        self.precision = metadata.precision
        self._check_io(path)
        self.providers = self.session.get_providers()
        self.on_gpu = self.providers[0] in GPU_PROVIDERS

    def _check_io(self, path) -> None:
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or not set(OUTPUT_NAMES) <= outputs:
            raise EngineError(
                f"{path}: expected input {INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}, got "
                f"{list(inputs)} and {sorted(outputs)}"
            )
        shape = inputs[INPUT_NAME]
        if len(shape) != 4 or any(
            isinstance(d, int) and d != want
            for d, want in zip(shape[1:], self.input_shape, strict=True)
        ):
            raise EngineError(
                f"{path}: input shape {shape} does not match the metadata's {self.input_shape}"
            )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers, "precision": self.precision}

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        if not self.on_gpu:
            probs, emb = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: inputs})
            return probs, emb
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, inputs)
        for name in OUTPUT_NAMES:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        probs, emb = binding.copy_outputs_to_cpu()
        return probs, emb


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


class TensorRTEngine(Engine):
    """A serialized TensorRT engine of the per-window model (batches of patches)."""

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike):
        self.session = TensorRTSession(path)
        metadata = read_sidecar(path)
        super().__init__(metadata.config, metadata.temperature, metadata.density)
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


__all__ = [
    "BACKENDS",
    "Engine",
    "EngineError",
    "MetadataError",
    "OnnxEngine",
    "TensorRTEngine",
    "TensorRTSession",
    "TorchEngine",
    "artifact_kind",
    "load_engine",
    "tensorrt_available",
]
