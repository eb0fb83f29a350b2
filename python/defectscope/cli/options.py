"""The option groups several commands take.

The settings of training (:class:`~defectscope.training.config.TrainConfig`) become
options through :class:`~defectscope.cli.fields.DataclassOptions` (those of mapping in
:mod:`defectscope.cli.cmd_map`); the choices of ``--backend`` are
:data:`defectscope.engines.loader.BACKENDS`. Frame reading (``--channel``, ``--frame``,
``--sum``, ``--pixel-size``, ``--unit``) is declared once, here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from defectscope.cli.fields import DataclassOptions
from defectscope.engines.loader import BACKENDS
from defectscope.io.frames import Calibration, Frame, read_frame
from defectscope.training.config import TrainConfig

TRAINING = DataclassOptions(TrainConfig)


def add_backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="auto")


def add_frame_options(parser: argparse.ArgumentParser, calibration: bool = True) -> None:
    """Which frame of a file to read, and (``calibration``) its pixel size.

    See :func:`read_frame_option`.
    """
    parser.add_argument("--channel", help="signal to read from a file holding several")
    parser.add_argument("--frame", dest="frame_index", type=int, help="frame of a stack")
    parser.add_argument("--sum", action="store_true", help="sum the frames of a stack")
    if not calibration:
        return
    parser.add_argument("--pixel-size", type=float, help="pixel size, overriding the file's")
    parser.add_argument("--unit", default="nm", help="unit of --pixel-size")


def read_frame_option(path: Path, args: argparse.Namespace) -> Frame:
    """The frame the frame options ask for, with ``--pixel-size`` applied."""
    frame = read_frame(path, args.channel, args.frame_index, args.sum)
    if args.pixel_size is not None:
        frame.calibration = pixel_calibration(args)
    if frame.calibration is not None:
        frame.calibration.check_extent(frame.data.shape)
    return frame


def pixel_calibration(args: argparse.Namespace) -> Calibration | None:
    """``--pixel-size``/``--unit`` as a Calibration (None without ``--pixel-size``)."""
    if args.pixel_size is None:
        return None
    try:
        return Calibration.square(args.pixel_size, args.unit)
    except ValueError as exc:
        raise ValueError(f"--pixel-size {args.pixel_size!r}: {exc}") from None


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Every :class:`TrainConfig` option, and ``--skip-bad`` for the patches read."""
    TRAINING.add(parser)
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable/odd files")


def add_evaluation_options(p: argparse.ArgumentParser, folds: int, loco: bool) -> None:
    p.add_argument("--folds", type=fold_count, default=folds)
    p.add_argument("--loco", action=argparse.BooleanOptionalAction, default=loco)
    p.add_argument("--resume", action="store_true")


def fold_count(text: str) -> int:
    value = int(text)
    if value != 0 and value < 3:
        raise argparse.ArgumentTypeError(f"folds must be 0 (off) or at least 3, got {value}")
    return value


def positive_or_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def report_skipped(patches) -> None:
    """List the files ``--skip-bad`` left out, on stderr."""
    for path, reason in patches.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
