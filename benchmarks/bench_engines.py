"""Engine throughput: patches per second by backend, precision and batch size.

Run::

    .venv/bin/python -m pytest benchmarks/bench_engines.py \\
        --benchmark-json=benchmarks/results/engines.json
"""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.engines.loader import load_engine
from defectscope.engines.onnx import OnnxEngine
from defectscope.engines.pytorch import TorchEngine
from defectscope.engines.tensorrt import tensorrt_available

BATCHES = [1, 16, 64]


def _engine(kind: str, model_dir):
    if kind == "torch-fp32":
        return TorchEngine(model_dir, precision="fp32")
    if kind == "torch-bf16":
        return TorchEngine(model_dir, precision="bf16")
    if kind == "ort-fp32":
        return OnnxEngine(model_dir / "model.onnx", providers=["CPUExecutionProvider"])
    if kind == "ort-int8":
        return OnnxEngine(model_dir / "model.int8.onnx", providers=["CPUExecutionProvider"])
    if kind.startswith("tensorrt"):
        ok, reason = tensorrt_available()
        if not ok:
            pytest.skip(reason)
        from defectscope.export.tensorrt import build_tensorrt_engine

        precision = kind.split("-")[1]
        source = model_dir / ("model.int8.onnx" if precision == "int8" else "model.onnx")
        path = model_dir / f"model.{precision}.engine"
        if not path.exists():
            build_tensorrt_engine(source, path, precision)
        return load_engine(path)
    raise ValueError(kind)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(
    "kind", ["torch-fp32", "torch-bf16", "ort-fp32", "ort-int8", "tensorrt-fp16", "tensorrt-int8"]
)
def test_engine_throughput(benchmark, bench_model, kind, batch):
    engine = _engine(kind, bench_model)
    inputs = np.random.default_rng(0).normal(size=(batch, 3, 64, 64)).astype(np.float32)
    engine.run(inputs)  # warm up
    benchmark.group = f"engine batch {batch}"
    benchmark.extra_info["patches"] = batch
    rounds = 3 if batch == 64 else 5
    benchmark.pedantic(engine.run, args=(inputs,), rounds=rounds, iterations=1)
