"""Command line: a thin layer over the library.

Every subcommand exits 0 on success and 1 with a one-line ``error: ...`` on bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from defectscope._version import __version__

BACKEND_CHOICES = ["auto", "torch", "onnxruntime", "tensorrt"]
# ImportError: an optional extra (train, formats, nion) is missing; MemoryError: a frame
# or batch too large for this machine.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    OSError,
    RuntimeError,
    ImportError,
    MemoryError,
)


def _train_config(args: argparse.Namespace):
    from defectscope.training.config import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        weights=args.weights,
        architecture=args.architecture,
        trainable_blocks=args.trainable_blocks,
        patience=args.patience,
        min_delta=args.min_delta,
        precision=args.precision,
        device=args.device,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from defectscope.io.datasets import load_patches
    from defectscope.training.loop import train_model_dir

    if args.data is None and args.simulated is None:
        raise ValueError("give DATA (patch folders), --simulated DIR, or both")
    real = None
    if args.data is not None:
        real = load_patches(args.data, skip_bad=args.skip_bad)
        _report_skipped(real)
    config = _train_config(args)
    if args.simulated is not None:
        from defectscope.training.loop import train_from_simulated

        folder = args.simulated / "patches"
        simulated = load_patches(folder if folder.is_dir() else args.simulated, args.skip_bad)
        _report_skipped(simulated)
        record = {"data": None if args.data is None else str(args.data)}
        record["simulated_data"] = str(args.simulated)
        result = train_from_simulated(
            simulated, args.out, config, args.validation, real, record, args.finetune_blocks
        )
    else:
        result = train_model_dir(real, args.out, config, args.validation, {"data": str(args.data)})
    print(f"saved {args.out} ({len(result.history)} epochs, {result.wall_time_s:.0f} s)")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.untrained:
        raise RuntimeError(
            f"{args.out}: training did not learn; the model was saved for inspection, with "
            "the warning in model.json"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from defectscope.evaluation.metrics import classification_metrics
    from defectscope.io.datasets import load_patches
    from defectscope.io.files import atomic_write_json
    from defectscope.outputs.map_files import refuse_overwrite
    from defectscope.training.classifier import PatchClassifier

    refuse_overwrite(args.json, [args.model, args.data])
    clf = PatchClassifier.load(args.model)
    patches = load_patches(args.data, skip_bad=args.skip_bad)
    _report_skipped(patches)
    unknown = sorted(set(patches.classes) - set(clf.classes))
    if unknown:
        raise ValueError(f"{args.data}: classes {unknown} are not among the model's {clf.classes}")
    labels = np.array([clf.classes.index(patches.classes[i]) for i in patches.labels])
    probabilities, _ = clf.predict(patches.images)
    metrics = classification_metrics(labels, probabilities.argmax(axis=1), clf.classes)
    atomic_write_json(args.json, metrics)
    print(f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} -> {args.json}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from defectscope.io.files import atomic_write_json
    from defectscope.outputs.map_files import refuse_overwrite
    from defectscope.training.classifier import PatchClassifier

    refuse_overwrite(args.json, [args.model, *args.files])
    records = PatchClassifier.load(args.model).predict_files(args.files)
    atomic_write_json(args.json, records)
    print(f"{len(records)} predictions -> {args.json}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from defectscope.io.datasets import (
        DATASET_FRAMES,
        dataset_folder,
        load_patches,
        locate_upstream,
    )
    from defectscope.studies.study import run_study

    frame = None
    if args.data is not None and not (Path(args.data) / "Image Data").is_dir():
        folder = Path(args.data)
    else:
        upstream = locate_upstream(args.data)
        folder = dataset_folder(upstream, args.dataset)
        frame = upstream / DATASET_FRAMES[args.dataset]
        frame = frame if frame.is_file() else None
    patches = load_patches(folder, skip_bad=args.skip_bad)
    _report_skipped(patches)
    print(f"{folder}: {len(patches.labels)} patches, classes {patches.counts()}")
    report = run_study(
        patches,
        args.out,
        _train_config(args),
        dataset_name=args.dataset,
        frame=frame,
        folds=args.folds,
        loco=args.loco,
        resume=args.resume,
    )
    print((Path(args.out) / "summary.md").read_text())
    print(f"wall time {report['wall_time_s']} s; results in {args.out}")
    return 0


def _model_patches(model_dir: Path, data: Path, classes: list[str]):
    """Patches under ``data`` normalized for the model, with labels in its class order."""
    from defectscope.io.datasets import load_patches
    from defectscope.nets.checkpoint import ModelConfig, read_metadata
    from defectscope.tiling.tiler import patches_to_inputs

    config = ModelConfig.from_dict(read_metadata(model_dir)["model"])
    patches = load_patches(data)
    unknown = sorted(set(patches.classes) - set(classes))
    if unknown:
        raise ValueError(f"{data}: classes {unknown} are not among the model's {classes}")
    labels = np.array([classes.index(patches.classes[i]) for i in patches.labels])
    return patches_to_inputs(patches.images, config.normalization), labels


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from defectscope.export.compare import compare_engines
    from defectscope.export.int8 import INT8_FILES, quantize_onnx_int8
    from defectscope.export.onnx import export_onnx
    from defectscope.export.tensorrt import build_tensorrt_engine
    from defectscope.io.files import atomic_write_json
    from defectscope.nets.checkpoint import read_metadata

    model_dir = Path(args.model)
    classes = read_metadata(model_dir)["model"]["classes"]
    fp32_path = model_dir / "model.onnx"
    int8_path = model_dir / INT8_FILES["cpu"]
    int8_trt_path = model_dir / INT8_FILES["tensorrt"]
    report: dict = {}
    if args.format == "onnx":
        inputs = labels = None
        if args.calib is not None:
            inputs, labels = _model_patches(model_dir, args.calib, classes)
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(inputs)) if inputs is not None else None
        check = inputs[order[:64]] if inputs is not None else None
        report["onnx"] = export_onnx(model_dir, fp32_path, check_inputs=check)
        print(
            f"ONNX: {fp32_path} (max |p_onnx - p_torch| = "
            f"{report['onnx']['max_abs_diff_probabilities']:.2e})"
        )
        if args.int8:
            if inputs is None:
                raise ValueError("--int8 needs --calib DATA (real patches to calibrate on)")
            calib, held = order[: args.calib_size], order[args.calib_size :]
            if len(held) == 0:
                raise ValueError(f"{args.calib}: needs more than {args.calib_size} patches")
            quantize_onnx_int8(fp32_path, int8_path, inputs[calib])
            report["int8"] = {
                "path": str(int8_path),
                "n_calibration": len(calib),
                **compare_engines(fp32_path, int8_path, inputs[held], labels[held]),
            }
            r = report["int8"]
            print(
                f"INT8: {int8_path}; on {r['n_patches']} held-out patches agreement "
                f"{r['agreement']:.4f}, accuracy {r['accuracy_reference']:.4f} (fp32) -> "
                f"{r['accuracy_candidate']:.4f} (int8)"
            )
            # TensorRT takes only symmetric signed INT8: a second model for that target.
            quantize_onnx_int8(fp32_path, int8_trt_path, inputs[calib], target="tensorrt")
            report["int8_tensorrt"] = {
                "path": str(int8_trt_path),
                **compare_engines(fp32_path, int8_trt_path, inputs[held], labels[held]),
            }
            print(
                f"INT8 for TensorRT (symmetric): {int8_trt_path}; agreement "
                f"{report['int8_tensorrt']['agreement']:.4f}"
            )
    elif args.dense:
        from defectscope.export.tensorrt import build_dense_tensorrt_engines

        built = build_dense_tensorrt_engines(model_dir, args.precision, args.max_side)
        for record in built:
            print(f"TensorRT dense (native stride {record['native_stride']}): {record['path']}")
        report["tensorrt_dense"] = built
    else:
        source = int8_trt_path if args.precision == "int8" else fp32_path
        if not source.is_file():
            raise ValueError(
                f"{source}: missing; run 'defectscope export {model_dir} --format onnx'"
                + (" --int8 --calib DATA" if args.precision == "int8" else "")
                + " first"
            )
        engine = build_tensorrt_engine(
            source, model_dir / f"model.{args.precision}.engine", precision=args.precision
        )
        report["tensorrt"] = {"path": str(engine), "precision": args.precision}
        print(f"TensorRT: {engine}")
    previous = model_dir / "export.json"
    merged = json.loads(previous.read_text()) if previous.is_file() else {}
    atomic_write_json(previous, {**merged, **report})
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from defectscope.maps.detector import Detector
    from defectscope.maps.rois import select_rois
    from defectscope.outputs.map_files import MAP_FILES, refuse_overwrite, write_map_outputs

    inputs = [args.artifact, args.frame]
    for name in MAP_FILES:
        refuse_overwrite(args.out / name, inputs)
    frame = _read_frame(args.frame, args)
    with Detector.load(
        args.artifact,
        backend=args.backend,
        batch_size=args.batch_size,
        background=args.background,
        dense=_dense_choice(args.mode),
    ) as det:
        result = det.map(frame, stride=args.stride, symmetry=args.symmetry, mode=args.mode)
        # The overlay marks the five best ROIs (what `roi` would rank first).
        rois = select_rois(result, 5)
        write_map_outputs(frame.data, result, args.out, inputs=inputs, rois=rois)
    regions = result.regions()
    unknown = f", {int(result.unknown.sum())} unknown windows" if result.unknown is not None else ""
    print(
        f"{result.grid_shape[0] * result.grid_shape[1]} windows{unknown}, {len(regions)} "
        f"regions, {result.timing_ms['total']:.0f} ms ({_map_mode(result, det)}) -> {args.out}"
    )
    return 0


def _dense_choice(mode: str) -> bool | str:
    return {"auto": "auto", "dense": True, "window": False}[mode]


def _map_mode(result, detector) -> str:
    """How a map was made, for the one-line summary."""
    info = result.info
    if info.get("mode") == "dense":
        return f"dense, native stride {info['native_stride']}, {info['precision']}"
    reason = f"; {info['reason']}" if info.get("reason") else ""
    return f"{detector.engine.name}, window by window{reason}"


def cmd_score_simulated(args: argparse.Namespace) -> int:
    from defectscope.io.files import atomic_write_json
    from defectscope.maps.detector import Detector
    from defectscope.outputs.map_files import refuse_overwrite
    from defectscope.studies.simulated import score_simulated

    if args.json is not None:
        refuse_overwrite(args.json, [args.artifact, args.simulated / "truth.json"])
    with Detector.load(
        args.artifact, backend=args.backend, background=args.background,
        dense=_dense_choice(args.mode),
    ) as det:  # fmt: skip
        score = score_simulated(
            det, args.simulated, args.stride, args.tolerance, args.known_only, args.mode
        )
    if args.json is not None:
        atomic_write_json(args.json, score)
    per_type = ", ".join(
        f"{kind} {v['recall']:.2f} of {v['defects']}" for kind, v in score["per_type"].items()
    )
    print(
        f"recall {score['recall']:.3f} ({score['matched']}/{score['defects']} defects), "
        f"precision {score['precision']:.3f} ({score['regions']} regions) within "
        f"{score['tolerance_px']:.1f} px; per type: {per_type}"
    )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from defectscope.simulate.dataset import (
        Instrument,
        Multislice,
        SimulationSettings,
        parse_zone,
        simulate_dataset,
    )

    settings = SimulationSettings(
        structure=args.structure,
        zone=parse_zone(args.zone),
        pixel_size=args.pixel_size,
        unit=args.unit,
        probe_fwhm=args.probe_fwhm,
        defects=args.defects,
        frames=args.frames,
        size=args.size,
        thickness=args.thickness,
        defects_per_frame=args.defects_per_frame,
        column_fraction=args.column_fraction,
        renderer=args.renderer,
        patch_size=args.patch_size,
        patches_per_defect=args.patches_per_defect,
        vary=args.vary,
        exponent=args.exponent,
        exponent_range=tuple(args.exponent_range) if args.exponent_range else None,
        column_scatter=args.column_scatter,
        seed=args.seed,
        instrument=Instrument(
            dose=args.dose, jitter=args.jitter, drift=tuple(args.drift), gradient=args.gradient
        ),
        multislice=Multislice(
            energy=args.energy * 1e3,
            phonons=args.phonons,
            prism_interpolation=args.prism,
            scan_sampling=args.scan_sampling,
        ),
    )
    record = simulate_dataset(settings, args.out, progress=not args.quiet)
    defects = sum(len(f["defects"]) for f in record["frames"])
    patches = ", ".join(f"{k} {v}" for k, v in sorted(record["patches"].items()))
    print(
        f"{args.out}: {len(record['frames'])} frames, {defects} defects, patches: {patches} "
        f"({record['frames_per_minute']:.1f} frames/min, {settings.renderer})"
    )
    return 0


def cmd_densify(args: argparse.Namespace) -> int:
    from defectscope.export.dense import make_dense

    frames = [_read_frame(path, args).data for path in args.frames]
    checks = [_read_frame(path, args).data for path in args.check] if args.check else None
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


def cmd_cluster(args: argparse.Namespace) -> int:
    from defectscope.outputs.clusters import cluster_dataset, cluster_frame, is_frame

    common = {
        "k": args.k,
        "k_range": (args.k_min, args.k_max),
        "variance": args.variance,
        "backend": args.backend,
        "seed": args.seed,
    }
    from defectscope.outputs.map_files import refuse_overwrite

    refuse_overwrite(args.out, [args.source, args.model])
    if is_frame(args.source):
        frame = _read_frame(args.source, args)
        report = cluster_frame(frame, args.model, args.out, stride=args.stride, **common)
    elif Path(args.source).is_dir():
        report = cluster_dataset(args.source, args.model, args.out, **common)
    else:
        raise ValueError(f"{args.source}: neither a frame file nor a patch dataset folder")
    learned = report["learned"]
    line = f"k = {learned['k']} (silhouette {learned['silhouette'][str(learned['k'])]:.3f})"
    if report["kind"] == "dataset":
        raw = report["raw_pixels"]
        line += (
            f"; ARI/NMI learned {learned['ari']:.3f}/{learned['nmi']:.3f}, "
            f"raw pixels {raw['ari']:.3f}/{raw['nmi']:.3f}"
        )
    print(f"{line} -> {args.out}")
    return 0


def cmd_roi(args: argparse.Namespace) -> int:
    from defectscope.io.files import atomic_write_json
    from defectscope.maps.detector import Detector
    from defectscope.outputs.map_files import refuse_overwrite

    refuse_overwrite(args.out, [args.artifact, args.frame])
    frame = _read_frame(args.frame, args)
    with Detector.load(
        args.artifact,
        backend=args.backend,
        background=args.background,
        dense=_dense_choice(args.mode),
    ) as det:
        rois = det.rois(
            frame, args.top, args.stride, args.min_spacing, unknown=args.unknown, mode=args.mode
        )
    atomic_write_json(args.out, rois)
    print(f"{len(rois)} ROIs -> {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from defectscope.studies.main_job import run_pipeline

    config = _train_config(args)
    for dataset in args.dataset:
        report = run_pipeline(
            dataset,
            args.out / dataset,
            args.data,
            config,
            args.top,
            folds=args.folds,
            loco=args.loco,
            resume=args.resume,
        )
        print(f"{dataset}: report -> {report}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from defectscope.outputs.map_files import refuse_overwrite
    from defectscope.service.batch import run_batch

    refuse_overwrite(args.out, [args.model, *args.sources])
    rows = run_batch(
        args.sources,
        args.model,
        args.out,
        stride=args.stride,
        top=args.top,
        scheduler=args.scheduler,
        workers=args.workers,
        backend=args.backend,
        background=args.background,
        unknown=args.unknown,
        channel=args.channel,
        frame_index=args.frame_index,
        sum_frames=args.sum,
    )
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
    print(
        f"{len(rows)} files: {counts['ok']} mapped, {counts['skipped']} already done, "
        f"{counts['error']} errors -> {args.out / 'index.parquet'}"
    )
    for row in rows:
        if row["status"] == "error":
            print(f"  {row['error']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from defectscope.service.server import serve

    logging.getLogger("defectscope").setLevel(logging.INFO)
    print(f"serving {args.artifact} on {args.bind} (Ctrl-C or SIGTERM to stop)", flush=True)
    served = serve(
        args.artifact,
        args.bind,
        args.backend,
        args.curve_secret,
        args.curve_clients,
        args.max_pixels,
        max_bytes=args.max_bytes,
        request_timeout_s=args.request_timeout,
        shutdown_grace_s=args.shutdown_grace,
    )
    print(f"stopped after {served} requests")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from defectscope.outputs.report import write_report

    print(f"report -> {write_report(args.run_dir, args.out)}")
    return 0


def _report_skipped(patches) -> None:
    for path, reason in patches.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    from defectscope.training.config import TrainConfig

    defaults = TrainConfig()
    parser.add_argument(
        "--weights",
        default=defaults.weights,
        help="imagenet (torch hub cache or download), none (random init) or a weights file",
    )
    parser.add_argument(
        "--architecture",
        choices=["vgg16", "vgg16_bn"],
        default=defaults.architecture,
        help="torchvision VGG-16, without or with batch normalization",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument(
        "--trainable-blocks",
        type=int,
        default=defaults.trainable_blocks,
        help="VGG-16 conv blocks that train, from the top (0 = head only, 5 = all)",
    )
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--min-delta", type=_non_negative_float, default=defaults.min_delta)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=defaults.device)
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable/odd files")


def _add_mode_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=["auto", "dense", "window"],
        default="auto",
        help="dense: one trunk pass over the frame (needs 'densify'); window: each window "
        "on its own; auto: dense where a dense graph serves the stride",
    )


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_or_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _add_frame_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channel", help="signal to read from a file holding several")
    parser.add_argument("--frame", dest="frame_index", type=int, help="frame of a stack")
    parser.add_argument("--sum", action="store_true", help="sum the frames of a stack")
    parser.add_argument("--pixel-size", type=float, help="pixel size, overriding the file's")
    parser.add_argument("--unit", default="nm", help="unit of --pixel-size")


def _read_frame(path: Path, args: argparse.Namespace):
    """The frame the options ask for, with ``--pixel-size`` applied."""
    from defectscope.io.frames import Calibration, read_frame

    frame = read_frame(path, args.channel, args.frame_index, args.sum)
    if args.pixel_size is not None:
        try:
            frame.calibration = Calibration.square(args.pixel_size, args.unit)
        except ValueError as exc:
            raise ValueError(f"--pixel-size {args.pixel_size!r}: {exc}") from None
    if frame.calibration is not None:
        frame.calibration.check_extent(frame.data.shape)
    return frame


# Descriptions of options used by several commands; --help adds each default.
def _add_evaluation_options(p: argparse.ArgumentParser, folds: int, loco: bool) -> None:
    p.add_argument("--folds", type=_fold_count, default=folds)
    p.add_argument("--loco", action=argparse.BooleanOptionalAction, default=loco)
    p.add_argument("--resume", action="store_true")


def _fold_count(text: str) -> int:
    value = int(text)
    if value != 0 and value < 3:
        raise argparse.ArgumentTypeError(f"folds must be 0 (off) or at least 3, got {value}")
    return value


OPTION_HELP = {
    "--scheduler": "'local' starts a Dask LocalCluster here; tcp://HOST:8786 uses a running one",
    "--workers": "worker processes of the local cluster (default: cores / 2)",
    "--folds": "grouped k-fold cross-validation (one training per fold; 0 turns it off)",
    "--loco": "leave-one-class-out test of the uncertainty (one training per class)",
    "--resume": "reuse trainings an interrupted run into the same --out finished with the "
    "same data, splits, settings and version",
    "--epochs": "training epochs at most (early stopping may end sooner)",
    "--seed": "random seed (splits, initialization, shuffling)",
    "--batch-size": "patches per training step or engine call",
    "--lr": "learning rate (AdamW)",
    "--patience": "epochs without a better validation loss before stopping",
    "--min-delta": "validation-loss drop (nats) that restarts the patience count",
    "--precision": "auto uses bf16 autocast where the CPU (AVX-512 BF16, AMX) or GPU has bf16",
    "--device": "where training runs: auto takes a CUDA GPU when PyTorch sees one",
    "--stride": "window step in pixels",
    "--out": "where to write the results",
    "--backend": "inference backend; auto picks the fastest that can run the artifact",
    "--json": "JSON file to write",
    "--skip-bad": "leave unreadable or odd-sized files out and list them",
    "--format": "what to export",
    "--k-min": "smallest k tried",
    "--k-max": "largest k tried",
    "--top": "number of ROIs",
    "--dataset": "public dataset(s)",
    "--bind": "ZeroMQ endpoint; anything but loopback needs CURVE keys",
    "--max-pixels": "largest frame (H x W) a request may claim",
    "--max-bytes": "largest frame in bytes; bigger message parts are dropped unread",
    "--request-timeout": "seconds a map may run before it is stopped with an error",
    "--shutdown-grace": "seconds the map in flight may finish after SIGTERM before it is cancelled",
    "-v": "log progress",
    "data": "patch dataset folder (upstream DataSet_X/ or one folder per class)",
    "model": "model directory",
    "files": "patch image files",
    "frame": "frame file (.npy, TIFF, PNG, JPEG, .dm3/.dm4, .emd, .ser/.emi, .mrc)",
    "artifact": "model directory, .onnx file or TensorRT engine",
    "run_dir": "run directory of the main job",
}


class _DefaultsFormatter(argparse.HelpFormatter):
    """Adds each option's default to its help, unless there is none to show."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        default = action.default
        # A store_true flag's False says nothing; 0 and --no-x defaults do (identity, as
        # 0 == False).
        flag = isinstance(action, argparse._StoreTrueAction)
        if (
            "%(default)" in help_text
            or "default:" in help_text
            or default is None
            or default is argparse.SUPPRESS
            or (flag and default is False)
            or action.required
        ):
            return help_text
        return f"{help_text} (default: %(default)s)"


