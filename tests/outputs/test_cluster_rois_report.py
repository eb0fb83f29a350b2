"""Clustering, ROI selection and the HTML report (checked in a real browser)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import tifffile

from defectscope.cli import main
from defectscope.io.frames import Calibration
from defectscope.maps.cluster import cluster_embeddings
from defectscope.maps.result import MapResult
from defectscope.maps.rois import RoiWeights, select_rois
from defectscope.tiling.tiler import window_origins
from tests.synthetic import lattice, toy_patches


def test_silhouette_picks_true_k_and_scores_agree_with_sklearn():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 10, (4, 16))
    x = np.concatenate([c + rng.normal(0, 1, (60, 16)) for c in centers])
    truth = np.repeat(np.arange(4), 60)
    result = cluster_embeddings(x, k_range=(2, 8))
    assert result.k == 4
    assert result.agreement(truth)["ari"] > 0.95
    assert result.silhouette[4] == pytest.approx(
        silhouette_score(result.coordinates, result.labels)
    )
    assert max(result.silhouette, key=result.silhouette.get) == 4
    fixed = cluster_embeddings(x, k=3)
    assert fixed.k == 3 and set(fixed.silhouette) == {3}


def test_cluster_input_errors():
    with pytest.raises(ValueError, match="NaN"):
        cluster_embeddings(np.full((10, 3), np.nan))
    with pytest.raises(ValueError, match="k must be"):
        cluster_embeddings(np.random.default_rng(0).normal(size=(10, 3)), k=1)


def _map(labels_grid, embeddings, classes=("Bulk", "A")):
    rows, cols = labels_grid.shape
    probs = np.full((rows, cols, len(classes)), 0.1, np.float32)
    for (r, c), label in np.ndenumerate(labels_grid):
        probs[r, c, label] = 0.9
    shape = ((rows - 1) * 16 + 64, (cols - 1) * 16 + 64)
    origins = window_origins(shape, 64, 16)
    return MapResult(origins, (rows, cols), probs, embeddings, list(classes), "Bulk", shape, 64, {})


def test_rois_rank_spacing_novelty_and_calibration():
    grid = np.zeros((10, 12), int)
    grid[2, 2] = 1  # small, ordinary-looking defect
    grid[6:8, 8:10] = 1  # larger defect with an unusual embedding
    grid[2, 4] = 1  # within 64 px of the first: must be suppressed by spacing
    emb = np.zeros((10, 12, 4), np.float32)
    emb[..., 0] = np.random.default_rng(1).normal(0, 0.1, (10, 12))
    emb[6:8, 8:10, 1] = 5.0
    result = _map(grid, emb)
    result.calibration = Calibration((0.02, 0.02), (1.0, -2.0), "nm")
    rois = select_rois(result, top=5)
    assert [r["rank"] for r in rois] == [1, 2]
    best = rois[0]
    assert best["n_windows"] == 4 and best["novelty"] > 0.9
    y, x = best["center"]
    assert (y, x) == pytest.approx((6 * 16 + 31.5 + 8, 8 * 16 + 31.5 + 8))
    height, width = result.frame_shape
    # Pixel i spans [i, i + 1) of the scan field, so its centre is at (i + 0.5) / n.
    assert best["center_norm"] == pytest.approx([(y + 0.5) / height, (x + 0.5) / width])
    assert best["center_norm_xy"] == pytest.approx([(x + 0.5) / width, (y + 0.5) / height])
    assert best["center_calibrated"] == pytest.approx([1 + y * 0.02, -2 + x * 0.02])
    assert best["unit"] == "nm"
    expected = 0.5 * best["defect_probability"] + 0.2 * 4 / 8 + 0.3 * best["novelty"]
    assert best["score"] == pytest.approx(expected)
    spaced = select_rois(result, top=5, min_spacing=10)
    assert len(spaced) == 3
    only_probability = select_rois(result, top=1, weights=RoiWeights(1.0, 0.0, 0.0))
    assert only_probability[0]["score"] == pytest.approx(only_probability[0]["defect_probability"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A whole demo run on synthetic data: study, export, cluster, roi, report."""
    from defectscope.studies.study import run_study
    from defectscope.training.loop import TrainConfig

    root = tmp_path_factory.mktemp("run")
    patches = toy_patches(8, noise=0.4)  # noisy enough that no two patches look like crops
    data = root / "DataSet_Toy"
    data.mkdir()
    for i, (image, label) in enumerate(zip(patches.images, patches.labels, strict=True)):
        tifffile.imwrite(data / f"{patches.classes[label]}_{i}.tif", image)
    frame = lattice((128, 128), vacancies=[(7, 7), (7, 8), (8, 7), (8, 8)], seed=3) * 200
    frame_path = root / "frame.tif"
    tifffile.imwrite(frame_path, frame.clip(0, 255).astype(np.uint8))
    run = root / "toy"
    config = TrainConfig(epochs=2, batch_size=8, precision="fp32")
    run_study(patches, run, config, "toy", progress=False, frame=frame_path, folds=3, loco=True)
    assert (
        main(
            [
                "cluster",
                str(data),
                "--model",
                str(run / "model"),
                "--out",
                str(run / "cluster"),
                "--k-max",
                "4",
                "--backend",
                "torch",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "roi",
                str(run / "model"),
                str(frame_path),
                "--top",
                "3",
                "--out",
                str(run / "rois.json"),
                "--pixel-size",
                "0.05",
            ]
        )
        == 0
    )
    assert main(["report", str(run)]) == 0
    return run


