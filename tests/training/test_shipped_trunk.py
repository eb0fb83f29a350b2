"""The trunk shipped in the package: found by name, checked by hash, and where training
starts from (issue 28)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from defectscope.nets import shipped  # noqa: E402
from defectscope.nets.vgg import (  # noqa: E402
    WeightsUnavailableError,
    build_model,
    resolve_weights,
)
from defectscope.training.config import PRETRAINED_TRUNK_LR_SCALE, TrainConfig  # noqa: E402
from defectscope.training.pretrain import export_trunk  # noqa: E402


def _trunk_tensors(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_the_package_ships_its_default_trunk_and_it_matches_its_manifest():
    assert shipped.DEFAULT_TRUNK in shipped.shipped_trunks()
    path, manifest = shipped.verified_weights(shipped.DEFAULT_TRUNK, "vgg16_bn")
    assert manifest["license"] and manifest["recipe_sha256"] and manifest["data_sha256"]
    assert path.stat().st_size == manifest["bytes"] <= 32 * 2**20
    state = _trunk_tensors(path)
    assert all(k.startswith("features.") for k in state)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    # It is a trained trunk, not an initialization: every conv has weights of its own
    # (a randomly initialized layer has zero-mean weights with Kaiming's spread).
    model = build_model(3, weights=shipped.DEFAULT_TRUNK, architecture="vgg16_bn")
    for name, tensor in state.items():
        loaded = dict(model.named_parameters()) | dict(model.named_buffers())
        np.testing.assert_array_equal(loaded[name].detach().numpy(), tensor.float().numpy())


def test_the_shipped_trunk_was_made_by_the_recipe_in_scripts():
    # scripts/pretrain_trunk.json is the recipe the manifest records: a change to the
    # file must come with a new trunk (or, where it makes the same data, a manifest
    # that records the new wording).
    from pathlib import Path

    pytest.importorskip("ase")  # the recipe's check builds its crystals
    from defectscope.training.pretrain import Recipe

    recipe = Recipe.load(Path(__file__).resolve().parents[2] / "scripts" / "pretrain_trunk.json")
    _, manifest = shipped.verified_weights(shipped.DEFAULT_TRUNK, "vgg16_bn")
    assert manifest["recipe"] == recipe.to_dict()
    assert manifest["recipe_sha256"] == recipe.digest()


@pytest.fixture
def trunk_dir(tmp_path, monkeypatch):
    """A small shipped-trunk folder made by export_trunk from a known model."""
    from defectscope.artifacts.metadata import WEIGHTS_FILE

    torch.manual_seed(3)
    model = build_model(4, weights="none", architecture="vgg16_bn")
    (tmp_path / "model").mkdir()
    torch.save(model.state_dict(), tmp_path / "model" / WEIGHTS_FILE)
    manifest = {"name": "sim-haadf", "architecture": "vgg16_bn", "license": "MIT"}
    export_trunk(tmp_path / "model", tmp_path / "weights", manifest)
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path / "weights")
    return tmp_path / "weights", model


def test_export_writes_fp16_trunk_with_its_hash(trunk_dir):
    directory, model = trunk_dir
    manifest = json.loads((directory / "sim-haadf.json").read_text())
    assert manifest["sha256"] == shipped.file_hash(directory / "sim-haadf.pt")
    built = build_model(2, weights="sim-haadf", architecture="vgg16_bn")
    for (name, want), got in zip(
        model.features.state_dict().items(), built.features.state_dict().values(), strict=True
    ):
        if want.is_floating_point():  # fp16 round trip: 2^-11 relative
            np.testing.assert_allclose(
                got.numpy(), want.numpy(), rtol=1e-3, atol=1e-6, err_msg=name
            )
        else:
            assert torch.equal(got, want)


def test_a_damaged_trunk_is_refused_with_its_hashes(trunk_dir):
    directory, _ = trunk_dir
    data = bytearray((directory / "sim-haadf.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (directory / "sim-haadf.pt").write_bytes(bytes(data))
    with pytest.raises(WeightsUnavailableError, match=r"SHA-256 .* differs from the manifest"):
        build_model(2, weights="sim-haadf", architecture="vgg16_bn")
    (directory / "sim-haadf.pt").unlink()
    with pytest.raises(WeightsUnavailableError, match="are missing"):
        build_model(2, weights="sim-haadf", architecture="vgg16_bn")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": "vgg16"}, "is a vgg16 trunk, not vgg16_bn"),
        ({"file": "../elsewhere.pt"}, "must name a file beside the manifest"),
        ({"sha256": None}, "needs 'file', 'sha256' and 'architecture'"),
    ],
)
def test_a_wrong_manifest_is_refused(trunk_dir, change, message):
    directory, _ = trunk_dir
    path = directory / "sim-haadf.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(WeightsUnavailableError, match=message):
        build_model(2, weights="sim-haadf", architecture="vgg16_bn")


def test_an_unreadable_manifest_and_an_unknown_name(trunk_dir):
    directory, _ = trunk_dir
    (directory / "sim-haadf.json").write_text("{not json")
    with pytest.raises(WeightsUnavailableError, match="unreadable manifest"):
        build_model(2, weights="sim-haadf", architecture="vgg16_bn")
    with pytest.raises(shipped.ShippedTrunkError, match="no shipped trunk named 'other'"):
        shipped.read_manifest("other")


def test_auto_prefers_cached_imagenet_then_the_shipped_trunk(trunk_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("DEFECTSCOPE_WEIGHTS", raising=False)
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert resolve_weights("auto", "vgg16_bn") == "sim-haadf"
    # No shipped trunk for plain VGG-16: random initialization.
    assert resolve_weights("auto", "vgg16") == "none"
    from defectscope.nets.vgg import imagenet_cache_path

    cached = imagenet_cache_path("vgg16_bn")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert resolve_weights("auto", "vgg16_bn") == "imagenet"
    monkeypatch.setenv("DEFECTSCOPE_WEIGHTS", "none")
    assert resolve_weights("auto", "vgg16_bn") == "none"
    assert resolve_weights("sim-haadf", "vgg16_bn") == "sim-haadf"  # named: as given
    shutil.rmtree(trunk_dir[0])
    monkeypatch.delenv("DEFECTSCOPE_WEIGHTS")
    cached.unlink()
    assert resolve_weights("auto", "vgg16_bn") == "none"


def test_fine_tuning_starts_from_the_shipped_trunk(trunk_dir, monkeypatch):
    from defectscope.training.loop import train_classifier, training_record
    from tests.synthetic import toy_patches

    directory, _ = trunk_dir
    monkeypatch.delenv("DEFECTSCOPE_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(directory / "no-hub"))
    torch.set_num_threads(1)
    shipped_state = _trunk_tensors(directory / "sim-haadf.pt")
    # A trunk learning rate of 0 leaves the convolutions exactly where they started.
    config = TrainConfig(
        epochs=1, precision="fp32", trunk_lr_scale=0.0, physical_augmentation=False
    )
    result = train_classifier(toy_patches(4, seed=1), None, config, progress=False)
    trunk = result.model.features.state_dict()
    convs = [k for k in shipped_state if k.endswith(".weight") and shipped_state[k].dim() == 4]
    assert convs
    for key in convs:
        np.testing.assert_array_equal(
            trunk[key[len("features.") :]].numpy(), shipped_state[key].float().numpy()
        )
    record = training_record(result, config)["training"]
    assert record["weights"] == "auto"
    assert record["weights_used"]["weights"] == "sim-haadf"
    assert record["weights_used"]["shipped_sha256"] == shipped.file_hash(directory / "sim-haadf.pt")
    assert record["schedule"]["trunk_learning_rate"] == 0.0


def test_the_trunk_learning_rate_is_the_schedule_s_share_of_the_rate():
    config = TrainConfig(learning_rate=1e-3)
    assert config.trunk_learning_rate("none") == pytest.approx(1e-3)
    assert config.trunk_learning_rate("sim-haadf") == pytest.approx(
        1e-3 * PRETRAINED_TRUNK_LR_SCALE
    )
    assert dataclasses.replace(config, trunk_lr_scale=0.5).trunk_learning_rate("none") == 5e-4
    for bad in (float("nan"), -1.0, 11.0, True, "0.1"):
        with pytest.raises(ValueError, match="trunk learning-rate scale"):
            TrainConfig(trunk_lr_scale=bad)


@pytest.mark.parametrize(
    "text", ["[]", '{"file": "../x.pt", "sha256": "0", "architecture": "vgg16_bn"}', "9" * 5000]
)
def test_a_damaged_manifest_is_an_error_not_a_silent_random_start(trunk_dir, monkeypatch, text):
    directory, _ = trunk_dir
    (directory / "sim-haadf.json").write_text(text)
    monkeypatch.setenv("DEFECTSCOPE_WEIGHTS", "auto")
    monkeypatch.setattr(
        "defectscope.nets.vgg.imagenet_cache_path", lambda arch: directory / "no-such-file"
    )
    # `auto` still names the shipped trunk, so loading it fails loudly.
    assert resolve_weights("auto", "vgg16_bn") == "sim-haadf"
    with pytest.raises(WeightsUnavailableError, match=r"sim-haadf\.json"):
        build_model(2, weights="auto", architecture="vgg16_bn")


def test_a_resumed_study_does_not_reuse_trainings_from_another_start(
    trunk_dir, tmp_path, monkeypatch
):
    from defectscope.studies.resume import FinishedWork
    from tests.synthetic import toy_patches

    patches = toy_patches(2, seed=0)
    monkeypatch.setattr(
        "defectscope.nets.vgg.imagenet_cache_path", lambda arch: tmp_path / "no-such-file"
    )
    keys = {}
    for start in ("none", "sim-haadf"):
        monkeypatch.setenv("DEFECTSCOPE_WEIGHTS", start)
        keys[start] = FinishedWork(tmp_path / "run", patches, TrainConfig(), resume=True)._base
    assert keys["none"] != keys["sim-haadf"]
    # The same start gives the same key.
    again = FinishedWork(tmp_path / "run", patches, TrainConfig(), resume=True)._base
    assert again == keys["sim-haadf"]