class ArgumentError(ValueError):
    """A command-line argument is missing or malformed."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``error:`` line and exit code 1, like every other.

    ``--help`` shows each option's default.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if "help" not in kwargs and args and args[0] in OPTION_HELP:
            kwargs["help"] = OPTION_HELP[args[0]]
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        raise ArgumentError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="defectscope",
        description=__doc__,
    )
    parser.add_argument("--version", action="version", version=f"defectscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train on all patches under DATA (and/or simulated ones)")
    p.add_argument("data", type=Path, nargs="?", help="patch folders (optional with --simulated)")
    p.add_argument(
        "--simulated",
        type=Path,
        help="a 'defectscope simulate' output: train on it alone, or pretrain on it and "
        "fine-tune on DATA",
    )
    p.add_argument(
        "--finetune-blocks",
        type=int,
        help="with --simulated and DATA: conv blocks (from the top) the real patches train; "
        "default --trainable-blocks",
    )
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument(
        "--validation",
        choices=["grouped", "random", "none"],
        default="grouped",
        help="held-out patches for early stopping and temperature scaling",
    )
    _add_training_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a model on the patches under DATA")
    p.add_argument("model", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--skip-bad", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify patch files")
    p.add_argument("model", type=Path)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--json", type=Path, required=True)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export ONNX (FP32, INT8) or TensorRT engines")
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

    p = sub.add_parser("map", help="defect map of a frame")
    p.add_argument("artifact", type=Path, help="model directory, .onnx file or TensorRT engine")
    p.add_argument("frame", type=Path)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--symmetry",
        choices=["none", "d4"],
        default="none",
        help="d4: average each window over its 8 rotations and reflections (8x the cost)",
    )
    p.add_argument("--background", help="name of the defect-free class")
    _add_mode_option(p)
    _add_frame_options(p)
    p.set_defaults(func=cmd_map)

    p = sub.add_parser(
        "simulate", help="simulated frames of a crystal with point defects, truth and patches"
    )
    p.add_argument("--structure", default="srtio3", help="srtio3, cdte or a file ASE reads (CIF)")
    p.add_argument("--zone", default="0,0,1", help="zone axis [uvw] along the beam")
    p.add_argument("--pixel-size", type=float, default=0.02)
    p.add_argument("--unit", default="nm", choices=["nm", "Å", "A", "pm"])
    p.add_argument("--probe-fwhm", type=float, default=0.08, help="in --unit")
    p.add_argument(
        "--defects",
        default="vacancy",
        help="comma list: vacancy[:El], substitution:El>El, interstitial[:El], antisite[:El>El]",
    )
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--size", type=int, default=1024, help="frame side in pixels")
    p.add_argument("--thickness", type=float, default=8.0, help="specimen thickness in --unit")
    p.add_argument("--defects-per-frame", type=int, help="default: one per (2.5 patches)^2")
    p.add_argument(
        "--column-fraction",
        type=float,
        default=0.5,
        help="share of a column's atoms of the species a vacancy/substitution takes (>= 1 atom)",
    )
    p.add_argument("--renderer", choices=["fast", "multislice"], default="fast")
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--patches-per-defect", type=int, default=4)
    p.add_argument(
        "--vary",
        type=float,
        default=0.0,
        help="draw each frame's probe, thickness, dose, column fraction within +-VARY",
    )
    p.add_argument("--exponent", type=float, default=1.7, help="fast renderer: Z ** EXPONENT")
    p.add_argument(
        "--exponent-range",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="fast renderer: draw each frame's exponent from [LO, HI] (domain randomization)",
    )
    p.add_argument(
        "--column-scatter",
        type=float,
        default=0.0,
        help="fast renderer: each column's intensity times N(1, S), clipped to 0.5-1.5",
    )
    p.add_argument("--dose", type=float, default=200.0, help="electrons at the brightest columns")
    p.add_argument("--jitter", type=float, default=0.3, help="scan-line jitter, pixels")
    p.add_argument("--drift", type=float, nargs=2, default=[2.0, 3.0], metavar=("DY", "DX"))
    p.add_argument("--gradient", type=float, default=0.15)
    p.add_argument("--energy", type=float, default=200.0, help="multislice: keV")
    p.add_argument("--phonons", type=int, default=0, help="multislice: frozen phonon configs")
    p.add_argument("--prism", type=int, default=0, help="multislice: PRISM interpolation (0: off)")
    p.add_argument(
        "--scan-sampling", type=float, help="multislice: scan step in Å, Fourier-interpolated"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "score-simulated", help="map a simulate output and match regions to its truth.json"
    )
    p.add_argument("artifact", type=Path, help="model directory, .onnx file or TensorRT engine")
    p.add_argument("simulated", type=Path, help="a 'defectscope simulate' output folder")
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--tolerance", type=float, help="pixels; default half the lattice spacing")
    p.add_argument("--known-only", action="store_true", help="leave unknown regions out")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--background", help="name of the defect-free class")
    p.add_argument("--json", type=Path, help="write the scores here")
    _add_mode_option(p)
    p.set_defaults(func=cmd_score_simulated)

    p = sub.add_parser(
        "densify", help="make dense graphs of a model directory (one trunk pass per frame)"
    )
    p.add_argument("model", type=Path, help="model directory (written by train)")
    p.add_argument("frames", nargs="+", type=Path, help="unlabeled frames to adapt on")
    p.add_argument(
        "--check",
        nargs="+",
        type=Path,
        help="frames to measure agreement on (default: "
        "the bottom quarter of each frame, held out while adapting)",
    )
    p.add_argument("--steps", type=_positive_or_zero, default=200, help="distillation steps")
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
    _add_frame_options(p)
    p.set_defaults(func=cmd_densify)

    p = sub.add_parser("cluster", help="cluster embeddings of a patch dataset or a frame")
    p.add_argument("source", type=Path, help="patch dataset folder or frame file")
    p.add_argument("--model", type=Path, required=True, help="model dir, .onnx or engine")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", type=int, help="fixed number of clusters (default: by silhouette)")
    p.add_argument("--k-min", type=int, default=2)
    p.add_argument("--k-max", type=int, default=10)
    p.add_argument("--variance", type=float, default=0.95, help="PCA variance kept")
    p.add_argument("--stride", type=int, default=16, help="window stride for frames")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    _add_frame_options(p)
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("roi", help="rank regions of interest in a frame")
    p.add_argument("artifact", type=Path)
    p.add_argument("frame", type=Path)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--out", type=Path, required=True, help="rois.json to write")
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--min-spacing", type=float, help="pixels between ROI centres (default: patch)")
    p.add_argument(
        "--unknown",
        choices=["ignore", "explore"],
        default="ignore",
        help="regions unlike the training data: never ROIs, or ranked by their uncertainty",
    )
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--background", help="name of the defect-free class")
    _add_mode_option(p)
    _add_frame_options(p)
    p.set_defaults(func=cmd_roi)

    p = sub.add_parser("demo", help="the main job: study, export, cluster, ROIs, report")
    p.add_argument("--dataset", nargs="+", default=["cdte", "sto"], choices=["cdte", "sto"])
    p.add_argument("--data", default=None, help="public data folder (else found or downloaded)")
    p.add_argument("--out", type=Path, default=Path("runs"))
    p.add_argument("--top", type=int, default=10, help="ROIs to rank in the large frame")
    _add_training_options(p)
    # The main job's default is the quick study (two trainings per dataset); the folds and
    # the left-out classes are one training each, so they are asked for (STUDY=full).
    _add_evaluation_options(p, folds=0, loco=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("batch", help="map many microscope files on Dask, resumably")
    p.add_argument("sources", nargs="+", help="files, folders (recursive) or globs")
    p.add_argument("--model", required=True, help="model dir, .onnx or TensorRT engine")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--scheduler", default="local")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--background", help="name of the defect-free class")
    p.add_argument("--unknown", choices=["ignore", "explore"], default="ignore")
    p.add_argument("--channel", help="signal to read from a file holding several")
    p.add_argument("--frame", dest="frame_index", type=int, help="frame of a stack")
    p.add_argument("--sum", action="store_true", help="sum the frames of a stack")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("serve", help="ZeroMQ service for acquisition software")
    p.add_argument("artifact", type=Path, help="model dir, .onnx or TensorRT engine")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--curve-secret", type=Path, help="server secret key file (CURVE)")
    p.add_argument("--curve-clients", type=Path, help="folder of authorized client public keys")
    p.add_argument("--max-pixels", type=int, default=16384 * 16384)
    p.add_argument("--max-bytes", type=int, default=256 * 2**20)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--shutdown-grace", type=float, default=5.0)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="self-contained HTML report of a run directory")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="HTML file (default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("study", help="random versus grouped split on the public data")
    p.add_argument("--dataset", default="cdte", choices=["cdte", "sto"])
    p.add_argument("--data", default=None, help="public data folder or a dataset folder")
    p.add_argument("--out", type=Path, required=True)
    _add_training_options(p)
    _add_evaluation_options(p, folds=5, loco=True)
    p.set_defaults(func=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except EXPECTED_ERRORS as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
