"""Command line: a thin layer over the library.

Every subcommand exits 0 on success and 1 with a one-line ``error: ...`` on bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from defectscope._version import __version__
from defectscope.cli.parser import ArgumentError, Parser

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

# name: (module under defectscope.cli whose add_<name> adds the options, help), in the
# order --help lists them. A command's module is imported when the command is parsed.
COMMANDS = {
    "train": ("cmd_train", "train on all patches under DATA (and/or simulated ones)"),
    "evaluate": ("cmd_models", "score a model on the patches under DATA"),
    "predict": ("cmd_models", "classify patch files"),
    "export": ("cmd_models", "export ONNX (FP32, INT8) or TensorRT engines"),
    "map": ("cmd_map", "defect map of a frame"),
    "simulate": (
        "cmd_simulate",
        "simulated frames of a crystal with point defects, truth and patches",
    ),
    "score-simulated": (
        "cmd_map",
        "map a simulate output and match regions to its truth.json",
    ),
    "densify": (
        "cmd_models",
        "make dense graphs of a model directory (one trunk pass per frame)",
    ),
    "cluster": ("cmd_map", "cluster embeddings of a patch dataset or a frame"),
    "roi": ("cmd_map", "rank regions of interest in a frame"),
    "demo": ("cmd_train", "the main job: study, export, cluster, ROIs, report"),
    "batch": ("cmd_service", "map many microscope files on Dask, resumably"),
    "serve": ("cmd_service", "ZeroMQ service for acquisition software"),
    "report": ("cmd_map", "self-contained HTML report of a run directory"),
    "study": ("cmd_train", "random versus grouped split on the public data"),
}


def _filler(name: str, module: str):
    def fill(parser: Parser) -> None:
        commands = importlib.import_module(f"defectscope.cli.{module}")
        getattr(commands, "add_" + name.replace("-", "_"))(parser)

    return fill


def build_parser() -> argparse.ArgumentParser:
    """The ``defectscope`` parser: every subcommand, each with ``func`` to run it.

    A subcommand's options are added when it is parsed; :func:`defectscope.cli.parser.
    subcommands` gives every subcommand's parser with its options.
    """
    parser = Parser(prog="defectscope", description=__doc__)
    parser.add_argument("--version", action="version", version=f"defectscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, fill=_filler(name, module))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``defectscope`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
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
