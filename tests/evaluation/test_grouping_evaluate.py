"""Overlap grouping, grouped splits, metrics and calibration."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from defectscope.evaluation.grouping import best_shift_correlation, find_groups
from defectscope.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    grouped_folds,
    grouped_split,
    random_split,
)
from tests.synthetic import lattice


def crops_of(region: np.ndarray, shifts: list[tuple[int, int]], size: int = 64) -> np.ndarray:
    return np.stack([region[y : y + size, x : x + size] for y, x in shifts])


def test_overlapping_crops_group_and_lattice_twins_do_not():
    # Two regions of the same periodic lattice with independent noise: they look
    # alike but share no pixels, so they must stay separate groups.
    region_a = lattice((90, 90), noise=0.15, seed=1)
    region_b = lattice((90, 90), noise=0.15, seed=2)
    a = crops_of(region_a, [(0, 0), (2, 3), (5, 5), (9, 12)])
    b = crops_of(region_b, [(0, 0), (4, 1)])
    groups = find_groups(np.concatenate([a, b]))
    assert groups.n_groups == 2
    assert len(set(groups.ids[:4])) == 1 and len(set(groups.ids[4:])) == 1
    assert groups.ids[0] != groups.ids[4]
    best = groups.best_match
    assert best[0, 1] > 0.99  # shared pixels
    assert best[0, 4] < groups.threshold  # same lattice, other noise


def test_chain_of_crops_is_one_group():
    region = np.random.default_rng(0).normal(size=(64, 200)).astype(np.float32)
    crops = crops_of(region, [(0, x) for x in range(0, 137, 8)])
    assert find_groups(crops).n_groups == 1  # neighbours overlap, ends do not


def test_correlation_matches_bruteforce():
    rng = np.random.default_rng(3)
    imgs = rng.normal(size=(3, 16, 16)).astype(np.float32)
    best = best_shift_correlation(imgs, template=8, max_shift=4)
    t = imgs[0, 4:12, 4:12].ravel()
    t = (t - t.mean()) / np.linalg.norm(t - t.mean())
    brute = 0.0
    for dy in range(9):
        for dx in range(9):
            w = imgs[1, dy : dy + 8, dx : dx + 8].ravel()
            w = (w - w.mean()) / np.linalg.norm(w - w.mean())
            brute = max(brute, float(t @ w))
    t1 = imgs[1, 4:12, 4:12].ravel()
    t1 = (t1 - t1.mean()) / np.linalg.norm(t1 - t1.mean())
    for dy in range(9):
        for dx in range(9):
            w = imgs[0, dy : dy + 8, dx : dx + 8].ravel()
            w = (w - w.mean()) / np.linalg.norm(w - w.mean())
            brute = max(brute, float(t1 @ w))
    assert best[0, 1] == pytest.approx(brute, abs=1e-5)


def test_grouped_split_never_leaks_groups():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    groups = np.concatenate([np.zeros(40), rng.integers(1, 9, 40), rng.integers(9, 20, 40)])
    groups = groups.astype(int)
    split = grouped_split(labels, groups, ["Bulk", "A", "B"], n_folds=4, seed=0)
    assert split.evaluable_classes == ["A", "B"]
    assert split.groups_per_class["Bulk"] == 1
    sets = [set(groups[ix]) for ix in (split.train, split.validation, split.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert 0 not in labels[split.test] and 0 not in labels[split.validation]
    assert len(split.train) + len(split.validation) + len(split.test) == len(labels)
    assert set(labels[split.test]) == {1, 2}


def test_grouped_folds_test_every_group_exactly_once():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 60)
    groups = np.concatenate(
        [np.zeros(60), rng.integers(1, 12, 60), rng.integers(12, 30, 60)]
    ).astype(int)
    splits = grouped_folds(labels, groups, ["Bulk", "A", "B"], n_folds=4, seed=0)
    assert len(splits) == 4
    tested = np.concatenate([s.test for s in splits])
    # Every patch of a testable group (classes A and B only) is tested exactly once.
    assert sorted(tested.tolist()) == np.flatnonzero(labels > 0).tolist()
    for index, split in enumerate(splits):
        sets = [set(groups[ix]) for ix in (split.train, split.validation, split.test)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert len(split.train) + len(split.validation) + len(split.test) == len(labels)
        # Every fold holds both classes, so the validation fold is the next fold's test
        # part: grouped as well.
        assert np.array_equal(split.validation, splits[(index + 1) % 4].test)
        assert 0 in labels[split.train]
    first = grouped_split(labels, groups, ["Bulk", "A", "B"], n_folds=4, seed=0)
    assert np.array_equal(first.test, splits[0].test)
    with pytest.raises(ValueError, match="at least 3 folds"):
        grouped_folds(labels, groups, ["Bulk", "A", "B"], n_folds=2)


def test_validation_fold_holds_a_class_the_next_fold_lacks():
    # Class B lies in three groups over four folds, so one fold lacks it; the split
    # testing the fold before that one must validate (and set its thresholds) on a fold
    # holding B, as SrTiO3's IExtra (four regions, five folds) needs.
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1, 2], [30, 80, 30])
    groups = np.concatenate([np.zeros(30), rng.integers(1, 21, 80), np.repeat([21, 22, 23], 10)])
    splits = grouped_folds(labels, groups.astype(int), ["Bulk", "A", "B"], n_folds=4, seed=0)
    holds_b = [2 in labels[s.test] for s in splits]
    assert holds_b.count(False) == 1
    lacking = holds_b.index(False)
    before = (lacking - 1) % 4
    assert np.array_equal(splits[before].validation, splits[(lacking + 1) % 4].test)
    for index, split in enumerate(splits):
        assert 2 in labels[split.validation]
        if index not in (before, lacking):
            assert np.array_equal(split.validation, splits[(index + 1) % 4].test)
        sets = [set(groups[ix]) for ix in (split.train, split.validation, split.test)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert len(split.train) + len(split.validation) + len(split.test) == len(labels)


def test_validation_fold_keeps_every_class_in_training_it_can():
    """No split drops a class from training, or its test classes from validation, that
    another choice of validation fold would keep (random sparse layouts, brute force)."""
    harder = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        # Regions holding one to three classes; c and d lie in three or four regions only.
        n_groups = int(rng.integers(7, 12))
        members = [
            set(rng.choice(2, int(rng.integers(1, 3)), replace=False)) for _ in range(n_groups)
        ]
        for rare in (2, 3):
            for g in rng.choice(n_groups, int(rng.integers(3, 5)), replace=False):
                members[g].add(rare)
        pairs = [(g, c) for g in range(n_groups) for c in sorted(members[g])]
        counts = rng.integers(3, 9, len(pairs))
        groups = np.repeat([g for g, _ in pairs], counts)
        labels = np.repeat([c for _, c in pairs], counts)
        classes = ["a", "b", "c", "d"]
        splits = grouped_folds(labels, groups, classes, n_folds=5, seed=seed)
        folds = [s.test for s in splits]
        if len(folds) < 3:
            continue
        everything = np.arange(len(labels))
        for index, split in enumerate(splits):
            options = []
            for other in range(len(folds)):
                if other == index:
                    continue
                train = np.setdiff1d(everything, np.concatenate([folds[index], folds[other]]))
                in_test = set(labels[folds[index]]) & set(labels[folds[other]])
                options.append((len(set(labels[train])), len(in_test)))
            chosen = (
                len(set(labels[split.train])),
                len(set(labels[split.test]) & set(labels[split.validation])),
            )
            assert chosen == max(options), (seed, index)
            following = (index + 1) % len(folds)
            harder += not np.array_equal(split.validation, folds[following])
    assert harder > 0  # some layouts needed another fold than the next one


def test_random_split_is_stratified_partition():
    labels = np.repeat([0, 1], [60, 40])
    split = random_split(labels, ["a", "b"], seed=1)
    all_ix = np.concatenate([split.train, split.validation, split.test])
    assert sorted(all_ix.tolist()) == list(range(100))
    assert np.mean(labels[split.test] == 0) == pytest.approx(0.6, abs=0.06)


def test_metrics_against_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    m = classification_metrics(y, p, ["a", "b", "c", "d"], scored_classes=["a", "c"])
    f1 = f1_score(y, p, average=None, labels=[0, 1, 2, 3])
    assert m["macro_f1"] == pytest.approx((f1[0] + f1[2]) / 2)
    assert m["accuracy"] == pytest.approx(np.mean(y == p))
    assert np.trace(np.array(m["confusion"])) == int((y == p).sum())
    assert m["per_class"]["b"]["support"] == int((y == 1).sum())
    # A scored class without test patches here has no F1: left out, not averaged in as 0.
    absent = np.where(y == 2, 0, y)
    m = classification_metrics(absent, p, ["a", "b", "c", "d"], scored_classes=["a", "c"])
    assert m["macro_f1_classes"] == ["a"]
    assert m["macro_f1"] == pytest.approx(f1_score(absent, p, average=None, labels=[0])[0])


def test_fold_summary_scores_each_fold_on_the_classes_it_tests():
    from defectscope.studies.study import summarize_folds

    def fold(f1_a, f1_b, support_b):
        per_class = {
            "a": {"f1": f1_a, "recall": f1_a, "support": 10},
            "b": {"f1": f1_b, "recall": f1_b, "support": support_b},
        }
        # As written before the fix: macro_f1 counted a class without test patches as 0.
        macro = (f1_a + f1_b) / 2
        metrics = {"accuracy": f1_a, "macro_f1": macro, "macro_f1_classes": ["a", "b"],
                   "per_class": per_class}  # fmt: skip
        return {"n_test": 10 + support_b, "metrics": metrics, "evaluable_classes": ["a", "b"],
                "calibration": {"ece_before": 0.1, "ece_after": 0.05}}  # fmt: skip

    summary = summarize_folds([fold(0.9, 0.8, 5), fold(0.7, 0.0, 0)], ["a", "b"])
    assert summary["macro_f1"]["values"] == pytest.approx([0.85, 0.7])
    assert summary["per_class"]["b"]["f1"]["n"] == 1
    assert "held_out_unknown" not in summary  # records written before it existed

    # A resumed fold without held-out unknown shares: averaged over the others, and said.
    from defectscope.studies.markdown import cross_validation_markdown

    folds = [fold(0.9, 0.8, 5), fold(0.7, 0.6, 5), fold(0.8, 0.8, 5)]
    for f, share in zip(folds, (0.2, None, 0.1), strict=True):
        if share is not None:
            f["held_out_unknown"] = {"embedding": share, "residual": 0.0, "combined": share}
    summary = summarize_folds(folds, ["a", "b"])
    assert summary["held_out_unknown"]["combined"]["values"] == pytest.approx([0.2, 0.1])
    report = {
        "random": {"metrics": {"per_class": {c: {"f1": 1.0} for c in "ab"}}},
        "cross_validation": {"folds": folds, "n_test": 45, **summary},
    }
    text = "\n".join(cross_validation_markdown(report))
    assert "over 2 of 3 folds: 0.150 ± 0.050" in text and "per fold 0.200 – 0.100" in text


def test_temperature_scaling_repairs_overconfidence():
    rng = np.random.default_rng(5)
    n, k = 4000, 3
    y = rng.integers(0, k, n)
    true_logits = rng.normal(size=(n, k))
    true_logits[np.arange(n), y] += 1.0
    # sample labels from the calibrated model, then make the logits 4x overconfident
    probs = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in probs])
    logits = 4.0 * true_logits
    temperature = fit_temperature(logits, y)
    assert temperature == pytest.approx(4.0, rel=0.15)
    before = expected_calibration_error(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), y)
    scaled = logits / temperature
    after = expected_calibration_error(np.exp(scaled) / np.exp(scaled).sum(1, keepdims=True), y)
    assert after < before / 3


def test_public_single_region_classes(public_data):
    """DATA.md: CdTe LC, SF1, SF2 and Twin_Bound are each crops of a single region."""
    from defectscope.io.datasets import load_patches

    patches = load_patches(public_data / "Image Data" / "DataSet_CdTe")
    groups = find_groups(patches.images)
    per_class = groups.per_class(patches.labels, patches.classes)
    for name in ("LC", "SF1", "SF2", "Twin_Bound"):
        assert per_class[name] == 1, per_class
    assert per_class["interstitial"] >= 20  # isolated point defects: many regions
    split = grouped_split(patches.labels, groups.ids, patches.classes)
    assert "LC" not in split.evaluable_classes and "interstitial" in split.evaluable_classes


def test_locate_patches_finds_crops():
    from defectscope.evaluation.provenance import locate_patches, match_template

    rng = np.random.default_rng(9)
    frame = rng.normal(size=(150, 170))
    crops = np.stack([frame[10:42, 100:132], frame[77:109, 3:35], rng.normal(size=(32, 32))])
    positions, scores = locate_patches(frame, crops)
    assert positions.tolist() == [[10, 100], [77, 3], [-1, -1]]
    assert scores[0] == pytest.approx(1.0) and scores[2] < 0.5
    # brute-force check of one correlation value
    t = crops[1] - crops[1].mean()
    w = frame[5:37, 60:92] - frame[5:37, 60:92].mean()
    brute = (t * w).sum() / np.sqrt((t**2).sum() * (w**2).sum())
    assert match_template(frame, crops[1])[5, 60] == pytest.approx(brute, abs=1e-9)


@pytest.mark.parametrize(
    "frame_shape, template_shape", [((150, 170), (32, 32)), ((151, 173), (20, 33))]
)
def test_shared_fft_correlation_equals_skimage_per_template(frame_shape, template_shape):
    from defectscope.evaluation.provenance import _FrameCorrelator, match_template

    rng = np.random.default_rng(11)
    frame = rng.normal(size=frame_shape) * 40 + 100
    frame[60:110, 40:100] = 7.0  # flat: no spread to correlate with
    frame[0:30, 0:50] = 5.0 + 1e-3 * rng.normal(size=(30, 50))  # little spread
    h, w = template_shape
    templates = rng.normal(size=(5, h, w))
    templates[1] = frame[3 : 3 + h, 9 : 9 + w]
    templates[2] = 3.0  # a flat template correlates with nothing
    templates[3] = frame[70 : 70 + h, 50 : 50 + w]  # cut from the flat region
    ncc = _FrameCorrelator(frame.astype(">f8"), template_shape).correlate(
        templates.astype(np.uint8)
    )
    for template, mine in zip(templates.astype(np.uint8), ncc, strict=True):
        # Both take window variances from running sums, whose rounding in windows of
        # little spread (1e-3 against 100 +- 40 elsewhere) is ~1e-6 of a score.
        np.testing.assert_allclose(mine, match_template(frame, template), atol=1e-5)


def test_locate_patches_agrees_with_per_patch_matching_and_refuses_bad_shapes(monkeypatch):
    from defectscope.evaluation.provenance import _FrameCorrelator, locate_patches, match_template

    # Small chunks, so that the 33 crops below are correlated in several.
    monkeypatch.setattr(_FrameCorrelator, "CHUNK_BYTES", 4 * 8 * 120 * 144 * 5)

    rng = np.random.default_rng(12)
    frame = rng.normal(size=(120, 140))
    crops = np.stack([frame[r : r + 24, c : c + 24] for r, c in [(0, 0), (96, 116), (40, 77)]])
    crops = np.concatenate([crops, rng.normal(size=(30, 24, 24))])
    positions, scores = locate_patches(frame, crops, threshold=0.9)
    assert positions[:3].tolist() == [[0, 0], [96, 116], [40, 77]]
    assert (positions[3:] == -1).all()
    for i in (0, 5, 32):
        ncc = match_template(frame, crops[i])
        assert scores[i] == pytest.approx(ncc.max(), abs=1e-9)
    empty = locate_patches(frame, np.zeros((0, 24, 24)))
    assert empty[0].shape == (0, 2) and empty[1].shape == (0,)
    with pytest.raises(ValueError, match="smaller than the templates"):
        locate_patches(frame[:20], crops)
    with pytest.raises(ValueError, match=r"\(n, h, w\)"):
        locate_patches(frame, crops[0])
    with pytest.raises(ValueError, match="2-D image"):
        locate_patches(np.stack([frame, frame]), crops)


def test_a_crop_is_found_on_a_frame_with_a_large_offset():
    from defectscope.evaluation.provenance import locate_patches

    # Window sums of uncentred values would cancel the spread of 0.5 against 1e7 away.
    rng = np.random.default_rng(13)
    frame = 1e7 + 0.5 * rng.normal(size=(128, 128))
    positions, scores = locate_patches(frame, frame[None, 30:62, 41:73], threshold=0.97)
    assert positions.tolist() == [[30, 41]] and scores[0] == pytest.approx(1.0, abs=1e-6)


def test_a_same_phase_lattice_region_is_not_taken_for_the_crop():
    from defectscope.evaluation.provenance import locate_patches
    from defectscope.studies.frame_check import CROP_MATCH_THRESHOLD

    # A periodic lattice matches itself one period away: a crop of another image of the
    # same lattice (independent noise) scores about 0.94 somewhere, and must not count as
    # cut from this frame; the frame's own crop does.
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:160, :160]
    lattice = np.cos(2 * np.pi * yy / 8) * np.cos(2 * np.pi * xx / 8)
    frame = lattice + rng.normal(scale=0.12, size=lattice.shape)
    other = lattice + rng.normal(scale=0.12, size=lattice.shape)
    crops = np.stack([frame[40:104, 24:88], other[40:104, 24:88]])
    positions, scores = locate_patches(frame, crops, threshold=CROP_MATCH_THRESHOLD)
    assert positions[0].tolist() == [40, 24] and positions[1].tolist() == [-1, -1]
    assert 0.9 < scores[1] < CROP_MATCH_THRESHOLD
