"""Pretrain a VGG-16 trunk on simulated HAADF frames of several crystal families.

A :class:`Recipe` (a JSON file, ``scripts/pretrain_trunk.json``) names the crystals,
zone axes, defects, pixel sizes and the randomized acquisition ranges;
:func:`pretrain_trunk` simulates every combination with
:func:`~defectscope.simulate.dataset.simulate_dataset`, pools the patches (a class per
crystal and defect kind, a group per frame), trains the classifier with grouped
validation and writes the trunk as fp16 weights with a manifest
(:mod:`defectscope.nets.shipped` loads it by name and checks its hash).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.io.datasets import PatchSet, load_patches
from defectscope.io.files import atomic_write_bytes, atomic_write_json, file_hash

RECIPE_KEYS = {
    "name",
    "architecture",
    "seed",
    "frames",
    "size",
    "pixel_sizes",
    "simulation",
    "crystals",
    "train",
    "license",
}
CRYSTAL_KEYS = {"structure", "zones", "defects", "simulation"}
# Simulation settings whose default changed after the shipped recipe was written, at
# the value its data were made with (the trunk needs no Bulk patches beside defects:
# they serve the unknown share of maps, which fine-tuning's own data decide).
RECIPE_SETTING_DEFAULTS = {"bulk_near_defects": False}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the trunk is pretrained on and how; see ``scripts/pretrain_trunk.json``.

    Attributes
    ----------
    name : str
        The trunk's name (``--weights NAME``).
    architecture : str
        ``vgg16_bn`` or ``vgg16``.
    seed : int
        Seeds every simulation (offset per combination) and the training.
    frames, size : int
        Frames per (crystal, zone, pixel size) and their side in pixels.
    pixel_sizes : tuple of float
        Pixel sizes (in the simulation's unit) every crystal and zone is recorded at.
    simulation : dict
        :class:`~defectscope.simulate.dataset.SimulationSettings` fields shared by all.
    crystals : tuple of dict
        ``structure``, ``zones`` (list of ``"u,v,w"``), ``defects`` and optionally
        ``simulation`` (fields for this crystal only).
    train : dict
        :class:`~defectscope.training.config.TrainConfig` fields.
    license : str
        The license the trunk is shipped under.
    """

    name: str
    architecture: str
    seed: int
    frames: int
    size: int
    pixel_sizes: tuple[float, ...]
    simulation: dict[str, Any]
    crystals: tuple[dict[str, Any], ...]
    train: dict[str, Any]
    license: str = "MIT"

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Read and check a recipe file.

        Raises
        ------
        ValueError
            Naming the file and the key or value that is wrong.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the recipe ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe is a JSON object")
        unknown = set(data) - RECIPE_KEYS
        missing = RECIPE_KEYS - {"license"} - set(data)
        if unknown or missing:
            raise ValueError(
                f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
            )
        for key, kind in (("pixel_sizes", list), ("crystals", list), ("simulation", dict)):
            if not isinstance(data[key], kind):
                raise ValueError(f"{path}: {key} must be a JSON {kind.__name__}")
        if not isinstance(data["train"], dict):
            raise ValueError(f"{path}: train must be a JSON dict of TrainConfig fields")
        recipe = cls(
            **{
                **data,
                "pixel_sizes": tuple(data["pixel_sizes"]),
                "crystals": tuple(data["crystals"]),
            }
        )
        try:
            recipe.check()
        except (ValueError, TypeError) as exc:  # TypeError: an unknown settings field
            raise ValueError(f"{path}: {exc}") from None
        return recipe

    def check(self) -> None:
        """Raise ``ValueError`` naming the first field out of range."""
        if not isinstance(self.name, str) or not self.name.replace("-", "").isalnum():
            raise ValueError(f"name {self.name!r}: letters, digits and '-' only")
        if self.name in ("auto", "imagenet", "none"):
            raise ValueError(f"name {self.name!r} is a --weights keyword, not a trunk name")
        from defectscope.training.config import TrainConfig

        # The training settings are checked now, not after hours of simulation.
        config = TrainConfig(**{**self.train, "architecture": self.architecture})
        for field in dataclasses.fields(config):
            value, meta = getattr(config, field.name), field.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise ValueError(f"{field.name} {value!r}: one of {list(meta['choices'])}")
            if "minimum" in meta and isinstance(value, int | float) and value < meta["minimum"]:
                raise ValueError(f"{field.name} {value!r}: at least {meta['minimum']}")
        for key in ("seed", "frames", "size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (key != "seed"):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not self.pixel_sizes or not all(
            isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p) and p > 0
            for p in self.pixel_sizes
        ):
            raise ValueError(f"pixel_sizes must be positive numbers, got {self.pixel_sizes!r}")
        if not self.crystals:
            raise ValueError("crystals: at least one")
        for crystal in self.crystals:
            if not isinstance(crystal, dict) or set(crystal) - CRYSTAL_KEYS:
                raise ValueError(f"crystal {crystal!r}: keys are {sorted(CRYSTAL_KEYS)}")
            if not isinstance(crystal.get("simulation", {}), dict):
                raise ValueError(f"crystal {crystal!r}: its simulation must be a JSON dict")
            if not {"structure", "zones", "defects"} <= set(crystal) or not crystal["zones"]:
                raise ValueError(f"crystal {crystal!r}: needs structure, zones and defects")
        from defectscope.simulate.defects import parse_defects
        from defectscope.simulate.specimen import load_structure

        for settings in self.settings().values():
            settings.check()
        for crystal in self.crystals:
            species = sorted(set(load_structure(crystal["structure"]).get_chemical_symbols()))
            parse_defects(crystal["defects"], species)

    def settings(self) -> dict[str, Any]:
        """Every combination's simulation settings, by a tag that names it
        (``srtio3_001_p0.016``); their seeds differ."""
        from defectscope.simulate.dataset import SimulationSettings, parse_zone
        from defectscope.simulate.instrument import Instrument

        combos: dict[str, Any] = {}
        for crystal in self.crystals:
            for zone_text in crystal["zones"]:
                zone = parse_zone(zone_text)
                for pixel_size in self.pixel_sizes:
                    # A structure given as a file is named by its stem, made path-safe.
                    name = re.sub(r"[^A-Za-z0-9]+", "-", Path(crystal["structure"]).stem)
                    tag = f"{name}_{''.join(map(str, zone))}_p{pixel_size:g}"
                    fields = {
                        # Simulation settings whose default changed after recipes were
                        # written keep the value they were made with, so a recipe's
                        # digest keeps naming its data; a recipe may set them.
                        **RECIPE_SETTING_DEFAULTS,
                        **self.simulation,
                        **crystal.get("simulation", {}),
                        "structure": crystal["structure"],
                        "zone": zone,
                        "defects": crystal["defects"],
                        "pixel_size": float(pixel_size),
                        "frames": self.frames,
                        "size": self.size,
                        "seed": self.seed * 1000 + len(combos),
                    }
                    if isinstance(fields.get("instrument"), dict):
                        fields["instrument"] = Instrument(**fields["instrument"])
                    if "exponent_range" in fields and fields["exponent_range"] is not None:
                        fields["exponent_range"] = tuple(fields["exponent_range"])
                    if tag in combos:
                        raise ValueError(f"crystal {crystal['structure']}, zone {zone}: twice")
                    combos[tag] = SimulationSettings(**fields)
        return combos

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """SHA-256 of the recipe's canonical JSON."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def simulate_recipe(recipe: Recipe, out: str | os.PathLike, progress: bool = True) -> list[Path]:
    """Simulate every combination into ``out/<tag>`` (kept ones are reused when whole and
    made with the same settings) and return the folders."""
    from defectscope.simulate.dataset import (
        _prepare,
        _settings_record,
        recorded_settings,
        simulate_dataset,
    )

    out = Path(out)
    folders = []
    for tag, settings in recipe.settings().items():
        folder = out / tag
        truth = folder / "truth.json"
        if truth.is_file():
            record = json.loads(truth.read_text())
            same = recorded_settings(record) == json.loads(json.dumps(_settings_record(settings)))
            classes = [spec.label for spec in _prepare(settings)[1]]
            if record.get("complete") and same and record.get("defect_classes") == classes:
                folders.append(folder)
                continue
            raise ValueError(
                f"{folder}: holds another simulation than the recipe's (or one made "
                "before its defect classes were recorded); remove it or give another "
                "output folder"
            )
        simulate_dataset(settings, folder, progress=progress)
        folders.append(folder)
    return folders


def pool_patches(folders: list[Path]) -> PatchSet:
    """The patches of several ``simulate`` outputs as one set: each class named
    ``<folder's crystal>:<class>`` (a Bulk class per crystal), each frame its own group."""
    images, labels, paths, groups = [], [], [], []
    pixel_sizes = set()
    for folder in folders:
        patches = load_patches(folder / "patches")
        crystal = folder.name.split("_")[0]
        names = [f"{crystal}:{c}" for c in patches.classes]
        images.append(patches.images)
        labels.extend(names[i] for i in patches.labels)
        paths.extend(patches.paths)
        offset = max(groups[-1]) + 1 if groups else 0
        groups.append(patches.groups + offset)
        pixel_sizes.add((patches.pixel_size, patches.unit))
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return PatchSet(
        images=np.concatenate(images),
        labels=np.array([index[c] for c in labels], dtype=np.int64),
        classes=classes,
        paths=paths,
        groups=np.concatenate(groups),
    )


