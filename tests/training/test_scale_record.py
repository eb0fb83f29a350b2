"""Training records the scale of its patches (issue 26, item 1), the one switch for the
physical augmentation, and a feature density that knows the physical variations the
model trained on.

Tiny trainings (pinned seeds and threads, one epoch) test what is recorded, never
what the network learned.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from defectscope.artifacts.metadata import ModelScale, read_model_dir
from defectscope.io.datasets import PatchSet, load_patches
from defectscope.tiling.lattice import LatticePeriods
from defectscope.training.augment import Augmentation
from defectscope.training.config import TrainConfig
from tests.synthetic import toy_patches

# tests.synthetic draws its toy lattices with this spacing (px): the periods' reference.
TOY_SPACING = 8.0
PIXEL_SIZE = 0.0391  # nm, what the user gives with --pixel-size


def write_patches(folder, patches: PatchSet, pixel_size: float | None = None, unit: str = "nm"):
    """A class-per-folder dataset; ImageJ-calibrated TIFFs when ``pixel_size`` is given."""
    import tifffile

    for i, (image, label) in enumerate(zip(patches.images, patches.labels, strict=True)):
        target = folder / patches.classes[label] / f"p{i}.tif"
        target.parent.mkdir(parents=True, exist_ok=True)
        if pixel_size is None:
            tifffile.imwrite(target, image)
        else:
            tifffile.imwrite(
                target,
                image,
                imagej=True,
                resolution=(1 / pixel_size, 1 / pixel_size),
                metadata={"unit": unit, "axes": "YX"},
            )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``train DATA --simulated SIM --pixel-size ...``: two tiny trainings in one command.

    SIM is a 'simulate' output as train reads it: ``truth.json`` with its settings (pixel
    size 0.5 Å, spelled "A" as simulate writes it) and ``patches/<Class>/``. DATA is a
    plain patch folder whose pixel size only ``--pixel-size`` gives.
    """
    import defectscope.training.loop as loop
    from defectscope.cli import main

    root = tmp_path_factory.mktemp("scale-train")
    sim, data = root / "sim", root / "data"
    write_patches(sim / "patches", toy_patches(6, seed=1))
    (sim / "truth.json").write_text(
        json.dumps({"settings": {"pixel_size": 0.5, "unit": "A"}, "unit": "A", "frames": []})
    )
    write_patches(data, toy_patches(6, seed=2))
    argv = ["train", str(data), "--simulated", str(sim), "--out", str(root / "model")]
    argv += ["--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--seed", "0"]
    argv += ["--trainable-blocks", "1", "--validation", "random"]
    argv += ["--pixel-size", str(PIXEL_SIZE), "--unit", "nm"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            # One epoch need not learn; what is recorded is what is tested.
            patch.setattr(loop.TrainResult, "untrained", property(lambda self: False))
            assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "model"


# The shells of a square lattice: spacing / sqrt(h^2 + k^2) for (1,0), (1,1), (2,0), (2,1).
TOY_SHELLS = TOY_SPACING / np.sqrt([1, 2, 4, 5])


def check_toy_lattice(lattice: dict | LatticePeriods) -> None:
    """The periods are the toy lattice's: its spacing among them, each one a shell.

    Which shell is strongest is not asserted: with half the patches holding a vacancy,
    the (1,0) and (1,1) shells stand out about equally (the runtime matches all shells).
    """
    periods = lattice if isinstance(lattice, LatticePeriods) else LatticePeriods.from_dict(lattice)
    assert periods.measurable and periods.reason is None
    assert any(p == pytest.approx(TOY_SPACING, rel=0.02) for p in periods.periods), periods
    for period in periods.periods:
        assert np.min(np.abs(TOY_SHELLS / period - 1)) <= 0.02, periods


def test_training_records_the_pixel_size_and_lattice_periods(trained):
    record = json.loads((trained / "model.json").read_text())
    scale = record["model"]["scale"]
    assert scale["pixel_size"] == PIXEL_SIZE and scale["unit"] == "nm"
    check_toy_lattice(scale["lattice"])
    assert read_model_dir(trained).config.scale == ModelScale.from_dict(scale)
    assert record["training"]["pixel_size"] == PIXEL_SIZE
    # The density was fitted (with the physical copies: the switch is on by default).
    assert record["training"]["physical_augmentation"] is True
    assert record["training"]["augmentation"]["physical"] is True
    assert record["density"] is not None


def test_the_simulated_pretraining_records_the_simulated_pixel_size(trained):
    """--pixel-size describes DATA; the simulated patches' own comes from truth.json."""
    scale = read_model_dir(trained / "pretrained").config.scale
    assert scale.pixel_size == 0.5 and scale.unit == "Å"
    check_toy_lattice(scale.lattice)


def test_the_simulated_training_fits_the_residual_on_the_patch_centres(trained):
    """'simulate' centres every defect patch on its defect, real patch folders need not:
    the pretraining's lattice-residual density takes the centre, the fine-tuning's the
    whole patch, and both load as engines that score with them."""
    from defectscope.engines.loader import load_engine
    from defectscope.tiling.residual import CENTRE_SHARE

    pretrained = json.loads((trained / "pretrained" / "model.json").read_text())
    fine = json.loads((trained / "model.json").read_text())
    assert pretrained["residual_density"]["centre"] == CENTRE_SHARE
    assert pretrained["residual_density"]["descriptor_version"] == 2
    assert "centre" not in fine["residual_density"]
    assert fine["residual_density"]["descriptor_version"] == 1
    engine = load_engine(trained / "pretrained", backend="torch")
    assert engine.residual_density.centre == CENTRE_SHARE


def test_the_scale_reaches_the_runtime(trained):
    from defectscope.engines.loader import load_engine

    engine = load_engine(trained, backend="torch")
    assert engine.config.scale.pixel_size == PIXEL_SIZE
    check_toy_lattice(engine.config.scale.lattice)


def test_the_scale_is_measured_on_every_training_and_pixel_size_precedence():
    from defectscope.training.loop import measure_training_scale

    patches = toy_patches(4)
    scale = measure_training_scale(patches)
    assert scale.pixel_size is None and scale.unit is None
    check_toy_lattice(scale.lattice)
    calibrated = dataclasses.replace(patches, pixel_size=0.5, unit="Å")
    assert measure_training_scale(calibrated).pixel_size == 0.5
    assert measure_training_scale(calibrated).unit == "Å"
    # --pixel-size overrides what the data say (as it does for frames).
    given = measure_training_scale(calibrated, 0.04, "nm")
    assert (given.pixel_size, given.unit) == (0.04, "nm")


def test_patches_without_a_lattice_record_why():
    from defectscope.training.loop import measure_training_scale

    rng = np.random.default_rng(0)
    noise = PatchSet(
        rng.normal(100, 10, (16, 64, 64)).astype(np.float32),
        np.arange(16) % 2,
        ["Bulk", "Vacancy"],
        [f"n{i}" for i in range(16)],
    )
    scale = measure_training_scale(noise, 0.02, "nm")
    assert not scale.lattice.measurable and scale.lattice.periods == ()
    assert "noise" in scale.lattice.reason
    # It is recorded, and reads back, like a measured one.
    again = ModelScale.from_dict(json.loads(json.dumps(scale.to_dict(), allow_nan=False)))
    assert again == scale
    # Patches too small to measure: recorded as such, not an error.
    small = dataclasses.replace(noise, images=noise.images[:, :8, :8])
    assert "too small" in measure_training_scale(small).lattice.reason


def test_load_patches_reads_a_shared_tiff_calibration(tmp_path, caplog):
    patches = toy_patches(2)
    write_patches(tmp_path / "a", patches, pixel_size=0.5, unit="A")
    loaded = load_patches(tmp_path / "a")
    assert loaded.pixel_size == pytest.approx(0.5, rel=1e-6) and loaded.unit == "Å"
    assert loaded.subset(np.array([0, 1])).pixel_size == loaded.pixel_size
    # One patch without a calibration: the folder has none.
    write_patches(tmp_path / "b", patches, pixel_size=0.5, unit="A")
    import tifffile

    tifffile.imwrite(tmp_path / "b" / "Bulk" / "p0.tif", patches.images[0])
    assert load_patches(tmp_path / "b").pixel_size is None
    # Two pixel sizes: none recorded, and a warning names both.
    write_patches(tmp_path / "c", patches, pixel_size=0.02, unit="nm")
    image = patches.images[0]
    tifffile.imwrite(
        tmp_path / "c" / "Bulk" / "p0.tif",
        image,
        imagej=True,
        resolution=(1 / 0.03, 1 / 0.03),
        metadata={"unit": "nm", "axes": "YX"},
    )
    with caplog.at_level(logging.WARNING, logger="defectscope.io.datasets"):
        assert load_patches(tmp_path / "c").pixel_size is None
    assert "different pixel sizes" in caplog.text and "0.03 nm" in caplog.text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "argument --pixel-size: must be a finite number >= 0, got nan"),
        ("inf", "argument --pixel-size: must be a finite number >= 0, got inf"),
        ("-0.1", "argument --pixel-size: must be a finite number >= 0, got -0.1"),
        ("0", "pixel size (--pixel-size) must be a finite number > 0, got 0.0"),
        ("x", "argument --pixel-size: invalid"),
    ],
)
def test_a_bad_pixel_size_is_one_error_line(value, message, tmp_path, capsys, monkeypatch):
    import defectscope.training.loop as loop
    from defectscope.cli import main

    def no_training(*args, **kwargs):
        raise AssertionError("trained with a bad pixel size")

    monkeypatch.setattr(loop, "train_classifier", no_training)
    argv = ["train", str(tmp_path), "--out", str(tmp_path / "m"), "--pixel-size", value]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "m").exists()


