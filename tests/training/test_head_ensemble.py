"""The head ensemble: members trained on frozen features agree where they trained and
disagree away from it; training leaves the caller's random state alone."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from defectscope.artifacts.disagreement import head_ensemble_scores  # noqa: E402
from defectscope.training.head_ensemble import train_head_ensemble, trunk_features  # noqa: E402


def _clusters(n: int = 60, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, d)) * 4 + 10  # trunk features are positive, off zero
    labels = np.arange(n) % 3
    return (centres[labels] + rng.normal(size=(n, d))).astype(np.float32), labels, centres


def test_members_fit_the_training_features_and_disagree_off_them():
    torch.set_num_threads(1)
    features, labels, centres = _clusters()
    state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    members = train_head_ensemble(features, labels, 3, members=5, epochs=30, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the caller's generators untouched
    if cuda_state is not None:
        assert all(map(torch.equal, cuda_state, torch.cuda.get_rng_state_all()))
    assert len(members) == 5
    assert not np.array_equal(members[0].hidden_weight, members[1].hidden_weight)
    known = head_ensemble_scores(features, members)
    assert (known.probabilities.argmax(1) == labels).mean() == 1.0
    # Far off every class, along directions training never varied.
    rng = np.random.default_rng(1)
    far = (centres.mean(0) + rng.normal(size=(60, features.shape[1])) * 20).astype(np.float32)
    novel = head_ensemble_scores(far, members)
    assert np.median(novel.mutual_information) > 5 * np.median(known.mutual_information)
    again = train_head_ensemble(features, labels, 3, members=5, epochs=30, seed=0)
    np.testing.assert_array_equal(again[4].weight, members[4].weight)


def test_trunk_features_are_the_flattened_conv_output():
    from defectscope.nets.vgg import DefectNet

    torch.manual_seed(0)
    untrained_model = DefectNet(3, 64, 16, 0.5, "vgg16_bn").eval()
    inputs = np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32)
    features = trunk_features(untrained_model, inputs, batch_size=2)
    with torch.no_grad():
        want = untrained_model.features(torch.from_numpy(inputs)).flatten(1).numpy()
    np.testing.assert_allclose(features, want, rtol=1e-5, atol=1e-6)
    assert features.shape == (3, 512 * 2 * 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"members": 1}, "at least two members"), ({"n_classes": 2}, "labels must lie")],
)
def test_bad_settings_are_refused(kwargs, message):
    features, labels, _ = _clusters(n=9)
    args = {"features": features, "labels": labels, "n_classes": 3, "epochs": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        train_head_ensemble(**args)


def test_a_feature_constant_in_training_does_not_blow_up_off_it():
    """A trunk channel that never opens on the training patches is centred, not scaled
    by its zero spread: opening it on a new window moves the logits by O(1), not 1e6."""
    features, labels, _ = _clusters()
    features[:, 0] = 0.0
    # Nearly constant: opened a hair on one patch (a spread 1e5 times below the others').
    features[:, 1] = 0.0
    features[0, 1] = 1e-4
    assert 1e-6 < features[:, 1].std() < 1e-4 * np.median(features[:, 2:].std(axis=0))
    members = train_head_ensemble(features, labels, 3, members=2, epochs=5, seed=0)
    assert max(np.abs(m.hidden_weight[:, :2]).max() for m in members) < 10
    # Features of ordinary spread are still standardized (weights / spread).
    wide = features.copy()
    wide[:, 2] *= 1000.0
    scaled = train_head_ensemble(wide, labels, 3, members=2, epochs=5, seed=0)
    np.testing.assert_allclose(
        scaled[0].hidden_weight[:, 2] * 1000.0, members[0].hidden_weight[:, 2], rtol=1e-3
    )
