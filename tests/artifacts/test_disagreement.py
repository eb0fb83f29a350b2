"""Monte Carlo dropout of the head, from embeddings, against PyTorch's own dropout."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.artifacts.disagreement import mc_dropout_scores


def _head(seed: int = 0, n: int = 6, d: int = 16, classes: int = 3):
    rng = np.random.default_rng(seed)
    embeddings = np.maximum(rng.normal(size=(n, d)), 0).astype(np.float32)  # post-ReLU
    weight = rng.normal(size=(classes, d)).astype(np.float32)
    bias = rng.normal(size=classes).astype(np.float32)
    return embeddings, weight, bias


def test_without_dropout_it_is_the_plain_softmax_and_no_disagreement():
    embeddings, weight, bias = _head()
    scores = mc_dropout_scores(embeddings, weight, bias, rate=0.0, samples=4)
    logits = embeddings.astype(np.float64) @ weight.T + bias
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(scores.probabilities, want, rtol=1e-5)
    np.testing.assert_allclose(scores.mutual_information, 0, atol=1e-9)
    np.testing.assert_allclose(scores.predictive_entropy, -(want * np.log(want)).sum(1), rtol=1e-5)


def test_matches_torch_dropout_in_the_head():
    """The reference: torch.nn.Dropout in training mode before the same Linear, sampled
    as often; mean prediction and mutual information agree to Monte Carlo error."""
    torch = pytest.importorskip("torch")
    embeddings, weight, bias = _head(seed=1)
    samples, rate = 4000, 0.5
    torch.manual_seed(0)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    dropout = torch.nn.Dropout(rate).train()
    with torch.no_grad():
        x = torch.from_numpy(embeddings).expand(samples, *embeddings.shape)
        p = torch.softmax(head(dropout(x)).double(), dim=-1).numpy()
    mean = p.mean(0)
    entropy = lambda q: -(q * np.log(q)).sum(-1)  # noqa: E731
    mutual = entropy(mean) - entropy(p).mean(0)
    scores = mc_dropout_scores(embeddings, weight, bias, rate, samples=samples, seed=3)
    np.testing.assert_allclose(scores.probabilities, mean, atol=0.03)
    np.testing.assert_allclose(scores.mutual_information, mutual, atol=0.03)
    assert (scores.mutual_information > 0.01).any()  # dropout does disagree here


def test_repeatable_with_a_seed():
    embeddings, weight, bias = _head(n=2100)
    a = mc_dropout_scores(embeddings, weight, bias, 0.3, samples=8, seed=5)
    b = mc_dropout_scores(embeddings, weight, bias, 0.3, samples=8, seed=5)
    np.testing.assert_array_equal(a.mutual_information, b.mutual_information)
    assert a.probabilities.shape == (2100, 3)
    np.testing.assert_allclose(a.probabilities.sum(1), 1, rtol=1e-9)
    assert np.all(a.mutual_information >= 0)
    assert np.all(a.mutual_information <= a.predictive_entropy + 1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rate": 1.0}, "dropout rate"),
        ({"rate": float("nan")}, "dropout rate"),
        ({"samples": 0}, "samples"),
        ({"samples": 2.5}, "samples"),
        ({"temperature": 0.0}, "temperature"),
        ({"weight": np.zeros((3, 5), np.float32)}, "head weight"),
        ({"bias": np.zeros(4, np.float32)}, "head bias"),
        ({"embeddings": np.zeros(16, np.float32)}, "embeddings must be"),
        ({"embeddings": np.full((2, 16), np.nan, np.float32)}, "NaN"),
    ],
)
def test_bad_input_is_refused_by_name(change, message):
    embeddings, weight, bias = _head()
    args = {"embeddings": embeddings, "weight": weight, "bias": bias, "rate": 0.5}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        mc_dropout_scores(**args)


def _members(seed: int = 0, d: int = 16, hidden: int = 8, classes: int = 3, n: int = 4):
    from defectscope.artifacts.disagreement import HeadMember

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


def test_head_ensemble_scores_match_torch_heads():
    torch = pytest.importorskip("torch")
    from defectscope.artifacts.disagreement import head_ensemble_scores

    features = np.random.default_rng(3).normal(size=(5, 16)).astype(np.float32)
    members = _members()
    probabilities = []
    for m in members:
        head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        with torch.no_grad():
            for layer, (w, b) in (
                (head[0], (m.hidden_weight, m.hidden_bias)),
                (head[2], (m.weight, m.bias)),
            ):
                layer.weight.copy_(torch.from_numpy(w))
                layer.bias.copy_(torch.from_numpy(b))
            probabilities.append(
                torch.softmax(head(torch.from_numpy(features)).double(), -1).numpy()
            )
    p = np.stack(probabilities)
    mean = p.mean(0)
    entropy = lambda q: -(q * np.log(q)).sum(-1)  # noqa: E731
    scores = head_ensemble_scores(features, members)
    np.testing.assert_allclose(scores.probabilities, mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores.predictive_entropy, entropy(mean), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        scores.mutual_information, entropy(mean) - entropy(p).mean(0), rtol=1e-4, atol=1e-6
    )
    # One head repeated agrees with itself: no disagreement.
    same = head_ensemble_scores(features, [members[0]] * 3)
    np.testing.assert_allclose(same.mutual_information, 0, atol=1e-9)


def test_head_ensemble_scores_refuse_bad_members():
    from defectscope.artifacts.disagreement import head_ensemble_scores

    features = np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError, match="at least two members"):
        head_ensemble_scores(features, _members(n=1))
    with pytest.raises(ValueError, match="member 0 hidden weight"):
        head_ensemble_scores(np.zeros((2, 15), np.float32), _members())
    with pytest.raises(ValueError, match="disagree on the number of classes"):
        head_ensemble_scores(features, _members()[:1] + _members(classes=4)[:1])
    with pytest.raises(ValueError, match="NaN"):
        head_ensemble_scores(np.full((2, 16), np.inf, np.float32), _members())


def test_head_ensemble_scores_do_not_depend_on_the_block_size(monkeypatch):
    from defectscope.artifacts import disagreement

    features = np.random.default_rng(4).normal(size=(50, 16)).astype(np.float32)
    members = _members()
    whole = disagreement.head_ensemble_scores(features, members)
    monkeypatch.setattr(disagreement, "_BLOCK", 7)
    blocked = disagreement.head_ensemble_scores(features, members)
    np.testing.assert_allclose(blocked.mutual_information, whole.mutual_information, rtol=1e-6)
    np.testing.assert_allclose(blocked.probabilities, whole.probabilities, rtol=1e-6)


def test_non_finite_heads_are_refused():
    from defectscope.artifacts.disagreement import head_ensemble_scores

    members = _members()
    members[1].weight[0, 0] = np.nan
    with pytest.raises(ValueError, match="member 1 output weight or bias hold NaN"):
        head_ensemble_scores(np.zeros((2, 16), np.float32), members)
    embeddings, weight, bias = _head()
    with pytest.raises(ValueError, match="head weight or bias hold NaN"):
        mc_dropout_scores(embeddings, weight, np.full_like(bias, np.inf), 0.5)


def _fitted(seed: int = 0, d: int = 16, classes: int = 3):
    from defectscope.artifacts.disagreement import fit_dropout_novelty

    embeddings, weight, bias = _head(seed, n=400, d=d, classes=classes)
    return fit_dropout_novelty(weight, bias, 0.5, embeddings, samples=16, seed=2)


def test_shared_masks_make_a_window_score_independent_of_its_batch():
    """Every window sees the same thinned heads: alone or among 5000, the same score."""
    embeddings, weight, bias = _head(seed=4, n=5000)
    whole = mc_dropout_scores(embeddings, weight, bias, 0.5, samples=8, seed=1)
    for i in (0, 17, 4100, 4999):
        alone = mc_dropout_scores(embeddings[i : i + 1], weight, bias, 0.5, samples=8, seed=1)
        # One row goes down another BLAS path than a block: rounding, nothing more.
        np.testing.assert_allclose(
            alone.mutual_information, whole.mutual_information[i : i + 1], rtol=1e-5
        )


def test_dropout_novelty_is_calibrated_on_its_held_out_windows():
    """Its threshold is the quantile of the held-out scores, computed here by torch."""
    torch = pytest.importorskip("torch")
    novelty = _fitted()
    held, weight, bias = _head(0, n=400)
    p = []
    for mask in torch.from_numpy(novelty.kept):
        thinned = torch.from_numpy(weight).double() * mask / 0.5
        p.append(
            torch.softmax(torch.from_numpy(held).double() @ thinned.T + torch.from_numpy(bias), -1)
        )
    p = torch.stack(p).numpy()
    entropy = lambda q: -(q * np.log(q)).sum(-1)  # noqa: E731
    mutual = entropy(p.mean(0)) - entropy(p).mean(0)
    assert novelty.threshold == pytest.approx(np.quantile(mutual, 0.99), rel=1e-5)
    score, uncertainty, unknown = novelty.score(held)
    np.testing.assert_allclose(score, mutual, rtol=1e-4, atol=1e-7)
    assert unknown.mean() <= 0.01 + 1e-9 and 0 < unknown.sum()
    # Uncertainty is the share of held-out windows scoring lower.
    order = np.argsort(mutual)
    assert np.all(np.diff(uncertainty[order]) >= -1e-6)
    assert uncertainty.min() == 0 and uncertainty.max() == 1


def test_dropout_novelty_record_round_trips_through_json():
    import json

    from defectscope.artifacts.disagreement import DropoutNovelty

    novelty = _fitted()
    again = DropoutNovelty.from_dict(json.loads(json.dumps(novelty.to_dict())), 3, 16)
    probe = _head(seed=9, n=50)[0]
    for got, want in zip(again.score(probe), novelty.score(probe), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(again.kept, novelty.kept)


def _edit_masks(record, **change):
    record["masks"] = {**record["masks"], **change}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(kind="tied-gaussian-mahalanobis"), "kind"),
        (lambda r: r.update(rate=1.0), "rate"),
        (lambda r: r.update(rate=True), "rate"),
        (lambda r: r.update(threshold=float("inf")), "threshold"),
        (lambda r: r.update(threshold=10**400), "threshold"),
        (lambda r: r.update(reference=[0.2, 0.1]), "reference"),
        (lambda r: r.update(quantile=True), "quantile"),
        (lambda r: r.update(rate=0), "rate"),
        (lambda r: r.update(reference=[False, True]), "reference must be a list of numbers"),
        (lambda r: r.update(reference={"a": 1}), "reference must be a list of numbers"),
        (lambda r: r.update(reference=[0, 10**400]), "too large"),
        (lambda r: _edit_masks(r, shape=[1e400, 16]), "masks are not valid"),
        (lambda r: _edit_masks(r, shape=[16.0, 16]), "masks are not valid"),
        (lambda r: _edit_masks(r, shape=[2000, 16]), "masks must be"),
        (lambda r: r["weight"].update(shape=[3, 1e400]), "weight is not a valid"),
        (lambda r: r["weight"].update(shape=[3, True]), "weight is not a valid"),
        (lambda r: r.pop("bias"), "bias"),
        (lambda r: _edit_masks(r, shape=[16, 15]), "masks must be"),
        (lambda r: _edit_masks(r, shape=[0, 16]), "masks must be"),
        (lambda r: _edit_masks(r, shape=[17, 16]), "bytes"),
        (lambda r: _edit_masks(r, packbits_base64="not base64!"), "masks are not valid"),
        (lambda r: r.pop("masks"), "masks are not valid"),
    ],
)
def test_malformed_dropout_records_are_refused_by_name(edit, message):
    from defectscope.artifacts.disagreement import DropoutNovelty

    record = _fitted().to_dict()
    edit(record)
    with pytest.raises(ValueError, match=message):
        DropoutNovelty.from_dict(record, 3, 16)


def test_a_dropout_record_for_another_model_is_refused():
    from defectscope.artifacts.disagreement import DropoutNovelty

    record = _fitted().to_dict()
    with pytest.raises(ValueError, match="3 classes for 4"):
        DropoutNovelty.from_dict(record, 4, 16)
    with pytest.raises(ValueError, match=r"weight must be \(outputs, 32\)"):
        DropoutNovelty.from_dict(record, 3, 32)
    with pytest.raises(ValueError, match="embeddings are 8-D"):
        DropoutNovelty.from_dict(record, 3, 16).score(np.zeros((2, 8), np.float32))


def test_model_metadata_names_its_file_for_a_bad_dropout_record():
    from defectscope.artifacts.metadata import ArtifactMetadata, MetadataError

    record = _fitted(classes=2).to_dict()
    record["rate"] = -0.1
    model = {"classes": ["Bulk", "Vacancy"], "patch_size": 64, "embedding_dim": 16}
    with pytest.raises(MetadataError, match=r"model\.json: invalid model metadata: .*rate"):
        ArtifactMetadata.from_record({"model": model, "mc_dropout": record}, "model.json")
    record["rate"] = 0.5
    read = ArtifactMetadata.from_record({"model": model, "mc_dropout": record}, "model.json")
    assert read.mc_dropout is not None and read.mc_dropout.rate == 0.5


def test_a_score_tied_with_the_lowest_held_out_scores_has_no_uncertainty():
    """Mutual information is 0 wherever every head agrees; such held-out windows tie."""
    from defectscope.artifacts.density import calibrated

    reference = np.r_[np.zeros(100), np.linspace(0.1, 1.0, 157)]
    _, uncertainty, unknown = calibrated(np.array([0.0, 0.1, 2.0]), reference, 0.9)
    np.testing.assert_allclose(uncertainty, [0.0, 100 / 256, 1.0], atol=1e-6)
    assert unknown.tolist() == [False, False, True]


def test_a_record_through_json_parsing_with_1e400_gives_a_metadata_error():
    """json turns 1e400 into inf without asking parse_constant: refused by name."""
    import json

    from defectscope.artifacts.metadata import ArtifactMetadata, MetadataError, parse_metadata_json

    model = {"classes": ["a", "b", "c"], "patch_size": 64, "embedding_dim": 16}
    text = json.dumps({"model": model, "mc_dropout": _fitted().to_dict()})
    for edited in (
        text.replace('"masks": {"shape": [16,', '"masks": {"shape": [1e400,'),
        text.replace('"threshold": ', '"threshold": 1e400, "x": '),
    ):
        assert edited != text
        with pytest.raises(MetadataError, match=r"m\.json: invalid model metadata"):
            ArtifactMetadata.from_record(parse_metadata_json(edited, "m.json"), "m.json")


def test_a_head_without_dropout_has_no_mc_dropout_record():
    from defectscope.artifacts.disagreement import fit_dropout_novelty

    embeddings, weight, bias = _head()
    with pytest.raises(ValueError, match=r"rate in \(0, 1\)"):
        fit_dropout_novelty(weight, bias, 0.0, embeddings)
