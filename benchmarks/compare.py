"""Print benchmark results as ratios to their baselines from the same run.

Usage::

    .venv/bin/python benchmarks/compare.py benchmarks/results/*.json
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path


def machine() -> str:
    from defectscope.util.system import cpu_description

    return cpu_description()


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for bench in data["benchmarks"]:
            rows.append(
                {
                    "file": Path(path).name,
                    "name": bench["name"],
                    "group": bench.get("group") or "",
                    "params": bench.get("params") or {},
                    "mean": bench["stats"]["mean"],
                    "min": bench["stats"]["min"],
                    "extra": bench.get("extra_info") or {},
                }
            )
    return rows


# bench_study.py's variants that are the code before its speed-ups.
STUDY_BASELINES = ("per-crop skimage", "fp32 passes")


def report(rows: list[dict]) -> str:
    lines = [f"machine: {machine()}", ""]
    tiling = [r for r in rows if r["name"].startswith("test_tile_2048")]
    if tiling:
        lines += [
            "## tiler (2048^2 uint16): C++ vs numpy",
            "",
            "| mode | stride | numpy s | C++ s | speed-up |",
            "|---|---|---|---|---|",
        ]
        by = defaultdict(dict)
        for r in tiling:
            by[(r["params"]["mode"], r["params"]["stride"])][r["params"]["impl"]] = r["min"]
        for (mode, stride), t in sorted(by.items()):
            if {"cpp", "numpy"} <= set(t):
                lines.append(
                    f"| {mode} | {stride} | {t['numpy']:.3f} | {t['cpp']:.3f} | "
                    f"{t['numpy'] / t['cpp']:.1f}x |"
                )
        lines.append("")
    engines = [r for r in rows if r["name"].startswith("test_engine_throughput")]
    if engines:
        lines += [
            "## engines: patches/s (ratio to torch-fp32 at the same batch)",
            "",
            "| engine | batch | patches/s | vs torch-fp32 |",
            "|---|---|---|---|",
        ]
        base = {
            r["params"]["batch"]: r["params"]["batch"] / r["min"]
            for r in engines
            if r["params"]["kind"] == "torch-fp32"
        }
        for r in sorted(engines, key=lambda r: (r["params"]["batch"], r["params"]["kind"])):
            rate = r["params"]["batch"] / r["min"]
            ratio = (
                rate / base[r["params"]["batch"]] if r["params"]["batch"] in base else float("nan")
            )
            lines.append(
                f"| {r['params']['kind']} | {r['params']['batch']} | {rate:.1f} | {ratio:.2f}x |"
            )
        lines.append("")
    e2e = [r for r in rows if r["name"].startswith("test_frame_latency")]
    if e2e:
        lines += [
            "## end to end: frame latency (ratio = naive / this)",
            "",
            "| frame | stride | implementation | seconds | speed-up vs naive |",
            "|---|---|---|---|---|",
        ]
        by = defaultdict(dict)
        for r in e2e:
            by[(r["params"]["size"], r["params"]["stride"])][r["params"]["impl"]] = r["min"]
        for (size, stride), t in sorted(by.items()):
            naive = t.get("naive-torch-fp32")
            for impl, seconds in sorted(t.items()):
                ratio = f"{naive / seconds:.2f}x" if naive else "n/a"
                lines.append(f"| {size}^2 | {stride} | {impl} | {seconds:.2f} | {ratio} |")
        lines.append("")
    dense = [r for r in rows if r["name"].startswith("test_dense_frame_latency")]
    if dense:
        lines += [
            "## dense maps: frame latency (same run; ratios = other / dense)",
            "",
            "| frame | stride | windows | dense INT8 s | window INT8 s | naive torch FP32 s "
            "| vs window INT8 | vs naive |",
            "|---|---|---|---|---|---|---|---|",
        ]
        by = defaultdict(dict)
        for r in dense:
            by[(r["params"]["size"], r["params"]["stride"])][r["params"]["impl"]] = r["min"]
        for (size, stride), t in sorted(by.items()):
            d = t.get("dense-ort-int8")
            w, n = t.get("window-ort-int8"), t.get("naive-torch-fp32")
            cell = [f"{v:.2f}" if v else "n/a" for v in (d, w, n)]
            ratio = [f"{v / d:.1f}x" if v and d else "n/a" for v in (w, n)]
            windows = len(range(0, size - 63, stride)) ** 2
            lines.append(
                f"| {size}^2 | {stride} | {windows} | {cell[0]} | {cell[1]} | {cell[2]} "
                f"| {ratio[0]} | {ratio[1]} |"
            )
        lines.append("")
    service = [r for r in rows if r["name"].startswith("test_frame_512")]
    if service:
        lines += [
            "## 512^2 uint16 frame, ROIs: in-process vs ZeroMQ service on loopback",
            "",
            "| stride | mode | route | p50 ms | p99 ms | overhead p50 ms (difference) "
            "| transport p50 / p99 ms (paired) |",
            "|---|---|---|---|---|---|---|",
        ]
        by = defaultdict(dict)
        for r in service:
            key = (r["params"]["stride"], r["extra"].get("mode", "window"))
            by[key][r["params"]["route"]] = r["extra"]
        for (stride, mode), t in sorted(by.items()):
            for route, e in sorted(t.items()):
                overhead = transport = ""
                if route == "service" and "in-process" in t:
                    overhead = f"{e['p50_ms'] - t['in-process']['p50_ms']:.2f}"
                if "transport_p50_ms" in e:
                    transport = f"{e['transport_p50_ms']:.2f} / {e['transport_p99_ms']:.2f}"
                lines.append(
                    f"| {stride} | {mode} | {route} | {e['p50_ms']:.1f} | {e['p99_ms']:.1f} "
                    f"| {overhead} | {transport} |"
                )
        lines.append("")
    archive = [r for r in rows if r["name"].startswith("test_archive_throughput")]
    if archive:
        by = {r["params"]["mode"]: r for r in archive}
        frames = archive[0]["extra"]["frames"]
        lines += [
            f"## archive: {frames} frames 1024^2, stride 32, INT8 ONNX, full outputs per frame",
            "",
            "| route | seconds | frames/s | vs serial | mean map ms | overhead per frame ms |",
            "|---|---|---|---|---|---|",
        ]
        serial = by.get("serial")
        for mode in ("serial", "batch-1-worker", "batch-2-workers"):
            if mode not in by:
                continue
            e, seconds = by[mode]["extra"], by[mode]["min"]
            ratio = f"{serial['min'] / seconds:.2f}x" if serial else "n/a"
            overhead = (
                f"{(seconds - serial['min']) / frames * 1000:.0f}"
                if serial and mode != "serial"
                else ""
            )
            lines.append(
                f"| {mode} | {seconds:.1f} | {e['frames_per_s']:.2f} | {ratio} | "
                f"{e['mean_map_ms']:.0f} | {overhead} |"
            )
        lines.append("")
    study = [r for r in rows if r["file"] == "study.json"]
    if study:
        lines += [
            "## main job's inner loops: before vs now (bench_study.py)",
            "",
            "| what | before s | now s | speed-up |",
            "|---|---|---|---|",
        ]
        groups: dict[str, dict[str, float]] = defaultdict(dict)
        for r in study:
            variant = next(iter(r["params"].values()), "")
            when = "before" if variant in STUDY_BASELINES else "now"
            groups[r["group"]][when] = r["mean"]
        for group, means in groups.items():
            if set(means) != {"before", "now"}:
                continue
            before, now = means["before"], means["now"]
            lines.append(f"| {group} | {before:.3f} | {now:.3f} | {before / now:.2f}x |")
        lines.append("")
    memory = [r for r in rows if r["name"].startswith("test_memmap_16k")]
    for r in memory:
        e = r["extra"]
        lines += [
            f"## memory: 16384^2 uint16 memmap ({e.get('mode', 'window')})",
            "",
            f"stride {e.get('stride')}: {e.get('windows')} windows in "
            f"{e.get('seconds', 0):.1f} s, peak RSS {e.get('peak_rss_mib', 0):.0f} MiB",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    paths = argv or sorted(str(p) for p in Path("benchmarks/results").glob("*.json"))
    paths = [p for p in paths if re.search(r"\.json$", p)]
    if not paths:
        print(
            "no benchmark JSON found; run the suites first (see docs/benchmarks.md)",
            file=sys.stderr,
        )
        return 1
    print(report(load(paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
