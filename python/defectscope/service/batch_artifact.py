"""What a batch run loads of a model, and one hash over all of it.

A frame's outputs are reused only while the model they came from is the same, so the
hash must cover every file a run may read, not only the one named: ``--model
DIR/model.onnx`` also loads the dense graphs in ``DIR/dense/`` and checks the artifact
against ``DIR/model.json`` and ``DIR/weights.pt``; a TensorRT engine brings its
``<engine>.json``. Hidden entries (staging folders of an export in progress) are not
loaded and not hashed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from defectscope.artifacts.metadata import META_FILE, WEIGHTS_FILE
from defectscope.engines.dense import DENSE_DIR
from defectscope.io.files import file_hash


def _visible_files(folder: Path) -> list[Path]:
    """Files under ``folder`` whose path (below it) has no hidden component."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def artifact_files(artifact: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(name, path)`` of every file a run on ``artifact`` may load, sorted by name.

    A model directory: every file in it (weights, ``model.json`` with its calibration
    and density, exported models, engines, ``dense/``). A file: the file, its
    ``<file>.json`` sidecar, and beside it ``model.json``, ``weights.pt`` and the
    ``dense/`` folder. Names are relative to the directory (or the file's folder).

    Raises
    ------
    FileNotFoundError
        When ``artifact`` is neither a file nor a folder.
    """
    path = Path(artifact)
    if path.is_dir():
        return [(p.relative_to(path).as_posix(), p) for p in _visible_files(path)]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model artifact not found")
    folder = path.parent
    files = {path.name: path}
    for name in (f"{path.name}.json", META_FILE, WEIGHTS_FILE):
        if (folder / name).is_file():
            files[name] = folder / name
    if (folder / DENSE_DIR).is_dir():
        for item in _visible_files(folder / DENSE_DIR):
            files[item.relative_to(folder).as_posix()] = item
    return sorted(files.items())


def artifact_hash(artifact: str | os.PathLike) -> str:
    """SHA-256 over everything a run on ``artifact`` loads (see :func:`artifact_files`).

    Each file's name and content hash go in, so a file renamed, added or removed (a
    ``dense/`` made or deleted beside an ONNX file) changes the hash.
    """
    digest = hashlib.sha256()
    for name, item in artifact_files(artifact):
        digest.update(name.encode() + b"\0")
        digest.update(file_hash(item).encode())
    return digest.hexdigest()
