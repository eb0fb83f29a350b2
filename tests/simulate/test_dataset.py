"""Simulated datasets: settings, frames, patches, the written folder and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

ase = pytest.importorskip("ase", reason="simulation needs the optional 'simulate' extra (ASE)")

from defectscope.simulate import dataset as sim  # noqa: E402
from defectscope.simulate.instrument import Instrument  # noqa: E402
from defectscope.simulate.renderers import Multislice  # noqa: E402
from defectscope.tiling.residual import CENTRE_SHARE  # noqa: E402


def _sr_column_peak_spread(column_scatter: float) -> float:
    """Relative spread of the Sr columns' integrated intensity in a quiet fast frame."""
    from scipy import ndimage

    quiet = Instrument(
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


def test_simulated_dataset_trains_the_way_train_reads(tmp_path):
    from defectscope.io.datasets import load_patches

    settings = sim.SimulationSettings(
        structure="cdte",
        zone=(1, 1, 0),
        defects="vacancy:Te,interstitial",
        frames=2,
        size=256,
        thickness=3.0,
        vary=0.0,
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

    settings = sim.SimulationSettings(
        frames=1, size=128, thickness=2.0, seed=1, defects="vacancy:Sr"
    )
    sim.simulate_dataset(settings, tmp_path, progress=False)
    frame = read_frame(tmp_path / "frames" / "frame_0000.tif")
    assert frame.calibration is not None
    assert frame.calibration.scale == pytest.approx((0.02, 0.02))
    assert frame.calibration.unit == "nm"


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
    assert record["model"]["classes"] == ["Bulk", "Vacancy_Cd", "Vacancy_Te"]
    # simulate centres its defect patches: the residual density looks at the centres;
    # the same patches as a bare folder (nothing says how they were cut) keep the whole.
    assert record["residual_density"]["centre"] == CENTRE_SHARE
    bare = tmp_path / "bare-model"
    argv = ["train", "--simulated", str(sim_dir / "patches"), "--out", str(bare), "--epochs", "1"]
    assert main([*argv, "--precision", "fp32", "--trainable-blocks", "1"]) == 0
    assert "centre" not in json.loads((bare / "model.json").read_text())["residual_density"]
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
        ({"instrument": Instrument(dose=float("inf"))}, "finite"),
        ({"instrument": Instrument(jitter=-1.0)}, "jitter"),
        ({"multislice": Multislice(prism_interpolation=-2)}, "PRISM"),
        # Issue 25, findings 9 and 13: each of these passed check() and failed later,
        # after work and files, or with numpy's words.
        ({"column_fraction": float("nan")}, "column fraction must be in"),
        ({"column_fraction": 1.5}, "column fraction must be in"),
        ({"exponent": 1e300}, "exponent must be in"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"defects_per_frame": -3}, "defects per frame"),
        ({"frames": 2.5}, "frames must be an integer"),
        ({"zone": (0, 0, 0)}, "zone axis"),
        ({"probe_fwhm": 1e300}, "probe FWHM"),
        ({"instrument": Instrument(dose=1e300)}, "dose"),
        ({"instrument": Instrument(drift=(1500.0, 0.0))}, "margin of 1504 pixels"),
        ({"instrument": Instrument(drift=(9000.0, 0.0)), "size": 4096}, "over the limit of 20000"),
        ({"multislice": Multislice(energy=1e-300)}, "energy must be"),
        ({"multislice": Multislice(potential_sampling=float("nan"))}, "potential sampling"),
        ({"bulk_near_defects": "yes"}, "bulk near defects must be true or false"),
    ],
)
def test_settings_out_of_range_are_named(change, message):
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


SMALL = sim.SimulationSettings(frames=1, size=128, thickness=2.0, seed=1, defects="vacancy:Sr")


