"""Simulated crystals: structures, defects, renderers, the instrument and the dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

ase = pytest.importorskip("ase", reason="simulation needs the optional 'simulate' extra (ASE)")

from defectscope.simulate import dataset as sim  # noqa: E402


def test_incoherent_renderer_keeps_each_atoms_weight_and_position():
    # Independent facts: a normalized probe keeps the total Z**n, and both the bilinear
    # spread and a symmetric Gaussian keep the centroid where the atom is.
    positions = np.array([[10.37, 14.81, 0.0]])
    image = sim.render_incoherent(positions, np.array([38]), (30, 30), 1.0, 2.0, exponent=1.7)
    assert image.sum() == pytest.approx(38**1.7, rel=1e-9)
    rows, cols = np.mgrid[0:30, 0:30]
    assert (image * cols).sum() / image.sum() == pytest.approx(10.37, abs=1e-6)
    assert (image * rows).sum() / image.sum() == pytest.approx(14.81, abs=1e-6)
    # The peak's width is the probe's: FWHM 2 px -> sigma 0.849 px (second moment).
    var = (image * (cols - 10.37) ** 2).sum() / image.sum()
    assert math.sqrt(var) == pytest.approx(math.sqrt(0.849**2 + 0.37 * 0.63), rel=0.02)


def _sr_column_peak_spread(column_scatter: float) -> float:
    """Relative spread of the Sr columns' integrated intensity in a quiet fast frame."""
    from scipy import ndimage

    quiet = sim.Instrument(
        dose=2e4, jitter=0.0, drift=(0.0, 0.0), gradient=0.0, gain=1.0, offset=0.0, read_noise=0
    )
    settings = sim.SimulationSettings(
        structure="srtio3", defects="vacancy:Sr", size=256, thickness=4.0, seed=3,
        column_scatter=column_scatter, instrument=quiet,
    )  # fmt: skip
    frame, record = sim.simulate_frame(settings, 0)
    image = frame.astype(float)
    peaks = (image == ndimage.maximum_filter(image, 9)) & (image > 0.6 * image.max())
    rows, cols = np.nonzero(peaks)
    inner = (rows > 10) & (rows < 246) & (cols > 10) & (cols < 246)
    for d in record["defects"]:  # the emptied columns are not bulk
        inner &= np.hypot(rows - d["row"], cols - d["col"]) > 10
    # Summed over 7 x 7 pixels: a peak's height alone depends on where the column
    # falls between pixels.
    heights = ndimage.uniform_filter(image, 7)[rows[inner], cols[inner]]
    assert len(heights) > 50
    return float(heights.std() / heights.mean())


def test_column_scatter_spreads_column_intensities():
    # Every Sr column holds the same atoms: without scatter their peaks agree to the shot
    # noise (under 1 % at this dose); with N(1, 0.1) per column they spread by about 10 %.
    assert _sr_column_peak_spread(0.0) < 0.02
    assert 0.06 < _sr_column_peak_spread(0.1) < 0.14
    weights = sim.render_incoherent(
        np.array([[5.0, 5.0, 0.0], [15.0, 5.0, 0.0]]), np.array([38, 38]), (20, 20), 1.0, 2.0,
        exponent=2.0, atom_scale=np.array([1.0, 0.5]),
    )  # fmt: skip
    assert weights.sum() == pytest.approx(1.5 * 38**2, rel=1e-9)
    assert weights[:, :10].sum() == pytest.approx(2 * weights[:, 10:].sum(), rel=1e-6)
    with pytest.raises(ValueError, match="one per atom"):
        sim.render_incoherent(
            np.zeros((2, 3)), np.array([38, 38]), (8, 8), 1.0, 2.0, atom_scale=np.ones(3)
        )


