"""Per-frame latency in-process versus through the ZeroMQ service on loopback.

512 x 512 uint16 frames at stride 16 and 32, ROIs requested, window by window
(``bench_model``) and dense (``bench_dense_model``, the default wherever a model
directory holds dense graphs). The service's overhead is
the difference of the two (serialization, copies, the loopback hop). Because two runs of
a multi-second map differ by more than that, the service route also measures it paired,
per request: client round trip minus the server's own ``timing_ms.request``.

Run::

    .venv/bin/python -m pytest benchmarks/bench_service.py \\
        --benchmark-json=benchmarks/results/service.json
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from benchmarks.frames import stem_frame
from defectscope.maps.detector import Detector
from defectscope.service.client import Client
from defectscope.service.server import BackgroundService


@pytest.fixture(scope="module", params=["window", "dense"])
def served(request, bench_model, bench_dense_model):
    """``(mode, model directory, service address)``: the service on the INT8 model."""
    model = bench_model if request.param == "window" else bench_dense_model
    with BackgroundService(model / "model.int8.onnx", backend="onnxruntime") as service:
        yield request.param, model, service.address


@pytest.mark.parametrize("stride", [32, 16])
@pytest.mark.parametrize("route", ["in-process", "service"])
def test_frame_512(benchmark, served, route, stride):
    mode, model, service_address = served
    frame = stem_frame(512)
    benchmark.group = f"512^2 stride {stride} {mode}"
    benchmark.extra_info["mode"] = mode
    if route == "in-process":
        det = Detector.load(model / "model.int8.onnx", backend="onnxruntime")
        assert bool(det.dense_engines) == (mode == "dense")
        benchmark.pedantic(
            det.rois, args=(frame,), kwargs={"stride": stride}, rounds=10, warmup_rounds=1
        )
        det.close()
    else:
        transport_ms = []

        def request() -> None:
            started = time.perf_counter()
            reply = client.rois(frame, stride=stride)
            rtt_ms = (time.perf_counter() - started) * 1000
            transport_ms.append(rtt_ms - reply["timing_ms"]["request"])

        with Client(service_address, timeout_ms=300_000) as client:
            benchmark.pedantic(request, rounds=10, warmup_rounds=1)
        transport = np.asarray(transport_ms[1:])  # the warm-up round is not timed
        benchmark.extra_info.update(
            transport_p50_ms=float(np.percentile(transport, 50)),
            transport_p99_ms=float(np.percentile(transport, 99)),
        )
    times = np.asarray(benchmark.stats.stats.data) * 1000
    benchmark.extra_info.update(
        p50_ms=float(np.percentile(times, 50)), p99_ms=float(np.percentile(times, 99))
    )
