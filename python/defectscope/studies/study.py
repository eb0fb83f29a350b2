"""The honest study: random versus grouped split on one patch dataset.

Trains the same network under both protocols, scores each on its own held-out
patches, and writes the comparison, the groups and both models under one run
directory.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
from scipy.special import softmax

from defectscope._version import __version__
from defectscope.artifacts.disagreement import DROPOUT_SAMPLES
from defectscope.evaluation.grouping import Groups, find_groups
from defectscope.evaluation.metrics import (
    LOCO_SCORES,
    Split,
    calibration_report,
    classification_metrics,
    grouped_folds,
    mean_std,
    random_split,
)
from defectscope.io.datasets import PatchSet
from defectscope.io.files import atomic_write_json, atomic_write_text
from defectscope.nets.device import autocast_dtype, device_name
from defectscope.nets.vgg import resolve_weights
from defectscope.studies.frame_check import frame_check
from defectscope.studies.markdown import summary_markdown
from defectscope.studies.resume import FOLD_RECORD, LOCO_RECORD, SPLIT_RECORD, FinishedWork
from defectscope.tiling.tiler import patches_to_inputs
from defectscope.training.loop import (
    TrainConfig,
    fit_model_novelty,
    fit_patch_residual_density,
    novelty_records,
    predict_logits,
    save_training,
    train_classifier,
)
from defectscope.util.progress import StepTimer
from defectscope.util.system import cpu_description

log = logging.getLogger(__name__)

# The random split trains for this share of the schedule's epochs. It is the memorization
# exhibit: its test patches have near-copies in training, so it fits them early; its
# trainings were a third of the main job's time. Half the epochs was too few: CdTe's
# random split scored 0.955 at 4 of 8 (0.987 at 8), no better than the grouped split.
RANDOM_SPLIT_EPOCH_SHARE = 0.75


def schedule_epochs(config: TrainConfig) -> int:
    """The epochs at most ``config`` trains for, from where its trunk starts."""
    return config.schedule(resolve_weights(config.weights, config.architecture))[0]


def random_split_config(config: TrainConfig) -> TrainConfig:
    """``config`` with :data:`RANDOM_SPLIT_EPOCH_SHARE` of its epochs (at least one)."""
    epochs = max(1, math.ceil(schedule_epochs(config) * RANDOM_SPLIT_EPOCH_SHARE))
    return dataclasses.replace(config, epochs=epochs)


def _score_split(patches: PatchSet, split: Split, config: TrainConfig, name: str, progress: bool):
    """Train on ``split.train``, early-stop on ``split.validation``, score ``split.test``."""
    train, val, test = (patches.subset(ix) for ix in (split.train, split.validation, split.test))
    result = train_classifier(train, val, config, progress=progress, name=name)
    norm = config.normalization
    val_logits, _ = predict_logits(result.model, patches_to_inputs(val.images, norm))
    test_logits, _ = predict_logits(result.model, patches_to_inputs(test.images, norm))
    metrics = classification_metrics(
        test.labels, test_logits.argmax(axis=1), patches.classes, split.evaluable_classes
    )
    calibration = calibration_report(val_logits, val.labels, test_logits, test.labels)
    metrics["mean_confidence"] = float(softmax(test_logits, axis=1).max(axis=1).mean())
    return result, metrics, calibration


def held_out_unknown(
    model, density, residual, test: PatchSet, normalization, dropout=None, ensemble=None
) -> dict | None:
    """Share of held-out patches of trained classes that the model's densities call unknown.

    ``test`` holds patches of classes the model was trained on, from regions it never
    saw (a grouped test part); every one called unknown is a false alarm of "new". The
    shares are the embedding density's, the lattice residual's and either's (what
    ``novelty="embedding+residual"`` maps call unknown), and with ``dropout`` (a
    :class:`~defectscope.artifacts.disagreement.DropoutNovelty`) MC dropout's, with
    ``ensemble`` (an :class:`~defectscope.artifacts.disagreement.EnsembleNovelty`) the
    head ensemble's, overall and per class held (None for an empty ``test``).
    """
    if len(test.labels) == 0:
        return None
    _, embeddings = predict_logits(model, patches_to_inputs(test.images, normalization))
    flagged = {
        "embedding": density.score(embeddings)[2],
        "residual": residual.score(test.images)[2],
    }
    flagged["combined"] = flagged["embedding"] | flagged["residual"]
    for name, source in (("mc_dropout", dropout), ("ensemble", ensemble)):
        if source is not None:
            flagged[name] = source.score(embeddings)[2]
    for name in ("mc_dropout", "ensemble"):
        if name in flagged:
            flagged[f"{name}_residual"] = flagged[name] | flagged["residual"]
    per_class = {}
    for index in np.unique(test.labels):
        of_class = test.labels == index
        per_class[test.classes[index]] = {"n": int(of_class.sum())} | {
            name: float(unknown[of_class].mean()) for name, unknown in flagged.items()
        }
    overall = {name: float(unknown.mean()) for name, unknown in flagged.items()}
    return {"n": len(test.labels), **overall, "per_class": per_class}


def _fit_densities(model, patches: PatchSet, split: Split, config: TrainConfig):
    """The embedding's sources (density, MC dropout, head ensemble) and the
    lattice-residual density of a model trained on ``split``, and what they call
    unknown of its test part (:func:`held_out_unknown`)."""
    train, val = patches.subset(split.train), patches.subset(split.validation)
    augmentation = config.training_augmentation
    novelty = fit_model_novelty(
        model,
        train,
        val,
        config.normalization,
        augmentation=augmentation,
        ensemble_seed=config.seed,
    )
    residual = fit_patch_residual_density(train, val, augmentation=augmentation)
    unknown = held_out_unknown(
        model,
        novelty.density,
        residual,
        patches.subset(split.test),
        config.normalization,
        novelty.dropout,
        novelty.ensemble,
    )
    return novelty, residual, unknown


def evaluate_split(
    patches: PatchSet,
    split: Split,
    config: TrainConfig,
    model_dir: Path,
    progress: bool = True,
    name: str | None = None,
    finished: FinishedWork | None = None,
    symmetry: bool = True,
    densities: bool = True,
) -> dict:
    """Train on ``split.train``, early-stop on ``split.validation``, score ``split.test``.

    The model is saved in ``model_dir`` with its metrics and, with ``densities``, its
    feature and lattice-residual densities (without them its maps call nothing
    unknown); a training ``finished`` holds, with its model unchanged, is not run
    again. With ``symmetry``, the test patches are also scored with test-time D4
    averaging (:func:`symmetry_effect`, eight more passes; ``test_time_symmetry`` is
    None without it).
    """
    unit = f"{split.name}-split"
    if finished is not None:
        stored = finished.get(unit, split, model_dir, required=SPLIT_RECORD, config=config)
        if stored is not None:
            return stored
    result, metrics, calibration = _score_split(
        patches, split, config, name or f"{split.name} split", progress
    )
    test = patches.subset(split.test)
    d4 = None
    if symmetry and len(test.labels):
        d4 = symmetry_effect(
            result.model, test.images, test.labels, config, calibration["temperature"]
        )
    extra = {"metrics": metrics, "calibration": calibration, "split": split.describe()}
    unknown = None
    if densities:
        novelty, residual, unknown = _fit_densities(result.model, patches, split, config)
        extra |= novelty_records(novelty) | {"residual_density": residual.to_dict()}
    save_training(model_dir, result, config, extra_record=extra)
    record = {
        "split": split.describe(),
        "metrics": metrics,
        "calibration": calibration,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "fit": result.fit,
        "warnings": result.warnings,
        "train_wall_time_s": round(result.wall_time_s, 1),
        "model_dir": str(model_dir),
        "test_time_symmetry": d4,
        "held_out_unknown": unknown,
        # Which patches trained and which tested: INT8 is calibrated and scored on these.
        "train_index": split.train.tolist(),
        "test_index": split.test.tolist(),
    }
    if finished is not None:
        finished.put(unit, split, record, model_dir, config=config)
    return record


def _scored_macro_f1(metrics: dict) -> float:
    """Macro-F1 over the fold's scored classes that its test part holds.

    Recomputed from the per-class figures, so fold records written before
    :func:`classification_metrics` left out classes without test patches (and counted
    them as F1 0) are summarized alike.
    """
    per_class = metrics["per_class"]
    scored = [c for c in metrics["macro_f1_classes"] if per_class[c]["support"] > 0]
    return float(np.mean([per_class[c]["f1"] for c in scored])) if scored else 0.0


def summarize_folds(folds: list[dict], classes: list[str]) -> dict:
    """Mean and standard deviation over folds, overall and per class.

    A class's figures are averaged over the folds whose test part holds it.
    """
    summary = {
        "n_folds": len(folds),
        "n_test": int(sum(f["n_test"] for f in folds)),
        "accuracy": mean_std([f["metrics"]["accuracy"] for f in folds]),
        "macro_f1": mean_std([_scored_macro_f1(f["metrics"]) for f in folds]),
        "ece_before": mean_std([f["calibration"]["ece_before"] for f in folds]),
        "ece_after": mean_std([f["calibration"]["ece_after"] for f in folds]),
        "per_class": {},
    }
    evaluable = folds[0]["evaluable_classes"] if folds else []
    for c in classes:
        if c not in evaluable:
            continue
        tested = [f["metrics"]["per_class"][c] for f in folds]
        tested = [m for m in tested if m["support"] > 0]
        summary["per_class"][c] = {
            "f1": mean_std([m["f1"] for m in tested]),
            "recall": mean_std([m["recall"] for m in tested]),
            "support": int(sum(m["support"] for m in tested)),
        }
    # Fold records written before held_out_unknown existed (resumed) have no shares.
    scored = [f["held_out_unknown"] for f in folds if f.get("held_out_unknown")]
    if scored:
        summary["held_out_unknown"] = {
            name: mean_std([s[name] for s in scored])
            for name in ("embedding", "residual", "combined")
        }
        # MC dropout's and the ensemble's shares came later still: summarized over the
        # folds that have them.
        for name in ("mc_dropout", "ensemble", "mc_dropout_residual", "ensemble_residual"):
            shares = [s[name] for s in scored if name in s]
            if shares:
                summary["held_out_unknown"][name] = mean_std(shares)
    return summary


def symmetry_effect(
    model, images: np.ndarray, labels: np.ndarray, config: TrainConfig, temperature: float
) -> dict:
    """Accuracy, ECE and time of the test patches with and without D4 averaging.

    D4 averages the calibrated probabilities of the eight rotations and reflections
    of each patch (what ``Detector.map(symmetry="d4")`` does), at eight passes each.
    The passes run at ``config.precision`` (bf16 where the CPU has it natively), both
    the plain one and the averaged ones, so the two are compared like for like.
    """
    from defectscope.evaluation.metrics import expected_calibration_error

    inputs = patches_to_inputs(images, config.normalization)
    # The model is on the CPU after training (train_classifier moves it there).
    used = autocast_dtype(config.precision, "cpu")
    report = {"n_test": len(labels), "precision": "bf16" if used is not None else "fp32"}
    views, seconds = [], []
    for turns in range(4):
        rotated = np.rot90(inputs, turns, axes=(2, 3))
        for view in (rotated, rotated[..., ::-1]):
            started = time.perf_counter()
            logits, _ = predict_logits(
                model, np.ascontiguousarray(view), precision=config.precision
            )
            views.append(softmax(logits / temperature, axis=1))
            seconds.append(time.perf_counter() - started)
    plain = views[0]  # no turn, no flip: the patches as they are
    averaged = np.mean(views, axis=0)
    # A typical pass, not the first (which pays the bf16 kernels' one-time setup).
    report["seconds_none"] = float(np.median(seconds))
    report["seconds_d4"] = float(np.sum(seconds))
    for name, probabilities in (("none", plain), ("d4", averaged)):
        report[f"accuracy_{name}"] = float(np.mean(probabilities.argmax(axis=1) == labels))
        report[f"ece_{name}"] = expected_calibration_error(probabilities, labels)
    return report


def cross_validate(
    patches: PatchSet,
    splits: list[Split],
    config: TrainConfig,
    first: dict | None = None,
    progress: bool = True,
    finished: FinishedWork | None = None,
    densities: bool = True,
) -> dict:
    """Grouped k-fold cross-validation: a model per fold, each group tested once.

    ``first``, the record of :func:`evaluate_split` on ``splits[0]``, is reused
    rather than trained again; so are folds ``finished`` holds. With ``densities``,
    each fold's model gets its densities fitted and its test patches scored by
    :func:`held_out_unknown` (the false alarms of "new" on regions it never saw).
    """
    folds = []
    for index, split in enumerate(splits):
        name = f"fold-{index + 1}-of-{len(splits)}"
        fold = finished.get(name, split, required=FOLD_RECORD) if finished is not None else None
        if fold is not None:
            if index == 0 and first is not None and not fold.get("held_out_unknown"):
                fold["held_out_unknown"] = first.get("held_out_unknown")  # an older record
            folds.append(fold)
            continue
        if index == 0 and first is not None:
            metrics, calibration = first["metrics"], first["calibration"]
            epochs, warnings = first["epochs_run"], first["warnings"]
            unknown = first.get("held_out_unknown")
        else:
            result, metrics, calibration = _score_split(
                patches, split, config, f"grouped fold {index + 1}/{len(splits)}", progress
            )
            epochs, warnings = len(result.history), result.warnings
            unknown = None
            if densities:
                unknown = _fit_densities(result.model, patches, split, config)[2]
        calibration = {k: v for k, v in calibration.items() if k != "reliability"}
        fold = {
            "fold": index,
            "n_train": len(split.train),
            "n_validation": len(split.validation),
            "n_test": len(split.test),
            "evaluable_classes": split.evaluable_classes,
            "metrics": {k: v for k, v in metrics.items() if k != "confusion"},
            "calibration": calibration,
            "epochs_run": epochs,
            "warnings": warnings,
            "held_out_unknown": unknown,
        }
        if finished is not None:
            finished.put(name, split, fold)
        folds.append(fold)
    return {"folds": folds, **summarize_folds(folds, patches.classes)}


def _log_past(distance: np.ndarray, threshold: float) -> np.ndarray:
    """log(distance / threshold), finite for zero distances and thresholds."""
    return np.log(np.maximum(distance, 1e-30)) - np.log(max(float(threshold), 1e-30))


def score_left_out_class(
    model,
    density,
    residual,
    known_images: np.ndarray,
    novel_images: np.ndarray,
    normalization,
    dropout_samples: int = DROPOUT_SAMPLES,
    ensemble=None,
    dropout_novelty=None,
    ensemble_novelty=None,
) -> dict:
    """AUROC of "this patch is of the class the model never saw", per novelty score.

    ``known_images`` are held-out patches of the trained classes, ``novel_images`` every
    patch of the left-out one; ``density`` and ``residual`` are the model's embedding
    and lattice-residual densities. Scores: the embedding's density distance, the
    residual's, the two combined (the larger of their calibrated uncertainties, each the
    share of held-out known windows closer, as maps combine them; and, measured beside
    it, the larger and the sum of each density's log distance past its own threshold),
    Monte Carlo dropout in the head (mutual
    information of ``dropout_samples`` masks), with ``ensemble`` (heads from
    :func:`~defectscope.training.head_ensemble.train_head_ensemble`) the heads'
    disagreement (:mod:`defectscope.artifacts.disagreement`), and the softmax (one minus
    the top probability). Also the shares of each part beyond the unknown threshold (the
    embedding's, and either of the two densities'), and with ``dropout_novelty`` (the
    model's calibrated :class:`~defectscope.artifacts.disagreement.DropoutNovelty`)
    the shares MC dropout calls unknown, as ``novelty="mc_dropout"`` maps would; with
    ``ensemble_novelty`` (the model's
    :class:`~defectscope.artifacts.disagreement.EnsembleNovelty`, heads on the
    embedding) its disagreement and the shares it calls unknown, as
    ``novelty="ensemble"`` maps would.
    """
    from sklearn.metrics import roc_auc_score

    from defectscope.artifacts.disagreement import head_ensemble_scores, mc_dropout_scores
    from defectscope.training.head_ensemble import trunk_features

    head = model.classifier
    weight = head.weight.detach().float().numpy()
    bias = head.bias.detach().float().numpy()
    scores = {}
    for part, images in (("known", known_images), ("novel", novel_images)):
        inputs = patches_to_inputs(images, normalization)
        logits, embeddings = predict_logits(model, inputs)
        distance, embedding_u, unknown = density.score(embeddings)
        residual_distance, residual_u, residual_unknown = residual.score(images)
        # The model's own record, when given, is what maps score with.
        dropout = (
            mc_dropout_scores(embeddings, weight, bias, model.dropout.p, samples=dropout_samples)
            if dropout_novelty is None
            else dropout_novelty.disagreement(embeddings)
        )
        # How far past its own unknown threshold each density puts a patch, in log
        # units: unlike the calibrated uncertainties these do not saturate at 1.
        past_embedding = _log_past(distance, density.threshold)
        past_residual = _log_past(residual_distance, residual.density.threshold)
        scores[part] = {
            "density": distance,
            "softmax": 1 - softmax(logits, axis=1).max(axis=1),
            "residual": residual_distance,
            # Either source may flag a window: the larger of the two calibrated
            # uncertainties (each the share of held-out known windows closer).
            "combined": np.maximum(embedding_u, residual_u),
            "combined_max_ratio": np.maximum(past_embedding, past_residual),
            "combined_sum_ratio": past_embedding + past_residual,
            "mc_dropout": dropout.mutual_information,
            "head_ensemble": None
            if ensemble is None
            else head_ensemble_scores(trunk_features(model, inputs), ensemble).mutual_information,
            "unknown": unknown,
            "combined_unknown": unknown | residual_unknown,
            "mc_dropout_unknown": None,
            "mc_dropout_residual": None,
            "mc_dropout_residual_unknown": None,
            "ensemble": None,
            "ensemble_unknown": None,
            "ensemble_residual": None,
            "ensemble_residual_unknown": None,
        }
        if dropout_novelty is not None:
            dropout_scores = dropout_novelty.score(embeddings)
            scores[part]["mc_dropout_unknown"] = dropout_scores[2]
            # As novelty="mc_dropout+residual" maps combine them.
            scores[part]["mc_dropout_residual"] = np.maximum(dropout_scores[1], residual_u)
            scores[part]["mc_dropout_residual_unknown"] = dropout_scores[2] | residual_unknown
        if ensemble_novelty is not None:
            ensemble_scores = ensemble_novelty.score(embeddings)
            scores[part]["ensemble"] = ensemble_scores[0]
            scores[part]["ensemble_unknown"] = ensemble_scores[2]
            # As novelty="ensemble+residual" maps combine them.
            scores[part]["ensemble_residual"] = np.maximum(ensemble_scores[1], residual_u)
            scores[part]["ensemble_residual_unknown"] = ensemble_scores[2] | residual_unknown
    truth = np.r_[np.zeros(len(known_images)), np.ones(len(novel_images))]
    report = {"n_known": len(known_images), "n_novel": len(novel_images)}
    for key in (key for _, key in LOCO_SCORES):
        if scores["known"][key] is None:
            continue
        ranked = np.r_[scores["known"][key], scores["novel"][key]]
        report[f"auroc_{key}"] = float(roc_auc_score(truth, ranked))
    for part in ("novel", "known"):
        for key, flags in (
            ("", "unknown"),
            ("_combined", "combined_unknown"),
            ("_mc_dropout", "mc_dropout_unknown"),
            ("_ensemble", "ensemble_unknown"),
            ("_mc_dropout_residual", "mc_dropout_residual_unknown"),
            ("_ensemble_residual", "ensemble_residual_unknown"),
        ):
            if scores[part][flags] is not None:
                report[f"{part}_unknown{key}"] = float(scores[part][flags].mean())
    return report


def _head_ensemble(model, train: PatchSet, normalization, seed: int):
    """Five heads on ``model``'s frozen trunk, trained on ``train`` (see head_ensemble)."""
    from defectscope.training.head_ensemble import train_head_ensemble, trunk_features

    features = trunk_features(model, patches_to_inputs(train.images, normalization))
    return train_head_ensemble(features, train.labels, len(train.classes), seed=seed)


def leave_one_class_out(
    patches: PatchSet,
    split: Split,
    config: TrainConfig,
    progress: bool = True,
    classes: list[str] | None = None,
    finished: FinishedWork | None = None,
    models_dir: Path | None = None,
) -> dict:
    """How well the uncertainty flags a class the model never saw.

    For each class X: train on the split's training part without X (validation
    likewise), fit the feature densities, then score the split's test patches of the
    other classes (held-out regions of trained classes) against every patch of X with
    :func:`score_left_out_class` (one AUROC per novelty score). ``classes`` limits which
    classes are left out in turn (default: every class); classes ``finished`` holds are
    not trained again. With ``models_dir``, each model is kept there as
    ``without-class-<index>/`` (its left-out class and densities in ``model.json``), so
    other novelty scores can be measured later without training again.
    """
    norm = config.normalization
    report = {}
    for drop, name in enumerate(patches.classes):
        if classes is not None and name not in classes:
            continue
        unit = f"without-class-{drop}"
        stored = finished.get(unit, split, required=LOCO_RECORD) if finished is not None else None
        if stored is not None and stored.get("class") == name:
            report[name] = stored["result"]
            continue
        known_test = patches.without_class(name, split.test)
        novel = np.flatnonzero(patches.labels == drop)
        if len(known_test.labels) < 2 or len(novel) < 2:
            report[name] = {"skipped": "no held-out patches of the other classes"}
            continue
        train = patches.without_class(name, split.train)
        val = patches.without_class(name, split.validation)
        if len(np.unique(train.labels)) < 2:
            report[name] = {"skipped": "fewer than two classes left to train on"}
            continue
        result = train_classifier(
            train,
            val if len(val.labels) else None,
            config,
            progress=progress,
            name=f"without {name}",
        )
        novelty = fit_model_novelty(
            result.model,
            train,
            val if len(val.labels) else None,
            norm,
            augmentation=config.training_augmentation,
            ensemble_seed=config.seed,
        )
        residual = fit_patch_residual_density(
            train, val if len(val.labels) else None, augmentation=config.training_augmentation
        )
        if models_dir is not None:
            save_training(
                models_dir / unit,
                result,
                config,
                extra_record={
                    "left_out": name,
                    **novelty_records(novelty),
                    "residual_density": residual.to_dict(),
                },
            )
        ensemble = _head_ensemble(result.model, train, norm, config.seed)
        report[name] = score_left_out_class(
            result.model,
            novelty.density,
            residual,
            known_test.images,
            patches.images[novel],
            norm,
            ensemble=ensemble,
            dropout_novelty=novelty.dropout,
            ensemble_novelty=novelty.ensemble,
        ) | {"warnings": result.warnings}
        if finished is not None:
            finished.put(unit, split, {"class": name, "result": report[name]})
    return report


def rescore_left_out(
    loco_dir: str | os.PathLike,
    patches: PatchSet,
    test_index: np.ndarray,
    train_index: np.ndarray | None = None,
    seed: int = 0,
) -> dict:
    """Score every model ``leave_one_class_out`` kept, again, without training it.

    ``loco_dir`` holds the ``without-class-<index>/`` model directories (each records
    its left-out class and both densities), ``patches`` the study's patches,
    ``test_index`` and ``train_index`` its split's test and training parts
    (``study.json``'s ``grouped.test_index`` and ``grouped.train_index``). With
    ``train_index`` the head ensemble is trained as the study trains it (``seed``: the
    study's). Returns :func:`score_left_out_class`'s record per left-out class: the
    numbers the study recorded, and those of scores added since.
    """
    from defectscope.artifacts.density import FeatureDensity
    from defectscope.artifacts.disagreement import DropoutNovelty, EnsembleNovelty
    from defectscope.artifacts.residual_density import ResidualDensity
    from defectscope.nets.checkpoint import load_checkpoint

    test_index = np.asarray(test_index, dtype=np.int64)
    report = {}
    for directory in sorted(Path(loco_dir).glob("without-class-*")):
        model, config, record = load_checkpoint(directory)
        name = record.get("left_out")
        if name not in patches.classes:
            raise ValueError(f"{directory}: left-out class {name!r} is not among the patches'")
        trained = [c for c in patches.classes if c != name]
        if list(config.classes) != trained:
            raise ValueError(
                f"{directory}: model classes {list(config.classes)} are not the patches' "
                f"without {name!r}, {trained}"
            )
        for key in ("density", "residual_density"):
            if key not in record:
                raise ValueError(f"{directory / 'model.json'}: records no {key}")
        n = len(config.classes)
        drop = patches.classes.index(name)
        known = test_index[patches.labels[test_index] != drop]
        novel = np.flatnonzero(patches.labels == drop)
        ensemble = None
        if train_index is not None:
            train = patches.without_class(name, train_index)
            ensemble = _head_ensemble(model, train, config.normalization, seed)
        report[name] = score_left_out_class(
            model,
            FeatureDensity.from_dict(record["density"], n),
            ResidualDensity.from_dict(record["residual_density"], n),
            patches.images[known],
            patches.images[novel],
            config.normalization,
            ensemble=ensemble,
            dropout_novelty=None
            if record.get("mc_dropout") is None
            else DropoutNovelty.from_dict(record["mc_dropout"], n, config.embedding_dim),
            ensemble_novelty=None
            if record.get("head_ensemble") is None
            else EnsembleNovelty.from_dict(record["head_ensemble"], n, config.embedding_dim),
        )
    return report


def write_groups_csv(path: Path, patches: PatchSet, groups: Groups) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["file", "label", "group"])
    for file, label, group in zip(patches.paths, patches.labels, groups.ids, strict=True):
        writer.writerow([file, patches.classes[label], int(group)])
    atomic_write_text(path, buffer.getvalue())