def test_a_bad_unit_is_refused():
    with pytest.raises(ValueError, match=r"unit \(--unit\)"):
        TrainConfig(pixel_size=0.02, unit=" ")
    with pytest.raises(ValueError, match=r"pixel size \(--pixel-size\)"):
        TrainConfig(pixel_size=float("nan"))


def test_one_switch_turns_the_physical_augmentation_off(monkeypatch):
    import defectscope.training.loop as loop
    from defectscope.cli.app import build_parser
    from defectscope.cli.options import TRAINING

    def built(*extra):
        return TRAINING.build(build_parser().parse_args(["train", "--out", "m", *extra]))

    assert built().physical_augmentation is True
    assert built().training_augmentation.physical is True
    off = built("--no-physical-augmentation")
    assert off.physical_augmentation is False
    assert off.training_augmentation.physical is False
    assert off.training_augmentation == dataclasses.replace(Augmentation(), physical=False)
    # Training draws from the augmentation the switch gives.
    seen = []

    class Stop(Exception):
        pass

    def spy(images, rng, config):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(loop, "augment_batch", spy)
    with pytest.raises(Stop):
        loop.train_classifier(toy_patches(2), None, dataclasses.replace(off, epochs=1), False)
    assert seen == [off.training_augmentation]
    # And the record says what training drew from.
    result = loop.TrainResult(None, None, [], 0, 0.0)
    monkeypatch.setattr(loop, "device_name", lambda device: "cpu")
    record = loop.training_record(result, off)
    assert record["training"]["physical_augmentation"] is False
    assert record["training"]["augmentation"]["physical"] is False


