"""What every model artifact says about itself, checked: torch-free.

A model directory (``model.json``), an ONNX file (``metadata_props``) and a TensorRT
engine (``<engine>.json``) all carry the same record: the classes, patch size,
normalization, embedding width, background class, the scale of the training patches
(:class:`ModelScale`) and the softmax temperature. This
module reads and validates that record without PyTorch, so runtimes on an instrument
PC can load exported artifacts with numpy and ONNX Runtime alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defectscope.artifacts.density import FeatureDensity
from defectscope.artifacts.disagreement import DropoutNovelty, EnsembleNovelty
from defectscope.artifacts.residual_density import ResidualDensity
from defectscope.tiling.lattice import LatticePeriods
from defectscope.tiling.tiler import Normalization

FORMAT_VERSION = 1
# The longest unit name a scale may carry ("nm", "Å", "pm", "µm", ...).
MAX_UNIT_LENGTH = 32
WEIGHTS_FILE = "weights.pt"
META_FILE = "model.json"
# Made from a model directory's weights (export, densify): stale once the weights change.
DERIVED_ARTIFACTS = (
    "model.onnx",
    "model.int8.onnx",
    "model.int8.trt.onnx",
    "model.fp16.engine",
    "model.fp16.engine.json",
    "model.int8.engine",
    "model.int8.engine.json",
    "export.json",
    "dense",
)
METADATA_KEY = "defectscope"
INPUT_NAME = "patches"
OUTPUT_NAMES = ("probabilities", "embedding")
_BACKGROUND_NAMES = ("bulk", "background", "lattice", "perfect")
MAX_PATCH_SIZE = 1024
MAX_EMBEDDING_DIM = 65536
# Where a model directory's dense graphs live (``defectscope densify``).
DENSE_DIR = "dense"
# The SHA-256 of the weights an artifact was made from (see :mod:`.provenance`).
WEIGHTS_SHA256 = "weights_sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class MetadataError(ValueError):
    """An artifact's metadata is missing, malformed or out of range."""


def guess_background(classes: list[str]) -> str | None:
    """The defect-free class: one named like bulk/background, else ``None``."""
    for name in classes:
        if name.lower() in _BACKGROUND_NAMES:
            return name
    return None


