"""Batch mapping on a Dask LocalCluster (loopback only): equal to serial maps, resumable."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
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

from defectscope.service.batch import file_hash, find_sources, output_folder, run_batch  # noqa: E402


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
            folder = output_folder(out, path.resolve(), file_hash(path))
            assert row["output"] == str(folder)
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
    # A rerun maps nothing that is done and retries what failed.
    again = run_batch(
        [tmp_path / "data"],
        onnx_artifact,
        out,
        scheduler=cluster.scheduler_address,
        progress=False,
    )
    statuses = {os.path.basename(r["file"]): r["status"] for r in again}
    assert all(statuses[p.name] == "skipped" for p in good)
    assert statuses["broken.tif"] == "error"
    # A changed file is mapped again (its content hash changed).
    tifffile.imwrite(good[0], np.flipud(tifffile.imread(good[0])))
    third = run_batch(
        [good[0]], onnx_artifact, out, scheduler=cluster.scheduler_address, progress=False
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
            if list(out.glob("frames/*/done.json")):
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
    done = [json.loads(p.read_text()) for p in out.glob("frames/*/done.json")]
    assert len(done) == 10 and all(d["status"] == "ok" for d in done)
    assert not list(out.glob("frames/.*staging*"))
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
    np.testing.assert_array_equal(result.origins, reference.origins)
    np.testing.assert_array_equal(result.labels, reference.labels)
    np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=1e-5)
    np.testing.assert_allclose(result.embeddings, reference.embeddings, atol=1e-4)
    np.testing.assert_array_equal(result.unknown, reference.unknown)
    assert result.regions() == reference.regions()


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
    folder = output_folder(tmp_path / "out", path.resolve(), file_hash(path))
    regions = json.loads((folder / "regions.json").read_text())
    assert [r["bbox"] for r in regions] == [r["bbox"] for r in reference.regions()]
    assert rows[0]["n_windows"] == reference.labels.size
    assert batch()[0]["status"] == "skipped"