def test_srtio3_001_columns_and_spacing():
    atoms = sim.load_structure("srtio3")
    specimen = sim.build_specimen(atoms, (0, 0, 1), (39.05, 39.05), 39.05)
    xy, column = specimen.columns()
    symbols = np.array(atoms.get_chemical_symbols())  # noqa: F841 (documentation)
    compositions = {}
    for c in range(len(xy)):
        numbers = tuple(sorted(set(specimen.numbers[column == c].tolist())))
        compositions.setdefault(numbers, []).append(int((column == c).sum()))
    # Perovskite [001]: pure Sr columns, Ti-O columns, pure O columns; 10 cells thick.
    assert set(compositions) == {(38,), (8, 22), (8,)}
    assert set(compositions[(38,)]) == {10} and set(compositions[(8, 22)]) == {20}
    assert len(compositions[(38,)]) == 100 and len(compositions[(8,)]) == 200
    assert specimen.lattice_spacing == pytest.approx(3.905, abs=1e-6)


def test_cdte_110_dumbbells():
    atoms = sim.load_structure("cdte")
    specimen = sim.build_specimen(atoms, (1, 1, 0), (40.0, 40.0), 30.0)
    xy, column = specimen.columns()
    cd = np.array([48 in specimen.numbers[column == c] for c in range(len(xy))])
    assert all(len(set(specimen.numbers[column == c].tolist())) == 1 for c in range(len(xy)))
    # Zinc blende along [110]: each Cd column has a Te column a/4 = 1.620 Å away.
    from scipy.spatial import cKDTree

    inner = np.all((xy > 3) & (xy < 37), axis=1)
    nearest, _ = cKDTree(xy[~cd]).query(xy[cd & inner])
    assert np.allclose(nearest, 6.481 / 4, atol=1e-6)
    # Same-composition columns form a centred rectangular net, a/sqrt(2) by a: the
    # nearest two are a * sqrt(3/8) apart.
    assert specimen.lattice_spacing == pytest.approx(6.481 * math.sqrt(3 / 8), abs=1e-6)


def test_defects_change_the_atoms_they_say():
    atoms = sim.load_structure("srtio3")
    specimen = sim.build_specimen(atoms, (0, 0, 1), (120.0, 120.0), 39.05)
    before_xy, before_column = specimen.columns()
    before = specimen.numbers.copy()
    specs = sim.parse_defects("vacancy:Sr,substitution:Ti>Nb,interstitial:Sr", ["Sr", "Ti", "O"])
    rng = np.random.default_rng(3)
    placed = sim.place_defects(specimen, specs, 3, 20.0, 30.0, 0.5, rng)
    placed.sort(key=lambda p: ["vacancy", "substitution", "interstitial"].index(p.spec.kind))
    assert [p.spec.kind for p in placed] == ["vacancy", "substitution", "interstitial"]
    sites = np.array([(p.x, p.y) for p in placed])
    assert np.all(sites >= 20.0) and np.all(sites <= 100.0)
    assert min(np.linalg.norm(sites[i] - sites[j]) for i in range(3) for j in range(i)) >= 30
    # Vacancy: 5 of the column's 10 Sr are gone; substitution: 5 of 10 Ti are now Nb.
    assert placed[0].atoms_changed == 5 and placed[1].atoms_changed == 5
    assert len(specimen.numbers) == len(before) - 5 + placed[2].atoms_changed
    assert int((specimen.numbers == 41).sum()) == 5
    # Interstitial: Sr atoms at a point away from every original column.
    xy = specimen.positions[:, :2]
    new = np.linalg.norm(xy - sites[2], axis=1) < 1e-9
    assert new.sum() == placed[2].atoms_changed and set(specimen.numbers[new]) == {38}
    assert np.linalg.norm(before_xy - sites[2], axis=1).min() > 1.3
    del before_column


