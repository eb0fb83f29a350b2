"""Self-describing model directories: ``weights.pt`` plus ``model.json``."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from defectscope.artifacts.metadata import (
    DERIVED_ARTIFACTS,
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    WEIGHTS_SHA256,
    MetadataError,
    ModelConfig,
    guess_background,
    read_metadata,
    read_model_dir,
)
from defectscope.artifacts.provenance import warn_once
from defectscope.io.files import atomic_write_bytes, atomic_write_json
from defectscope.nets.vgg import ARCHITECTURES, DefectNet

__all__ = [
    "META_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "ModelConfig",
    "guess_background",
    "load_checkpoint",
    "read_metadata",
    "save_checkpoint",
]

# A model directory's metadata is an artifact record (torch-free, see :mod:`artifact`).
CheckpointError = MetadataError
log = logging.getLogger(__name__)


def save_checkpoint(
    directory: str | os.PathLike,
    model: DefectNet,
    config: ModelConfig,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write weights and JSON metadata into ``directory`` (each file atomically).

    Replacing a model's weights removes what was made from the old ones (ONNX
    exports, TensorRT engines, ``dense/``): they would no longer match.

    ``metadata`` holds free-form records such as the training configuration,
    the history and metrics; the model's own ``config`` is stored under ``"model"``, and
    the SHA-256 of the weights written under ``"weights_sha256"``: the calibration and
    density in ``model.json`` were made from those weights, and every artifact made
    from the directory records the same hash (see :mod:`defectscope.artifacts.provenance`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / WEIGHTS_FILE).exists():
        # ONNX files, engines and dense graphs of the weights replaced here would go on
        # being loaded beside the new ones and answer for a model that is gone.
        stale = [directory / n for n in DERIVED_ARTIFACTS if (directory / n).exists()]
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if stale:
            log.warning(
                "%s: removed %s, made from the weights this save replaces",
                directory,
                ", ".join(p.name for p in stale),
            )
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    atomic_write_bytes(directory / WEIGHTS_FILE, data)
    record = {"format_version": FORMAT_VERSION, "model": config.to_dict(), **(metadata or {})}
    record[WEIGHTS_SHA256] = hashlib.sha256(data).hexdigest()
    atomic_write_json(directory / META_FILE, record)
    return directory


def load_checkpoint(directory: str | os.PathLike) -> tuple[DefectNet, ModelConfig, dict[str, Any]]:
    """Rebuild the network of a model directory, in eval mode on the CPU.

    The record returned is ``model.json``'s, with ``"weights_sha256"`` set to the hash of
    the weights actually loaded (what an artifact made from them records).

    Raises
    ------
    CheckpointError
        When ``model.json`` (its calibration and density) was written for other weights
        than ``weights.pt`` holds: one line naming both hashes.
    """
    directory = Path(directory)
    metadata = read_model_dir(directory)
    record, config = metadata.raw, metadata.config
    if config.architecture not in ARCHITECTURES:
        raise CheckpointError(f"{directory}: unknown architecture {config.architecture!r}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing {WEIGHTS_FILE}")
    n_classes = len(config.classes)
    model = DefectNet(n_classes, config.patch_size, config.embedding_dim, 0.5, config.architecture)
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{weights}: cannot read weights ({exc})") from exc
    actual = hashlib.sha256(data).hexdigest()
    if metadata.weights_sha256 is None:
        warn_once(
            f"{directory / META_FILE}: records no weights hash (written before defectscope "
            "recorded one); its calibration and density cannot be checked against "
            f"{WEIGHTS_FILE}"
        )
    elif metadata.weights_sha256 != actual:
        raise CheckpointError(
            f"{directory / META_FILE}: written for weights sha256 {metadata.weights_sha256}, "
            f"but {weights} has sha256 {actual}; its calibration and density belong to other "
            "weights (save the model again, or restore its weights.pt)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise CheckpointError(f"{weights}: cannot load weights ({exc})") from exc
    model.eval()
    return model, config, {**record, WEIGHTS_SHA256: actual}
