"""Opening an artifact with a backend, and the files a run loads for it."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

from defectscope.artifacts.metadata import DENSE_DIR, META_FILE, WEIGHTS_FILE
from defectscope.artifacts.provenance import ProvenanceError, cached_file_hash, model_dir_of
from defectscope.engines.base import Engine, EngineError, artifact_kind
from defectscope.engines.onnx import GPU_PROVIDERS, OnnxEngine
from defectscope.engines.pytorch import TorchEngine
from defectscope.engines.tensorrt import TensorRTEngine, tensorrt_available

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
# What a run may load from a model directory besides its dense/ folder.
MODEL_FILES = (
    META_FILE,
    WEIGHTS_FILE,
    "model.onnx",
    "model.int8.onnx",
    "model.fp16.engine",
    "model.fp16.engine.json",
    "model.int8.engine",
    "model.int8.engine.json",
)
log = logging.getLogger(__name__)


def gpu_providers_available() -> bool:
    """True when ONNX Runtime here can run on a GPU (TensorRT or CUDA provider)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return any(p in ort.get_available_providers() for p in GPU_PROVIDERS)


def _pytorch_sees_a_gpu() -> bool:
    """True when PyTorch is installed and sees a CUDA GPU.

    PyTorch is imported only where an NVIDIA driver is present: importing it costs
    seconds, which a CPU-only instrument PC should not pay to learn it has no GPU.
    """
    if not Path("/proc/driver/nvidia/version").exists() and "torch" not in sys.modules:
        return False
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def load_engine(
    artifact: str | os.PathLike, backend: str = "auto", threads: int = 0, precision: str = "fp32"
) -> Engine:
    """Open ``artifact`` with ``backend``.

    ``auto`` picks the fastest that can run it: a TensorRT engine runs on TensorRT;
    an ONNX file on ONNX Runtime (TensorRT/CUDA providers first); a model directory
    on its TensorRT engine when TensorRT is importable, on PyTorch when PyTorch sees a
    CUDA GPU and ONNX Runtime has no GPU provider, else on ONNX Runtime when a model
    exported beside it exists, else on PyTorch. On the
    CPU the INT8 model (``model.int8.onnx``, U8S8 for VNNI) is preferred; with a GPU
    provider the FP32 ``model.onnx`` is taken (the TensorRT provider builds FP16 from
    it), since the CPU INT8 model's asymmetric activations do not suit TensorRT.

    An artifact made from other weights than its model directory's ``weights.pt`` is
    refused when it was asked for (a file, or the ``onnxruntime``/``tensorrt`` backend);
    one ``auto`` finds beside the weights is passed by with a warning, for the next
    choice (PyTorch last, when it is installed).

    Raises
    ------
    EngineError
        The backend cannot run the artifact.
    ProvenanceError
        A derived artifact asked for was made from other weights (both hashes named).
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
        if tensorrt_available()[0]:
            for name in ("model.int8.engine", "model.fp16.engine"):
                if (artifact / name).is_file():
                    return TensorRTEngine(artifact / name)
        if not gpu_providers_available() and _pytorch_sees_a_gpu():
            # A GPU without TensorRT or onnxruntime-gpu: PyTorch runs the model there (and
            # its dense network, engines.torch_dense), not ONNX Runtime on the CPU.
            return TorchEngine(artifact, precision=precision)
        names = ["model.onnx"] if gpu_providers_available() else ["model.int8.onnx", "model.onnx"]
        stale: list[ProvenanceError] = []
        for name in names:
            if (artifact / name).is_file():
                try:
                    return OnnxEngine(artifact / name, threads=threads)
                except ProvenanceError as exc:
                    stale.append(exc)
                    log.warning("%s; not used", exc)
        if stale and importlib.util.find_spec("torch") is None:
            raise stale[0]  # nothing else to run it with: say why
        backend = "torch"
    if backend == "onnxruntime":
        onnx_path = artifact / "model.onnx"
        if not onnx_path.is_file():
            raise EngineError(f"{artifact}: no model.onnx; run 'defectscope export' first")
        return OnnxEngine(onnx_path, threads=threads)
    return TorchEngine(artifact, precision=precision)


def artifact_files(artifact: str | os.PathLike) -> list[Path]:
    """Every file a run may load for ``artifact``, sorted: hash these to know it is the same.

    A model directory: ``model.json``, ``weights.pt``, the exported models and engines
    with their sidecars, and every file of ``dense/``. A file (``.onnx``, an engine): it,
    its sidecar, and, when it lies in a model directory, that directory's ``model.json``,
    ``weights.pt`` (what it is checked against) and ``dense/`` (the dense graphs a map
    loads beside it). Which of them a given run opens depends on the backend and the
    machine (GPU, PyTorch), so all are listed: a change to any means the results may
    change. Hidden files (``.name``: staging folders, temporary files) are not loaded
    and not listed.

    Raises
    ------
    EngineError
        When ``artifact`` is not a model directory, ONNX file or engine.
    """
    path = Path(artifact)
    kind = artifact_kind(path)
    files: set[Path] = set()
    model_dir = path if kind == "model_dir" else model_dir_of(path)
    if kind != "model_dir":
        files.add(path)
        sidecar = Path(f"{path}.json")
        if sidecar.is_file():
            files.add(sidecar)
    if model_dir is not None:
        names = MODEL_FILES if kind == "model_dir" else (META_FILE, WEIGHTS_FILE)
        files.update(model_dir / name for name in names if (model_dir / name).is_file())
        dense = model_dir / DENSE_DIR
        if dense.is_dir():
            files.update(p for p in dense.iterdir() if p.is_file() and not p.name.startswith("."))
    return sorted(files)


def artifact_hashes(artifact: str | os.PathLike) -> dict[str, str]:
    """``{file: sha256}`` for :func:`artifact_files`, names relative to the model directory.

    Equal dictionaries mean a run loads the same bytes; a batch run keys its results by it.
    """
    path = Path(artifact)
    base = path if path.is_dir() else (model_dir_of(path) or path.parent)
    hashes = {}
    for file in artifact_files(path):
        try:
            name = file.relative_to(base).as_posix()
        except ValueError:
            name = str(file)
        hashes[name] = cached_file_hash(file)
    return hashes
