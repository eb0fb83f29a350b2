"""The lattice residual's density (issue 27) in the model record and in every map: a
point defect of a kind never trained on is unknown, the trained kinds are not, and the
two densities combine as documented."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from defectscope.artifacts.metadata import MetadataError
from defectscope.artifacts.residual_density import ResidualDensity, fit_residual_density
from defectscope.engines.loader import load_engine
from defectscope.maps.detector import Detector
from defectscope.maps.options import MapOptions
from defectscope.tiling.tiler import window_origins
from tests.synthetic import lattice, toy_patches

SPOT = (132, 132)  # between four columns of the 8 px lattice (columns at 8 i + 4)


def interstitial_frame() -> np.ndarray:
    """The toy lattice with one extra bright spot between columns: a defect kind the toy
    model (clean lattice, centred vacancy) never saw."""
    image = lattice((256, 256), seed=11)
    yy, xx = np.mgrid[0:256, 0:256]
    image = image + 0.9 * np.exp(-((yy - SPOT[0]) ** 2 + (xx - SPOT[1]) ** 2) / 2.0)
    return (image * 200).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def residual_model_dir(density_model_dir, tmp_path_factory):
    """The toy model with both densities: the embedding's and the lattice residual's."""
    train, held = toy_patches(30), toy_patches(20, seed=1)
    residual = fit_residual_density(train.images, train.labels, 2, held.images)
    out = tmp_path_factory.mktemp("models") / "toy-residual"
    shutil.copytree(density_model_dir, out, ignore=shutil.ignore_patterns("*.onnx"))
    record = json.loads((out / "model.json").read_text())
    record["residual_density"] = residual.to_dict()
    (out / "model.json").write_text(json.dumps(record))
    return out


def windows_of(frame: np.ndarray, origins: np.ndarray) -> np.ndarray:
    """Numpy reference tiling: the raw pixels of each window."""
    return np.stack([frame[r : r + 64, c : c + 64] for r, c in origins]).astype(np.float64)


def test_record_round_trip_scores_alike(residual_model_dir):
    record = json.loads((residual_model_dir / "model.json").read_text())["residual_density"]
    density = ResidualDensity.from_dict(record, n_classes=2)
    again = ResidualDensity.from_dict(json.loads(json.dumps(density.to_dict())), n_classes=2)
    windows = toy_patches(5, seed=3).images
    for got, want in zip(again.score(windows), density.score(windows), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_centred_density_records_its_centre_and_scores_its_centre():
    """Fitted on the patches' centres: the record is version 2 with the share, reads back
    to the same scores, and those are the centre descriptors' (not the whole window's)."""
    from defectscope.artifacts.density import fit_density
    from defectscope.tiling.residual import CENTRE_SHARE, residual_descriptors

    train, held = toy_patches(30), toy_patches(20, seed=1)
    density = fit_residual_density(train.images, train.labels, 2, held.images, centre=0.375)
    record = json.loads(json.dumps(density.to_dict()))
    assert record["descriptor_version"] == 2 and record["centre"] == CENTRE_SHARE
    again = ResidualDensity.from_dict(record, n_classes=2)
    assert again.centre == CENTRE_SHARE
    windows = toy_patches(5, seed=3).images
    for got, want in zip(again.score(windows), density.score(windows), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3)  # JSON keeps the fit to float32
    reference = fit_density(
        residual_descriptors(train.images, centre=CENTRE_SHARE),
        train.labels,
        2,
        residual_descriptors(held.images, centre=CENTRE_SHARE),
    )
    want = reference.score(residual_descriptors(windows, centre=CENTRE_SHARE))[0]
    np.testing.assert_allclose(density.score(windows)[0], want, rtol=1e-6)
    whole = fit_residual_density(train.images, train.labels, 2, held.images)
    assert whole.to_dict()["descriptor_version"] == 1 and "centre" not in whole.to_dict()
    assert not np.allclose(whole.score(windows)[0], want)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.pop("centre"), "centre must be a share"),
        (lambda r: r.update(centre=0), "centre must be a share"),
        (lambda r: r.update(centre=1e300), "centre must be a share"),
        (lambda r: r.update(centre=10**400), "centre must be a share"),
        (lambda r: r.update(centre="0.375"), "centre must be a share"),
        (lambda r: r.update(centre=True), "centre must be a share"),
        (lambda r: r.update(centre=float("nan")), "centre must be a share"),
        (lambda r: r.update(centre=-0.375), "centre must be a share"),
        (lambda r: r.update(descriptor_version=3), "descriptor version"),
        (lambda r: r.update(descriptor_version=1), "version 1 .* has a centre"),
    ],
)
def test_malformed_centre_records_are_refused(centred_record, edit, message):
    record = json.loads(json.dumps(centred_record))
    edit(record)
    with pytest.raises(ValueError, match=message):
        ResidualDensity.from_dict(record, n_classes=2)


def test_a_bad_centre_is_refused_when_made(centred_record):
    density = ResidualDensity.from_dict(centred_record, n_classes=2).density
    for centre in (0, 2.0, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="centre must be a share"):
            ResidualDensity(density, 64, centre=centre)


@pytest.fixture(scope="module")
def centred_record():
    train = toy_patches(30)
    return fit_residual_density(train.images, train.labels, 2, centre=0.375).to_dict()


def test_a_new_point_defect_is_unknown_and_the_lattice_around_it_is_not(residual_model_dir):
    frame = interstitial_frame()
    with Detector.load(residual_model_dir, backend="torch") as det:
        both = det.map(frame, stride=16, novelty="auto")
        embedding = det.map(frame, stride=16, novelty="embedding")
        residual = det.map(frame, stride=16, novelty="residual")
    assert both.info["novelty"] == ["embedding", "lattice residual"]
    assert embedding.info["novelty"] == ["embedding"]
    assert residual.info["novelty"] == ["lattice residual"]
    # The combination is the larger uncertainty and either's unknown, window by window.
    np.testing.assert_array_equal(
        both.uncertainty, np.maximum(embedding.uncertainty, residual.uncertainty)
    )
    np.testing.assert_array_equal(both.unknown, embedding.unknown | residual.unknown)
    # The residual's scores are those of the windows' raw pixels (numpy tiling): the
    # normalized input the map reuses changes nothing.
    density = ResidualDensity.from_dict(
        json.loads((residual_model_dir / "model.json").read_text())["residual_density"]
    )
    origins = window_origins(frame.shape, 64, 16)
    _, want_u, want_k = density.score(windows_of(frame, origins))
    np.testing.assert_allclose(residual.uncertainty.ravel(), want_u, atol=1e-4)
    assert np.mean(residual.unknown.ravel() != want_k) <= 0.01  # ties at the threshold
    # Windows that hold the spot well inside are unknown; windows far from it are known.
    centre = origins + 31.5
    inside = np.all(np.abs(centre - np.array(SPOT)) <= 16, axis=1)
    far = np.max(np.abs(centre - np.array(SPOT)), axis=1) >= 64 + 8
    assert inside.sum() >= 4 and far.sum() >= 40
    assert residual.unknown.ravel()[inside].all()
    assert residual.unknown.ravel()[far].mean() <= 0.1


def test_residual_novelty_needs_a_model_that_carries_it(density_model_dir):
    with Detector.load(density_model_dir, backend="torch") as det:
        with pytest.raises(ValueError, match="no lattice-residual density"):
            det.map(interstitial_frame(), stride=16, novelty="residual")
        result = det.map(interstitial_frame(), stride=16)  # auto: the embedding's alone
        assert result.info["novelty"] == ["embedding"]
        with pytest.raises(ValueError, match="novelty must be one of"):
            det.map(interstitial_frame(), stride=16, novelty="both")
    with pytest.raises(ValueError, match="novelty"):
        MapOptions(novelty="both")


def test_windows_over_holes_are_not_judged_by_the_residual(residual_model_dir):
    frame = interstitial_frame().astype(np.float32)
    frame[40:43, 200:203] = np.nan  # a hole far from the spot
    origins = window_origins(frame.shape, 64, 16)
    holes = np.array([not np.isfinite(frame[r : r + 64, c : c + 64]).all() for r, c in origins])
    assert 4 <= holes.sum() < len(holes) // 2
    with Detector.load(residual_model_dir, backend="torch") as det:
        residual = det.map(frame, stride=16, nan_policy="zero", novelty="residual")
        embedding = det.map(frame, stride=16, nan_policy="zero", novelty="embedding")
        both = det.map(frame, stride=16, nan_policy="zero")
    # Alone, the residual cannot judge a hole: unknown at uncertainty 1.
    assert residual.unknown.ravel()[holes].all()
    assert (residual.uncertainty.ravel()[holes] == 1.0).all()
    # Combined, a hole's window keeps the embedding's score.
    np.testing.assert_array_equal(
        both.uncertainty.ravel()[holes], embedding.uncertainty.ravel()[holes]
    )
    np.testing.assert_array_equal(both.unknown.ravel()[holes], embedding.unknown.ravel()[holes])
    # Elsewhere the hole changes nothing: the residual scores as on the frame without it.
    with Detector.load(residual_model_dir, backend="torch") as det:
        clean = det.map(interstitial_frame(), stride=16, novelty="residual")
    np.testing.assert_allclose(
        residual.uncertainty.ravel()[~holes], clean.uncertainty.ravel()[~holes], atol=1e-4
    )


def test_the_residual_density_travels_through_onnx(residual_model_dir, tmp_path):
    from defectscope.export.onnx import export_onnx

    path = tmp_path / "toy.onnx"
    export_onnx(residual_model_dir, path)
    engine = load_engine(path)
    assert engine.residual_density is not None
    frame = interstitial_frame()
    with Detector.load(residual_model_dir, backend="torch") as det:
        want = det.map(frame, stride=16, novelty="residual")
    with Detector.load(path) as det:
        got = det.map(frame, stride=16, novelty="residual")
    np.testing.assert_allclose(got.uncertainty, want.uncertainty, atol=1e-4)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(kind="gaussian"), "kind"),
        (lambda r: r.update(descriptor_version=99), "descriptor version"),
        (lambda r: r.update(patch_size=True), "patch_size"),
        (lambda r: r.update(patch_size=1e300), "patch_size"),
        (lambda r: r.update(patch_size=1e400), "Infinity is not valid JSON"),
        (lambda r: r.update(patch_size=32), "56-D for a 40-D"),
        (lambda r: r.update(peak_factor=float("nan")), "NaN is not valid JSON"),
        (lambda r: r.update(peak_factor="10"), "peak_factor"),
        (lambda r: r.update(peak_factor=10**400), "peak_factor"),
        (lambda r: r.update(descriptor_version=True), "descriptor version"),
        (lambda r: r["density"].update(threshold=10**400), "threshold"),
        (lambda r: r["density"].update(threshold=True), "threshold"),
        (lambda r: r.update(peak_factor=0.5), "peak_factor"),
        (lambda r: r["density"].update(threshold=-1), "threshold"),
        (lambda r: r.update(density=[]), "density must be an object"),
    ],
)
def test_malformed_residual_records_are_refused(residual_model_dir, tmp_path, edit, message):
    target = tmp_path / "model"
    shutil.copytree(residual_model_dir, target)
    record = json.loads((target / "model.json").read_text())
    edit(record["residual_density"])
    (target / "model.json").write_text(json.dumps(record))
    with pytest.raises(MetadataError, match=message):
        load_engine(target, backend="torch")


def test_fit_refuses_mismatched_patches():
    patches = toy_patches(4)
    with pytest.raises(ValueError, match="square"):
        fit_residual_density(patches.images[:, :, :40], patches.labels, 2)
    with pytest.raises(ValueError, match="held-out"):
        fit_residual_density(patches.images, patches.labels, 2, patches.images[:, :48, :48])
