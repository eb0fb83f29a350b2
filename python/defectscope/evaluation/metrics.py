"""Metrics, calibration and honest (grouped) splits."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

# Leave-one-class-out novelty scores, as (name in tables, record key after "auroc_"):
# what the study's summary and the HTML report show.
LOCO_SCORES = (
    ("density", "density"),
    ("lattice residual", "residual"),
    ("combined", "combined"),
    ("combined, larger past threshold", "combined_max_ratio"),
    ("combined, sum past thresholds", "combined_sum_ratio"),
    ("MC dropout", "mc_dropout"),
    ("head ensemble, trunk features", "head_ensemble"),
    ("head ensemble, embedding (maps)", "ensemble"),
    ("MC dropout + lattice residual", "mc_dropout_residual"),
    ("head ensemble + lattice residual", "ensemble_residual"),
    ("softmax", "softmax"),
)


def classification_metrics(
    labels: np.ndarray,
    predictions: np.ndarray,
    classes: list[str],
    scored_classes: list[str] | None = None,
) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    Parameters
    ----------
    labels, predictions : ndarray of int
        True and predicted class indices.
    classes : list of str
        Names of the indices.
    scored_classes : list of str, optional
        Classes averaged into ``macro_f1`` (default: all); those without test
        patches here are left out.

    Returns
    -------
    dict
        ``{"accuracy", "macro_f1", "per_class", "confusion", "classes"}``; rows of
        ``confusion`` are true classes, columns predicted ones.
    """
    index = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=index, zero_division=0
    )
    per_class = {
        c: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(classes)
    }
    # A class with no test patches here has no F1 to average (sklearn's 0 would count it).
    scored_classes = [
        c
        for c in (classes if scored_classes is None else scored_classes)
        if per_class[c]["support"] > 0
    ]
    macro = float(np.mean([per_class[c]["f1"] for c in scored_classes])) if scored_classes else 0.0
    return {
        "accuracy": float(np.mean(labels == predictions)) if len(labels) else 0.0,
        "macro_f1": macro,
        "macro_f1_classes": list(scored_classes),
        "per_class": per_class,
        "confusion": confusion_matrix(labels, predictions, labels=index).tolist(),
        "classes": list(classes),
    }


def mean_std(values: list[float]) -> dict:
    """``{"mean", "std", "n", "values"}`` of a list (mean and std None when empty)."""
    return {
        "mean": float(np.mean(values)) if values else None,
        "std": float(np.std(values)) if values else None,
        "n": len(values),
        "values": [float(v) for v in values],
    }


