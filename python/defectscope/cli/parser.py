"""The parser every command shares: one-line errors, defaults in ``--help``, lazy commands.

A subcommand's options are added when that subcommand is parsed (or its help shown),
so ``defectscope --version`` or ``defectscope train`` never imports what ``map`` needs
(SciPy, the engines, the service).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

# Help of options several commands declare by hand; --help adds each default.
OPTION_HELP = {
    "--scheduler": "'local' starts a Dask LocalCluster here; tcp://HOST:8786 uses a running one",
    "--workers": "worker processes of the local cluster (default: cores / 2)",
    "--folds": "grouped k-fold cross-validation (one training per fold; 0 turns it off)",
    "--loco": "leave-one-class-out test of the uncertainty (one training per class)",
    "--resume": "reuse trainings an interrupted run into the same --out finished with the "
    "same data, splits, settings and version",
    "--seed": "random seed (splits, initialization, shuffling)",
    "--out": "where to write the results",
    "--backend": "inference backend; auto picks the fastest that can run the artifact",
    "--json": "JSON file to write",
    "--skip-bad": "leave unreadable or odd-sized files out and list them",
    "--format": "what to export",
    "--k-min": "smallest k tried",
    "--k-max": "largest k tried",
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


class ArgumentError(ValueError):
    """A command-line argument is missing or malformed."""


class DefaultsFormatter(argparse.HelpFormatter):
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


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``error:`` line and exit code 1, like every other.

    ``--help`` shows each option's default; an option declared without help takes
    its help from :data:`OPTION_HELP`. ``fill``, when given, adds the parser's options
    the first time it parses (see :meth:`filled`).
    """

    def __init__(self, *args, fill: Callable[[Parser], None] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self._fill = fill

    def filled(self) -> Parser:
        """The parser with its options added (once)."""
        fill, self._fill = self._fill, None
        if fill is not None:
            fill(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.filled()
        return super().parse_known_args(args, namespace)

    def add_argument(self, *args, **kwargs):
        if "help" not in kwargs and args and args[0] in OPTION_HELP:
            kwargs["help"] = OPTION_HELP[args[0]]
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        raise ArgumentError(f"{self.prog}: {message}")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, Parser]:
    """Each subcommand's parser, with its options added."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.filled() for name, sub in action.choices.items()}
