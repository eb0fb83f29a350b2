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

# What each kind of finished unit must hold for the study to use it (None: any value).
_METRICS = {"accuracy": None, "macro_f1_classes": None, "per_class": dict}
_CALIBRATION = {"ece_before": None, "ece_after": None}
SPLIT_RECORD = {
    "split": {"evaluable_classes": list, "n_test": None},
    "metrics": {**_METRICS, "macro_f1": None},
    "calibration": _CALIBRATION,
    "epochs_run": None,
    "warnings": list,
}
FOLD_RECORD = {
    "n_test": None,
    "evaluable_classes": list,
    "metrics": _METRICS,
    "calibration": _CALIBRATION,
}
LOCO_RECORD = {"class": str, "result": dict}


def missing_part(record, spec: dict, prefix: str = "") -> str | None:
    """The first entry ``spec`` asks for that ``record`` lacks (``"metrics.accuracy"``).

    ``spec`` maps keys to None (any value), a type the value must be, or a nested spec.
    """
    if not isinstance(record, dict):
        return f"{prefix or 'record'} (not an object)"
    for key, want in spec.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in record:
            return name
        value = record[key]
        if isinstance(want, dict):
            if (inner := missing_part(value, want, name)) is not None:
                return inner
        elif want is not None and not isinstance(value, want):
            return f"{name} (not a {want.__name__})"
    return None


def _start(config: TrainConfig) -> dict:
    from defectscope.nets.vgg import describe_weights, resolve_weights

    choice = resolve_weights(config.weights, config.architecture)
    return {
        **describe_weights(choice, config.architecture),
        "schedule": list(config.schedule(choice)),
        "trunk_learning_rate": config.trunk_learning_rate(choice),
    }


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
            # Where the trunk really starts (``auto`` differs between machines, a shipped
            # trunk or a file by its SHA-256) and the schedule that start implies.
            "start": _start(config),
            "version": __version__,
        }
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        self._base = digest.hexdigest()
        self._config = config
        self.where = {"machine": cpu_description(), "device": device_name(config.device)}

    def _key(self, name: str, split: Split, config: TrainConfig | None = None) -> str:
        digest = hashlib.sha256(self._base.encode() + name.encode())
        if config is not None and config != self._config:
            # A unit trained with its own settings (the random split's shorter schedule).
            own = {k: v for k, v in dataclasses.asdict(config).items() if k != "device"}
            digest.update(json.dumps(own, sort_keys=True, default=str).encode())
        for part in (split.train, split.validation, split.test):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes() + b"|")
        return digest.hexdigest()

    def get(
        self,
        name: str,
        split: Split,
        model_dir: Path | None = None,
        required: dict | None = None,
        config: TrainConfig | None = None,
    ) -> dict | None:
        """The stored record of ``name`` when it may be reused, else None.

        ``required`` (see :func:`missing_part`) is what the record must hold: a stored
        file without its ``record`` or lacking part of it (damaged, or edited by hand) is
        trained again, with a warning, rather than failing the study later. ``config``:
        the unit's own settings when they are not the study's (part of the key).
        """
        path = self.directory / f"{name}.json"
        if not self.resume or not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s: damaged (%s); training %s again", path, exc, name)
            return None
        if not isinstance(stored, dict) or stored.get("key") != self._key(name, split, config):
            return None
        lacking = missing_part(stored, {"record": required or dict})
        if lacking is not None:
            log.warning("%s: damaged (no %s); training %s again", path, lacking, name)
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

    def put(
        self,
        name: str,
        split: Split,
        record: dict,
        model_dir: Path | None = None,
        config: TrainConfig | None = None,
    ) -> None:
        stored = {
            "key": self._key(name, split, config),
            "record": record,
            "trained_on": self.where,
        }
        if model_dir is not None:
            stored["weights_sha256"] = file_hash(model_dir / WEIGHTS_FILE)
        atomic_write_json(self.directory / f"{name}.json", stored)
