"""``train``, ``study`` and ``demo``: the commands that train (PyTorch, imported when run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from defectscope.cli.options import (
    TRAINING,
    add_evaluation_options,
    add_training_options,
    report_skipped,
)
from defectscope.io.datasets import DATASET_FOLDERS

DATASETS = list(DATASET_FOLDERS)  # the public datasets, by short name


def cmd_train(args: argparse.Namespace) -> int:
    from defectscope.io.datasets import load_patches
    from defectscope.tiling.residual import CENTRE_SHARE
    from defectscope.training.loop import train_from_simulated, train_model_dir

    if args.data is None and args.simulated is None:
        raise ValueError("give DATA (patch folders), --simulated DIR, or both")
    config = TRAINING.build(args)
    real = None
    if args.data is not None:
        real = load_patches(args.data, skip_bad=args.skip_bad)
        report_skipped(real)
    if args.simulated is not None:
        # A 'simulate' output holds its patches in patches/; a bare patch folder works too.
        folder = args.simulated / "patches"
        simulated = load_patches(folder if folder.is_dir() else args.simulated, args.skip_bad)
        report_skipped(simulated)
        simulated_pixel_size(args.simulated, simulated)
        record = {"data": None if args.data is None else str(args.data)}
        record["simulated_data"] = str(args.simulated)
        # Only a 'simulate' output is known to centre its defect patches on the defects.
        made_by_simulate = (args.simulated / "truth.json").is_file()
        result = train_from_simulated(
            simulated,
            args.out,
            config,
            args.validation,
            real,
            record,
            args.finetune_blocks,
            residual_centre=CENTRE_SHARE if made_by_simulate else None,
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


def simulated_pixel_size(folder: Path, patches) -> None:
    """Set ``patches.pixel_size``/``unit`` from a 'simulate' output's ``truth.json``.

    The settings it records are what the patches were made at; a bare patch folder
    (no ``truth.json``) keeps what its TIFF calibration says, if anything.
    """
    import math

    from defectscope.io.datasets import length_unit
    from defectscope.simulate.truth import read_truth

    if not (folder / "truth.json").is_file():
        return
    settings = read_truth(folder).get("settings")
    settings = settings if isinstance(settings, dict) else {}
    size, unit = settings.get("pixel_size"), settings.get("unit")
    if size is None:
        return
    if (
        isinstance(size, bool)
        or not isinstance(size, int | float)
        or not math.isfinite(size)
        or size <= 0
        or not isinstance(unit, str)
        or not unit.strip()
    ):
        raise ValueError(
            f"{folder / 'truth.json'}: settings.pixel_size and settings.unit must be a "
            f"finite number > 0 and a unit, got {size!r} and {unit!r}"
        )
    patches.pixel_size, patches.unit = float(size), length_unit(unit)


def cmd_study(args: argparse.Namespace) -> int:
    from defectscope.io.datasets import (
        DATASET_FRAMES,
        dataset_folder,
        load_patches,
        locate_upstream,
    )
    from defectscope.studies.study import run_study

    # --data is the public data (found or downloaded when absent), or one dataset folder.
    frame = None
    if args.data is not None and not (Path(args.data) / "Image Data").is_dir():
        folder = Path(args.data)
    else:
        upstream = locate_upstream(args.data)
        folder = dataset_folder(upstream, args.dataset)
        frame = upstream / DATASET_FRAMES[args.dataset]
        frame = frame if frame.is_file() else None
    patches = load_patches(folder, skip_bad=args.skip_bad)
    report_skipped(patches)
    print(f"{folder}: {len(patches.labels)} patches, classes {patches.counts()}")
    report = run_study(
        patches,
        args.out,
        TRAINING.build(args),
        dataset_name=args.dataset,
        frame=frame,
        folds=args.folds,
        loco=args.loco,
        resume=args.resume,
    )
    print((Path(args.out) / "summary.md").read_text())
    print(f"wall time {report['wall_time_s']} s; results in {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from defectscope.studies.main_job import run_pipeline

    config = TRAINING.build(args)
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


def add_train(p: argparse.ArgumentParser) -> None:
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
    add_training_options(p)
    p.set_defaults(func=cmd_train)


def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--data", default=None, help="public data folder (else found or downloaded)")
    p.add_argument("--out", type=Path, default=Path("runs"))
    p.add_argument("--top", type=int, default=10, help="ROIs to rank in the large frame")
    add_training_options(p)
    # The main job's default is the quick study (two trainings per dataset); the folds and
    # the left-out classes are one training each, so they are asked for (STUDY=full).
    add_evaluation_options(p, folds=0, loco=False)
    p.set_defaults(func=cmd_demo)


def add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cdte", choices=DATASETS)
    p.add_argument("--data", default=None, help="public data folder or a dataset folder")
    p.add_argument("--out", type=Path, required=True)
    add_training_options(p)
    add_evaluation_options(p, folds=5, loco=True)
    p.set_defaults(func=cmd_study)