def test_defect_and_zone_parsing_errors():
    present = ["Cd", "Te"]
    assert sim.parse_defects("antisite", present) == [sim.DefectSpec("antisite", "Cd", "Te")]
    assert sim.parse_defects("vacancy", present)[0].species == "Te"  # the heaviest
    for text, message in [
        ("hole", "kind must be"),
        ("substitution:Cd", "substitution:Ti>Nb"),
        ("vacancy:Xx", "not a chemical element"),
        ("vacancy:Sr", "has no Sr"),
        ("vacancy,vacancy", "given twice"),
        ("", "no defects"),
    ]:
        with pytest.raises(ValueError, match=message):
            sim.parse_defects(text, present)
    assert sim.parse_zone("110") == (1, 1, 0) and sim.parse_zone("0,0,1") == (0, 0, 1)
    for text in ("0,0,0", "1,a,0", "1,1"):
        with pytest.raises(ValueError, match="zone axis"):
            sim.parse_zone(text)
    with pytest.raises(ValueError, match="not found"):
        sim.load_structure("/nonexistent/thing.cif")


def test_room_for_defects_is_checked():
    atoms = sim.load_structure("srtio3")
    specimen = sim.build_specimen(atoms, (0, 0, 1), (40.0, 40.0), 8.0)
    specs = sim.parse_defects("vacancy", ["Sr", "Ti", "O"])
    with pytest.raises(ValueError, match="room for"):
        sim.place_defects(specimen, specs, 5, 5.0, 30.0, 1.0, np.random.default_rng(0))


def test_acquired_positions_follow_drift_and_jitter():
    # One bright spot per place; after drift and jitter, each spot's centroid in the
    # recorded frame is where to_frame says.
    margin, shape = 12, (200, 200)
    spots = np.array([[40.0, 50.0], [150.0, 60.0], [100.0, 170.0], [180.0, 180.0]])
    positions = np.column_stack([spots[:, 1] + margin, spots[:, 0] + margin, np.zeros(4)])
    clean = sim.render_incoherent(
        positions, np.full(4, 50), (shape[0] + 2 * margin, shape[1] + 2 * margin), 1.0, 3.0
    )
    instrument = sim.Instrument(
        dose=1e6, jitter=0.4, drift=(5.0, 8.0), gradient=0.0, gain=1.0, offset=0.0, read_noise=0
    )
    frame, to_frame = sim.acquire(clean, margin, instrument, np.random.default_rng(1))
    assert frame.shape == shape and frame.dtype == np.uint16
    from scipy import ndimage

    labels, n = ndimage.label(frame > frame.max() * 0.2)
    assert n == 4
    found = np.array(ndimage.center_of_mass(frame.astype(float), labels, range(1, 5)))
    expected = np.array([to_frame(r, c) for r, c in spots])
    distance = np.linalg.norm(found[:, None] - expected[None], axis=2).min(axis=1)
    assert distance.max() < 0.6, distance
    # Without distortions the truth would be the spots themselves: the drift matters.
    assert np.linalg.norm(expected - spots, axis=1).max() > 4


def test_simulated_dataset_trains_the_way_train_reads(tmp_path):
    from defectscope.io.datasets import load_patches

    settings = sim.SimulationSettings(
        structure="cdte",
        zone=(1, 1, 0),
        defects="vacancy,interstitial",
        frames=2,
        size=256,
        thickness=3.0,
        patches_per_defect=2,
        seed=5,
    )
    record = sim.simulate_dataset(settings, tmp_path / "sim", progress=False)
    truth = json.loads((tmp_path / "sim" / "truth.json").read_text())
    assert truth == json.loads(json.dumps(record))
    assert truth["lattice_spacing"] == pytest.approx(0.6481 * math.sqrt(3 / 8), abs=1e-6)
    for frame in truth["frames"]:
        assert len(frame["defects"]) == 2  # one per (2.5 patches)^2, at least one per kind
        for d in frame["defects"]:
            assert 32 <= d["row"] <= 224 and 32 <= d["col"] <= 224
            assert d["x"] == pytest.approx(d["col"] * 0.02)
    patches = load_patches(tmp_path / "sim" / "patches")
    assert patches.classes == ["Bulk", "Interstitial_Te", "Vacancy_Te"]
    assert patches.images.shape[1:] == (64, 64) and patches.images.dtype == np.uint16
    # Groups are the frames: a patch's group is the frame it was cut from.
    from_name = np.array([int(p.rsplit("frame", 1)[1][:4]) for p in patches.paths])
    np.testing.assert_array_equal(patches.groups, from_name)
    # A defect patch holds its defect near the centre: the frame's pixels there.
    frame = __import__("tifffile").imread(tmp_path / "sim" / "frames" / "frame_0000.tif")
    assert frame.shape == (256, 256) and frame.dtype == np.uint16
    with pytest.raises(ValueError, match="already holds"):
        sim.simulate_dataset(settings, tmp_path / "sim", progress=False)