@pytest.fixture(scope="module")
def untrained_model():
    """A seeded random network: the density's checks are about which embeddings it is
    fitted on, which needs no training."""
    from defectscope.nets.vgg import build_model

    torch.manual_seed(0)
    return build_model(2, patch_size=64, embedding_dim=16).eval()


def test_density_without_physical_copies_is_the_plain_fit(untrained_model):
    """The default (and a model trained without physical augmentation) fits on the
    patches alone, as before."""
    from defectscope.artifacts.density import fit_density
    from defectscope.tiling.tiler import Normalization, patches_to_inputs
    from defectscope.training.loop import fit_model_density, predict_logits

    norm = Normalization()
    train, val = toy_patches(6), toy_patches(4, seed=1)
    _, train_emb = predict_logits(untrained_model, patches_to_inputs(train.images, norm))
    _, val_emb = predict_logits(untrained_model, patches_to_inputs(val.images, norm))
    want = fit_density(train_emb, train.labels, 2, val_emb)
    for augmentation in (None, Augmentation(physical=False), Augmentation.off()):
        got = fit_model_density(untrained_model, train, val, norm, augmentation=augmentation)
        assert got.threshold == pytest.approx(want.threshold, rel=1e-5)
        np.testing.assert_allclose(got.means, want.means, rtol=1e-5, atol=1e-6)


def test_density_with_physical_copies_knows_the_physical_variations(untrained_model):
    """Physically varied windows the model trained to ignore stay in distribution.

    The threshold is the distance quantile (0.99 by default) of the validation patches
    plus their physical copies, so fresh physical copies of held-out patches (another
    seed) rarely fall beyond it; a density fitted on the patches alone
    calls far more of them unknown.
    """
    from defectscope.tiling.tiler import Normalization, patches_to_inputs
    from defectscope.training.augment import augment_batch, density_augmentation
    from defectscope.training.loop import fit_model_density, predict_logits

    norm = Normalization()
    train, val, test = toy_patches(24), toy_patches(16, seed=1), toy_patches(16, seed=2)
    physical = Augmentation()
    plain = fit_model_density(untrained_model, train, val, norm)
    aware = fit_model_density(untrained_model, train, val, norm, augmentation=physical)
    again = fit_model_density(untrained_model, train, val, norm, augmentation=physical)
    np.testing.assert_array_equal(aware.means, again.means)  # a fixed seed
    assert aware.threshold == again.threshold
    varied = augment_batch(test.images, np.random.default_rng(99), density_augmentation(physical))
    _, embeddings = predict_logits(untrained_model, patches_to_inputs(varied, norm))
    unknown_plain = plain.score(embeddings)[2].mean()
    unknown_aware = aware.score(embeddings)[2].mean()
    assert unknown_aware <= 0.25
    assert unknown_aware < unknown_plain


