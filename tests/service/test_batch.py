"""Batch mapping on a Dask LocalCluster (loopback only): equal to serial maps, resumable.

The ``test_issue25_*`` tests are the archive findings of issue 25 (each failed before
the batch mapper was split into ``service/batch_*.py``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import signal
import stat
import threading
import time

import numpy as np
import pytest
import tifffile

from defectscope.maps.detector import Detector
from defectscope.maps.result import windows_csv
from tests.synthetic import lattice

distributed = pytest.importorskip("distributed", reason="Dask is the optional 'scale' extra")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow comes with the 'scale' extra")

from defectscope.maps.options import MapOptions  # noqa: E402
from defectscope.service.batch import (  # noqa: E402
    artifact_files,
    artifact_hash,
    find_sources,
    keyed_sources,
    output_folder,
    run_batch,
)


def _frames(folder, n, size=128):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        vacancy = [(4 + i % 3, 5), (4 + i % 3, 6), (5 + i % 3, 5), (5 + i % 3, 6)]
        frame = (lattice((size, size), vacancies=vacancy, seed=40 + i) * 200).clip(0, 255)
        path = folder / ("sub" if i % 2 else "") / f"frame{i}.tif"
        path.parent.mkdir(exist_ok=True)
        tifffile.imwrite(path, frame.astype(np.uint8))
        paths.append(path)
    return paths


def _windows(text):
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        yield cluster


def test_batch_equals_serial_maps_and_reruns_nothing(onnx_artifact, tmp_path, cluster):
    good = _frames(tmp_path / "data", 4)
    (tmp_path / "data" / "broken.tif").write_bytes(b"not a tiff at all")
    np.save(tmp_path / "data" / "tiny.npy", np.zeros((16, 16), np.float32))
    (tmp_path / "data" / "notes.txt").write_text("not a frame: never picked from a folder")
    out = tmp_path / "out"
    rows = run_batch(
        [tmp_path / "data"],
        onnx_artifact,
        out,
        stride=16,
        top=3,
        scheduler=cluster.scheduler_address,
        progress=False,
    )
    assert len(rows) == 6
    by_name = {os.path.basename(r["file"]): r for r in rows}
    assert (
        by_name["broken.tif"]["status"] == "error"
        and "broken.tif" in by_name["broken.tif"]["error"]
    )
    assert by_name["tiny.npy"]["status"] == "error" and "16" in by_name["tiny.npy"]["error"]
    with Detector.load(onnx_artifact, backend="onnxruntime") as det:
        for path in good:
            row = by_name[path.name]
            assert row["status"] == "ok", row
            frame = tifffile.imread(path)
            reference = det.map(frame, stride=16)
            key = path.relative_to(tmp_path / "data").as_posix()
            folder = output_folder(out, key)
            assert row["key"] == key and row["output"] == str(folder)
            got, want = (
                _windows((folder / "windows.csv").read_text()),
                _windows(windows_csv(reference)),
            )
            assert [w["label"] for w in got] == [w["label"] for w in want]
            assert row["n_regions"] == len(reference.regions())
            regions = json.loads((folder / "regions.json").read_text())
            assert [r["bbox"] for r in regions] == [r["bbox"] for r in reference.regions()]
            assert (folder / "overlay.png").stat().st_size > 0
            assert len(json.loads((folder / "rois.json").read_text())) <= 3
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert sorted(r["file"] for r in index) == sorted(r["file"] for r in rows)
    with open(out / "index.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 6
    # A rerun with the same options maps nothing that is done and retries what failed.
    again = run_batch(
        [tmp_path / "data"],
        onnx_artifact,
        out,
        options=MapOptions(stride=16, top_k=3),
        scheduler=cluster.scheduler_address,
        progress=False,
    )
    statuses = {os.path.basename(r["file"]): r["status"] for r in again}
    assert all(statuses[p.name] == "skipped" for p in good)
    assert statuses["broken.tif"] == "error"
    # A changed file is mapped again (its content hash changed).
    tifffile.imwrite(good[0], np.flipud(tifffile.imread(good[0])))
    third = run_batch(
        [good[0]], onnx_artifact, out, top=3, scheduler=cluster.scheduler_address, progress=False
    )
    assert third[0]["status"] == "ok"


def test_a_killed_worker_loses_no_frame(onnx_artifact, tmp_path, cluster):
    paths = _frames(tmp_path / "data", 10, size=256)
    out = tmp_path / "out"
    client = distributed.Client(cluster.scheduler_address)
    pids = list(client.run(os.getpid).values())
    client.close()

    def kill_when_first_frame_is_done():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                finished = list(out.rglob("done.json"))
            except FileNotFoundError:  # a staging folder renamed while the walk was in it
                finished = []
            if finished:
                os.kill(pids[0], signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_first_frame_is_done)
    killer.start()
    rows = run_batch(
        [tmp_path / "data"],
        onnx_artifact,
        out,
        scheduler=cluster.scheduler_address,
        progress=False,
    )
    killer.join()
    assert sorted(r["file"] for r in rows) == sorted(str(p.resolve()) for p in paths)
    # A frame the killed worker finished but whose result died with it is rerun by Dask
    # and finds its done.json: "skipped", its outputs complete, nothing mapped twice.
    statuses = [r["status"] for r in rows]
    assert set(statuses) <= {"ok", "skipped"}, [r["error"] for r in rows]
    assert statuses.count("skipped") <= 1, statuses
    done = [json.loads(p.read_text()) for p in out.rglob("done.json")]
    assert len(done) == 10 and all(d["status"] == "ok" for d in done)
    assert not [p for p in out.rglob("*") if ".staging-" in p.name]
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # the worker really was killed


def test_local_cluster_route_through_the_cli(onnx_artifact, tmp_path, capsys):
    from defectscope.cli import main

    paths = _frames(tmp_path / "data", 2)
    found = find_sources([tmp_path / "data", str(tmp_path / "data" / "*.tif")])
    assert found == sorted(p.resolve() for p in paths)
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_sources([tmp_path / "missing"])
    out = tmp_path / "out"
    args = ["batch", str(tmp_path / "data"), "--model", str(onnx_artifact), "--out", str(out)]
    assert main([*args, "--workers", "1"]) == 0
    assert "2 files: 2 mapped, 0 already done, 0 errors" in capsys.readouterr().out
    assert [r["status"] for r in pq.read_table(out / "index.parquet").to_pylist()] == ["ok"] * 2
    assert main([*args, "--workers", "0"]) == 1  # one error line, nothing started
    assert "workers must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize(("height", "band", "bands"), [(300, 96, 3), (200, 64, 3), (260, 128, 2)])
def test_map_overlap_bands_equal_one_map(density_model_dir, cluster, height, band, bands):
    """Bands of a frame across workers give the windows and regions of one map."""
    from defectscope.service.batch import map_large_frame

    vacancy = [(20, 9), (20, 10), (21, 9), (21, 10), (3, 3), (3, 4), (4, 3), (4, 4)]
    frame = (lattice((height, 200), vacancies=vacancy, seed=5) * 200).clip(0, 255)
    frame = frame.astype(np.uint8)
    frame[:, 150:] = np.random.default_rng(1).integers(0, 255, (height, 50))  # unknown part
    with Detector.load(density_model_dir, backend="torch") as det:
        reference = det.map(frame, stride=16)
    with distributed.Client(cluster.scheduler_address) as client:
        result = map_large_frame(
            frame, density_model_dir, client, stride=16, band=band, backend="torch"
        )
    # The remainder shorter than a patch joins the last band, which holds the bottom edge.
    assert result.timing_ms["bands"] == bands
    assert result.info["novelty"] == reference.info["novelty"] == ["embedding"]
    np.testing.assert_allclose(result.embeddings, reference.embeddings, atol=1e-4)
    np.testing.assert_array_equal(result.unknown, reference.unknown)
    assert_regions_agree(result, reference)


def test_bands_keep_the_density_s_frame_check(density_model_dir, cluster, tmp_path):
    """With another source judging the windows, band maps carry the embedding density's
    frame check as one map does (read from the embeddings the bands return)."""
    from defectscope.artifacts.residual_density import fit_residual_density
    from defectscope.maps.options import MapOptions
    from defectscope.service.batch import map_large_frame
    from tests.conftest import acquisition_patches

    model = tmp_path / "model"
    shutil.copytree(density_model_dir, model)
    train, held = acquisition_patches(24, seed=0), acquisition_patches(12, seed=1)
    residual = fit_residual_density(train.images, train.labels, 2, held.images)
    record = json.loads((model / "model.json").read_text())
    record["residual_density"] = residual.to_dict()
    (model / "model.json").write_text(json.dumps(record))
    frame = (lattice((260, 200), seed=5) * 200).clip(0, 255).astype(np.uint8)
    frame[:, 120:] = np.random.default_rng(1).integers(0, 255, (260, 80))  # unknown part
    options = MapOptions(stride=16, novelty="residual")
    with Detector.load(model, backend="torch") as det:
        reference = det.map(frame, stride=16, novelty="residual")
        embedding = det.map(frame, stride=16, novelty="embedding")
    with distributed.Client(cluster.scheduler_address) as client:
        result = map_large_frame(frame, model, client, band=128, backend="torch", options=options)
    assert result.info["novelty"] == reference.info["novelty"] == ["lattice residual"]
    assert result.info["ood_check"] == reference.info["ood_check"] == "embedding density"
    np.testing.assert_array_equal(result.frame_unknown, reference.frame_unknown)
    np.testing.assert_array_equal(result.frame_unknown, embedding.unknown)
    assert result.frame_unknown.any()  # the noise part: the check has something to see
    assert result.out_of_distribution == reference.out_of_distribution


def assert_regions_agree(got, want) -> None:
    """Two maps of the same windows: labels and unknown flags equal, probabilities and
    uncertainty within float32 rounding; regions equal by label, windows and bbox, their
    scores within the bounds the per-window differences of the two maps allow.

    Worker processes and CPU kinds (AVX2, AVX-512, AMX) round the network differently,
    so probabilities and uncertainty differ in the last digits; a region's score (a mean
    over its windows) then differs by at most the largest window difference, and its
    weighted centroid by at most its extent times the summed weight differences over
    its weight. Regions are matched by (unknown, bbox, label), not by their order: two
    regions of nearly equal scores may be listed either way.
    """
    np.testing.assert_array_equal(got.origins, want.origins)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.unknown_mask, want.unknown_mask)
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=0, atol=1e-5)
    if want.uncertainty is not None:
        # A distance of the embedding: float32 rounding, relative to its size.
        np.testing.assert_allclose(got.uncertainty, want.uncertainty, rtol=1e-3, atol=1e-6)
    d_defect = float(np.abs(got.defect_probability - want.defect_probability).max())
    d_uncertainty = (
        float(np.abs(got.uncertainty - want.uncertainty).max())
        if want.uncertainty is not None
        else 0.0
    )
    eps = 1e-9  # float64 sums of float32 values in another order

    def exact(region):
        return (
            bool(region.get("unknown")),
            tuple(region["bbox"]),
            region["label"],
            region["n_windows"],
            region.get("nearest_class"),
        )

    got_regions = sorted(got.regions(), key=exact)
    want_regions = sorted(want.regions(), key=exact)
    assert [exact(r) for r in got_regions] == [exact(r) for r in want_regions]
    height, width = want.frame_shape
    for g, w in zip(got_regions, want_regions, strict=True):
        assert g["frame_fraction"] == w["frame_fraction"]
        unknown = bool(w.get("unknown"))
        d_score = d_uncertainty if unknown else d_defect
        assert abs(g["score"] - w["score"]) <= d_score + eps, (g, w)
        if "uncertainty" in w:
            assert abs(g["uncertainty"] - w["uncertainty"]) <= d_uncertainty + eps, (g, w)
        y0, x0, y1, x1 = w["bbox"]
        weight = w["score"] * w["n_windows"]
        if unknown or weight <= 1e-6:
            d_centroid = eps  # plain mean of window centres
        else:
            d_centroid = max(y1 - y0, x1 - x0) * w["n_windows"] * d_score / weight + eps
        np.testing.assert_allclose(g["centroid"], w["centroid"], rtol=0, atol=d_centroid)
        scale = d_centroid / min(height, width)
        np.testing.assert_allclose(g["centroid_norm"], w["centroid_norm"], rtol=0, atol=scale)


def test_map_overlap_bands_take_the_background_asked_for(density_model_dir, cluster):
    """--background reaches every band: the regions are those of one map with it."""
    from defectscope.service.batch import map_large_frame

    frame = (lattice((200, 160), vacancies=[(10, 9), (10, 10)], seed=6) * 200).clip(0, 255)
    frame = frame.astype(np.uint8)
    with Detector.load(density_model_dir, backend="torch", background="Vacancy") as det:
        reference = det.map(frame, stride=16)
    with distributed.Client(cluster.scheduler_address) as client:
        result = map_large_frame(
            frame, density_model_dir, client, stride=16, band=96, backend="torch",
            background="Vacancy",
        )  # fmt: skip
    assert result.background == "Vacancy"
    np.testing.assert_array_equal(result.labels, reference.labels)
    got, want = result.regions(), reference.regions()
    assert [(r["label"], r["bbox"], r["n_windows"]) for r in got] == [
        (r["label"], r["bbox"], r["n_windows"]) for r in want
    ]
    for g, w in zip(got, want, strict=True):  # worker processes may round differently
        np.testing.assert_allclose(g["centroid"], w["centroid"], atol=1e-4)


def test_map_overlap_refuses_bad_bands(onnx_artifact):
    from defectscope.service.batch import map_large_frame

    frame = np.zeros((200, 200), np.uint8)
    for band in (40, 100, True):
        with pytest.raises(ValueError, match="band must be a multiple"):
            map_large_frame(frame, onnx_artifact, stride=16, band=band)


def test_batch_maps_a_large_frame_in_bands(onnx_artifact, tmp_path, cluster):
    frame = (lattice((400, 256), vacancies=[(30, 9), (30, 10)], seed=9) * 200).clip(0, 255)
    path = tmp_path / "big.npy"
    np.save(path, frame.astype(np.uint8))

    def batch():
        return run_batch(
            [path],
            onnx_artifact,
            tmp_path / "out",
            scheduler=cluster.scheduler_address,
            large_pixels=256 * 256,
            band=128,
            progress=False,
        )

    rows = batch()
    assert rows[0]["status"] == "ok", rows[0]
    with Detector.load(onnx_artifact, backend="onnxruntime") as det:
        reference = det.map(frame.astype(np.uint8), stride=16)
    folder = output_folder(tmp_path / "out", "big.npy")
    regions = json.loads((folder / "regions.json").read_text())
    assert [r["bbox"] for r in regions] == [r["bbox"] for r in reference.regions()]
    assert rows[0]["n_windows"] == reference.labels.size
    assert batch()[0]["status"] == "skipped"


def _map_result(rng, grid=(8, 8), scale=0.0):
    """A synthetic two-class map with a density: a defect blob and an unknown blob."""
    from defectscope.maps.result import MapResult

    rows, cols = grid
    vacancy = np.full(grid, 0.1)
    vacancy[2:4, 2:5] = 0.9
    probabilities = np.stack([1 - vacancy, vacancy], axis=-1).astype(np.float32)
    uncertainty = np.full(grid, 0.3, np.float32)
    uncertainty[5:7, 5:7] = 0.95
    if scale:  # another CPU's rounding: differences up to ``scale`` (uncertainty: relative)
        probabilities = probabilities + rng.uniform(-scale, scale, probabilities.shape) / 6
        uncertainty = uncertainty * (1 + rng.uniform(-scale, scale, grid))
    yy, xx = np.mgrid[0:rows, 0:cols] * 16
    return MapResult(
        origins=np.stack([yy.ravel(), xx.ravel()], axis=1),
        grid_shape=grid,
        probabilities=probabilities.astype(np.float32),
        embeddings=np.zeros((rows, cols, 4), np.float32),
        classes=["Bulk", "Vacancy"],
        background="Bulk",
        frame_shape=(rows * 16 + 48, cols * 16 + 48),
        patch_size=64,
        timing_ms={"total": 0.0},
        uncertainty=uncertainty.astype(np.float32),
        unknown=uncertainty > 0.9,
    )


def test_issue25_14_regions_compared_within_the_rounding_of_their_windows():
    """Finding 14: maps that differ by float32 rounding (another CPU kind) have regions
    that are not equal as floats, yet agree by label, windows and bbox; a real
    difference (a score off by 0.05, a window more) is still caught."""
    rng = np.random.default_rng(0)
    want = _map_result(rng)
    got = _map_result(rng, scale=3e-5)  # 0.340443 against 0.340454 on Intel AMX
    assert got.regions() != want.regions()  # what the exact comparison did
    assert_regions_agree(got, want)
    worse = _map_result(rng)
    worse.probabilities[2:4, 2:5, 1] -= 0.05
    worse.probabilities[2:4, 2:5, 0] += 0.05
    bigger = _map_result(rng)
    bigger.probabilities[4, 2] = (0.2, 0.8)
    for wrong in (worse, bigger):
        with pytest.raises(AssertionError):
            assert_regions_agree(wrong, want)


def test_issue25_2_artifact_hash_covers_everything_a_run_loads(tmp_path):
    """Finding 2: ``--model DIR/model.onnx`` loads ``DIR/dense/`` and checks the model
    against ``DIR/model.json``/``weights.pt``: all of it is hashed, nothing else."""
    folder = tmp_path / "model"
    (folder / "dense" / ".dense.staging-1-ab").mkdir(parents=True)
    for name in ("model.onnx", "model.onnx.json", "model.json", "weights.pt", "other.onnx"):
        (folder / name).write_bytes(name.encode())
    (folder / "dense" / "dense32.onnx").write_bytes(b"graph")
    (folder / "dense" / "dense.json").write_text("{}")
    (folder / "dense" / ".dense.staging-1-ab" / "half.onnx").write_bytes(b"half made")
    names = [name for name, _ in artifact_files(folder / "model.onnx")]
    assert names == [
        "dense/dense.json",
        "dense/dense32.onnx",
        "model.json",
        "model.onnx",
        "model.onnx.json",
        "weights.pt",
    ]
    before = artifact_hash(folder / "model.onnx")
    for name in ("dense/dense32.onnx", "dense/dense.json", "model.json", "weights.pt"):
        path = folder / name
        content = path.read_bytes()
        path.write_bytes(content + b" changed")
        assert artifact_hash(folder / "model.onnx") != before, name
        path.write_bytes(content)
    assert artifact_hash(folder / "model.onnx") == before
    (folder / "other.onnx").write_bytes(b"another model, not loaded")
    (folder / "dense" / ".dense.staging-1-ab" / "half.onnx").write_bytes(b"still half")
    assert artifact_hash(folder / "model.onnx") == before
    (folder / "dense" / "dense16.onnx").write_bytes(b"a new graph")
    assert artifact_hash(folder / "model.onnx") != before
    # A model directory: every visible file in it, dense/ included.
    assert "dense/dense32.onnx" in [name for name, _ in artifact_files(folder)]
    with pytest.raises(FileNotFoundError, match="model artifact not found"):
        artifact_hash(tmp_path / "missing.onnx")


def test_issue25_2_rerun_maps_again_when_dense_beside_the_model_changed(
    onnx_artifact, tmp_path, cluster
):
    """Finding 2: after ``dense/`` beside ``model.onnx`` changed, a rerun maps again."""
    model = tmp_path / "model"
    (model / "dense").mkdir(parents=True)
    shutil.copy(onnx_artifact, model / "model.onnx")
    (model / "dense" / "dense.json").write_text('{"agreement": 0.99}\n')
    _frames(tmp_path / "data", 1)

    def batch():
        rows = run_batch(
            [tmp_path / "data"],
            model / "model.onnx",
            tmp_path / "out",
            scheduler=cluster.scheduler_address,
            progress=False,
        )
        return [r["status"] for r in rows]

    assert batch() == ["ok"]
    assert batch() == ["skipped"]
    (model / "dense" / "dense.json").write_text('{"agreement": 0.02}\n')
    assert batch() == ["ok"]


def test_issue25_5_same_name_and_content_in_two_folders(onnx_artifact, tmp_path, cluster):
    """Finding 5: ``a.npy`` and ``sub/a.npy`` alike are two rows keyed by their relative
    paths, each mapped once into its own folder; skipped rows name their own file."""
    frame = (lattice((128, 128), vacancies=[(5, 5), (5, 6)], seed=3) * 200).clip(0, 255)
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    np.save(data / "a.npy", frame.astype(np.uint8))
    shutil.copy(data / "a.npy", data / "sub" / "a.npy")
    out = tmp_path / "out"

    def batch():
        return run_batch(
            [data], onnx_artifact, out, scheduler=cluster.scheduler_address, progress=False
        )

    first = batch()
    assert [(r["key"], r["file"], r["status"]) for r in first] == [
        ("a.npy", str((data / "a.npy").resolve()), "ok"),
        ("sub/a.npy", str((data / "sub" / "a.npy").resolve()), "ok"),
    ]
    assert {r["output"] for r in first} == {
        str(output_folder(out, "a.npy")),
        str(output_folder(out, "sub/a.npy")),
    }
    again = batch()
    assert [(r["key"], r["file"], r["status"]) for r in again] == [
        ("a.npy", str((data / "a.npy").resolve()), "skipped"),
        ("sub/a.npy", str((data / "sub" / "a.npy").resolve()), "skipped"),
    ]
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [(r["key"], r["file"]) for r in index] == [(r["key"], r["file"]) for r in again]
    records = sorted(json.loads(p.read_text())["key"] for p in out.rglob("done.json"))
    assert records == ["a.npy", "sub/a.npy"]


def test_issue25_6_deleted_or_changed_outputs_are_rebuilt(onnx_artifact, tmp_path, cluster):
    """Finding 6: every output a frame should have exists and matches its record, or
    the frame is mapped again; the options are recorded, and new options remap."""
    paths = _frames(tmp_path / "data", 4)
    out = tmp_path / "out"

    def batch(**options):
        rows = run_batch(
            [tmp_path / "data"],
            onnx_artifact,
            out,
            scheduler=cluster.scheduler_address,
            progress=False,
            **options,
        )
        return {r["key"]: r for r in rows}

    first = batch(top=3)
    keys = [p.relative_to(tmp_path / "data").as_posix() for p in paths]
    assert [first[k]["status"] for k in keys] == ["ok"] * 4
    want_options = MapOptions(top_k=3).to_json()
    assert all(json.loads(first[k]["options"]) == want_options for k in keys)
    folders = [output_folder(out, k) for k in keys]
    record = json.loads((folders[0] / "done.json").read_text())
    expected = {"windows.csv", "regions.json", "map.json", "overlay.png", "confidence.png"}
    expected |= {"rois.json"}
    assert (
        set(record["outputs"]) == expected == {p.name for p in folders[0].iterdir()} - {"done.json"}
    )
    kept = {name: (folders[1] / name).read_bytes() for name in expected}
    (folders[0] / "windows.csv").unlink()
    (folders[1] / "overlay.png").unlink()
    (folders[2] / "regions.json").write_text("[]\n")  # there, but not what was recorded
    again = batch(top=3)
    assert [again[k]["status"] for k in keys] == ["ok", "ok", "ok", "skipped"]
    for folder in folders[:3]:
        assert {p.name for p in folder.iterdir()} == expected | {"done.json"}
    # The rebuilt outputs are those of the first map (same file, model and options).
    assert {name: (folders[1] / name).read_bytes() for name in ("windows.csv", "rois.json")} == {
        name: kept[name] for name in ("windows.csv", "rois.json")
    }
    assert json.loads((folders[2] / "regions.json").read_text()) != []
    assert [r["status"] for r in batch(top=3).values()] == ["skipped"] * 4
    # Other options are another map: all frames again, the new options recorded.
    changed = batch(top=2)
    assert [changed[k]["status"] for k in keys] == ["ok"] * 4
    assert json.loads(changed[keys[0]]["options"])["top_k"] == 2
    assert len(json.loads((folders[0] / "rois.json").read_text())) <= 2


def test_issue25_7_the_output_folder_is_never_an_input(onnx_artifact, tmp_path, cluster):
    """Finding 7: ``batch IN --out IN`` maps IN's frames and never its own outputs, on
    every rerun; ``--out IN/maps`` reruns like any other output folder."""
    paths = _frames(tmp_path / "data", 2)
    data = tmp_path / "data"
    keys = sorted(p.relative_to(data).as_posix() for p in paths)

    def batch(out):
        rows = run_batch(
            [data], onnx_artifact, out, scheduler=cluster.scheduler_address, progress=False
        )
        return [(r["key"], r["status"]) for r in rows]

    assert batch(data) == [(k, "ok") for k in keys]
    assert len(list((data / "frames").rglob("overlay.png"))) == 2
    assert batch(data) == [(k, "skipped") for k in keys]
    assert batch(data) == [(k, "skipped") for k in keys]
    assert len(list((data / "frames").rglob("overlay.png"))) == 2
    assert batch(data / "maps") == [(k, "ok") for k in keys]
    assert batch(data / "maps") == [(k, "skipped") for k in keys]
    assert not list((data / "maps").rglob("maps"))  # no output folder within outputs


def test_issue25_7_sources_leave_out_what_the_run_writes(tmp_path):
    data = tmp_path / "data"
    frames = [data / "a.tif", data / "sub" / "b.npy"]
    outputs = [data / "frames" / "a.tif" / "overlay.png", data / "maps" / "frames" / "x.png"]
    for path in frames + outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (data / "maps" / "notes.tif").write_bytes(b"x")
    # --out IN: its frames are inputs, what the run writes there is not.
    assert find_sources([data], out=data) == sorted(
        [p.resolve() for p in frames]
        + [(data / "maps" / "frames" / "x.png").resolve(), (data / "maps" / "notes.tif").resolve()]
    )
    # --out IN/maps: nothing under IN/maps is an input.
    assert find_sources([data], out=data / "maps") == sorted(
        [p.resolve() for p in frames] + [outputs[0].resolve()]
    )
    assert find_sources([str(data / "**" / "*.png")], out=data / "maps") == [outputs[0].resolve()]
    with pytest.raises(ValueError, match="output"):
        find_sources([outputs[1]], out=data / "maps")
    with pytest.raises(ValueError, match="output folder"):
        find_sources([data / "maps" / "frames"], out=data / "maps")
    # The output folder named as the input folder is ``batch IN --out IN``.
    assert find_sources([data / "maps"], out=data / "maps") == [
        (data / "maps" / "notes.tif").resolve()
    ]
    # A frame's output folder of another run (it holds done.json) is not searched.
    (data / "old" / "a.tif").mkdir(parents=True)
    (data / "old" / "a.tif" / "overlay.png").write_bytes(b"x")
    (data / "old" / "a.tif" / "done.json").write_text("{}")
    assert find_sources([data / "old"]) == []
    keyed = keyed_sources([data / "sub", data / "a.tif"])
    assert [(s.key, s.path) for s in keyed] == [
        ("a.tif", frames[0].resolve()),
        ("sub/b.npy", frames[1].resolve()),
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"stride": 0}, "stride must be a positive integer"),
        ({"top": -1}, "top must be a positive integer"),
        ({"unknown": "maybe"}, "unknown must be one of"),
        ({"background": ""}, "background must be a class name"),
        ({"options": MapOptions(stride=32), "stride": 16}, "differs from options.stride"),
        ({"workers": 0}, "workers must be a positive integer"),
        ({"band": 100}, "band must be a multiple of the stride"),
        ({"large_pixels": 0}, "large_pixels must be a positive integer"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"frame_index": -1}, "frame must be an integer"),
    ],
)
def test_issue25_13_bad_options_refused_before_a_cluster_starts(
    onnx_artifact, tmp_path, monkeypatch, settings, message
):
    """Finding 13: ``batch --stride 0`` (and any bad setting) is one clear error before
    a cluster starts, not a cluster that refuses every file."""

    def no_cluster(*args, **kwargs):
        raise AssertionError("a Dask cluster was started")

    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    monkeypatch.setattr(distributed, "Client", no_cluster)
    _frames(tmp_path / "data", 1)
    with pytest.raises(ValueError, match=message):
        run_batch([tmp_path / "data"], onnx_artifact, tmp_path / "out", progress=False, **settings)
    assert not (tmp_path / "out").exists()


def test_issue25_13_refuses_outputs_in_the_model_directory(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "LocalCluster", None)
    _frames(tmp_path / "data", 1)
    with pytest.raises(ValueError, match="lies in the model directory"):
        run_batch([tmp_path / "data"], model_dir, model_dir / "maps", progress=False)
    assert not (model_dir / "maps").exists()


def test_issue25_13_dask_logs_quiet_unless_verbose(onnx_artifact, tmp_path, cluster, caplog):
    """Finding 13: Dask's INFO lines (scheduler, client connections) only with ``verbose``.

    Quiet on a cluster of the run's own (closed within the run); verbose on the test's
    cluster, whose scheduler runs in this process.
    """
    _frames(tmp_path / "data", 1)

    def dask_info(scheduler, verbose):
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            run_batch(
                [tmp_path / "data"],
                onnx_artifact,
                tmp_path / "out",
                scheduler=scheduler,
                workers=1 if scheduler == "local" else None,
                progress=False,
                verbose=verbose,
            )
        return [
            r.getMessage()
            for r in caplog.records
            if r.name.split(".")[0] in ("distributed", "dask") and r.levelno < logging.WARNING
        ]

    assert dask_info("local", verbose=False) == []
    assert dask_info(cluster.scheduler_address, verbose=True)


def test_issue25_13_outputs_take_the_umask_modes(onnx_artifact, tmp_path, cluster):
    """Files and folders a run makes have the umask's modes (0644/0755 by default), not
    the 0600/0700 of a temporary file or folder."""
    _frames(tmp_path / "data", 2)
    out = tmp_path / "out"
    rows = run_batch(
        [tmp_path / "data"], onnx_artifact, out, scheduler=cluster.scheduler_address, progress=False
    )
    assert [r["status"] for r in rows] == ["ok", "ok"]
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == want, f"{path}: {oct(mode)}, expected {oct(want)}"