def test_nan_column_fraction_is_refused_before_any_file(tmp_path):
    # Issue 25, finding 9: a NaN column fraction wrote a frame and patches, then failed
    # writing truth.json (JSON has no NaN), and the half-made folder was refused after.
    settings = dataclasses.replace(SMALL, column_fraction=float("nan"))
    with pytest.raises(ValueError, match="column fraction must be in \\(0, 1\\], got nan"):
        sim.simulate_dataset(settings, tmp_path / "sim", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_with_a_truth_json_is_not_overwritten(tmp_path):
    # Issue 25, finding 12: without frames/ beside it, a truth.json was overwritten.
    out = tmp_path / "sim"
    out.mkdir()
    (out / "truth.json").write_text('{"frames": []}')
    with pytest.raises(ValueError, match="already holds a simulated dataset"):
        sim.simulate_dataset(SMALL, out, progress=False)
    assert (out / "truth.json").read_text() == '{"frames": []}'
    assert [p.name for p in tmp_path.iterdir()] == ["sim"]
    assert [p.name for p in out.iterdir()] == ["truth.json"]


def test_a_failed_run_leaves_no_dataset(tmp_path, monkeypatch):
    # Derived folders are staged: a run that fails after its first frame leaves no
    # loadable dataset, only the hidden staging folder with the truth of what it made.
    real = sim.simulate_frame

    def fails_at(index_failing):
        def simulate_frame(settings, index):
            if index == index_failing:
                raise RuntimeError("the disk is on fire")
            return real(settings, index)

        return simulate_frame

    monkeypatch.setattr(sim, "simulate_frame", fails_at(1))
    with pytest.raises(RuntimeError, match="on fire"):
        sim.simulate_dataset(dataclasses.replace(SMALL, frames=2), tmp_path / "sim", progress=False)
    assert not (tmp_path / "sim").exists()
    with pytest.raises(ValueError, match=r"no truth\.json"):
        sim.read_truth(tmp_path / "sim")
    (kept,) = tmp_path.glob(".sim.partial-*")
    partial = sim.read_truth(kept)
    assert partial["complete"] is False and len(partial["frames"]) == 1
    assert (kept / "frames" / "frame_0000.tif").is_file()
    # A failure before the first frame leaves nothing at all.
    monkeypatch.setattr(sim, "simulate_frame", fails_at(0))
    with pytest.raises(RuntimeError):
        sim.simulate_dataset(SMALL, tmp_path / "other", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]


def test_a_dataset_joins_a_folder_that_holds_other_files(tmp_path):
    out = tmp_path / "sim"
    (out / "frames").mkdir(parents=True)  # empty: allowed, as before
    (out / "notes.txt").write_text("mine")
    record = sim.simulate_dataset(SMALL, out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert sim.read_truth(out) == json.loads(json.dumps(record)) and record["complete"]
    assert (out / "frames" / "frame_0000.tif").is_file()
    assert (out / "patches" / "groups.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim"]  # no staging left


def test_a_drift_larger_than_the_frame_is_refused_at_once(tmp_path, capsys, deadline):
    # Issue 25, finding 8: 'simulate --size 128 --frames 1 --drift 1500 0' hung (a
    # pairwise step on a 3136-pixel field), then could not have placed a defect: the
    # drift moves every site out of a 128-pixel frame. It is refused before any work.
    from defectscope.cli import main

    out = tmp_path / "o"
    args = ["simulate", "--size", "128", "--frames", "1", "--drift", "1500", "0", "--quiet"]
    with deadline(60):
        assert main([*args, "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: drift (1500.0, 0.0)") and "margin of 1504 pixels" in error
    assert not out.exists()


def test_a_large_drift_field_renders_in_seconds(deadline):
    # The same 3136-pixel field (2.6 million atoms) with no defect to place: every step
    # (columns, spacing, placing, rendering) is near-linear, so it takes seconds.
    settings = sim.SimulationSettings(
        size=128, frames=1, defects_per_frame=0, instrument=Instrument(drift=(1500.0, 0.0))
    )
    with deadline(240):
        frame, record = sim.simulate_frame(settings, 0)
    assert frame.shape == (128, 128) and record["defects"] == []
    assert record["lattice_spacing"] == pytest.approx(0.3905, abs=1e-6)


@pytest.mark.parametrize(
    "option, value, named",
    [
        ("--pixel-size", "1e-300", "at pixel size 1e-300 nm is 9.6e+298 pixels"),
        ("--probe-fwhm", "1e300", "probe FWHM 1e+300 nm"),
        ("--dose", "1e300", "dose 1e+300 is over the limit"),
        ("--exponent", "1e300", "exponent must be in (0, 4]"),
        ("--thickness", "1e-300", "thickness 1e-300 nm"),
        ("--seed", "-1", "seed must be >= 0"),
        ("--column-fraction", "nan", "column fraction must be in (0, 1], got nan"),
        ("--defects", "substitution:Ti>Ti", "changes nothing"),
        ("--energy", "1e-300", "energy must be 1 to 10000 keV"),
    ],
)
def test_hostile_numbers_get_one_error_naming_the_setting(tmp_path, capsys, option, value, named):
    # Issue 25, findings 9, 12 and 13: numpy's 'attempt to get argmin of an empty
    # sequence', 'Maximum allowed size exceeded', 'lam value too large', a dataset
    # without its truth, or a class of patches showing nothing.
    from defectscope.cli import main

    out = tmp_path / "o"
    args = ["simulate", "--frames", "1", "--size", "128", "--quiet", "--out", str(out)]
    assert main([*args, option, value]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_a_frame_smaller_than_a_unit_cell_is_named(tmp_path):
    # Issue 25, finding 13: a field without atoms ended in 'attempt to get argmin of an
    # empty sequence'.
    settings = dataclasses.replace(SMALL, pixel_size=1e-6, probe_fwhm=1e-6)
    with pytest.raises(ValueError, match="pixel size 1e-06 nm: the 128-pixel frame spans"):
        sim.simulate_dataset(settings, tmp_path / "sim", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("near", [False, True])
def test_bulk_patches_hold_defects_only_outside_their_centre_when_asked(near):
    # A frame of zeros with a 1 at each defect: a Bulk patch's pixels say where defects lie.
    rng = np.random.default_rng(3)
    frame = np.zeros((512, 512), dtype=np.float32)
    places = rng.integers(40, 472, size=(24, 2))
    frame[places[:, 0], places[:, 1]] = 1.0
    defects = [{"type": "Vacancy", "row": float(r), "col": float(c)} for r, c in places]
    pairs = sim.cut_patches(frame, defects, 64, 4, np.random.default_rng(0), near)
    bulk = np.stack([patch for label, patch in pairs if label == "Bulk"])
    assert len(bulk) >= 60
    # Crops start at the rounded centre - 32: a defect 16 px before the centre is at 16.
    centre = bulk[:, 17:48, 17:48]
    assert centre.max() == 0  # no Bulk patch holds a defect in its central square
    outer = bulk.reshape(len(bulk), -1).max(axis=1)
    if near:
        # ... but, as windows beside a defect do, about half hold one: half are placed
        # beside a defect (a quarter of those just past the edge, holding none), and on
        # this crowded frame about 30 % of the rest land near one.
        assert 0.45 <= outer.mean() <= 0.65  # 0.53 here; 0.30 with none placed beside
        rows, cols = np.nonzero(bulk[outer > 0])[1:]
        reach = np.maximum(np.abs(rows - 32), np.abs(cols - 32))
        counts = np.histogram(reach, bins=[16, 20, 24, 28, 33])[0]
        assert counts.min() >= 0.05 * len(reach), counts
    else:
        assert outer.max() == 0
    # The defect patches are unchanged: each holds its defect within an eighth of its centre.
    defect_patches = np.stack([patch for label, patch in pairs if label == "Vacancy"])
    assert defect_patches[:, 24:41, 24:41].reshape(len(defect_patches), -1).max(axis=1).min() == 1


def test_bulk_near_defects_reaches_the_patches_and_old_datasets_still_match(monkeypatch, tmp_path):
    seen = []
    real_cut = sim.cut_patches

    def spy(*args):
        seen.append(args[5])
        return real_cut(*args)

    monkeypatch.setattr(sim, "cut_patches", spy)
    assert sim.SimulationSettings().bulk_near_defects is True  # the default since 2026-12-05
    settings = sim.SimulationSettings(
        frames=1, size=192, defects="vacancy:Sr", bulk_near_defects=False, seed=2
    )
    with pytest.raises(TypeError, match="bulk_near_defects must be true or false"):
        real_cut(np.zeros((128, 128)), [], 64, 1, np.random.default_rng(0), "no")
    truth = sim.simulate_dataset(settings, tmp_path / "d", progress=False)
    assert seen == [False]
    assert truth["settings"]["bulk_near_defects"] is False
    # A truth.json written before the setting existed was made without it, whatever
    # today's default: it still matches the settings it was made with.
    old = {k: v for k, v in truth["settings"].items() if k != "bulk_near_defects"}
    assert sim.recorded_settings({"settings": old})["bulk_near_defects"] is False
    assert sim.recorded_settings({"settings": old}) == truth["settings"]
    assert sim.recorded_settings({"settings": truth["settings"]}) == truth["settings"]
    assert sim.recorded_settings({}) is None