def test_study_cross_validates_every_group_once(run_dir):
    study = json.loads((run_dir / "study.json").read_text())
    cv = study["cross_validation"]
    assert cv["n_folds"] == 3 and len(cv["folds"]) == 3
    # The first fold is the grouped split whose model is kept, not a second training.
    assert cv["folds"][0]["metrics"]["accuracy"] == study["grouped"]["metrics"]["accuracy"]
    accuracies = [fold["metrics"]["accuracy"] for fold in cv["folds"]]
    assert cv["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert cv["accuracy"]["std"] == pytest.approx(np.std(accuracies))
    # Every testable patch is tested exactly once over the folds.
    assert cv["n_test"] == sum(fold["n_test"] for fold in cv["folds"]) == 16
    for c, m in cv["per_class"].items():
        assert m["support"] == 8 and m["f1"]["n"] == 3, c
    # Two classes: leaving one out leaves nothing to classify, which is said, not hidden.
    loco = study["leave_one_class_out"]
    assert set(loco) == {"Bulk", "Vacancy"}
    assert all("skipped" in r for r in loco.values())
    summary = (run_dir / "summary.md").read_text()
    assert "Grouped 3-fold cross-validation" in summary and "±" in summary
    symmetry = study["grouped"]["test_time_symmetry"]
    assert symmetry["n_test"] == study["grouped"]["split"]["n_test"]
    assert 0 <= symmetry["accuracy_d4"] <= 1 and symmetry["seconds_d4"] > symmetry["seconds_none"]
    # Both checks ran at the study's precision (fp32 here, bf16 where native with auto).
    assert symmetry["precision"] == study["frame_check"]["precision"] == "fp32"
    assert "Test-time symmetry" in summary
    html = (run_dir / "report.html").read_text()
    # The report opens with the run's settings, the CPU among them.
    assert html.index("Run settings") < html.index("Evaluation: random versus grouped")
    assert study["run"]["machine"] in html and "cores" in study["run"]["machine"]
    assert "Grouped 3-fold cross-validation" in (run_dir / "report.html").read_text()


def test_cluster_outputs_compare_with_raw_pixels(run_dir):
    report = json.loads((run_dir / "cluster" / "cluster.json").read_text())
    for key in ("learned", "raw_pixels"):
        assert {"k", "ari", "nmi", "silhouette"} <= set(report[key])
        assert 2 <= report[key]["k"] <= 4
    rows = (run_dir / "cluster" / "clusters.csv").read_text().splitlines()
    assert rows[0].startswith("item,cluster,pc1") and len(rows) == 1 + 16
    for name in ("silhouette", "pca", "montage"):
        assert (run_dir / "cluster" / f"{name}.png").stat().st_size > 1000


def test_roi_cli_json(run_dir):
    rois = json.loads((run_dir / "rois.json").read_text())
    assert len(rois) <= 3
    for roi in rois:
        assert 0 <= roi["center_norm"][0] <= 1 and 0 <= roi["center_norm"][1] <= 1
        assert roi["unit"] == "nm"
        assert roi["center_calibrated"][0] == pytest.approx(roi["center"][0] * 0.05)
        y0, x0, y1, x1 = roi["bbox"]
        assert roi["size_calibrated"] == pytest.approx([(y1 - y0) * 0.05, (x1 - x0) * 0.05])


def _chromium() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    html = (run_dir / "report.html").read_text()
    n_images = html.count("<img ")
    assert n_images >= 8 and "data:image/png;base64," in html
    assert 'src="http' not in html  # self-contained
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    probe = tmp_path / "probe.html"
    probe.write_text(
        html.replace(
            "</body>",
            "<script>window.addEventListener('load', () => { const i = [...document.images];"
            " document.body.dataset.images = i.length + ':' +"
            " i.filter(x => x.complete && x.naturalWidth > 0).length; });</script></body>",
        )
    )
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'data-images="(\d+):(\d+)"', out.stdout)
    assert match, out.stderr[-2000:]
    total, loaded = map(int, match.groups())
    assert total == n_images and loaded == total