def run_study(
    patches: PatchSet,
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    dataset_name: str = "dataset",
    overlap_threshold: float = 0.95,
    progress: bool = True,
    frame: Path | None = None,
    folds: int = 5,
    loco: bool = True,
    steps: StepTimer | None = None,
    resume: bool = False,
) -> dict:
    """Run the random-versus-grouped study and write it under ``out_dir``.

    Writes ``study.json``, ``summary.md``, ``groups.csv``, ``model/`` (trained on
    the first grouped split, with honest metrics and the densities that make its maps
    say unknown) and ``model_random/`` (the random split's, without densities); with
    ``loco``, the models trained without each class under ``loco/``; with
    ``frame``, also ``frame_map/`` and a check of the map against the crops'
    positions; ``finished/`` holds what ``resume`` may reuse.

    Parameters
    ----------
    folds : int
        Grouped k-fold cross-validation over this many folds (each fold one more
        training); 0 scores the first grouped split only.
    loco : bool
        Leave-one-class-out test of the uncertainty (one training per class).
    steps : StepTimer, optional
        Times each step (and shows a spinner for those without a progress bar).
    resume : bool
        Reuse the trainings an earlier, interrupted run into the same ``out_dir``
        finished with the same patches, splits, settings and version (see
        :class:`FinishedWork`); the report lists them under ``"resumed"``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = steps or StepTimer(spinner=progress)
    with steps("grouping patches into independent regions"):
        groups = find_groups(patches.images, threshold=overlap_threshold)
    write_groups_csv(out_dir / "groups.csv", patches, groups)
    groups_per_class = groups.per_class(patches.labels, patches.classes)
    log.info("%d patches in %d independent groups", len(patches.labels), groups.n_groups)

    rnd = random_split(patches.labels, patches.classes, seed=config.seed)
    splits = grouped_folds(
        patches.labels, groups.ids, patches.classes, n_folds=folds or 5, seed=config.seed
    )
    grp = splits[0]
    if not grp.evaluable_classes:
        raise ValueError(
            f"{dataset_name}: no class has three independent groups, so nothing can be "
            "evaluated honestly"
        )
    report = {
        "dataset": dataset_name,
        "run": {
            "defectscope": __version__,
            "machine": cpu_description(),
            "training_device": device_name(config.device),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
        "n_patches": len(patches.labels),
        "classes": patches.classes,
        "counts": patches.counts(),
        "n_groups": groups.n_groups,
        "overlap_threshold": overlap_threshold,
        "groups_per_class": groups_per_class,
        "not_evaluable": {
            c: f"only {n} independent group(s)"
            for c, n in groups_per_class.items()
            if c not in grp.evaluable_classes
        },
        "train_config": dataclasses.asdict(config),
    }
    finished = FinishedWork(out_dir, patches, config, resume)
    with steps("training on the random split", spin=False):
        # No D4 check and no densities here, and fewer epochs: on a random split the
        # check would measure memorized near-copies, and this model is the memorization
        # exhibit, not one to map with (model/ is); nothing reads either.
        random_config = random_split_config(config)
        report["random"] = evaluate_split(
            patches,
            rnd,
            random_config,
            out_dir / "model_random",
            progress,
            finished=finished,
            symmetry=False,
            densities=False,
        )
        report["random"]["max_epochs"] = random_config.epochs
    with steps("training on the grouped split", spin=False):
        report["grouped"] = evaluate_split(
            patches, grp, config, out_dir / "model", progress, finished=finished
        )
        report["grouped"]["max_epochs"] = schedule_epochs(config)
    if folds:
        with steps(f"grouped {len(splits)}-fold cross-validation", spin=False):
            report["cross_validation"] = cross_validate(
                patches, splits, config, report["grouped"], progress, finished
            )
    if loco:
        with steps("leave one class out", spin=False):
            report["leave_one_class_out"] = leave_one_class_out(
                patches, grp, config, progress, finished=finished, models_dir=out_dir / "loco"
            )
    if finished.reused:
        report["resumed"] = finished.reused
    if frame is not None:
        with steps("mapping the large frame"):
            report["frame_check"] = frame_check(
                out_dir / "model", frame, patches, out_dir / "frame_map", precision=config.precision
            )
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out_dir / "study.json", report)
    atomic_write_text(out_dir / "summary.md", summary_markdown(report))
    return report
