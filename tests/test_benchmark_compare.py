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
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    text = report(load([str(path)]))
    assert "| zscore | 16 | 4.000 | 0.500 | 8.0x |" in text
    assert "| ort-int8 | 16 | 32.0 | 4.00x |" in text
    assert "| 1024^2 | 32 | detector-ort-int8 | 4.00 | 7.50x |" in text
    assert text.startswith("machine: ")
