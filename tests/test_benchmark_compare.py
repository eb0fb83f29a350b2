"""benchmarks/compare.py turns pytest-benchmark JSON into ratios to the baselines."""

from __future__ import annotations

import json

from benchmarks.compare import load, report


def _bench(name, params, seconds, group=""):
    return {
        "name": name,
        "group": group,
        "params": params,
        "extra_info": {},
        "stats": {"mean": seconds, "min": seconds},
    }


def test_ratios_to_baselines(tmp_path):
    data = {
        "benchmarks": [
            _bench(
                "test_tile_2048[numpy-zscore-16]",
                {"impl": "numpy", "mode": "zscore", "stride": 16},
                4.0,
            ),
            _bench(
                "test_tile_2048[cpp-zscore-16]",
                {"impl": "cpp", "mode": "zscore", "stride": 16},
                0.5,
            ),
            _bench(
                "test_engine_throughput[torch-fp32-16]", {"kind": "torch-fp32", "batch": 16}, 2.0
            ),
            _bench("test_engine_throughput[ort-int8-16]", {"kind": "ort-int8", "batch": 16}, 0.5),
            _bench(
                "test_frame_latency[naive-1024-32]",
                {"impl": "naive-torch-fp32", "size": 1024, "stride": 32},
                30.0,
            ),
            _bench(
                "test_frame_latency[ort-1024-32]",
                {"impl": "detector-ort-int8", "size": 1024, "stride": 32},
                4.0,
            ),
        ]
    }
    in_process = _bench("test_frame_512[in-process-16]", {"route": "in-process", "stride": 16}, 1)
    in_process["extra_info"] = {"p50_ms": 100.0, "p99_ms": 120.0}
    service = _bench("test_frame_512[service-16]", {"route": "service", "stride": 16}, 1)
    service["extra_info"] = {
        "p50_ms": 102.5,
        "p99_ms": 130.0,
        "transport_p50_ms": 1.25,
        "transport_p99_ms": 2.5,
    }
    dense = [
        _bench(
            f"test_dense_frame_latency[{impl}-512-16]",
            {"impl": impl, "size": 512, "stride": 16},
            seconds,
        )
        for impl, seconds in (
            ("dense-ort-int8", 0.2),
            ("window-ort-int8", 2.5),
            ("naive-torch-fp32", 14.0),
        )
    ]
    data["benchmarks"] += [in_process, service, *dense]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    text = report(load([str(path)]))
    assert "| zscore | 16 | 4.000 | 0.500 | 8.0x |" in text
    assert "| ort-int8 | 16 | 32.0 | 4.00x |" in text
    assert "| 1024^2 | 32 | detector-ort-int8 | 4.00 | 7.50x |" in text
    assert "| 16 | window | in-process | 100.0 | 120.0 |  |  |" in text
    assert "| 16 | window | service | 102.5 | 130.0 | 2.50 | 1.25 / 2.50 |" in text
    assert "| 512^2 | 16 | 841 | 0.20 | 2.50 | 14.00 | 12.5x | 70.0x |" in text
    assert text.startswith("machine: ")
