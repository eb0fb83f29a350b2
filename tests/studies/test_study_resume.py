"""An interrupted study resumes: finished trainings are reused only when nothing changed."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from defectscope.artifacts.metadata import WEIGHTS_FILE
from defectscope.evaluation.metrics import random_split
from defectscope.io.datasets import PatchSet
from defectscope.studies import study as study_module
from defectscope.studies.resume import FinishedWork
from defectscope.studies.study import random_split_config, rescore_left_out, run_study
from defectscope.training.loop import TrainConfig
from tests.synthetic import lattice

CONFIG = TrainConfig(epochs=1, batch_size=8, precision="fp32", seed=0)


def three_classes(n_per_class: int = 6) -> PatchSet:
    """Bulk, a central and a corner vacancy; noisy enough that each patch is its own group."""
    kinds = {"Bulk": [], "Centre": [(3, 3), (3, 4), (4, 3), (4, 4)], "Corner": [(1, 1), (1, 2)]}
    images, labels = [], []
    for label, vacancies in enumerate(kinds.values()):
        for i in range(n_per_class):
            images.append(lattice((64, 64), vacancies=vacancies, noise=0.4, seed=100 * label + i))
            labels.append(label)
    images = (np.stack(images) * 200).clip(0, 255).astype(np.uint8)
    return PatchSet(images, np.array(labels), list(kinds), [f"p{i}" for i in range(len(labels))])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    report = run_study(three_classes(), out, CONFIG, "toy", progress=False, folds=3, loco=True)
    return out, report


def test_a_resumed_study_trains_nothing_finished(first_run, monkeypatch):
    out, first = first_run
    finished = sorted(p.name for p in (out / "finished").iterdir())
    assert finished == [
        "fold-1-of-3.json",
        "fold-2-of-3.json",
        "fold-3-of-3.json",
        "grouped-split.json",
        "random-split.json",
        "without-class-0.json",
        "without-class-1.json",
        "without-class-2.json",
    ]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished training was run again")

    monkeypatch.setattr(study_module, "train_classifier", no_training)
    monkeypatch.setattr(study_module, "_score_split", no_training)
    again = run_study(
        three_classes(), out, CONFIG, "toy", progress=False, folds=3, loco=True, resume=True
    )
    assert sorted(r["unit"] for r in again["resumed"]) == [p[: -len(".json")] for p in finished]
    # Each reused training says where it ran.
    assert {r["device"] for r in again["resumed"]} == {first["run"]["training_device"]}
    assert {r["machine"] for r in again["resumed"]} == {first["run"]["machine"]}
    for part in ("random", "grouped", "cross_validation", "leave_one_class_out"):
        assert json.dumps(again[part], sort_keys=True) == json.dumps(first[part], sort_keys=True)
    assert again["leave_one_class_out"]["Corner"]["n_novel"] == 6
    # The kept models, scored again from disk, give the study's numbers.
    grouped = first["grouped"]
    rescored = rescore_left_out(
        out / "loco", three_classes(), grouped["test_index"], grouped["train_index"], CONFIG.seed
    )
    for name, recorded in first["leave_one_class_out"].items():
        for key, value in rescored[name].items():
            assert recorded[key] == pytest.approx(value, abs=1e-6), (name, key)
        assert 0 <= recorded["auroc_mc_dropout"] <= 1 and 0 <= recorded["auroc_head_ensemble"] <= 1
        # What a map with novelty="mc_dropout" would call unknown, from the kept record.
        assert {"novel_unknown_mc_dropout", "known_unknown_mc_dropout"} <= rescored[name].keys()
    # The summary's table shows every score, one cell per column.
    lines = (out / "summary.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| left out |"))
    header = lines[start]
    row = next(line for line in lines[start:] if line.startswith("| Corner |"))
    assert row.count("|") == header.count("|") and "AUROC head ensemble" in header
    corner = first["leave_one_class_out"]["Corner"]
    for key in (
        "auroc_mc_dropout",
        "auroc_head_ensemble",
        "auroc_combined_sum_ratio",
        "auroc_ensemble_residual",
        "auroc_mc_dropout_residual",
    ):
        assert f" {corner[key]:.3f} " in row, key
    # Each model trained without a class is kept, saying which class it never saw.
    kept = json.loads((out / "loco" / "without-class-2" / "model.json").read_text())
    assert kept["left_out"] == "Corner" and kept["model"]["classes"] == ["Bulk", "Centre"]
    # Without --resume everything is trained again.
    with pytest.raises(AssertionError, match="run again"):
        run_study(three_classes(), out, CONFIG, "toy", progress=False, folds=3, loco=True)


def test_only_the_grouped_split_s_model_carries_densities(first_run):
    """model/ is the one maps use; model_random/ is the memorization exhibit."""
    out, report = first_run
    grouped = json.loads((out / "model" / "model.json").read_text())
    shown = json.loads((out / "model_random" / "model.json").read_text())
    assert grouped["density"] and grouped["residual_density"] and grouped["mc_dropout"]
    assert not {"density", "residual_density", "mc_dropout"} & shown.keys()
    assert shown["metrics"] == report["random"]["metrics"]
    assert report["random"]["test_time_symmetry"] is None
    assert report["grouped"]["test_time_symmetry"]["n_test"] == report["grouped"]["split"]["n_test"]
    # One epoch cannot be shortened: the random split trained the study's schedule.
    assert report["random"]["max_epochs"] == report["grouped"]["max_epochs"] == 1
    assert "The random split trains for" not in (out / "summary.md").read_text()


def test_held_out_known_patches_called_unknown_are_counted_per_fold(first_run):
    """The grouped split's share matches its saved model scored again from disk."""
    from defectscope.artifacts.density import FeatureDensity
    from defectscope.artifacts.disagreement import DropoutNovelty, EnsembleNovelty
    from defectscope.artifacts.residual_density import ResidualDensity
    from defectscope.nets.checkpoint import load_checkpoint
    from defectscope.tiling.tiler import patches_to_inputs
    from defectscope.training.loop import predict_logits

    out, report = first_run
    patches = three_classes()
    test = np.asarray(report["grouped"]["test_index"])
    model, config, record = load_checkpoint(out / "model")
    _, embeddings = predict_logits(
        model, patches_to_inputs(patches.images[test], config.normalization)
    )
    embedding = FeatureDensity.from_dict(record["density"], 3).score(embeddings)[2]
    residual = ResidualDensity.from_dict(record["residual_density"], 3).score(patches.images[test])[
        2
    ]
    shares = report["grouped"]["held_out_unknown"]
    assert shares["n"] == len(test)
    assert shares["embedding"] == pytest.approx(embedding.mean())
    assert shares["residual"] == pytest.approx(residual.mean())
    assert shares["combined"] == pytest.approx((embedding | residual).mean())
    dropout = DropoutNovelty.from_dict(record["mc_dropout"], 3).score(embeddings)[2]
    assert shares["mc_dropout"] == pytest.approx(dropout.mean())
    ensemble = EnsembleNovelty.from_dict(record["head_ensemble"], 3).score(embeddings)[2]
    assert shares["ensemble"] == pytest.approx(ensemble.mean())
    assert shares["ensemble_residual"] == pytest.approx((ensemble | residual).mean())
    assert shares["mc_dropout_residual"] == pytest.approx((dropout | residual).mean())
    for index, name in enumerate(patches.classes):
        of_class = patches.labels[test] == index
        if of_class.any():
            assert shares["per_class"][name]["combined"] == pytest.approx(
                (embedding | residual)[of_class].mean()
            )
        else:
            assert name not in shares["per_class"]
    # Every fold has its own; the first is the grouped split's.
    folds = report["cross_validation"]["folds"]
    assert folds[0]["held_out_unknown"] == shares
    assert all(f["held_out_unknown"]["n"] == f["n_test"] for f in folds)
    combined = [f["held_out_unknown"]["combined"] for f in folds]
    assert report["cross_validation"]["held_out_unknown"]["combined"]["mean"] == pytest.approx(
        np.mean(combined)
    )
    dropout_shares = [f["held_out_unknown"]["mc_dropout"] for f in folds]
    assert report["cross_validation"]["held_out_unknown"]["mc_dropout"]["values"] == pytest.approx(
        dropout_shares
    )
    assert (
        "Held-out test patches of trained classes called unknown"
        in (out / "summary.md").read_text()
    )


