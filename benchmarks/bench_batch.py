"""Archive throughput: serial maps in a loop versus ``defectscope batch`` on Dask.

A folder of synthetic 1024^2 uint16 frames (64 by default,
``DEFECTSCOPE_BENCH_BATCH_FRAMES``) is mapped at stride 32 with the INT8 ONNX model,
each frame with its full outputs (windows.csv, regions.json, rois.json, overlay,
confidence): serially in this process (``map_file`` in a loop, one engine with every
core), and by ``run_batch`` on a LocalCluster of 1 and 2 worker processes (engine
threads = cores // workers), cluster start-up included.

Run::

    .venv/bin/python -m pytest benchmarks/bench_batch.py \\
        --benchmark-json=benchmarks/results/batch.json
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from benchmarks.frames import stem_frame

N_FRAMES = int(os.environ.get("DEFECTSCOPE_BENCH_BATCH_FRAMES", "64"))
STRIDE = 32


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    frame = stem_frame(1024)
    for i in range(N_FRAMES):
        # Distinct content (and so distinct hashes), same work per frame.
        np.save(folder / f"frame{i:03d}.npy", np.roll(frame, 8 * i, axis=1))
    return folder


@pytest.mark.parametrize("mode", ["serial", "batch-1-worker", "batch-2-workers"])
def test_archive_throughput(benchmark, bench_model, archive, tmp_path, mode):
    pytest.importorskip("distributed", reason="Dask is the optional 'scale' extra")
    from defectscope.service.batch import artifact_hash, clear_detectors, map_file, run_batch

    artifact = str(bench_model / "model.int8.onnx")
    files = sorted(str(p) for p in archive.glob("*.npy"))
    out = tmp_path / "out"
    benchmark.group = f"archive of {N_FRAMES} frames 1024^2, stride {STRIDE}"

    def serial():
        digest = artifact_hash(artifact)
        return [map_file(f, str(out), artifact, digest, stride=STRIDE, threads=0) for f in files]

    def batch(workers):
        return run_batch([archive], artifact, out, stride=STRIDE, workers=workers, progress=False)

    def setup():
        shutil.rmtree(out, ignore_errors=True)

    run = serial if mode == "serial" else (lambda: batch(1 if "1-worker" in mode else 2))
    rows = benchmark.pedantic(run, setup=setup, rounds=1)
    assert len(rows) == N_FRAMES and all(r["status"] == "ok" for r in rows)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        frames=N_FRAMES,
        frames_per_s=N_FRAMES / seconds,
        mean_map_ms=float(np.mean([r["map_ms"] for r in rows])),
        mean_total_ms=float(np.mean([r["total_ms"] for r in rows])),
        cores=len(os.sched_getaffinity(0)),
    )
    clear_detectors()