def test_residual_density_with_physical_copies_knows_the_physical_variations():
    """The lattice residual's density is fitted as the embedding's: with physical copies
    of the training and validation patches, so the dose, jitter, blur and column
    contrast training drew from do not make a window's residual unknown (a noisier
    window has a larger residual everywhere; it is not a new defect)."""
    from defectscope.training.augment import (
        augment_batch,
        density_augmentation,
        with_physical_copies,
    )
    from defectscope.training.loop import fit_patch_residual_density

    train, val, test = toy_patches(24), toy_patches(16, seed=1), toy_patches(16, seed=2)
    physical = Augmentation()
    images, labels = with_physical_copies(
        train.images, train.labels, physical, np.random.default_rng(0)
    )
    assert len(images) == 2 * len(train.images)
    np.testing.assert_array_equal(labels, np.r_[train.labels, train.labels])
    np.testing.assert_array_equal(images[: len(train.images)], train.images)
    assert not np.array_equal(images[len(train.images) :], train.images)
    off = dataclasses.replace(physical, physical=False)
    same, same_labels = with_physical_copies(train.images, train.labels, off, None)
    assert same is train.images and same_labels is train.labels

    plain = fit_patch_residual_density(train, val)
    aware = fit_patch_residual_density(train, val, augmentation=physical)
    again = fit_patch_residual_density(train, val, augmentation=physical)
    np.testing.assert_array_equal(aware.density.means, again.density.means)  # fixed seed
    varied = augment_batch(test.images, np.random.default_rng(99), density_augmentation(physical))
    unknown_plain = plain.score(varied)[2].mean()
    unknown_aware = aware.score(varied)[2].mean()
    assert unknown_aware <= 0.25
    assert unknown_aware < unknown_plain


def test_density_fit_sets_are_the_patches_then_their_copies_from_one_generator():
    """Both densities are fitted on the same sets: the training patches and one copy of
    each, then the validation patches and enough copies of each for a stable threshold,
    drawn from one generator (training first); fewer than two validation patches set no
    threshold."""
    from defectscope.training.augment import (
        MAX_HELD_OUT_COPIES,
        density_fit_sets,
        held_out_copies,
        with_physical_copies,
    )

    train, val = toy_patches(12), toy_patches(6, seed=1)
    physical = Augmentation()
    images, labels, held = density_fit_sets(train.images, train.labels, val.images, physical, 7)
    rng = np.random.default_rng(7)
    want_images, want_labels = with_physical_copies(train.images, train.labels, physical, rng)
    want_held, _ = with_physical_copies(val.images, None, physical, rng, MAX_HELD_OUT_COPIES)
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(held, want_held)
    assert len(images) == 2 * len(train.images)
    assert len(held) == (1 + MAX_HELD_OUT_COPIES) * len(val.images)
    # Every copy is drawn anew: no two blocks of the held-out set are alike.
    blocks = held.reshape(1 + MAX_HELD_OUT_COPIES, len(val.images), -1)
    for i in range(len(blocks)):
        for j in range(i):
            assert not np.array_equal(blocks[i], blocks[j])
    # Copies: enough for 4000 windows, at least one, at most eight.
    assert [held_out_copies(n) for n in (0, 2, 318, 500, 1000, 1999, 2000, 10**6)] == [
        8,
        8,
        8,
        7,
        3,
        2,
        1,
        1,
    ]
    many, many_labels = with_physical_copies(train.images, train.labels, physical, rng, 3)
    assert len(many) == 4 * len(train.images)
    np.testing.assert_array_equal(many_labels, np.tile(train.labels, 4))
    np.testing.assert_array_equal(many[: len(train.images)], train.images)
    for few in (None, val.images[:1], val.images[:0]):
        assert density_fit_sets(train.images, train.labels, few, physical)[2] is None
    off = dataclasses.replace(physical, physical=False)
    same, same_labels, same_held = density_fit_sets(train.images, train.labels, val.images, off)
    assert same is train.images and same_labels is train.labels and same_held is val.images