def test_cluster_frame_windows(run_dir, tmp_path):
    frame_path = run_dir.parent / "frame.tif"
    out = tmp_path / "frame_clusters"
    assert (
        main(
            [
                "cluster",
                str(frame_path),
                "--model",
                str(run_dir / "model"),
                "--out",
                str(out),
                "--k-max",
                "3",
                "--stride",
                "16",
                "--backend",
                "torch",
                "--pixel-size",
                "0.05",
            ]
        )
        == 0
    )
    report = json.loads((out / "cluster.json").read_text())
    assert report["kind"] == "frame" and 2 <= report["learned"]["k"] <= 3
    assert report["calibration"] == {"scale": [0.05, 0.05], "offset": [0.0, 0.0], "unit": "nm"}
    rows = list(csv.DictReader((out / "clusters.csv").open()))
    assert len(rows) == len(window_origins((128, 128), 64, 16)) == report["n_items"]
    for row in rows:
        assert float(row["cy"]) == int(row["row"]) + 31.5
        assert float(row["cx_nm"]) == pytest.approx(float(row["cx"]) * 0.05)
    assert (out / "cluster_map.png").read_bytes()[:4] == b"\x89PNG"


def test_a_region_covering_most_of_the_frame_is_not_an_roi():
    grid = np.ones((6, 6), int)
    grid[0, :] = 0  # 30 of 36 windows are "defect": the model calls the frame a defect
    grid[5, 5] = 0
    emb = np.random.default_rng(2).normal(size=(6, 6, 4)).astype(np.float32)
    result = _map(grid, emb)
    (region,) = result.regions()
    assert region["frame_fraction"] == pytest.approx(29 / 36)
    assert select_rois(result, top=3) == []
    assert len(select_rois(result, top=3, max_frame_fraction=0.9)) == 1


def test_share_of_a_class_mapped_outside_its_crops():
    from defectscope.studies.frame_check import outside_crop_extent

    grid = np.zeros((6, 6), int)
    grid[0:2, 0:2] = 1  # where the class's crops were cut
    grid[5, 5] = 1  # far away: a false alarm
    result = _map(grid, np.zeros((6, 6, 4), np.float32))
    crops = np.array([[0, 0], [16, 16], [-1, -1]])  # the last crop was not found
    report = outside_crop_extent(result, crops, np.array([1, 1, 1]))
    assert report["A"] == {"windows": 5, "outside": 1 / 36, "outside_known": 1 / 36}
    result.unknown = np.zeros((6, 6), bool)
    result.unknown[5, 5] = True
    assert outside_crop_extent(result, crops, np.array([1, 1, 1]))["A"]["outside_known"] == 0
