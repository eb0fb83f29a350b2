"""Which weights an artifact was made from, checked when it is loaded: torch-free.

Everything made from a model directory's ``weights.pt`` (``model.json``'s calibration and
density, ONNX and INT8 models, TensorRT engines, the dense graphs) records the SHA-256 of
those weights under ``weights_sha256``. A loader compares it with the weights the model
directory holds now (or, where ``weights.pt`` is not shipped, with the hash ``model.json``
records) and refuses an artifact made from other weights: it would answer for a model
that is not there. Artifacts made before the hash was recorded load with a warning.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from defectscope.artifacts.metadata import (
    DENSE_DIR,
    META_FILE,
    WEIGHTS_FILE,
    WEIGHTS_SHA256,
    MetadataError,
    check_sha256,
    parse_metadata_json,
)
from defectscope.io.files import file_hash

log = logging.getLogger(__name__)

__all__ = [
    "WEIGHTS_SHA256",
    "ProvenanceError",
    "cached_file_hash",
    "check_weights",
    "model_dir_of",
    "model_weights",
]


class ProvenanceError(MetadataError):
    """An artifact was made from other weights than the model directory beside it holds."""


_hashes: dict[tuple, str] = {}
_warned: set[str] = set()
_lock = threading.Lock()


def cached_file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file, remembered while its size, times and inode stay the same.

    A detector, a batch run and the service load the same weights and graphs many times;
    hashing 60 MB each time would cost more than the check is worth.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    key += (stat.st_ctime_ns,)
    with _lock:
        if key in _hashes:
            return _hashes[key]
    digest = file_hash(path)
    with _lock:
        if len(_hashes) > 1024:
            _hashes.clear()
        _hashes[key] = digest
    return digest


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time this process sees it."""
    with _lock:
        if message in _warned:
            return
        _warned.add(message)
    log.warning("%s", message)


def model_dir_of(artifact: str | os.PathLike) -> Path | None:
    """The model directory an artifact belongs to, or None for a standalone file.

    A model directory itself; a file beside ``model.json`` (``model.onnx``, an engine);
    or a file in its ``dense/`` folder.
    """
    path = Path(artifact)
    if path.is_dir() and path.name != DENSE_DIR:
        return path if (path / META_FILE).is_file() else None
    parent = path.parent
    if (parent / META_FILE).is_file():
        return parent
    if parent.name == DENSE_DIR and (parent.parent / META_FILE).is_file():
        return parent.parent
    return None


def model_weights(model_dir: str | os.PathLike) -> tuple[str | None, str]:
    """The hash of the weights ``model_dir`` stands for, and where it was read.

    ``weights.pt``'s own hash when the file is there; else the hash its ``model.json``
    records (a deployment folder without weights); ``(None, "")`` when neither is.
    """
    model_dir = Path(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if weights.is_file():
        return cached_file_hash(weights), str(weights)
    meta = model_dir / META_FILE
    if meta.is_file():
        try:
            record = parse_metadata_json(meta.read_bytes(), str(meta))
        except (OSError, MetadataError):
            return None, ""  # the model's own loader reports a broken model.json
        if isinstance(record, dict):
            try:
                recorded = check_sha256(record.get(WEIGHTS_SHA256))
            except MetadataError as exc:
                raise MetadataError(f"{meta}: {exc}") from None
            if recorded is not None:
                return recorded, f"{meta} (no {WEIGHTS_FILE}; the weights it records)"
    return None, ""


def check_weights(
    artifact: str | os.PathLike,
    recorded: str | None,
    model_dir: str | os.PathLike | None = None,
) -> None:
    """Refuse ``artifact`` when it was made from other weights than its model directory's.

    Parameters
    ----------
    artifact : path-like
        What is being loaded (named in the messages).
    recorded : str or None
        The ``weights_sha256`` the artifact records; None for one made before it was
        recorded, which is accepted with a warning.
    model_dir : path-like, optional
        The model directory to compare with; by default the one ``artifact`` lies in
        (:func:`model_dir_of`). Nothing is checked for a standalone artifact.

    Raises
    ------
    ProvenanceError
        One line naming both hashes when they differ.
    """
    model_dir = model_dir_of(artifact) if model_dir is None else Path(model_dir)
    if model_dir is None:
        return
    actual, source = model_weights(model_dir)
    if actual is None:
        return
    if recorded is None:
        warn_once(
            f"{artifact}: records no weights hash (made before defectscope recorded one), so "
            f"it cannot be checked against {source} (sha256 {actual}); make it again to bind it"
        )
        return
    if recorded != actual:
        raise ProvenanceError(
            f"{artifact}: made from weights sha256 {recorded}, but {source} has sha256 "
            f"{actual}; make it again from these weights (defectscope export / densify)"
        )
