"""The VGG-16 model, weight loading, freezing, training and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from scipy.special import softmax

from defectscope.evaluation.scoring import classify_patches, open_engine
from defectscope.nets.checkpoint import CheckpointError, load_checkpoint
from defectscope.nets.vgg import WeightsUnavailableError, build_model, imagenet_cache_path
from defectscope.tiling.tiler import Normalization, patches_to_inputs, tile_numpy
from defectscope.training.augment import Augmentation, augment_batch
from defectscope.training.loop import TrainConfig, predict_logits, save_training, train_classifier
from tests.synthetic import toy_patches


def test_embedding_and_logits_shapes():
    model = build_model(5, weights="none").eval()
    x = torch.randn(3, 3, 64, 64)
    logits, emb = model.forward_with_embedding(x)
    assert logits.shape == (3, 5) and emb.shape == (3, 256)
    assert torch.allclose(model(x), logits, atol=1e-5)


def test_trunk_is_torchvision_vgg16():
    reference = torchvision.models.vgg16(weights=None).features
    ours = build_model(2).features
    assert [type(m) for m in ours] == [type(m) for m in reference]
    assert sum(p.numel() for p in ours.parameters()) == 14_714_688


@pytest.mark.parametrize(("blocks", "trainable_convs"), [(0, 0), (1, 3), (2, 6), (5, 13)])
def test_freeze_policy(blocks, trainable_convs):
    model = build_model(3, trainable_blocks=blocks)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert sum(m.weight.requires_grad for m in convs) == trainable_convs
    # trainable convs are the last ones
    assert all(m.weight.requires_grad for m in convs[len(convs) - trainable_convs :])
    assert model.classifier.weight.requires_grad


def test_local_weights_file_loads_trunk(tmp_path):
    source = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(source.state_dict(), path)
    model = build_model(4, weights=str(path))
    assert torch.equal(model.features[28].weight, source.features[28].weight)


def test_bad_weights_are_errors_not_fallbacks(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_model(2, weights=str(tmp_path / "missing.pth"))
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsUnavailableError, match="features"):
        build_model(2, weights=str(tmp_path / "other.pth"))


def test_imagenet_offline_error_says_how(monkeypatch, tmp_path):
    if imagenet_cache_path().is_file():
        pytest.skip("ImageNet weights are cached on this machine")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(2, weights="imagenet")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and "--weights none" in message


def test_augmentation_keeps_shape_and_is_seeded():
    patches = toy_patches(2).images
    a = augment_batch(patches, np.random.default_rng(7))
    b = augment_batch(patches, np.random.default_rng(7))
    assert a.shape == patches.shape and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.allclose(a, patches)
    same = augment_batch(patches, np.random.default_rng(7), Augmentation.off())
    assert np.array_equal(same, patches.astype(np.float32))


def test_patches_to_inputs_matches_reference():
    patches = toy_patches(2).images
    got = patches_to_inputs(patches, Normalization())
    want = np.stack([tile_numpy(p, 64, 64)[0] for p in patches])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_training_learns_and_checkpoint_round_trips(tmp_path):
    train, val = toy_patches(12, seed=0), toy_patches(4, seed=1)
    config = TrainConfig(
        epochs=6,
        batch_size=8,
        patience=6,
        augmentation=Augmentation.off(),
        precision="fp32",
    )
    result = train_classifier(train, val, config, progress=False)
    history = result.history
    # Mechanics, not convergence (a tiny run need not converge alike on every CPU): the
    # optimizer steps reduce the training loss, and the weights kept are those of the
    # best validation epoch, whose loss the kept model reproduces.
    assert min(h["train_loss"] for h in history[1:]) < history[0]["train_loss"]
    best = result.best_epoch
    assert history[best]["val_loss"] <= min(h["val_loss"] for h in history) + 1e-4
    inputs = patches_to_inputs(val.images, result.config.normalization)
    logits_a, emb = predict_logits(result.model, inputs)
    probs = softmax(logits_a, axis=1)
    assert probs.shape == (8, 2) and emb.shape == (8, 256)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    kept_loss = float(np.mean(-np.log(probs[np.arange(8), val.labels])))
    assert kept_loss == pytest.approx(history[best]["val_loss"], rel=1e-4, abs=1e-5)

    save_training(
        tmp_path / "m", result, config, extra_record={"calibration": {"temperature": 2.0}}
    )
    loaded = open_engine(tmp_path / "m", backend="torch")
    assert loaded.classes == ["Bulk", "Vacancy"] and loaded.temperature == 2.0
    probs_b, _ = classify_patches(loaded, val.images)
    atol = 1e-5 if loaded.device.type == "cpu" else 0.02  # CUDA convolutions run in TF32
    np.testing.assert_allclose(probs_b, softmax(logits_a / 2.0, axis=1), atol=atol)
    _, config_loaded, record = load_checkpoint(tmp_path / "m")
    assert config_loaded.background_class == "Bulk"
    assert record["training"]["epochs"] == 6 and len(record["history"]) == len(history)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a defectscope model"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{")
    with pytest.raises(CheckpointError, match="invalid model metadata"):
        load_checkpoint(tmp_path / "broken")


def _frozen_at_chance(monkeypatch):
    """Make build_model return a network whose head outputs zeros: it can only guess class 0."""
    import defectscope.training.loop as train_module

    original = train_module.build_model

    def build(*args, **kwargs):
        model = original(*args, **kwargs)
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
        for param in model.parameters():
            param.requires_grad = False
        model.classifier.weight.requires_grad = True  # the optimizer needs something
        return model

    monkeypatch.setattr(train_module, "build_model", build)


def test_a_model_that_never_learned_is_not_kept_quietly(monkeypatch):
    _frozen_at_chance(monkeypatch)
    config = TrainConfig(epochs=3, batch_size=8, learning_rate=0.0, precision="fp32")
    result = train_classifier(toy_patches(6), toy_patches(3, seed=2), config, progress=False)
    # No epoch beat chance, so none was "best": the last is kept, and the run says so.
    assert result.best_epoch == len(result.history) - 1
    assert result.untrained
    assert result.fit["train_accuracy"] == pytest.approx(0.5)
    assert any("near chance on its own training data" in w for w in result.warnings)
    assert any("near chance on validation" in w for w in result.warnings)
    # A validation fold of one class has a perfect majority baseline: not judged by it.
    only_bulk = toy_patches(3, seed=2)
    only_bulk = only_bulk.subset(np.flatnonzero(only_bulk.labels == 0))
    result = train_classifier(toy_patches(6), only_bulk, config, progress=False)
    assert result.fit["validation_chance"] == 1.0
    assert not any("near chance on validation" in w for w in result.warnings)
    assert any("near chance on its own training data" in w for w in result.warnings)


def test_train_cli_fails_loudly_when_nothing_was_learned(monkeypatch, tmp_path, capsys):
    import tifffile

    from defectscope.cli import main

    _frozen_at_chance(monkeypatch)
    data = tmp_path / "DataSet_Toy"
    data.mkdir()
    patches = toy_patches(6)
    for i, (image, label) in enumerate(zip(patches.images, patches.labels, strict=True)):
        tifffile.imwrite(data / f"{patches.classes[label]}_{i}.tif", image)
    out = tmp_path / "model"
    args = ["train", str(data), "--out", str(out), "--epochs", "2", "--lr", "0"]
    code = main([*args, "--validation", "random", "--precision", "fp32"])
    err = capsys.readouterr().err
    assert code == 1
    assert "warning: the kept model" in err and "error:" in err and "did not learn" in err
    record = json.loads((out / "model.json").read_text())
    assert record["warnings"] and record["fit"]["train_accuracy"] < record["fit"]["learned_above"]


def test_batchnorm_statistics_are_recalibrated_to_the_final_weights():
    from defectscope.training.loop import recalibrate_batchnorm

    torch.manual_seed(0)
    model = build_model(2, architecture="vgg16_bn").eval()
    inputs = patches_to_inputs(toy_patches(4).images, Normalization())
    assert recalibrate_batchnorm(model, inputs, batch_size=4)
    bn = model.features[1]
    # The first BN layer's running mean is the mean of its input (conv output) over the data.
    with torch.no_grad():
        conv = model.features[0](torch.from_numpy(inputs))
    np.testing.assert_allclose(bn.running_mean.numpy(), conv.mean((0, 2, 3)).numpy(), atol=1e-4)
    assert bn.momentum == 0.1 and not model.training
    assert not recalibrate_batchnorm(build_model(2, architecture="vgg16"), inputs)


def test_batchnorm_recalibration_in_bf16_matches_fp32_to_its_rounding():
    """Training in bf16 re-estimates the statistics in bf16 too: the same ones, rounded."""
    import copy

    from defectscope.training.loop import recalibrate_batchnorm

    torch.manual_seed(0)
    model = build_model(2, architecture="vgg16_bn").eval()
    inputs = patches_to_inputs(toy_patches(4).images, Normalization())
    in_bf16 = copy.deepcopy(model)
    assert recalibrate_batchnorm(model, inputs, batch_size=4, precision="fp32")
    assert recalibrate_batchnorm(in_bf16, inputs, batch_size=4, precision="bf16")
    layers = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    rounded = [m for m in in_bf16.features if isinstance(m, torch.nn.BatchNorm2d)]
    for exact, bf16 in zip(layers, rounded, strict=True):
        spread = exact.running_var.sqrt().mean().item()
        np.testing.assert_allclose(bf16.running_mean, exact.running_mean, atol=0.05 * spread)
        np.testing.assert_allclose(bf16.running_var, exact.running_var, rtol=0.1, atol=1e-3)
    # The passes did run in bf16: the deepest statistics differ by its rounding.
    assert not torch.equal(rounded[-1].running_mean, layers[-1].running_mean)
    assert not in_bf16.training


@pytest.mark.parametrize("min_delta, epochs_run", [(0.01, 5), (0.0, 7)])
def test_patience_restarts_only_on_a_meaningful_gain(monkeypatch, min_delta, epochs_run):
    import defectscope.training.loop as train_module

    # Scripted validation losses: a big gain, then gains of 0.002 an epoch (0.006 in the
    # three epochs of patience: less than 0.01).
    losses = iter([1.0, 0.5, 0.498, 0.496, 0.494, 0.492, 0.49])
    monkeypatch.setattr(train_module, "_epoch_loss", lambda *a: (next(losses), 0.5))
    monkeypatch.setattr(train_module, "chance_level", lambda *a: -10.0)  # always "learning"
    config = TrainConfig(epochs=7, batch_size=8, patience=3, min_delta=min_delta, precision="fp32")
    result = train_classifier(toy_patches(4), toy_patches(2, seed=1), config, progress=False)
    assert len(result.history) == epochs_run
    # Small gains do not restart patience, but the best weights are still the lowest loss's.
    assert result.best_epoch == epochs_run - 1


@pytest.mark.parametrize(
    "losses, epochs_run, best_epoch",
    [
        # Solved from the third epoch (below min_delta, noise between epochs): the old rule
        # stopped after the fifth; now every epoch runs and the latest solved is kept.
        ([1.0, 0.2, 0.005, 0.003, 0.004, 0.002, 0.003], 7, 6),
        # Solved once, then worse again: patience counts from there as usual.
        ([1.0, 0.005, 0.3, 0.4, 0.5, 0.6, 0.7], 4, 1),
        # A solved epoch after the worse ones is kept over the earlier, lower loss.
        ([1.0, 0.002, 0.3, 0.008, 0.5, 0.6, 0.7], 6, 3),
    ],
)
def test_a_solved_validation_does_not_stop_training(monkeypatch, losses, epochs_run, best_epoch):
    import defectscope.training.loop as train_module

    scripted = iter(losses)
    monkeypatch.setattr(train_module, "_epoch_loss", lambda *a: (next(scripted), 1.0))
    monkeypatch.setattr(train_module, "chance_level", lambda *a: -10.0)  # always "learning"
    config = TrainConfig(epochs=7, batch_size=8, patience=2, min_delta=0.01, precision="fp32")
    result = train_classifier(toy_patches(4), toy_patches(2, seed=1), config, progress=False)
    assert len(result.history) == epochs_run
    assert result.best_epoch == best_epoch
    assert [r["val_loss"] for r in result.history] == losses[:epochs_run]


@pytest.mark.parametrize(
    "cap, native", [("AVX2", False), ("AVX512_CORE_VNNI", False), ("AVX512_CORE_BF16", None)]
)
def test_bf16_autocast_follows_a_onednn_cap(monkeypatch, cap, native):
    from defectscope.nets.device import cpu_has_bf16
    from defectscope.util.system import cpu_description

    # Capped below BF16 (the AVX2 emulation), auto precision must train in fp32; with a
    # BF16 cap the CPU's own flags decide.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    cpu_has_bf16.cache_clear()
    try:
        flags = open("/proc/cpuinfo").read()
        own = "avx512_bf16" in flags or "amx_bf16" in flags
        assert cpu_has_bf16() is (own if native is None else native)
        description = cpu_description()
        assert "capped:" in description and f"ONEDNN_MAX_CPU_ISA={cap}" in description
    finally:
        cpu_has_bf16.cache_clear()  # the next caller sees the environment restored


def test_auto_precision_on_a_gpu_takes_bf16_only_where_it_is_native(monkeypatch):
    from defectscope.nets.device import autocast_dtype

    # A pre-Ampere GPU: PyTorch emulates bf16 (slower than fp32) and says so when asked.
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
    )
    assert autocast_dtype("auto", "cuda") is None
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16  # asked for: given
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype("auto", "cuda") is torch.bfloat16


def test_training_device_choice():
    from defectscope.nets.device import training_device

    assert training_device("cpu").type == "cpu"
    assert training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be"):
        training_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            training_device("cuda")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            train_classifier(toy_patches(2), None, TrainConfig(epochs=1, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch sees no CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_training_on_the_gpu_matches_its_cpu_scoring(tmp_path, precision):
    train, val = toy_patches(12, seed=0), toy_patches(4, seed=1)
    config = TrainConfig(epochs=4, batch_size=8, augmentation=Augmentation.off(),
                         precision=precision, device="cuda")  # fmt: skip
    result = train_classifier(train, val, config, progress=False)
    # The kept model comes back on the CPU, where scoring, densities and export run.
    assert {p.device.type for p in result.model.parameters()} == {"cpu"}
    history = result.history
    assert min(h["train_loss"] for h in history[1:]) < history[0]["train_loss"]
    inputs = patches_to_inputs(val.images, result.config.normalization)
    logits, _ = predict_logits(result.model, inputs)
    probs = softmax(logits, axis=1)
    kept_loss = float(np.mean(-np.log(probs[np.arange(8), val.labels])))
    # The GPU scored validation in its own arithmetic (TF32 convolutions, bf16 for auto).
    tolerance = 0.02 if precision == "fp32" else 0.1
    assert kept_loss == pytest.approx(
        history[result.best_epoch]["val_loss"], rel=tolerance, abs=0.01
    )
    save_training(tmp_path / "m", result, config)
    _, _, record = load_checkpoint(tmp_path / "m")
    assert record["training"]["device_used"] == torch.cuda.get_device_name(0)


def test_new_weights_remove_what_was_made_from_the_old(tmp_path):
    from defectscope.nets.checkpoint import ModelConfig, save_checkpoint

    config = ModelConfig(classes=("Bulk", "Vacancy"), patch_size=64)
    model = build_model(2)
    save_checkpoint(tmp_path, model, config)
    made = ["model.onnx", "model.int8.onnx", "model.fp16.engine", "model.fp16.engine.json"]
    for name in made:
        (tmp_path / name).write_bytes(b"old")
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "dense16.onnx").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's")
    save_checkpoint(tmp_path, model, config)  # the same directory, new weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "notes.txt", "weights.pt"]


def _write_patches(folder, patches, hidden=True):
    """A class-per-folder dataset of ``patches``, plus hidden files a system leaves."""
    import tifffile

    for i, (image, label) in enumerate(zip(patches.images, patches.labels, strict=True)):
        (folder / patches.classes[label]).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / patches.classes[label] / f"p{i}.tif", image)
    if hidden:
        tifffile.imwrite(folder / "Bulk" / "._p0.tif", patches.images[0])
        (folder / "Bulk" / ".ipynb_checkpoints").mkdir()
        tifffile.imwrite(folder / "Bulk" / ".ipynb_checkpoints" / "p0.tif", patches.images[0])


def test_one_class_is_refused_before_any_training(tmp_path, monkeypatch, capsys):
    """Before: train on one class exited 0 and saved a model that map refuses."""
    import defectscope.training.loop as loop
    from defectscope.cli import main
    from defectscope.io.datasets import load_patches

    def no_training(*args, **kwargs):
        raise AssertionError("trained on one class")

    monkeypatch.setattr(loop, "train_classifier", no_training)
    patches = toy_patches(4)
    only_bulk = patches.subset(np.flatnonzero(patches.labels == 0))
    with pytest.raises(loop.TrainingDataError) as caught:
        loop.train_model_dir(only_bulk, tmp_path / "m", TrainConfig(epochs=1))
    message = str(caught.value)
    assert "at least two classes, found 1: Bulk (4 patches); no patches of Vacancy" in message
    assert not (tmp_path / "m").exists()
    # Simulated patches of one class: refused before the pretraining.
    data = tmp_path / "simulated"
    _write_patches(data, only_bulk, hidden=False)
    simulated = load_patches(data)
    with pytest.raises(loop.TrainingDataError, match=r"simulated patches: .* found 1: Bulk"):
        loop.train_from_simulated(simulated, tmp_path / "s", TrainConfig(epochs=1), real=patches)
    assert not (tmp_path / "s").exists()
    code = main(["train", str(data), "--out", str(tmp_path / "cli"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "found 1: Bulk (4 patches)" in err
    assert not (tmp_path / "cli").exists()


def test_skipped_files_are_listed_and_recorded(tmp_path):
    """Before: files whose names begin with '.' were left out without a word."""
    from defectscope.io.datasets import load_patches
    from defectscope.training.loop import train_model_dir

    data = tmp_path / "data"
    _write_patches(data, toy_patches(4))
    patches = load_patches(data)
    assert len(patches.labels) == 8
    skipped = {path.split("/data/")[1]: reason for path, reason in patches.skipped}
    assert set(skipped) == {"Bulk/._p0.tif", "Bulk/.ipynb_checkpoints"}
    assert "name begins with '.'" in skipped["Bulk/._p0.tif"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(epochs=1, batch_size=8, precision="fp32")
        train_model_dir(patches, tmp_path / "m", config, validation="none")
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "m" / "model.json").read_text())
    assert {Path(s["path"]).name for s in record["skipped"]} == {"._p0.tif", ".ipynb_checkpoints"}
