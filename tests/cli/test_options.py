"""Options built from dataclass fields: what they add, and the dataclasses they give back.

Each round trip compares the parsed dataclass with one built directly from the
library's constructor (the old CLI's field-by-field mapping, written out), so a
generated option that reads, converts or defaults a value differently fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from defectscope.cli.app import build_parser, main
from defectscope.cli.cmd_map import MAPPING
from defectscope.cli.cmd_simulate import SIMULATION
from defectscope.cli.fields import DataclassOptions, Spelling
from defectscope.cli.options import TRAINING
from defectscope.cli.parser import ArgumentError, Parser, subcommands
from defectscope.engines.loader import BACKENDS
from defectscope.maps.options import MapOptions
from defectscope.maps.rois import UNKNOWN_POLICIES
from defectscope.simulate.dataset import Instrument, Multislice, SimulationSettings
from defectscope.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    gain: float = dataclasses.field(default=4.0, metadata={"help": "counts per electron"})
    spot: tuple[float, float] = dataclasses.field(
        default=(1.0, 2.0), metadata={"help": "where", "metavar": ("Y", "X")}
    )


@dataclasses.dataclass(frozen=True)
class Toy:
    steps: int = dataclasses.field(default=3, metadata={"help": "how many"})
    rate: float = dataclasses.field(default=0.5, metadata={"flag": "--lr", "minimum": 0})
    kind: str = dataclasses.field(default="a", metadata={"help": "k", "choices": ("a", "b")})
    limit: float | None = None
    fast: bool = True
    hidden: int = dataclasses.field(default=7, metadata={"cli": False})
    inner: Inner = Inner()

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def toy_parser(options: DataclassOptions, **add) -> Parser:
    parser = Parser(prog="toy")
    options.add(parser, **add)
    return parser


def test_fields_become_options_with_type_default_help_and_choices():
    parser = toy_parser(DataclassOptions(Toy))
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    assert {"--steps", "--lr", "--kind", "--limit", "--fast", "--no-fast", "--gain", "--spot"} <= (
        set(by_flag)
    )
    assert "--hidden" not in by_flag and "--rate" not in by_flag
    assert by_flag["--steps"].default == 3 and by_flag["--steps"].type is int
    assert by_flag["--kind"].choices == ["a", "b"] and by_flag["--kind"].help == "k"
    assert by_flag["--limit"].help == "limit"  # no help metadata: the field's name
    assert by_flag["--spot"].nargs == 2 and by_flag["--spot"].metavar == ("Y", "X")
    assert by_flag["--lr"].metavar == "LR"


def test_parsed_options_round_trip_into_the_dataclass():
    options = DataclassOptions(Toy)
    parser = toy_parser(options)
    assert options.build(parser.parse_args([])) == Toy()
    argv = ["--steps", "9", "--lr", "0.25", "--kind", "b", "--limit", "1.5", "--no-fast"]
    argv += ["--gain", "2", "--spot", "5", "6"]
    want = Toy(9, 0.25, "b", 1.5, False, inner=Inner(2.0, (5.0, 6.0)))
    assert options.build(parser.parse_args(argv)) == want
    # Fields a command leaves out keep their defaults; 'defaults' changes one per command.
    parser = toy_parser(options, only=("steps",), defaults={"steps": 5})
    assert options.build(parser.parse_args([])) == Toy(steps=5)


def test_a_new_field_is_a_new_option_without_another_edit():
    grown = dataclasses.make_dataclass(
        "Grown",
        [("extra", int, dataclasses.field(default=4, metadata={"help": "new setting"}))],
        bases=(Toy,),
        frozen=True,
    )
    options = DataclassOptions(grown)
    built = options.build(toy_parser(options).parse_args(["--extra", "11"]))
    assert built.extra == 11 and built.steps == 3


def test_bad_values_are_refused_while_parsing_or_by_the_dataclass():
    options = DataclassOptions(Toy)
    parser = toy_parser(options)
    for argv, message in [
        (["--steps", "three"], "invalid int value: 'three'"),
        (["--lr", "-1"], "must be a finite number >= 0, got -1"),
        (["--lr", "nan"], "must be a finite number >= 0"),
        (["--kind", "c"], "invalid choice: 'c'"),
    ]:
        with pytest.raises(ArgumentError, match=message):
            parser.parse_args(argv)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        options.build(parser.parse_args(["--steps", "-2"]))


def test_a_field_without_a_command_line_form_is_named():
    @dataclasses.dataclass(frozen=True)
    class Odd:
        table: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="table: no command-line form"):
        DataclassOptions(Odd)
    assert DataclassOptions(Odd, exclude={"table"}).leaves == {}
    spelled = DataclassOptions(Odd, spellings={"table": Spelling(type=str, to_field=eval)})
    parser = toy_parser(spelled)
    assert spelled.build(parser.parse_args(["--table", "{'a': 1}"])) == Odd({"a": 1})


def test_flattened_fields_must_have_distinct_names():
    @dataclasses.dataclass(frozen=True)
    class Clash:
        gain: float = 1.0
        inner: Inner = Inner()

    with pytest.raises(ValueError, match="two fields named 'gain'"):
        DataclassOptions(Clash)


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command", ["train", "study", "demo"])
def test_train_options_round_trip_into_train_config(command):
    required = {"train": ["--out", "m"], "study": ["--out", "s"], "demo": []}[command]
    assert TRAINING.build(parse([command, *required])) == TrainConfig()
    argv = [command, *required, "--epochs", "3", "--lr", "0.01", "--min-delta", "0"]
    argv += ["--architecture", "vgg16", "--precision", "bf16", "--weight-decay", "0.5"]
    want = TrainConfig(
        epochs=3,
        learning_rate=0.01,
        min_delta=0.0,
        architecture="vgg16",
        precision="bf16",
        weight_decay=0.5,
    )
    assert TRAINING.build(parse(argv)) == want


def test_every_plain_train_config_field_is_an_option():
    nested = {"augmentation", "normalization"}  # set from Python (metadata cli=False)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - nested
    assert set(TRAINING.leaves) == names
    for field in dataclasses.fields(TrainConfig):
        if field.name in names:
            assert field.metadata["help"], field.name


def test_simulate_options_round_trip_into_simulation_settings():
    assert SIMULATION.build(parse(["simulate", "--out", "x"])) == SimulationSettings()
    argv = ["simulate", "--out", "x", "--zone", "1,1,0", "--energy", "300", "--prism", "2"]
    argv += ["--drift", "1", "-2", "--exponent-range", "1.5", "2", "--unit", "pm", "--dose", "50"]
    argv += ["--defects-per-frame", "3", "--scan-sampling", "0.1", "--read-noise", "0"]
    want = SimulationSettings(
        zone=(1, 1, 0),
        unit="pm",
        defects_per_frame=3,
        exponent_range=(1.5, 2.0),
        instrument=Instrument(dose=50.0, drift=(1.0, -2.0), read_noise=0.0),
        multislice=Multislice(energy=300e3, prism_interpolation=2, scan_sampling=0.1),
    )
    assert SIMULATION.build(parse(argv)) == want


def test_map_commands_take_map_options():
    base = ["roi", "model", "frame.npy", "--out", "r.json"]
    assert MAPPING.build(parse(base)) == MapOptions()
    argv = [*base, "--top", "3", "--unknown", "explore", "--stride", "32", "--min-spacing", "12"]
    argv += ["--mode", "window", "--background", "Bulk", "--symmetry", "d4", "--batch-size", "8"]
    want = MapOptions(
        top_k=3,
        unknown="explore",
        stride=32,
        min_spacing=12.0,
        mode="window",
        background="Bulk",
        symmetry="d4",
        batch_size=8,
    )
    assert MAPPING.build(parse(argv)) == want
    batch = parse(["batch", "a.tif", "--model", "m", "--out", "o"])
    assert MAPPING.build(batch) == MapOptions(top_k=10)  # batch's own default, as before
    fields = {f.name for f in dataclasses.fields(MapOptions)} - {"keep_embeddings"}
    for command in ("map", "roi", "batch", "serve"):
        parser = subcommands(build_parser())[command]
        dests = {a.dest for a in parser._actions}
        assert fields <= dests, command


def test_choices_are_the_library_constants():
    sub = subcommands(build_parser())
    for command in ("map", "roi", "cluster", "batch", "serve", "score-simulated", "evaluate"):
        backend = next(a for a in sub[command]._actions if a.dest == "backend")
        assert tuple(backend.choices) == BACKENDS, command
    for command in ("roi", "batch", "map"):
        unknown = next(a for a in sub[command]._actions if a.dest == "unknown")
        assert tuple(unknown.choices) == UNKNOWN_POLICIES, command


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--out", "m", "--epochs", "three"], "argument --epochs: invalid int value"),
        (["train", "--out", "m", "--min-delta", "-1"], "must be a finite number >= 0"),
        (["train", "--out", "m", "--architecture", "resnet"], "invalid choice: 'resnet'"),
        (["simulate", "--out", "s", "--unit", "furlong"], "invalid choice: 'furlong'"),
        (["simulate", "--out", "s", "--zone", "0,0"], "zone axis '0,0'"),
        (["roi", "m", "f.npy", "--out", "r.json", "--stride", "0"], "stride must be a positive"),
        (["roi", "m", "f.npy", "--out", "r.json", "--top", "1.5"], "invalid int value: '1.5'"),
        (["map", "m", "f.npy", "--out", "o", "--nan-policy", "x"], "invalid choice: 'x'"),
    ],
)
def test_an_invalid_value_is_one_error_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_invalid_value_from_the_shell_is_no_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "defectscope.cli", "train", "--out", "m", "--epochs", "x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: defectscope train: argument --epochs") and (
        run.stderr.count("\n") == 1
    )
