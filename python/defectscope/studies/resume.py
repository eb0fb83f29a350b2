"""Resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from defectscope._version import __version__
from defectscope.artifacts.metadata import WEIGHTS_FILE
from defectscope.evaluation.metrics import (
    Split,
)
from defectscope.io.datasets import PatchSet
from defectscope.io.files import atomic_write_json, file_hash
from defectscope.nets.device import device_name
from defectscope.training.loop import (
    TrainConfig,
)
from defectscope.util.system import cpu_description

log = logging.getLogger(__name__)


class FinishedWork:
    """The trainings a study has finished, kept so that an interrupted run can resume.

    Each unit of work (the random split, the grouped split, a fold, a left-out class)
    is written, when it ends, to ``<out_dir>/finished/<name>.json`` with a key: the
    SHA-256 of the patches' pixels, labels and classes, of the unit's split indices,
    of the training settings and of the defectscope version. With ``resume``, a unit
    whose stored key matches (and, for a saved model, whose weights are unchanged) is
    taken from there instead of being trained again; anything else is trained anew.
    """

    def __init__(self, out_dir: Path, patches: PatchSet, config: TrainConfig, resume: bool):
        self.directory = out_dir / "finished"
        self.resume = resume
        self.reused: list[dict | str] = []  # dict: the unit and where it trained
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(patches.images).tobytes())
        digest.update(str(patches.images.dtype).encode() + str(patches.images.shape).encode())
        digest.update(np.ascontiguousarray(patches.labels, dtype=np.int64).tobytes())
        # Where it trained is not part of the key: a run resumed on another device
        # reuses what the first one finished.
        settings = {
            "classes": patches.classes,
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "device"},
            "version": __version__,
        }
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        self._base = digest.hexdigest()
        self.where = {"machine": cpu_description(), "device": device_name(config.device)}

    def _key(self, name: str, split: Split) -> str:
        digest = hashlib.sha256(self._base.encode() + name.encode())
        for part in (split.train, split.validation, split.test):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes() + b"|")
        return digest.hexdigest()

    def get(self, name: str, split: Split, model_dir: Path | None = None) -> dict | None:
        """The stored record of ``name`` when it may be reused, else None."""
        path = self.directory / f"{name}.json"
        if not self.resume or not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(stored, dict) or stored.get("key") != self._key(name, split):
            return None
        weights = model_dir / WEIGHTS_FILE if model_dir is not None else None
        if weights is not None and (
            not weights.is_file() or stored.get("weights_sha256") != file_hash(weights)
        ):
            return None
        log.info("%s: reusing the training finished by an earlier run (%s)", name, path)
        where = stored.get("trained_on", {})
        self.reused.append({"unit": name, **where} if where else name)
        return stored["record"]

    def put(self, name: str, split: Split, record: dict, model_dir: Path | None = None) -> None:
        stored = {"key": self._key(name, split), "record": record, "trained_on": self.where}
        if model_dir is not None:
            stored["weights_sha256"] = file_hash(model_dir / WEIGHTS_FILE)
        atomic_write_json(self.directory / f"{name}.json", stored)
