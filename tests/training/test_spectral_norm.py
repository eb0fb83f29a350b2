"""Soft spectral normalization: bounds hold against an exact SVD, weights bake into a
plain VGG-16, and training with it yields an ordinary checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from defectscope.nets.spectral import apply_spectral_norm, remove_spectral_norm  # noqa: E402
from defectscope.nets.vgg import build_model  # noqa: E402


def _sigma(weight: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(weight.detach().flatten(1).double(), ord=2))


def _bn_gain(bn: nn.BatchNorm2d) -> float:
    return float((bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).max())


def test_every_layer_is_bounded_and_free_layers_left_alone():
    torch.manual_seed(0)
    model = build_model(3, weights="none", architecture="vgg16_bn")
    with torch.no_grad():  # make some layers large, one small
        model.features[0].weight.mul_(50)
        model.features[3].weight.mul_(1e-3)
        model.features[1].weight.fill_(40.0)
    small = model.features[3].weight.detach().clone()
    classifier = model.classifier.weight.detach().clone()
    n = apply_spectral_norm(model, 3.0, seed=0)
    assert n == 13 + 13 + 1  # convs, batch norms, the embedding's linear layer
    model.train()
    x = torch.randn(4, 3, 64, 64)
    for _ in range(3):  # power iterations run in training steps
        model(x)
    # A last step that leaves the running variances as they are, so the gains' bound is
    # read on the variances now held.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.0
    model(x)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear) and module is not model.classifier:
            assert _sigma(module.weight) <= 3.0 * 1.01
        if isinstance(module, nn.BatchNorm2d):
            assert _bn_gain(module) <= 3.0 * (1 + 1e-5)
    assert _sigma(model.features[0].weight) == pytest.approx(3.0, rel=0.01)
    torch.testing.assert_close(model.features[3].weight, small)  # below the bound: as it was
    torch.testing.assert_close(model.classifier.weight, classifier)


def test_baked_weights_give_the_same_outputs_and_a_plain_state_dict():
    torch.manual_seed(1)
    model = build_model(3, weights="none", architecture="vgg16_bn")
    apply_spectral_norm(model, 1.5, seed=0)
    model.train()
    model(torch.randn(4, 3, 64, 64))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    assert remove_spectral_norm(model) == 27
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before)
    state = model.state_dict()
    assert not any("parametrizations" in key for key in state)
    fresh = build_model(3, weights="none", architecture="vgg16_bn")
    fresh.load_state_dict(state)  # an ordinary VGG-16 checkpoint


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_coefficient_is_refused(bad):
    from defectscope.training.config import TrainConfig

    model = build_model(2, weights="none", architecture="vgg16_bn")
    with pytest.raises(ValueError, match="coefficient"):
        apply_spectral_norm(model, bad)
    with pytest.raises(ValueError, match="--spectral-norm"):
        TrainConfig(spectral_norm=bad)


def test_training_with_it_saves_an_ordinary_bounded_model(tmp_path):
    from defectscope.nets.checkpoint import load_checkpoint
    from defectscope.training.config import TrainConfig
    from defectscope.training.loop import save_training, train_classifier
    from tests.synthetic import toy_patches

    torch.set_num_threads(1)
    config = TrainConfig(epochs=1, weights="none", spectral_norm=2.0, precision="fp32")
    result = train_classifier(toy_patches(4), None, config, progress=False)
    convs = [m for m in result.model.features if isinstance(m, nn.Conv2d)]
    assert max(_sigma(m.weight) for m in convs) <= 2.0 * 1.05
    save_training(tmp_path / "model", result, config)
    model, _, record = load_checkpoint(tmp_path / "model")
    assert record["training"]["spectral_norm"] == 2.0
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x))


def test_frozen_layers_are_left_as_they_are():
    torch.manual_seed(2)
    model = build_model(3, weights="none", architecture="vgg16_bn", trainable_blocks=1)
    frozen = model.features[0].weight.detach().clone()
    n = apply_spectral_norm(model, 0.5, seed=0)
    assert n == 3 + 3 + 1  # block 5's convs and batch norms, the embedding
    model.train()
    model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(model.features[0].weight, frozen)


def test_batchnorm_re_estimation_sees_the_weights_evaluation_uses():
    """Re-estimating batch-norm statistics (no gradients) must not move the bounds: the
    constrained model and its baked copy gather the same statistics."""
    from defectscope.training.loop import recalibrate_batchnorm

    def constrained():
        torch.manual_seed(3)
        model = build_model(3, weights="none", architecture="vgg16_bn")
        with torch.no_grad():
            model.features[1].weight.fill_(20.0)  # a gain the bound cuts
        apply_spectral_norm(model, 2.0, seed=0)
        return model

    model = constrained()
    model.train()
    for _ in range(2):
        model(torch.randn(4, 3, 64, 64) * 0.3)
    # Not copy.deepcopy: a parametrized copy shares its class with the original, and
    # removing the copy's parametrizations would remove the original's properties.
    baked = constrained()
    baked.load_state_dict(model.state_dict())
    baked.eval()
    remove_spectral_norm(baked)
    inputs = np.random.default_rng(0).normal(size=(16, 3, 64, 64)).astype(np.float32) * 0.3
    assert recalibrate_batchnorm(model, inputs, batch_size=8)
    assert recalibrate_batchnorm(baked, inputs, batch_size=8)
    model.eval()  # reading the weights in a training step would move the bounds
    norms = 0
    for a, b in zip(model.features, baked.features, strict=True):
        if isinstance(a, nn.BatchNorm2d):
            torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(a.weight, b.weight)
            norms += 1
    assert norms == 13
