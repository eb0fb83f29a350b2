"""Onnx."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.artifacts.metadata import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    ArtifactMetadata,
    parse_metadata_json,
)
from defectscope.artifacts.provenance import check_weights
from defectscope.engines.base import Engine, EngineError


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

    A file in a model directory made from other weights than the directory's
    ``weights.pt`` is refused (:class:`~defectscope.artifacts.provenance.ProvenanceError`).
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
        check_weights(path, metadata.weights_sha256)
        super().__init__(**self.fields_of(metadata))
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
        # Widths the graph states must be the metadata's: a class list of another model
        # would otherwise name the columns of these probabilities.
        widths = {OUTPUT_NAMES[0]: len(self.classes), OUTPUT_NAMES[1]: self.config.embedding_dim}
        for output in self.session.get_outputs():
            want = widths.get(output.name)
            shape = output.shape
            if want is None:
                continue
            if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != want):
                raise EngineError(
                    f"{path}: output {output.name!r} has shape {shape}, but the metadata says "
                    f"(batch, {want})"
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


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
