"""``simulate``: every :class:`~defectscope.simulate.dataset.SimulationSettings` field
(with its ``Instrument`` and ``Multislice``) is an option; the frames, truth and
patches are written by :func:`~defectscope.simulate.dataset.simulate_dataset`."""

from __future__ import annotations

import argparse
from pathlib import Path

from defectscope.cli.fields import DataclassOptions, Spelling
from defectscope.simulate.dataset import SimulationSettings, parse_zone


def _zone_text(zone: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in zone)


# Where the command line writes a field otherwise than its name and type say.
SIMULATION = DataclassOptions(
    SimulationSettings,
    spellings={
        "zone": Spelling(type=str, to_field=parse_zone, from_field=_zone_text),
        "energy": Spelling(
            to_field=lambda kev: kev * 1e3,
            from_field=lambda ev: ev / 1e3,
            help="multislice: beam energy in keV",
        ),
        "prism_interpolation": Spelling(flag="--prism"),
    },
)


def cmd_simulate(args: argparse.Namespace) -> int:
    from defectscope.simulate.dataset import simulate_dataset

    settings = SIMULATION.build(args)
    record = simulate_dataset(settings, args.out, progress=not args.quiet)
    defects = sum(len(f["defects"]) for f in record["frames"])
    patches = ", ".join(f"{k} {v}" for k, v in sorted(record["patches"].items()))
    print(
        f"{args.out}: {len(record['frames'])} frames, {defects} defects, patches: {patches} "
        f"({record['frames_per_minute']:.1f} frames/min, {settings.renderer})"
    )
    return 0


def add_simulate(p: argparse.ArgumentParser) -> None:
    SIMULATION.add(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_simulate)
