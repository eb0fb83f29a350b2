"""Frame latency through ``Detector.map`` against a naive baseline.

The baseline is what one writes first: numpy ``sliding_window_view`` tiling with
numpy z-scoring, then a per-batch PyTorch FP32 loop, no overlap of tiling and
inference. Frames: 1024^2 and 2048^2 at stride 32 and 16; choose fewer with
``DEFECTSCOPE_BENCH_FRAMES=1024:32,2048:32`` (size:stride pairs).

Run::

    .venv/bin/python -m pytest benchmarks/bench_end_to_end.py \\
        --benchmark-json=benchmarks/results/end_to_end.json
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from benchmarks.frames import stem_frame
from defectscope.maps.detector import Detector
from defectscope.nets.checkpoint import load_checkpoint

FRAMES = [
    tuple(int(v) for v in pair.split(":"))
    for pair in os.environ.get("DEFECTSCOPE_BENCH_FRAMES", "1024:32,1024:16,2048:32,2048:16").split(
        ","
    )
]


def naive_map(model, frame: np.ndarray, stride: int, batch: int = 64) -> np.ndarray:
    views = np.lib.stride_tricks.sliding_window_view(frame, (64, 64))[::stride, ::stride]
    patches = views.reshape(-1, 64, 64).astype(np.float32)
    mean = patches.mean(axis=(1, 2), keepdims=True)
    std = np.maximum(patches.std(axis=(1, 2), keepdims=True), 1e-8)
    inputs = np.repeat(((patches - mean) / std)[:, None], 3, axis=1)
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch):
            logits = model(torch.from_numpy(inputs[start : start + batch]))
            out.append(torch.softmax(logits, 1).numpy())
    return np.concatenate(out)


@pytest.mark.parametrize(("size", "stride"), FRAMES)
@pytest.mark.parametrize("impl", ["naive-torch-fp32", "detector-ort-int8", "detector-torch-bf16"])
def test_frame_latency(benchmark, bench_model, impl, size, stride):
    frame = stem_frame(size)
    benchmark.group = f"frame {size}^2 stride {stride}"
    rounds = 1
    if impl == "naive-torch-fp32":
        model, _, _ = load_checkpoint(bench_model)
        result = benchmark.pedantic(naive_map, args=(model, frame, stride), rounds=rounds)
        assert len(result) == len(range(0, size - 63, stride)) ** 2
        return
    backend, precision = ("onnxruntime", "int8") if "ort" in impl else ("torch", "bf16")
    artifact = bench_model / "model.int8.onnx" if backend == "onnxruntime" else bench_model
    if backend == "torch":
        from defectscope.engines.pytorch import TorchEngine

        detector = Detector(TorchEngine(bench_model, precision=precision), batch_size=64)
    else:
        detector = Detector.load(artifact, backend=backend, batch_size=64)
    detector.engine.run(np.zeros((1, 3, 64, 64), np.float32))
    result = benchmark.pedantic(
        detector.map,
        args=(frame,),
        kwargs={"stride": stride, "keep_embeddings": False},
        rounds=rounds,
    )
    benchmark.extra_info["windows"] = int(np.prod(result.grid_shape))
    detector.close()
