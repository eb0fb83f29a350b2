"""Leave-one-class-out for the lattice residual alone, on every grouped fold.

The residual's density needs no network (:mod:`defectscope.artifacts.residual_density`),
so unlike the study's leave-one-class-out (one training per class) it can be measured
on all folds in seconds: for each fold and each class X, fit the density on the fold's
training patches of the other classes (threshold on its validation patches; with
training's augmentation, physically varied copies join them, as ``train`` fits it),
and score the fold's held-out test patches of the other classes against every patch of X.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from defectscope.artifacts.residual_density import DESCRIPTOR_VERSION, fit_residual_density
from defectscope.evaluation.metrics import Split
from defectscope.io.datasets import PatchSet
from defectscope.training.augment import (
    Augmentation,
    density_augmentation,
    density_fit_sets,
)


def residual_leave_one_class_out(
    patches: PatchSet, folds: list[Split], augmentation: Augmentation | None = None
) -> dict[str, Any]:
    """AUROC of "X is unknown" by the lattice residual, per class and fold.

    Parameters
    ----------
    patches : PatchSet
    folds : list of Split
        Grouped folds (:func:`defectscope.evaluation.metrics.grouped_folds`).
    augmentation : Augmentation, optional
        Training's augmentation: with its physical part on, the density is fitted as
        training fits it, with physically varied copies of the training and validation
        patches (:func:`~defectscope.training.augment.density_fit_sets`).

    Returns
    -------
    dict
        ``classes``: per class ``auroc`` (per fold), ``mean``, ``std``, ``novel_unknown``
        (share of X beyond the threshold, per fold); ``known_unknown``: the share of
        held-out known patches beyond it, per fold and class; ``seconds``.
    """
    from sklearn.metrics import roc_auc_score

    started = time.perf_counter()
    report: dict[str, Any] = {
        "descriptor_version": DESCRIPTOR_VERSION,
        "physical_copies": density_augmentation(augmentation) is not None,
        "classes": {},
    }
    known_unknown = []
    for drop, name in enumerate(patches.classes):
        aurocs, novel_unknown = [], []
        novel = np.flatnonzero(patches.labels == drop)
        for split in folds:
            train, validation, known = (
                index[patches.labels[index] != drop]
                for index in (split.train, split.validation, split.test)
            )
            if len(known) < 2 or len(novel) < 2 or len(np.unique(patches.labels[train])) < 2:
                continue
            labels = patches.labels[train] - (patches.labels[train] > drop)
            images, labels, held = density_fit_sets(
                patches.images[train], labels, patches.images[validation], augmentation
            )
            density = fit_residual_density(images, labels, len(patches.classes) - 1, held)
            known_d, _, known_k = density.score(patches.images[known])
            novel_d, _, novel_k = density.score(patches.images[novel])
            truth = np.r_[np.zeros(len(known)), np.ones(len(novel))]
            aurocs.append(float(roc_auc_score(truth, np.r_[known_d, novel_d])))
            novel_unknown.append(float(novel_k.mean()))
            known_unknown.append(float(known_k.mean()))
        report["classes"][name] = {
            "auroc": aurocs,
            "mean": float(np.mean(aurocs)) if aurocs else None,
            "std": float(np.std(aurocs)) if aurocs else None,
            "novel_unknown": novel_unknown,
            "n_novel": len(novel),
        }
    report["known_unknown"] = {
        "mean": float(np.mean(known_unknown)) if known_unknown else None,
        "max": float(np.max(known_unknown)) if known_unknown else None,
    }
    report["seconds"] = time.perf_counter() - started
    return report


def residual_loco_markdown(dataset: str, report: dict[str, Any]) -> list[str]:
    """Rows of the per-class table (``| dataset | class | folds | AUROC | unknown |``)."""
    lines = []
    for name, r in report["classes"].items():
        if r["mean"] is None:
            lines.append(f"| {dataset} | {name} | 0 | – | – |")
            continue
        per_fold = " ".join(f"{v:.2f}" for v in r["auroc"])
        lines.append(
            f"| {dataset} | {name} | {len(r['auroc'])} | {r['mean']:.3f} ± {r['std']:.3f} "
            f"({per_fold}) | {np.mean(r['novel_unknown']):.3f} |"
        )
    return lines