def test_finished_work_is_not_reused_when_anything_changed(first_run):
    out, _ = first_run
    patches = three_classes()
    split = random_split(patches.labels, patches.classes, seed=CONFIG.seed)
    model_dir = out / "model_random"
    assert FinishedWork(out, patches, CONFIG, resume=True).get("random-split", split, model_dir)
    # Off unless asked for.
    assert FinishedWork(out, patches, CONFIG, resume=False).get("random-split", split) is None
    changed = {
        "settings": (patches, dataclasses.replace(CONFIG, learning_rate=3e-4), split),
        "pixels": (dataclasses.replace(patches, images=patches.images[::-1].copy()), CONFIG, split),
        "split": (patches, CONFIG, dataclasses.replace(split, test=split.test[1:])),
    }
    for what, (p, config, s) in changed.items():
        assert FinishedWork(out, p, config, resume=True).get("random-split", s) is None, what
    # A model changed since (retrained by hand, copied over) is not the one scored.
    weights = model_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes() + b"\0")
    work = FinishedWork(out, patches, CONFIG, resume=True)
    assert work.get("random-split", split, model_dir) is None
    # A damaged record is trained again, not an error.
    (out / "finished" / "fold-2-of-3.json").write_text("{not json")
    work = FinishedWork(out, patches, CONFIG, resume=True)
    assert work.get("fold-2-of-3", split) is None