def test_simulated_frame_reads_with_its_calibration(tmp_path):
    pytest.importorskip("rsciio", reason="calibrated TIFF needs the 'formats' extra")
    from defectscope.io.frames import read_frame

    settings = sim.SimulationSettings(frames=1, size=128, thickness=2.0, seed=1)
    sim.simulate_dataset(settings, tmp_path, progress=False)
    frame = read_frame(tmp_path / "frames" / "frame_0000.tif")
    assert frame.calibration is not None
    assert frame.calibration.scale == pytest.approx((0.02, 0.02))
    assert frame.calibration.unit == "nm"


def test_match_regions_is_one_to_one():
    truth = np.array([[0.0, 0.0], [10.0, 0.0]])
    found = np.array([[0.5, 0.0], [0.2, 0.1], [30.0, 0.0]])
    recall, precision, matched = sim.match_regions(found, truth, 1.0)
    assert (recall, precision, matched) == (0.5, 1 / 3, 1)
    assert sim.match_regions(np.empty((0, 2)), truth, 1.0)[:2] == (0.0, 1.0)
    assert sim.match_pairs(found, truth, 1.0) == [(1, 0)]  # the nearer of two claims wins


def test_multislice_agrees_with_the_incoherent_model():
    pytest.importorskip("abtem", reason="the multislice renderer needs abTEM")
    atoms = sim.load_structure("srtio3")
    specimen = sim.build_specimen(atoms, (0, 0, 1), (7.81, 7.81), 7.81)
    pixel, shape = 0.4, (19, 19)
    settings = sim.Multislice(potential_sampling=0.1, detector_inner=2.5)
    slow = sim.render_multislice(specimen, shape, pixel, 1.2, (0.0, 0.0), settings)
    fast = sim.render_incoherent(specimen.positions, specimen.numbers, shape, pixel, 1.2)
    # Same place, same orientation: the column pattern correlates, and the Sr columns
    # (Z = 38) are brighter than the pure O ones (Z = 8) in both.
    inner = (slice(3, -3), slice(3, -3))
    r = np.corrcoef(slow[inner].ravel(), fast[inner].ravel())[0, 1]
    assert r > 0.8, r
    xy, column = specimen.columns()
    pixel_of = np.rint(xy / pixel).astype(int)
    on_grid = np.all((pixel_of >= 3) & (pixel_of < 16), axis=1)
    kinds = [tuple(sorted(set(specimen.numbers[column == c].tolist()))) for c in range(len(xy))]
    sites = list(zip(pixel_of, kinds, on_grid, strict=True))
    sr = [slow[r, c] for (c, r), k, ok in sites if ok and k == (38,)]
    o = [slow[r, c] for (c, r), k, ok in sites if ok and k == (8,)]
    assert sr and o and min(sr) > max(o)


@pytest.fixture
def learned(monkeypatch):
    """Tiny trainings here test plumbing, not convergence: count every run as learned."""
    import defectscope.training.loop as train_module

    monkeypatch.setattr(train_module.TrainResult, "untrained", property(lambda self: False))


