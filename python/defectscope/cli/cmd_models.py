"""``evaluate``, ``predict``, ``export`` and ``densify``: scoring and exporting a model.

``evaluate`` and ``predict`` run through the engines
(:mod:`defectscope.evaluation.scoring`), so they score a model directory, an ONNX file
or a TensorRT engine alike; ``export`` is the one export recipe
(:func:`defectscope.export.recipe.export_model`) the main job runs too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from defectscope.cli.options import (
    add_backend_option,
    add_frame_options,
    positive_or_zero,
    read_frame_option,
    report_skipped,
)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from defectscope.evaluation.scoring import evaluate_artifact, open_engine
    from defectscope.io.datasets import load_patches
    from defectscope.io.files import atomic_write_json
    from defectscope.outputs.map_files import refuse_overwrite

    refuse_overwrite(args.json, [args.model, args.data])
    engine = open_engine(args.model, args.backend)
    patches = load_patches(args.data, skip_bad=args.skip_bad)
    report_skipped(patches)
    metrics = evaluate_artifact(engine, patches, batch_size=args.batch_size, source=args.data)
    atomic_write_json(args.json, metrics)
    print(f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} -> {args.json}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from defectscope.evaluation.scoring import predict_files
    from defectscope.io.files import atomic_write_json
    from defectscope.outputs.map_files import refuse_overwrite

    refuse_overwrite(args.json, [args.model, *args.files])
    records = predict_files(args.model, args.files, args.backend, args.batch_size)
    atomic_write_json(args.json, records)
    print(f"{len(records)} predictions -> {args.json}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from defectscope.export.recipe import export_model

    if args.format == "onnx":
        formats = ("onnx", "int8") if args.int8 else ("onnx",)
    else:
        formats = ("tensorrt",)
    report = export_model(
        args.model,
        formats,
        args.calib,
        calibration_size=args.calib_size,
        seed=args.seed,
        precision=args.precision,
        dense=args.dense,
        max_side=args.max_side,
    )
    for line in export_lines(report):
        print(line)
    return 0


def export_lines(report: dict) -> list[str]:
    """One line per thing :func:`export_model` made, in the order it made them."""
    lines = []
    if "onnx" in report:
        onnx = report["onnx"]
        diff = onnx.get("max_abs_diff_probabilities")
        parity = f" (max |p_onnx - p_torch| = {diff:.2e})" if diff is not None else ""
        lines.append(f"ONNX: {onnx['path']}{parity}")
    if "int8" in report:
        r = report["int8"]
        lines.append(
            f"INT8: {r['path']}; on {r['n_patches']} held-out patches agreement "
            f"{r['agreement']:.4f}, accuracy {r['accuracy_reference']:.4f} (fp32) -> "
            f"{r['accuracy_candidate']:.4f} (int8)"
        )
    if "int8_tensorrt" in report:
        r = report["int8_tensorrt"]
        lines.append(f"INT8 for TensorRT (symmetric): {r['path']}; agreement {r['agreement']:.4f}")
    for record in report.get("tensorrt_dense", []):
        lines.append(f"TensorRT dense (native stride {record['native_stride']}): {record['path']}")
    if "tensorrt" in report:
        lines.append(f"TensorRT: {report['tensorrt']['path']}")
    return lines


def cmd_densify(args: argparse.Namespace) -> int:
    from defectscope.export.dense import make_dense

    frames = [read_frame_option(path, args).data for path in args.frames]
    checks = [read_frame_option(path, args).data for path in args.check] if args.check else None
    record = make_dense(
        args.model,
        frames,
        checks,
        native_strides=args.native_stride,
        steps=args.steps,
        int8=args.int8,
        stride=args.stride,
        seed=args.seed,
    )
    for precision, report in record["agreement"].items():
        per_class = ", ".join(
            f"{name} {v['agreement']:.3f} ({v['windows']})"
            for name, v in report["per_class"].items()
        )
        print(
            f"{precision}: dense agrees with window by window on {report['agreement']:.1%} of "
            f"{report['windows']} windows (per class: {per_class})"
        )
    if not record["agreement"]:
        print("no check frames: agreement not measured (frames too small to hold a quarter out)")
    print(f"dense graphs {', '.join(record['graphs'].values())} -> {args.model / 'dense'}")
    return 0


def _add_scoring_options(p: argparse.ArgumentParser) -> None:
    add_backend_option(p)
    p.add_argument("--batch-size", type=int, default=64, help="patches per engine call")


def add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model directory, .onnx file or TensorRT engine")
    p.add_argument("data", type=Path)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--skip-bad", action="store_true")
    _add_scoring_options(p)
    p.set_defaults(func=cmd_evaluate)


def add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model directory, .onnx file or TensorRT engine")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--json", type=Path, required=True)
    _add_scoring_options(p)
    p.set_defaults(func=cmd_predict)


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model directory")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument("--int8", action="store_true", help="also write a static INT8 ONNX model")
    p.add_argument("--calib", type=Path, help="patch dataset for parity, calibration and checks")
    p.add_argument("--calib-size", type=int, default=256, help="patches used to calibrate")
    p.add_argument("--precision", choices=["fp16", "int8"], default="fp16", help="TensorRT")
    p.add_argument(
        "--dense", action="store_true", help="TensorRT: build the dense graphs' engines instead"
    )
    p.add_argument("--max-side", type=int, default=1536, help="TensorRT dense: largest region side")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_export)


def add_densify(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="model directory (written by train)")
    p.add_argument("frames", nargs="+", type=Path, help="unlabeled frames to adapt on")
    p.add_argument(
        "--check",
        nargs="+",
        type=Path,
        help="frames to measure agreement on (default: "
        "the bottom quarter of each frame, held out while adapting)",
    )
    p.add_argument("--steps", type=positive_or_zero, default=200, help="distillation steps")
    p.add_argument(
        "--native-stride",
        type=int,
        nargs="+",
        choices=[32, 16, 8],
        default=[16],
        help="native strides of the graphs to write (16 serves 16, 32, 48, ...)",
    )
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--stride", type=int, default=16, help="stride of the agreement check")
    p.add_argument("--seed", type=int, default=0)
    add_frame_options(p)
    p.set_defaults(func=cmd_densify)
