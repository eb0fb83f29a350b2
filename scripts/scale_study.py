"""Issue 26's measurement table from one run: maps of frames unlike the training patches.

Synthetic domain shift (trains a model on nominal SrTiO3 [001] frames unless --model is
given), real frames resampled by 0.85-1.15, and the cost of the scale step; each map made
with --scale auto and off. Writes OUT/domain_shift.json (after every part) and
OUT/domain_shift.md. See defectscope.studies.domain_shift.

  python scripts/scale_study.py --out runs/scale-study --synthetic \\
      --real-model sto=runs/sto/model ../shared/datasets/.../STO_Training_Image.jpg \\
      --real-model cdte=runs/cdte/model ../shared/datasets/.../CdTe_Training_Image.tif
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path


def scale_arm(text: str) -> str | float:
    """'auto', 'off' or a positive factor."""
    if text in ("auto", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: auto, off or a positive factor") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r}: a factor must be a positive number")
    return value


def augmentation_changes(text: str) -> dict:
    """A JSON object of ``Augmentation`` fields (lists become the ranges' tuples)."""
    try:
        changes = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(changes, dict):
        raise argparse.ArgumentTypeError("a JSON object of Augmentation fields")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="folder of the report (and model)")
    p.add_argument("--synthetic", action="store_true", help="run the synthetic domain shift")
    p.add_argument("--model", type=Path, help="reuse this model for --synthetic (no training)")
    p.add_argument(
        "--real-model",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME=MODEL_DIR", "FRAME"),
        help="a real frame and the model that maps it (repeatable)",
    )
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--scales", nargs="+", type=scale_arm, default=["auto", "off"])
    p.add_argument("--backend", default="auto", help="engine backend (Detector.load)")
    p.add_argument("--threads", type=int, default=0, help="engine threads (0: its default)")
    g = p.add_argument_group("synthetic frames")
    g.add_argument("--test-frames", type=int, default=3, help="frames per condition")
    g.add_argument(
        "--conditions",
        nargs="+",
        metavar="NAME",
        help="only these conditions (names as in the report: 'nominal', 'all combined', ...)",
    )
    g.add_argument("--test-size", type=int, default=768)
    g.add_argument("--test-seed", type=int, default=1000)
    g.add_argument("--train-frames", type=int, default=32)
    g.add_argument("--train-size", type=int, default=512)
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument(
        "--patience",
        type=int,
        help="early-stopping patience (default: train's for the starting weights)",
    )
    g.add_argument("--seed", type=int, default=0, help="training set and training seed")
    g.add_argument(
        "--bulk-near-defects",
        action=argparse.BooleanOptionalAction,
        help="training set: Bulk patches may hold a defect outside their central square, "
        "half of them placed beside one (simulate's default: on)",
    )
    g.add_argument(
        "--augmentation",
        type=augmentation_changes,
        default={},
        metavar="JSON",
        help="training augmentation fields, e.g. '{\"sampling_probability\": 0.8}'",
    )
    g.add_argument(
        "--cost-sizes", type=int, nargs="*", default=[512, 2048], help="frame sides timed"
    )
    g.add_argument("--cost-repeats", type=int, default=2)
    p.add_argument("--zooms", type=float, nargs="+", default=[0.85, 0.9, 1.1, 1.15])
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    from defectscope.studies.domain_shift import (
        RealFrame,
        default_shifts,
        run_domain_shift,
        study_settings,
    )
    from defectscope.training.augment import Augmentation
    from defectscope.training.config import TrainConfig

    if args.model is not None and (args.bulk_near_defects is not None or args.augmentation):
        print(
            "error: --bulk-near-defects and --augmentation train a model; --model reuses one",
            file=sys.stderr,
        )
        return 1
    try:
        real = []
        for spec, frame in args.real_model:
            name, sep, model = spec.partition("=")
            if not sep or not name or not model:
                raise ValueError(f"--real-model {spec!r}: write NAME=MODEL_DIR FRAME")
            real.append(RealFrame(name, Path(model), Path(frame)))
        shifts = None
        if args.conditions:
            known = {shift.name: shift for shift in default_shifts()}
            unknown = [name for name in args.conditions if name not in known]
            if unknown:
                raise ValueError(f"--conditions {unknown}: choose from {sorted(known)}")
            shifts = [known[name] for name in args.conditions]
        # Unset, the training set is simulate's default.
        near = (
            {} if args.bulk_near_defects is None else {"bulk_near_defects": args.bulk_near_defects}
        )
        train = study_settings(
            frames=args.train_frames,
            size=args.train_size,
            seed=args.seed,
            **near,
        )
        test = dataclasses.replace(train, size=args.test_size, seed=args.test_seed)
        try:
            augmentation = Augmentation(**args.augmentation)
        except TypeError as exc:
            raise ValueError(f"--augmentation: {exc}") from None
        report = run_domain_shift(
            args.out,
            synthetic=args.synthetic,
            model=args.model,
            train_settings=train,
            train_config=TrainConfig(
                epochs=args.epochs,
                seed=args.seed,
                patience=args.patience,
                augmentation=augmentation,
            ),
            test_settings=test,
            frames=args.test_frames,
            shifts=shifts,
            real=real,
            zooms=args.zooms,
            cost_sizes=args.cost_sizes,
            cost_repeats=args.cost_repeats,
            stride=args.stride,
            scales=args.scales,
            backend=args.backend,
            threads=args.threads,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print((args.out / "domain_shift.md").read_text())
    print(f"report: {args.out / 'domain_shift.json'} ({len(report.get('real', []))} real frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