def test_pretraining_on_simulated_starts_the_fine_tuning(tmp_path, learned):
    import torch

    from defectscope.nets.checkpoint import load_checkpoint
    from defectscope.nets.vgg import build_model
    from defectscope.training.config import TrainConfig
    from defectscope.training.loop import train_from_simulated
    from tests.synthetic import toy_patches

    simulated, real = toy_patches(6, seed=1), toy_patches(6, seed=2)
    real.classes = ["Clean", "Hole"]  # the real classes need not be the simulated ones
    config = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-3, precision="fp32")
    train_from_simulated(
        simulated, tmp_path / "m", config, "random", real, {"note": "x"}, finetune_blocks=0
    )
    pre, _, pre_record = load_checkpoint(tmp_path / "m" / "pretrained")
    fine, fine_config, record = load_checkpoint(tmp_path / "m")
    assert pre_record["simulated"]["use"] == "pretraining"
    assert record["simulated"]["use"].startswith("pretrained on simulated")
    assert record["note"] == "x" and fine_config.classes == ("Clean", "Hole")
    # Fine-tuning trained no conv block, so the trunk's weights are the pretrained ones
    # (batch-norm statistics are re-estimated), and pretraining had moved them away
    # from the seeded initialization.
    pre_weights = dict(pre.features.named_parameters())
    for name, weight in fine.features.named_parameters():
        assert torch.equal(weight, pre_weights[name]), name
    torch.manual_seed(config.seed)
    fresh = build_model(2, architecture=config.architecture)
    assert not torch.equal(pre.features[0].weight, fresh.features[0].weight)


def test_three_commands_from_a_crystal_to_scores(tmp_path, learned):
    from defectscope.cli import main

    sim_dir, model = tmp_path / "sim", tmp_path / "model"
    args = ["simulate", "--structure", "cdte", "--zone", "110", "--defects", "vacancy"]
    args += ["--frames", "2", "--size", "192", "--thickness", "2", "--quiet", "--out", str(sim_dir)]
    assert main(args) == 0
    args = ["train", "--simulated", str(sim_dir), "--out", str(model), "--epochs", "1"]
    assert main([*args, "--precision", "fp32", "--trainable-blocks", "1"]) == 0
    record = json.loads((model / "model.json").read_text())
    assert record["simulated"]["use"] == "simulated only"
    assert record["model"]["classes"] == ["Bulk", "Vacancy_Te"]
    scores = tmp_path / "scores.json"
    assert main(["score-simulated", str(model), str(sim_dir), "--json", str(scores)]) == 0
    score = json.loads(scores.read_text())
    truth = sim.read_truth(sim_dir)
    assert score["defects"] == sum(len(f["defects"]) for f in truth["frames"])
    assert 0 <= score["recall"] <= 1 and len(score["frames"]) == 2
    assert score["tolerance_px"] == pytest.approx(0.5 * truth["lattice_spacing"] / 0.02)
    # Bad input: one error line, exit 1.
    assert main(["simulate", "--defects", "hole", "--out", str(tmp_path / "x")]) == 1
    assert main(["train", "--out", str(tmp_path / "y")]) == 1
    assert main(["score-simulated", str(model), str(sim_dir), "--tolerance", "-1"]) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pixel_size": float("inf")}, "pixel size must be positive"),
        ({"thickness": float("nan")}, "thickness must be positive"),
        ({"unit": "furlong"}, "unit"),
        ({"size": 64}, "at least twice the patch size"),
        ({"vary": 1.0}, "vary"),
        ({"column_scatter": float("nan")}, "column scatter"),
        ({"instrument": sim.Instrument(dose=float("inf"))}, "finite"),
        ({"instrument": sim.Instrument(jitter=-1.0)}, "jitter"),
        ({"multislice": sim.Multislice(prism_interpolation=-2)}, "PRISM"),
    ],
)
def test_settings_out_of_range_are_named(change, message):
    import dataclasses

    settings = dataclasses.replace(sim.SimulationSettings(), **change)
    with pytest.raises(ValueError, match=message):
        settings.check()


def test_simulate_cli_refuses_hostile_numbers(tmp_path, capsys):
    from defectscope.cli import main

    assert main(["simulate", "--pixel-size", "1e400", "--out", str(tmp_path / "a")]) == 1
    assert main(["simulate", "--size", "100000000", "--out", str(tmp_path / "b")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 2 and all(line.startswith("error:") for line in errors)
    assert "pixel size" in errors[0] and "16384" in errors[1]
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.tif"))
