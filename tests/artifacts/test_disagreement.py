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