def patch_digest(patches: PatchSet) -> str:
    """SHA-256 of the pooled patches: pixels, labels and class names."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(patches.images).tobytes())
    digest.update(patches.labels.astype("<i8").tobytes())
    digest.update(json.dumps(patches.classes).encode())
    return digest.hexdigest()


def export_trunk(
    model_dir: str | os.PathLike, out: str | os.PathLike, manifest: dict[str, Any]
) -> Path:
    """Write the trunk (``features.*``) of a trained model as fp16 ``<name>.pt`` with its
    manifest ``<name>.json`` (SHA-256 of the weights file added) into ``out``."""
    import torch

    from defectscope.artifacts.metadata import WEIGHTS_FILE

    state = torch.load(Path(model_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    trunk = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in state.items()
        if k.startswith("features.")
    }
    if not trunk:
        raise ValueError(f"{model_dir}: its weights hold no 'features.*' trunk")
    buffer = io.BytesIO()
    torch.save(trunk, buffer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = manifest["name"]
    weights = out / f"{name}.pt"
    atomic_write_bytes(weights, buffer.getvalue())
    manifest = {**manifest, "file": weights.name, "sha256": file_hash(weights)}
    manifest["bytes"] = weights.stat().st_size
    atomic_write_json(out / f"{name}.json", manifest)
    return weights


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pretrain_trunk(recipe: Recipe, out: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Simulate, train and export: ``out/sim/<tag>``, ``out/model``, ``out/trunk``.

    Returns
    -------
    dict
        The manifest written next to the trunk.
    """
    import torch

    from defectscope.tiling.residual import CENTRE_SHARE
    from defectscope.training.config import TrainConfig
    from defectscope.training.loop import train_model_dir

    out = Path(out)
    started = time.perf_counter()
    folders = simulate_recipe(recipe, out / "sim", progress=progress)
    simulated = time.perf_counter()
    patches = pool_patches(folders)
    config = TrainConfig(
        **{"weights": "none", "seed": recipe.seed, **recipe.train},
        architecture=recipe.architecture,
    )
    result = train_model_dir(
        patches,
        out / "model",
        config,
        "grouped",
        {"pretraining_recipe": recipe.name},
        residual_centre=CENTRE_SHARE,  # simulated patches, centred on their defects
    )
    trained = time.perf_counter()
    history = result.history
    manifest = {
        "name": recipe.name,
        "architecture": recipe.architecture,
        "format": "fp16 state dict of the torchvision VGG-16 'features' trunk",
        "license": recipe.license,
        "recipe": recipe.to_dict(),
        "recipe_sha256": recipe.digest(),
        "data_sha256": patch_digest(patches),
        "patches": patches.counts(),
        "frames": sum(recipe.frames for _ in folders),
        "seed": recipe.seed,
        "epochs": len(history),
        # The exported weights are the best epoch's (early stopping restores them).
        "best_epoch": result.best_epoch,
        "validation": dict(history[result.best_epoch]) if history else {},
        "seconds": {
            "simulation": round(simulated - started, 1),
            "training": round(trained - simulated, 1),
        },
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    export_trunk(out / "model", out / "trunk", manifest)
    return json.loads((out / "trunk" / f"{recipe.name}.json").read_text())
