"""Trunks shipped inside the package: found by name, verified by hash before use.

Each trunk is ``weights/<name>.pt`` (an fp16 state dict of the VGG-16 ``features``
trunk) with ``weights/<name>.json``, its manifest: architecture, SHA-256 of the weights
file, the recipe and data hash it was made from (``scripts/pretrain_trunk.py``), seed,
time and license. Reading manifests needs no PyTorch; :mod:`defectscope.nets.vgg` loads
the weights once :func:`verified_weights` has checked them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from defectscope.io.files import file_hash

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The trunk ``--weights auto`` starts from when no ImageNet weights are cached.
DEFAULT_TRUNK = "sim-haadf"


class ShippedTrunkError(ValueError):
    """A shipped trunk is missing, damaged or does not match its manifest."""


def shipped_trunks(directory: Path | None = None) -> list[str]:
    """Names of the trunks whose manifest is in ``directory`` (default :data:`WEIGHTS_DIR`)."""
    directory = directory or WEIGHTS_DIR
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.json") if not p.name.startswith("."))


def read_manifest(name: str, directory: Path | None = None) -> dict[str, Any]:
    """The manifest of the shipped trunk ``name``.

    Raises
    ------
    ShippedTrunkError
        When there is no such trunk or its manifest is not a readable JSON object with
        ``file``, ``sha256`` and ``architecture``.
    """
    directory = directory or WEIGHTS_DIR
    path = directory / f"{name}.json"
    if not path.is_file():
        known = ", ".join(shipped_trunks(directory)) or "none in this installation"
        raise ShippedTrunkError(f"no shipped trunk named {name!r} (shipped: {known})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON and int limits
        raise ShippedTrunkError(f"{path}: unreadable manifest ({type(exc).__name__})") from exc
    if not isinstance(manifest, dict) or not all(
        isinstance(manifest.get(k), str) for k in ("file", "sha256", "architecture")
    ):
        raise ShippedTrunkError(f"{path}: a manifest needs 'file', 'sha256' and 'architecture'")
    if Path(manifest["file"]).name != manifest["file"]:
        raise ShippedTrunkError(f"{path}: 'file' must name a file beside the manifest")
    return manifest


def verified_weights(
    name: str, architecture: str, directory: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """The weights file of trunk ``name`` and its manifest, after checking both.

    Raises
    ------
    ShippedTrunkError
        When the trunk is unknown, made for another architecture, its file is missing
        or its SHA-256 differs from the manifest's (a damaged or replaced file).
    """
    directory = directory or WEIGHTS_DIR
    manifest = read_manifest(name, directory)
    if manifest["architecture"] != architecture:
        raise ShippedTrunkError(
            f"shipped trunk {name!r} is a {manifest['architecture']} trunk, not {architecture}"
        )
    path = directory / manifest["file"]
    if not path.is_file():
        raise ShippedTrunkError(f"{path}: the weights of shipped trunk {name!r} are missing")
    digest = file_hash(path)
    if digest != manifest["sha256"]:
        raise ShippedTrunkError(
            f"{path}: SHA-256 {digest} differs from the manifest's {manifest['sha256']}: the "
            "file is damaged or was replaced; reinstall defectscope"
        )
    return path, manifest


def default_trunk(architecture: str, directory: Path | None = None) -> str | None:
    """The shipped trunk ``--weights auto`` starts ``architecture`` from, if any.

    Only an absent manifest means "none": a damaged one is returned by name, so that
    loading it fails loudly instead of training from random initialization unnoticed.
    """
    if not ((directory or WEIGHTS_DIR) / f"{DEFAULT_TRUNK}.json").exists():
        return None
    try:
        manifest = read_manifest(DEFAULT_TRUNK, directory)
    except ShippedTrunkError:
        return DEFAULT_TRUNK
    return DEFAULT_TRUNK if manifest["architecture"] == architecture else None
