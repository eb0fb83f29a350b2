"""The head ensemble on the embedding as a map's novelty source: calibration against
PyTorch heads, its stored record, and the records it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectscope.artifacts.disagreement import (
    MAX_ENSEMBLE_MEMBERS,
    EnsembleNovelty,
    HeadMember,
    fit_ensemble_novelty,
)
from tests.references import ensemble_mutual_information


def _members(n: int = 5, d: int = 16, hidden: int = 8, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        HeadMember(
            rng.normal(size=(hidden, d)).astype(np.float32),
            rng.normal(size=hidden).astype(np.float32),
            rng.normal(size=(classes, hidden)).astype(np.float32),
            rng.normal(size=classes).astype(np.float32),
        )
        for _ in range(n)
    ]


def _embeddings(n: int, d: int = 16, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(n, d)), 0).astype(np.float32)  # post-ReLU


def _fitted(classes: int = 3) -> EnsembleNovelty:
    return fit_ensemble_novelty(_members(classes=classes), _embeddings(400))


def _torch_mutual_information(members, embeddings) -> np.ndarray:
    pytest.importorskip("torch")
    return ensemble_mutual_information(embeddings, members)


def test_ensemble_novelty_is_calibrated_on_its_held_out_windows():
    """Its threshold is the 0.99 quantile of torch heads' mutual information on the
    held-out windows; uncertainty is the share of them scoring lower."""
    held = _embeddings(400)
    novelty = _fitted()
    mutual = _torch_mutual_information(novelty.members, held)
    assert novelty.threshold == pytest.approx(np.quantile(mutual, 0.99), rel=1e-4)
    assert novelty.source == "validation" and novelty.novelty_name == "head ensemble"
    score, uncertainty, unknown = novelty.score(held)
    np.testing.assert_allclose(score, mutual, rtol=1e-4, atol=1e-7)
    assert 0 < unknown.sum() <= 0.01 * len(held) + 1
    order = np.argsort(mutual)
    assert np.all(np.diff(uncertainty[order]) >= -1e-6)
    assert uncertainty.min() == 0 and uncertainty.max() == 1


def test_a_window_far_from_the_held_out_ones_is_unknown():
    """Members that agree near the held-out windows and disagree far from them."""
    novelty = _fitted()
    far = _embeddings(50, seed=7) * 40
    mutual = _torch_mutual_information(novelty.members, far)
    _, _, unknown = novelty.score(far)
    assert np.array_equal(unknown, mutual > novelty.threshold)
    assert unknown.mean() > 0.5


def test_ensemble_record_round_trips_through_json():
    novelty = _fitted()
    again = EnsembleNovelty.from_dict(json.loads(json.dumps(novelty.to_dict())), 3, 16)
    probe = _embeddings(50, seed=9)
    for got, want in zip(again.score(probe), novelty.score(probe), strict=True):
        np.testing.assert_array_equal(got, want)
    for a, b in zip(again.members, novelty.members, strict=True):
        for field in ("hidden_weight", "hidden_bias", "weight", "bias"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def _member(record, index=0):
    return record["members"][index]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(kind="mc-dropout-mutual-information"), "kind"),
        (lambda r: r.update(members={"a": 1}), "list of 2"),
        (lambda r: r.update(members=r["members"][:1]), "list of 2"),
        (lambda r: r.update(members=r["members"] * 7), "list of 2"),
        (lambda r: r["members"].__setitem__(1, "head"), "member 1 must be an object"),
        (lambda r: _member(r).pop("hidden_bias"), "member 0 hidden_bias"),
        (lambda r: _member(r)["weight"].update(shape=[3, 1e400]), "member 0 weight"),
        (lambda r: _member(r)["weight"].update(shape=[3, True]), "member 0 weight"),
        (lambda r: _member(r)["hidden_weight"].update(shape=[16, 8]), "hidden weight must be"),
        (lambda r: _member(r)["bias"].update(shape=[1]), "member 0"),
        (lambda r: r.update(threshold=10**400), "threshold"),
        (lambda r: r.update(threshold=float("nan")), "threshold"),
        (lambda r: r.update(reference=[0.2, 0.1]), "reference"),
        (lambda r: r.update(reference=[0, 10**400]), "too large"),
        (lambda r: r.update(reference=list(range(70000))), "at most 65536"),
        (lambda r: r.update(quantile=True), "quantile"),
    ],
)
def test_malformed_ensemble_records_are_refused_by_name(edit, message):
    record = _fitted().to_dict()
    edit(record)
    with pytest.raises(ValueError, match=message):
        EnsembleNovelty.from_dict(record, 3, 16)


def test_members_of_different_models_are_refused():
    record = _fitted().to_dict()
    other = fit_ensemble_novelty(_members(classes=4), _embeddings(10)).to_dict()
    record["members"][1] = other["members"][1]
    with pytest.raises(ValueError, match="disagree"):
        EnsembleNovelty.from_dict(record)
    with pytest.raises(ValueError, match="member 1 has 4 classes for 3"):
        EnsembleNovelty.from_dict(record, 3, 16)


def test_an_ensemble_for_another_model_is_refused():
    record = _fitted().to_dict()
    with pytest.raises(ValueError, match="3 classes for 4"):
        EnsembleNovelty.from_dict(record, 4, 16)
    with pytest.raises(ValueError, match=r"weight must be \(outputs, 32\)"):
        EnsembleNovelty.from_dict(record, 3, 32)
    with pytest.raises(ValueError, match="embeddings are 8-D"):
        EnsembleNovelty.from_dict(record, 3, 16).score(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        _fitted().score(np.full((2, 16), np.nan, np.float32))


def test_the_number_of_members_is_bounded():
    with pytest.raises(ValueError, match=f"2..{MAX_ENSEMBLE_MEMBERS} members"):
        fit_ensemble_novelty(_members(n=1), _embeddings(10))
    with pytest.raises(ValueError, match=f"2..{MAX_ENSEMBLE_MEMBERS} members"):
        fit_ensemble_novelty(_members(n=MAX_ENSEMBLE_MEMBERS + 1), _embeddings(10))
    with pytest.raises(ValueError, match="at least 2 held-out"):
        fit_ensemble_novelty(_members(), _embeddings(1))


def test_model_metadata_reads_the_record_and_names_its_file_when_bad():
    from defectscope.artifacts.metadata import (
        ArtifactMetadata,
        MetadataError,
        parse_metadata_json,
    )

    model = {"classes": ["a", "b", "c"], "patch_size": 64, "embedding_dim": 16}
    record = _fitted().to_dict()
    read = ArtifactMetadata.from_record({"model": model, "head_ensemble": record}, "model.json")
    assert read.head_ensemble is not None and len(read.head_ensemble.members) == 5
    text = json.dumps({"model": model, "head_ensemble": record})
    for edited in (
        text.replace('"threshold": ', '"threshold": 1e400, "x": '),
        text.replace('"kind": "head-ensemble', '"kind": "tied-gaussian'),
    ):
        assert edited != text
        with pytest.raises(MetadataError, match=r"m\.json: invalid model metadata"):
            ArtifactMetadata.from_record(parse_metadata_json(edited, "m.json"), "m.json")


def test_members_reading_nothing_or_giving_no_class_are_refused():
    """Without the model's shape to check against, empty layers are refused by name."""
    for hidden, classes, d in ((8, 3, 0), (8, 0, 16)):
        record = _fitted().to_dict()
        from defectscope.artifacts.density import encode_array as empty

        for member in record["members"]:
            member["hidden_weight"] = empty(np.zeros((hidden, d), np.float32))
            member["weight"] = empty(np.zeros((classes, hidden), np.float32))
            member["bias"] = empty(np.zeros(classes, np.float32))
        with pytest.raises(ValueError, match="at least one"):
            EnsembleNovelty.from_dict(record)


def test_a_json_integer_past_the_digit_limit_gives_a_metadata_error():
    from defectscope.artifacts.metadata import MetadataError, parse_metadata_json

    with pytest.raises(MetadataError, match=r"m\.json: invalid model metadata"):
        parse_metadata_json('{"threshold": ' + "9" * 5000 + "}", "m.json")
