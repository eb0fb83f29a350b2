"""The default novelty (issue 27) on synthetic lattices, where the answer is known: a
model trained on vacancy clusters maps a frame holding vacancy clusters and an
interstitial, a point defect it never saw. The interstitial is unknown; the vacancies
are known defects; the frame is not out of distribution."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from defectscope.artifacts.residual_density import fit_residual_density
from defectscope.maps.detector import AUTO_NOVELTY, Detector
from defectscope.tiling.tiler import window_origins
from tests.conftest import acquisition_patches
from tests.synthetic import acquired_lattice

SHAPE = (224, 224)
CLUSTERS = [(3, 3), (3, 20), (20, 3)]  # lattice indices; centres at (i + 1) * 8 px
# Midway between four columns (columns sit at 8 i + 4), far from every cluster.
SPOT = (168, 168)


def frame_with_interstitial(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An acquired lattice with vacancy clusters (the trained kind) plus one extra
    column between columns (a kind never trained on); the frame and cluster centres."""
    frame, centres = acquired_lattice(SHAPE, CLUSTERS, seed=seed)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    spot = 160.0 * np.exp(-((yy - SPOT[0]) ** 2 + (xx - SPOT[1]) ** 2) / (2 * 1.5**2))
    return (frame + spot).clip(0, 255).astype(np.uint8), centres


@pytest.fixture(scope="module")
def trained_like_model_dir(acquisition_model_dir, tmp_path_factory):
    """The acquisition model (density, MC dropout, head ensemble) plus the lattice
    residual's density, fitted as training fits it: every record a trained model has."""
    train, held = acquisition_patches(24, seed=0), acquisition_patches(12, seed=1)
    residual = fit_residual_density(train.images, train.labels, 2, held.images)
    out = tmp_path_factory.mktemp("models") / "acquisition-all-records"
    shutil.copytree(acquisition_model_dir, out)
    record = json.loads((out / "model.json").read_text())
    record["residual_density"] = residual.to_dict()
    (out / "model.json").write_text(json.dumps(record))
    return out


def near(origins: np.ndarray, point, reach: float) -> np.ndarray:
    """Windows whose centre lies within ``reach`` px of ``point`` on both axes."""
    return np.all(np.abs(origins + 31.5 - np.asarray(point, float)) <= reach, axis=1)


@pytest.mark.parametrize("seed", [5, 6])
def test_a_point_defect_never_trained_on_is_new_and_the_trained_ones_are_not(
    trained_like_model_dir, seed
):
    frame, centres = frame_with_interstitial(seed)
    with Detector.load(trained_like_model_dir, backend="torch") as det:
        result = det.map(frame)  # every option at its default
        pair = det.map(frame, novelty=AUTO_NOVELTY)
        vacancy = det.classes.index("Vacancy")
    assert result.info["novelty"] == ["head ensemble", "lattice residual"]
    assert result.info["ood_check"] == "embedding density"
    np.testing.assert_array_equal(result.unknown, pair.unknown)
    np.testing.assert_array_equal(result.uncertainty, pair.uncertainty)

    origins = window_origins(frame.shape, 64, 16)
    unknown = result.unknown.ravel()
    label = result.probabilities.reshape(len(origins), -1).argmax(axis=1)
    # Windows that hold the extra column well inside are new.
    inside = near(origins, SPOT, 16)
    assert inside.sum() >= 4 and unknown[inside].all()
    # Windows that hold a vacancy cluster well inside are known, and called vacancies.
    for centre in centres:
        holds = near(origins, centre, 8)
        assert holds.sum() >= 1
        assert not unknown[holds].any(), f"cluster at {centre} called new"
        assert (label[holds] == vacancy).all(), f"cluster at {centre} not a vacancy"
    # Every cluster is a known region, the extra column an unknown one, and one new
    # point defect does not make the frame out of distribution.
    regions = result.regions()

    def covered(point, flagged: bool) -> bool:
        return any(
            r["bbox"][0] <= point[0] < r["bbox"][2]
            and r["bbox"][1] <= point[1] < r["bbox"][3]
            and bool(r.get("unknown")) == flagged
            for r in regions
        )

    assert all(covered(c, False) for c in centres)
    assert covered(SPOT, True)
    assert not result.out_of_distribution


def test_without_the_interstitial_nothing_is_new(trained_like_model_dir):
    """The same frames without the extra column: windows that hold no defect are
    known, and the frame is not out of distribution."""
    origins = window_origins(SHAPE, 64, 16)
    with Detector.load(trained_like_model_dir, backend="torch") as det:
        for seed in (5, 6):
            frame, centres = acquired_lattice(SHAPE, CLUSTERS, seed=seed)
            result = det.map(frame)
            # No cluster column inside the window (columns of a cluster within 4 px
            # of its centre, windows reaching 32 px from theirs).
            clean = np.all([~near(origins, c, 32 + 4 + 4) for c in centres], axis=0)
            unknown = result.unknown.ravel()
            assert clean.sum() >= 40
            assert unknown[clean].mean() <= 0.15
            assert not result.out_of_distribution
