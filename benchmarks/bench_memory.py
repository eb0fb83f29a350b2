"""Peak memory while mapping a 16384 x 16384 uint16 ``np.memmap`` frame.

Measured in a child process (``ru_maxrss``), so nothing else in the suite counts.
The frame file is sparse (512 MiB that takes no disk); every window is read
through the memmap, so touched pages show in RSS as page cache. The stride is
``DEFECTSCOPE_BENCH_MEMMAP_STRIDE`` (default 128: 16,641 windows, minutes on 2
cores with INT8; stride 16 means a million windows, hours on this CPU) window by
window; the dense route maps the same frame at stride 16 (``..._DENSE_STRIDE``), a
million windows, in one trunk pass over crops of 1536^2.

Run::

    .venv/bin/python -m pytest benchmarks/bench_memory.py \\
        --benchmark-json=benchmarks/results/memory.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = """
import json, resource, sys, time
import numpy as np
from defectscope.maps.detector import Detector
frame = np.memmap(sys.argv[1], dtype=np.uint16, mode="r", shape=(16384, 16384))
det = Detector.load(sys.argv[2], batch_size=64)
start = time.perf_counter()
result = det.map(frame, stride=int(sys.argv[3]), keep_embeddings=False)
print(json.dumps({
    "mode": result.info["mode"],
    "windows": int(np.prod(result.grid_shape)),
    "seconds": time.perf_counter() - start,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


@pytest.mark.parametrize("mode", ["window", "dense"])
def test_memmap_16k_peak_rss(benchmark, bench_model, bench_dense_model, tmp_path, mode):
    if mode == "window":
        stride = int(os.environ.get("DEFECTSCOPE_BENCH_MEMMAP_STRIDE", "128"))
        artifact = bench_model / "model.int8.onnx"
    else:
        stride = int(os.environ.get("DEFECTSCOPE_BENCH_MEMMAP_DENSE_STRIDE", "16"))
        artifact = bench_dense_model
    path = tmp_path / "frame16k.u16"
    with open(path, "wb") as handle:
        handle.truncate(16384 * 16384 * 2)
    args = [
        sys.executable,
        "-c",
        CHILD,
        str(path),
        str(artifact),
        str(stride),
    ]

    def run():
        out = subprocess.run(args, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    result = benchmark.pedantic(run, rounds=1)
    benchmark.group = "memory 16k memmap"
    benchmark.extra_info.update(result, stride=stride)
    assert result["mode"] == mode
    assert result["peak_rss_mib"] < 2048