def format_mean_std(stat: dict) -> str:
    """``"0.912 ± 0.034"`` for a :func:`mean_std` record, "n/a" when it is empty."""
    return "n/a" if stat["mean"] is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15):
    """Expected calibration error of the top-class confidence (equal-width bins)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict:
    """Mean confidence, accuracy and count of each non-empty confidence bin."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    out: dict[str, list] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        mask = which == b
        if mask.any():
            out["confidence"].append(float(confidence[mask].mean()))
            out["accuracy"].append(float(correct[mask].mean()))
            out["count"].append(int(mask.sum()))
    return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimizing the negative log-likelihood of ``softmax(logits / T)``."""

    def nll(log_t: float) -> float:
        scaled = log_softmax(logits / np.exp(log_t), axis=1)
        return -float(scaled[np.arange(len(labels)), labels].mean())

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def calibration_report(
    val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray, test_labels: np.ndarray
) -> dict:
    """ECE on the test set before and after temperature scaling fitted on validation."""
    temperature = fit_temperature(val_logits, val_labels)
    before = softmax(test_logits, axis=1)
    after = softmax(test_logits / temperature, axis=1)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, test_labels),
        "ece_after": expected_calibration_error(after, test_labels),
        "reliability": {
            "before": reliability_bins(before, test_labels),
            "after": reliability_bins(after, test_labels),
        },
    }


@dataclasses.dataclass
class Split:
    """Indices of a train/validation/test split and what it can score."""

    name: str
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    evaluable_classes: list[str]
    groups_per_class: dict[str, int] | None = None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "n_train": len(self.train),
            "n_validation": len(self.validation),
            "n_test": len(self.test),
            "evaluable_classes": self.evaluable_classes,
            "groups_per_class": self.groups_per_class,
        }


def random_split(
    labels: np.ndarray, classes: list[str], test_size: float = 0.2, val_size: float = 0.15, seed=0
) -> Split:
    """Stratified random split: the usual protocol, which measures memorization here."""
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=test_size, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_size / (1 - test_size), stratify=labels[rest], random_state=seed
    )
    return Split("random", np.sort(train), np.sort(val), np.sort(test), list(classes))


def grouped_folds(
    labels: np.ndarray, groups: np.ndarray, classes: list[str], n_folds: int = 5, seed: int = 0
) -> list[Split]:
    """Grouped k-fold cross-validation: every testable group is tested exactly once.

    A class is evaluable when it occurs in at least three groups (one each for
    training, validation and test). Groups holding only evaluable classes are
    distributed over ``n_folds`` folds stratified by class (scikit-learn's
    ``StratifiedGroupKFold``). Split ``i`` tests fold ``i``, early-stops, fits its
    temperature and sets its unknown thresholds on a validation fold (so validation is
    grouped too), and trains on every other patch, so single-region classes are still
    learned but never scored. A class with fewer groups than folds is missing from some
    folds, and a validation fold without it would leave the class's early stopping,
    temperature and thresholds uncalibrated; so the validation fold is the first after
    ``i`` (cyclically) that, in this order, leaves the most classes in training, holds
    the most of the test fold's classes and holds the most classes: usually fold
    ``i + 1``.

    Returns
    -------
    list of Split
        One per fold; a single split with empty test and validation parts when
        fewer than three groups can be tested.
    """
    if n_folds < 3:
        raise ValueError(
            f"grouped folds need at least 3 folds (train, validation, test), got {n_folds}"
        )
    groups_per_class = {c: len(np.unique(groups[labels == i])) for i, c in enumerate(classes)}
    evaluable = [c for c in classes if groups_per_class[c] >= 3]
    evaluable_index = {classes.index(c) for c in evaluable}
    testable_groups = [
        g for g in np.unique(groups) if set(np.unique(labels[groups == g])) <= evaluable_index
    ]
    candidate = np.flatnonzero(np.isin(groups, testable_groups))
    if len(evaluable) == 0 or len(testable_groups) < 3:
        empty = np.array([], dtype=np.int64)
        return [Split("grouped", np.arange(len(labels)), empty, empty, [], groups_per_class)]
    folds = min(n_folds, len(testable_groups))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    assignment = np.full(len(labels), -1)
    for fold, (_, held) in enumerate(
        splitter.split(candidate, labels[candidate], groups[candidate])
    ):
        assignment[candidate[held]] = fold
    held = [set(np.unique(labels[assignment == fold]).tolist()) for fold in range(folds)]
    splits = []
    for fold in range(folds):

        def merit(other: int, fold: int = fold) -> tuple[int, int, int]:
            # Keep every class in training first, then validate the test fold's classes,
            # then as many classes as possible.
            kept = np.unique(labels[(assignment != fold) & (assignment != other)])
            return len(kept), len(held[other] & held[fold]), len(held[other])

        after = [(fold + step) % folds for step in range(1, folds)]
        held_out = max(after, key=merit)  # the first of the best: usually fold + 1
        test = np.flatnonzero(assignment == fold)
        val = np.flatnonzero(assignment == held_out)
        train = np.flatnonzero((assignment != fold) & (assignment != held_out))
        splits.append(Split("grouped", train, val, test, evaluable, groups_per_class))
    return splits


def grouped_split(
    labels: np.ndarray, groups: np.ndarray, classes: list[str], n_folds: int = 5, seed: int = 0
) -> Split:
    """The first split of :func:`grouped_folds`: one grouped train/validation/test split."""
    return grouped_folds(labels, groups, classes, n_folds=n_folds, seed=seed)[0]
