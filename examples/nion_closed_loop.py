"""Closed loop on Nion Swift's simulated STEM: survey -> ROIs -> probe -> subscan.

Starts nionswift-usim headless with a lattice specimen holding vacancy clusters at
the given positions (nm), scans a survey, ranks ROIs with a defectscope model, parks
the probe on the best ROI and scans a subscan centred there. Prints what happened
and, with ``--out``, writes it as JSON (plus the survey and subscan as .npy).

    pip install 'defectscope[nion]'
    python examples/nion_closed_loop.py runs/toy/model --defect=-2.8,3.6 --defect=3.2,-1.2

Inside Nion Swift, skip ``SimulatedSTEM`` and pass the application's scan hardware
source and ``Registry.get_component("stem_controller")`` to ``visit_top_roi``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

from defectscope.io.files import atomic_write_bytes, atomic_write_json
from defectscope.maps.detector import Detector
from defectscope.maps.options import MapOptions
from defectscope.nion.loop import SimulatedSTEM, set_survey, visit_top_roi
from defectscope.simulate.lattice import LatticeSample


def parse_point(text: str) -> tuple[float, float]:
    try:
        y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Y,X in nm, got {text!r}") from None
    return y, x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model directory, .onnx file or TensorRT engine")
    parser.add_argument(
        "--defect",
        type=parse_point,
        action="append",
        default=[],
        metavar="Y,X",
        help="vacancy cluster position in nm from the specimen origin (repeatable; "
        "write --defect=-2.8,3.6 when it starts with a minus sign)",
    )
    parser.add_argument("--pixels", type=int, default=256, help="survey size in pixels")
    parser.add_argument("--fov-nm", type=float, default=12.8, help="survey field of view")
    parser.add_argument("--pixel-time-us", type=float, default=1.0)
    parser.add_argument("--stride", type=int, default=16, help="window step in pixels")
    parser.add_argument("--top", type=int, default=5, help="number of ROIs ranked")
    # Choices and help from the MapOptions fields, so they mean what they mean everywhere.
    for name in ("mode", "unknown"):
        field = MapOptions.__dataclass_fields__[name]
        parser.add_argument(
            f"--{name}",
            choices=field.metadata["choices"],
            default=field.default,
            help=field.metadata["help"],
        )
    parser.add_argument("--subscan-fraction", type=float, default=0.25)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, help="folder for step.json, survey.npy, subscan.npy")
    args = parser.parse_args(argv)
    try:
        options = MapOptions(
            stride=args.stride, top_k=args.top, mode=args.mode, unknown=args.unknown
        )
    except ValueError as error:
        parser.error(str(error))

    detector = Detector.load(args.model, backend=args.backend)
    sample = LatticeSample(vacancies_nm=tuple(args.defect))
    with detector, SimulatedSTEM(sample) as stem:
        set_survey(stem.scan_source, args.pixels, args.fov_nm, args.pixel_time_us)
        step = visit_top_roi(
            detector,
            stem.scan_source,
            stem.stem_controller,
            subscan_fraction=args.subscan_fraction,
            options=options,
        )
        subscan_field = stem.generator.fields[-1] if step.subscan is not None else None

    report = {
        "defects_nm": [list(d) for d in sample.vacancies_nm],
        "rois": step.rois,
        "probe_position": step.probe_position,
        "subscan_region": step.subscan_region,
        "subscan_field_nm": None,
        "defects_in_subscan": [],
        "timing_ms": step.timing_ms,
        "options": options.to_json(),
    }
    if subscan_field is not None:
        report["subscan_field_nm"] = {
            "center": list(subscan_field.center_nm),
            "fov": list(subscan_field.fov_nm),
        }
        report["defects_in_subscan"] = [
            list(d) for d in sample.vacancies_nm if subscan_field.contains(*d)
        ]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, frame in (("survey", step.survey), ("subscan", step.subscan)):
            if frame is not None:
                buffer = io.BytesIO()
                np.save(buffer, frame.data)
                atomic_write_bytes(args.out / f"{name}.npy", buffer.getvalue())
        atomic_write_json(args.out / "step.json", report)
    if step.subscan is None:
        print("no ROI in the survey: the probe was not moved", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