@pytest.mark.parametrize(
    ("unit", "damage", "lacking"),
    [
        ("fold-3-of-3", lambda stored: stored.pop("record"), "record"),
        ("fold-3-of-3", lambda stored: stored["record"].pop("metrics"), "record.metrics"),
        ("grouped-split", lambda stored: stored["record"].pop("metrics"), "record.metrics"),
        ("without-class-1", lambda stored: stored["record"].pop("result"), "record.result"),
    ],
)
def test_a_damaged_finished_record_is_trained_again(first_run, unit, damage, lacking, caplog):
    """Before: a finished/*.json without 'record' or 'metrics' raised KeyError."""
    import logging

    from defectscope.evaluation.grouping import find_groups
    from defectscope.evaluation.metrics import grouped_folds
    from defectscope.studies.resume import FOLD_RECORD, LOCO_RECORD, SPLIT_RECORD

    out, _ = first_run
    patches = three_classes()
    groups = find_groups(patches.images)
    splits = grouped_folds(patches.labels, groups.ids, patches.classes, 3, seed=CONFIG.seed)
    split = splits[2] if unit.startswith("fold") else splits[0]
    required = {"fold": FOLD_RECORD, "grouped": SPLIT_RECORD, "without": LOCO_RECORD}
    required = required[unit.split("-")[0]]
    work = FinishedWork(out, patches, CONFIG, resume=True)
    path = out / "finished" / f"{unit}.json"
    stored = json.loads(path.read_text())
    assert work.get(unit, split, required=required) == stored["record"]
    damage(stored)
    damaged = out / "damaged" / f"{unit}.json"
    damaged.parent.mkdir(exist_ok=True)
    damaged.write_text(json.dumps(stored))
    work.directory = damaged.parent
    with caplog.at_level(logging.WARNING):
        assert work.get(unit, split, required=required) is None
    assert any(f"no {lacking}" in r.getMessage() for r in caplog.records)


def test_a_resumed_study_retrains_only_the_damaged_unit(first_run, monkeypatch):
    out, _ = first_run
    path = out / "finished" / "fold-3-of-3.json"
    stored = json.loads(path.read_text())
    del stored["record"]["metrics"]
    path.write_text(json.dumps(stored))
    trained = []
    score_split = study_module._score_split

    def counted(patches, split, config, name, progress):
        trained.append(name)
        return score_split(patches, split, config, name, progress)

    monkeypatch.setattr(study_module, "_score_split", counted)
    again = run_study(
        three_classes(), out, CONFIG, "toy", progress=False, folds=3, loco=False, resume=True
    )
    assert "grouped fold 3/3" in trained
    assert "metrics" in again["cross_validation"]["folds"][2]
    assert json.loads(path.read_text())["record"]["metrics"]  # written again, whole


def test_the_random_split_trains_a_shorter_schedule(tmp_path):
    """The memorization exhibit trains 3/4 of the epochs; its record and resume key say so."""
    config = dataclasses.replace(CONFIG, epochs=4, patience=4)
    assert random_split_config(config).epochs == 3
    assert random_split_config(dataclasses.replace(CONFIG, epochs=8)).epochs == 6
    assert random_split_config(dataclasses.replace(CONFIG, epochs=2)).epochs == 2
    assert random_split_config(CONFIG).epochs == 1  # never none
    # Unset epochs follow the schedule of where the trunk starts.
    unset = dataclasses.replace(CONFIG, epochs=None, weights="none")
    assert random_split_config(unset).epochs == 23  # 3/4 of the 30 from random init

    patches = three_classes()
    report = run_study(patches, tmp_path, config, "toy", progress=False, folds=0, loco=False)
    shown = json.loads((tmp_path / "model_random" / "model.json").read_text())
    kept = json.loads((tmp_path / "model" / "model.json").read_text())
    assert shown["training"]["schedule"]["epochs"] == 3
    assert len(shown["history"]) <= 3 and report["random"]["epochs_run"] <= 3
    assert kept["training"]["schedule"]["epochs"] == 4
    assert report["random"]["max_epochs"] == 3
    assert report["grouped"]["max_epochs"] == 4
    assert (
        "trains for 3 of the schedule's 4 epochs at most" in (tmp_path / "summary.md").read_text()
    )
    # Its finished record is keyed by its own settings, not the study's.
    split = random_split(patches.labels, patches.classes, seed=CONFIG.seed)
    work = FinishedWork(tmp_path, patches, config, resume=True)
    model_dir = tmp_path / "model_random"
    assert work.get("random-split", split, model_dir) is None
    assert work.get("random-split", split, model_dir, config=random_split_config(config))