def _integer(data: dict, key: str, default: Any, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MetadataError(f"{key} must be an integer in {low}..{high}, got {value!r}")
    return value


def _normalization(data: Any) -> Normalization:
    if not isinstance(data, dict):
        raise MetadataError(f"normalization must be an object, got {data!r}")
    mode = data.get("mode", "zscore")
    if mode not in ("zscore", "minmax", "imagenet"):
        raise MetadataError(f"normalization mode must be zscore, minmax or imagenet, got {mode!r}")
    channels = data.get("channels", 3)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise MetadataError(f"normalization channels must be 1 or 3, got {channels!r}")
    value_range = data.get("value_range")
    if value_range is not None:
        if (
            not isinstance(value_range, list | tuple)
            or len(value_range) != 2
            or not all(_finite_number(v) for v in value_range)
            or not value_range[1] > value_range[0]
            or not math.isfinite(float(value_range[1]) - float(value_range[0]))
        ):
            raise MetadataError(
                f"normalization value_range must be [low, high], finite, high > low, "
                f"got {value_range!r}"
            )
        value_range = (float(value_range[0]), float(value_range[1]))
    if mode == "imagenet" and channels != 3:
        raise MetadataError("imagenet normalization needs 3 channels")
    return Normalization(mode=mode, value_range=value_range, channels=channels)


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_sha256(value: Any, key: str = WEIGHTS_SHA256) -> str | None:
    """A SHA-256 hex digest (64 lowercase hex digits) or None when absent."""
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise MetadataError(f"{key} must be a SHA-256 hex digest (64 hex digits), got {value!r}")
    return value


def check_temperature(value: Any) -> float:
    """The softmax temperature, a finite number > 0 (0 would divide logits by zero)."""
    if not _finite_number(value) or not 1e-3 <= float(value) <= 1e3:
        raise MetadataError(f"temperature must be a number in 0.001..1000, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class ModelScale:
    """What a model knows about the scale of the patches it was trained on.

    Attributes
    ----------
    pixel_size : float, optional
        Pixel size of the training patches, when the data gave one (``train
        --pixel-size``, a simulated dataset's settings); finite and > 0.
    unit : str, optional
        Unit of ``pixel_size`` (``"nm"``, ``"Å"``, ``"pm"``, ...); needed with it.
    lattice : LatticePeriods, optional
        Lattice periods (pixels) measured on the training patches' power spectra;
        recorded also when they could not be measured (``measurable=False`` and why).
    """

    pixel_size: float | None = None
    unit: str | None = None
    lattice: LatticePeriods | None = None

    def __post_init__(self) -> None:
        # The same checks as a record read from a file: a bad scale is refused where it
        # is made, not where a map first reads it.
        _check_scale_fields(self.pixel_size, self.unit, self.lattice)
        if self.pixel_size is not None:
            object.__setattr__(self, "pixel_size", float(self.pixel_size))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (``from_dict`` reads it back)."""
        return {
            "pixel_size": self.pixel_size,
            "unit": self.unit,
            "lattice": None if self.lattice is None else self.lattice.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> ModelScale:
        """Build and check a scale record; :class:`MetadataError` names the bad key."""
        if not isinstance(data, dict):
            raise MetadataError(f"scale must be an object, got {data!r}")
        lattice = data.get("lattice")
        if lattice is not None:
            if not isinstance(lattice, dict):
                raise MetadataError(f"scale.lattice must be an object, got {lattice!r}")
            try:
                lattice = LatticePeriods.from_dict(lattice)
            except (ValueError, TypeError) as exc:
                raise MetadataError(f"scale.lattice: {exc}") from None
        return cls(data.get("pixel_size"), data.get("unit"), lattice)


def _check_scale_fields(pixel_size: Any, unit: Any, lattice: Any) -> None:
    """Raise :class:`MetadataError` naming the first bad field of a :class:`ModelScale`."""
    if pixel_size is not None and not (_finite_number(pixel_size) and pixel_size > 0):
        raise MetadataError(f"scale.pixel_size must be a finite number > 0, got {pixel_size!r}")
    if unit is not None and (
        not isinstance(unit, str) or not unit.strip() or len(unit) > MAX_UNIT_LENGTH
    ):
        raise MetadataError(f"scale.unit must be a short name like 'nm', got {unit!r}")
    if pixel_size is not None and unit is None:
        raise MetadataError(f"scale.unit is missing: pixel_size {pixel_size!r} has no unit")
    if lattice is not None and not isinstance(lattice, LatticePeriods):
        raise MetadataError(f"scale.lattice must be LatticePeriods, got {lattice!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a runtime needs to rebuild and feed the network."""

    classes: tuple[str, ...]
    patch_size: int = 64
    normalization: Normalization = Normalization()
    embedding_dim: int = 256
    architecture: str = "vgg16"
    background_class: str | None = None
    # The scale of the training patches; None for models trained before it was recorded.
    scale: ModelScale | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["classes"] = list(self.classes)
        data["normalization"] = self.normalization.to_dict()
        data["scale"] = None if self.scale is None else self.scale.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ModelConfig:
        """Build and check a config; :class:`MetadataError` names the bad field."""
        if not isinstance(data, dict):
            raise MetadataError(f"model config must be an object, got {type(data).__name__}")
        classes = data.get("classes")
        if (
            not isinstance(classes, list | tuple)
            or len(classes) < 2
            or not all(isinstance(c, str) and c.strip() for c in classes)
        ):
            raise MetadataError(f"classes must be a list of 2 or more names, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise MetadataError(f"class names must be unique, got {classes!r}")
        if "patch_size" not in data:
            raise MetadataError("patch_size is missing")
        patch_size = _integer(data, "patch_size", None, 8, MAX_PATCH_SIZE)
        embedding_dim = _integer(data, "embedding_dim", 256, 1, MAX_EMBEDDING_DIM)
        architecture = data.get("architecture", "vgg16")
        if not isinstance(architecture, str):
            raise MetadataError(f"architecture must be a name, got {architecture!r}")
        background = data.get("background_class")
        if background is not None and background not in classes:
            raise MetadataError(f"background_class {background!r} is not among {list(classes)}")
        scale = data.get("scale")  # absent in model.json written before it was recorded
        return cls(
            classes=tuple(classes),
            patch_size=patch_size,
            normalization=_normalization(data.get("normalization", {})),
            embedding_dim=embedding_dim,
            architecture=architecture,
            background_class=background,
            scale=None if scale is None else ModelScale.from_dict(scale),
        )


@dataclasses.dataclass(frozen=True)
class ArtifactMetadata:
    """The checked record of an artifact: its config and temperature.

    ``weights_sha256`` is the SHA-256 of the ``weights.pt`` the artifact was made from
    (None for artifacts made before it was recorded).
    """

    config: ModelConfig
    temperature: float = 1.0
    precision: str = "fp32"
    raw: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    density: FeatureDensity | None = dataclasses.field(default=None, compare=False, repr=False)
    weights_sha256: str | None = dataclasses.field(default=None, compare=False)
    residual_density: ResidualDensity | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    mc_dropout: DropoutNovelty | None = dataclasses.field(default=None, compare=False, repr=False)
    head_ensemble: EnsembleNovelty | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    @classmethod
    def from_record(cls, record: Any, source: str) -> ArtifactMetadata:
        """Check an artifact's record (``{"model": ..., "temperature": ...}``)."""
        try:
            if not isinstance(record, dict):
                raise MetadataError(f"metadata must be an object, got {type(record).__name__}")
            if "model" not in record:
                raise MetadataError("the 'model' entry is missing")
            config = ModelConfig.from_dict(record["model"])
            temperature = record.get("temperature")
            if temperature is None:
                calibration = record.get("calibration", {})
                if not isinstance(calibration, dict):
                    raise MetadataError(f"calibration must be an object, got {calibration!r}")
                temperature = calibration.get("temperature", 1.0)
            precision = record.get("precision", "fp32")
            if not isinstance(precision, str):
                raise MetadataError(f"precision must be a name, got {precision!r}")
            classes, width = len(config.classes), config.embedding_dim
            density = _stored(record, "density", FeatureDensity.from_dict, classes, width)
            residual = _stored(record, "residual_density", ResidualDensity.from_dict, classes)
            if residual is not None and residual.patch_size != config.patch_size:
                raise MetadataError(
                    f"residual density is for {residual.patch_size} px windows, "
                    f"the model's are {config.patch_size} px"
                )
            dropout = _stored(record, "mc_dropout", DropoutNovelty.from_dict, classes, width)
            ensemble = _stored(record, "head_ensemble", EnsembleNovelty.from_dict, classes, width)
            weights = check_sha256(record.get(WEIGHTS_SHA256))
            temperature = check_temperature(temperature)
            return cls(
                config,
                temperature,
                precision,
                record,
                density,
                weights,
                residual,
                dropout,
                ensemble,
            )
        except MetadataError as exc:
            raise MetadataError(f"{source}: invalid model metadata: {exc}") from None


def _stored(record: dict, key: str, reader: Callable[..., Any], *shape: int) -> Any:
    """``reader(record[key], *shape)`` where the record holds ``key`` (else None); its
    ValueError becomes a MetadataError."""
    if record.get(key) is None:
        return None
    try:
        return reader(record[key], *shape)
    except ValueError as exc:
        raise MetadataError(str(exc)) from None


def parse_metadata_json(text: str | bytes, source: str) -> Any:
    """JSON that may not hold NaN or Infinity (``json`` accepts both by default)."""

    def reject(name: str):
        raise MetadataError(f"{source}: {name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=reject)
    # ValueError beyond JSONDecodeError: an integer past Python's digit limit (4300).
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MetadataError(f"{source}: invalid model metadata ({exc})") from exc


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a model directory, checked."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise MetadataError(f"{directory}: model directory not found")
    if not meta_path.is_file():
        raise MetadataError(f"{directory}: not a defectscope model (no {META_FILE})")
    record = parse_metadata_json(meta_path.read_bytes(), str(meta_path))
    ArtifactMetadata.from_record(record, str(meta_path))
    return record


def read_model_dir(directory: str | os.PathLike) -> ArtifactMetadata:
    """The checked metadata of a model directory."""
    record = read_metadata(directory)
    return ArtifactMetadata.from_record(record, str(Path(directory) / META_FILE))


def read_sidecar(path: str | os.PathLike) -> ArtifactMetadata:
    """The checked metadata of a TensorRT engine, from ``<engine>.json`` beside it."""
    sidecar = Path(str(path) + ".json")
    if not sidecar.is_file():
        raise MetadataError(f"{path}: missing metadata file {sidecar.name}")
    record = parse_metadata_json(sidecar.read_bytes(), str(sidecar))
    return ArtifactMetadata.from_record(record, str(sidecar))


# VGG-16's convolutional blocks (each ends with a max-pool).
N_BLOCKS = 5
