"""Dense maps against window-by-window maps and the naive loop, same run, same frames.

Three ways to map a frame: ``dense-ort-int8`` (one pass of the trunk over the frame,
:mod:`defectscope.engines.dense`, INT8 graph of native stride 16), ``window-ort-int8`` (every
window through the INT8 per-window model, the detector's path before dense maps) and
``naive-torch-fp32`` (numpy tiling, a PyTorch FP32 loop). Frames: 512^2 at stride
16, 2048^2 at stride 32 and 16; choose others with
``DEFECTSCOPE_BENCH_DENSE_FRAMES=512:16,2048:16`` (size:stride pairs), leave the
naive loop out with ``DEFECTSCOPE_BENCH_NAIVE=0`` (minutes at 2048^2 stride 16).

Run::

    .venv/bin/python -m pytest benchmarks/bench_dense.py \\
        --benchmark-json=benchmarks/results/dense.json
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks.bench_end_to_end import naive_map
from benchmarks.frames import stem_frame
from defectscope.maps.detector import Detector
from defectscope.nets.checkpoint import load_checkpoint

FRAMES = [
    tuple(int(v) for v in pair.split(":"))
    for pair in os.environ.get("DEFECTSCOPE_BENCH_DENSE_FRAMES", "512:16,2048:32,2048:16").split(
        ","
    )
]
IMPLS = ["dense-ort-int8", "window-ort-int8"]
if os.environ.get("DEFECTSCOPE_BENCH_NAIVE", "1") != "0":
    IMPLS.append("naive-torch-fp32")


@pytest.mark.parametrize(("size", "stride"), FRAMES)
@pytest.mark.parametrize("impl", IMPLS)
def test_dense_frame_latency(benchmark, bench_dense_model, impl, size, stride):
    frame = stem_frame(size)
    benchmark.group = f"frame {size}^2 stride {stride}"
    windows = len(range(0, size - 63, stride)) ** 2
    if impl == "naive-torch-fp32":
        model, _, _ = load_checkpoint(bench_dense_model)
        result = benchmark.pedantic(naive_map, args=(model.eval(), frame, stride), rounds=1)
        assert len(result) == windows
        return
    mode = "dense" if impl.startswith("dense") else "window"
    # "auto" on a model directory takes the INT8 models on the CPU.
    with Detector.load(bench_dense_model, dense=mode == "dense") as det:
        det.map(frame[:512, :512], stride=stride, mode=mode, keep_embeddings=False)  # warm
        rounds = 3 if size <= 512 else 1
        result = benchmark.pedantic(
            det.map,
            args=(frame,),
            kwargs={"stride": stride, "keep_embeddings": False, "mode": mode},
            rounds=rounds,
        )
    assert result.info["mode"] == mode
    assert int(np.prod(result.grid_shape)) == windows
    assert det.engine.precision == "int8"
    benchmark.extra_info.update(windows=windows, **result.info)
