"""``map``, ``roi``, ``score-simulated``, ``cluster`` and ``report``: results from frames.

``map`` and ``roi`` take every :class:`~defectscope.maps.options.MapOptions` field as an
option and call :meth:`Detector.find <defectscope.maps.detector.Detector.find>`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from defectscope.cli.fields import DataclassOptions, Spelling
from defectscope.cli.options import add_backend_option, add_frame_options, read_frame_option
from defectscope.maps.options import MapOptions

# Every MapOptions field is an option of map, roi, batch and serve; keep_embeddings is
# the command's own business (ROIs and the map outputs need them).
MAPPING = DataclassOptions(
    MapOptions, spellings={"top_k": Spelling(flag="--top")}, exclude={"keep_embeddings"}
)


def dense_for(mode: str) -> bool | str:
    """``Detector.load``'s ``dense`` for a map ``mode``: load the dense graphs it may use."""
    return {"auto": "auto", "dense": True, "window": False}[mode]


def cmd_map(args: argparse.Namespace) -> int:
    from defectscope.maps.detector import Detector
    from defectscope.outputs.map_files import MAP_FILES, refuse_overwrite, write_map_outputs

    options = MAPPING.build(args)
    inputs = [args.artifact, args.frame]
    for name in MAP_FILES:
        refuse_overwrite(args.out / name, inputs)
    frame = read_frame_option(args.frame, args)
    with Detector.load(
        args.artifact, backend=args.backend, dense=dense_for(options.mode), options=options
    ) as det:
        found = det.find(frame, options)
        # The overlay marks the --top best ROIs (what `roi` would rank first).
        write_map_outputs(frame.data, found.result, args.out, inputs=inputs, rois=found.rois)
        how = map_mode(found.result, det)
    result = found.result
    regions = result.regions()
    unknown = f", {int(result.unknown.sum())} unknown windows" if result.unknown is not None else ""
    print(
        f"{result.grid_shape[0] * result.grid_shape[1]} windows{unknown}, {len(regions)} "
        f"regions, {result.timing_ms['total']:.0f} ms ({how}) -> {args.out}"
    )
    for line in map_notes(result):
        print(line)
    return 0


def map_notes(result) -> list[str]:
    """Lines after a map's summary: its scale matching, and an out-of-distribution frame."""
    from defectscope.maps.scale import describe

    lines = []
    record = result.info.get("scale")
    if record is not None and (record.get("applied") or record.get("warning")):
        lines.append(describe(record))
    if result.unknown is not None and result.out_of_distribution:
        lines.append(ood_line(result))
    return lines


def ood_line(result) -> str:
    """``out of distribution: 95 % of windows unknown (threshold 25 %); no ROIs ...``."""
    checked = result.ood_check_share
    by_density = (
        "" if checked is None else f"; the embedding density's check: {checked:.0%} of them"
    )
    return (
        f"out of distribution: {result.unknown_share:.0%} of windows unknown "
        f"({result.unexplained_share:.0%} away from known defects{by_density}, threshold "
        f"{result.ood_threshold:.0%}); ROIs only with --unknown explore"
    )


def map_mode(result, detector) -> str:
    """How a map was made, for the one-line summary."""
    info = result.info
    if info.get("mode") == "dense":
        return f"dense, native stride {info['native_stride']}, {info['precision']}"
    reason = f"; {info['reason']}" if info.get("reason") else ""
    return f"{detector.engine.name}, window by window{reason}"


def cmd_roi(args: argparse.Namespace) -> int:
    from defectscope.io.files import atomic_write_json
    from defectscope.maps.detector import Detector
    from defectscope.outputs.map_files import refuse_overwrite

    options = MAPPING.build(args)
    refuse_overwrite(args.out, [args.artifact, args.frame])
    frame = read_frame_option(args.frame, args)
    with Detector.load(
        args.artifact, backend=args.backend, dense=dense_for(options.mode), options=options
    ) as det:
        found = det.find(frame, options)
    rois = found.rois
    atomic_write_json(args.out, rois)
    print(f"{len(rois)} ROIs -> {args.out}")
    for line in map_notes(found.result):
        print(line)
    return 0


def cmd_score_simulated(args: argparse.Namespace) -> int:
    from defectscope.io.files import atomic_write_json
    from defectscope.maps.detector import Detector
    from defectscope.outputs.map_files import refuse_overwrite
    from defectscope.studies.simulated import score_simulated

    options = MAPPING.build(args)
    if args.json is not None:
        refuse_overwrite(args.json, [args.artifact, args.simulated / "truth.json"])
    with Detector.load(
        args.artifact, backend=args.backend, dense=dense_for(options.mode), options=options
    ) as det:
        score = score_simulated(
            det,
            args.simulated,
            options.stride,
            args.tolerance,
            args.known_only,
            options.mode,
            scale=options.scale,
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


def cmd_cluster(args: argparse.Namespace) -> int:
    from defectscope.outputs.clusters import cluster_dataset, cluster_frame, is_frame
    from defectscope.outputs.map_files import refuse_overwrite

    common = {
        "k": args.k,
        "k_range": (args.k_min, args.k_max),
        "variance": args.variance,
        "backend": args.backend,
        "seed": args.seed,
    }
    refuse_overwrite(args.out, [args.source, args.model])
    if is_frame(args.source):
        scale = MAPPING.build(args).scale
        frame = read_frame_option(args.source, args)
        report = cluster_frame(
            frame, args.model, args.out, stride=args.stride, scale=scale, **common
        )
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


def cmd_report(args: argparse.Namespace) -> int:
    from defectscope.outputs.report import write_report

    print(f"report -> {write_report(args.run_dir, args.out)}")
    return 0


def add_map(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="model directory, .onnx file or TensorRT engine")
    p.add_argument("frame", type=Path)
    p.add_argument("--out", type=Path, required=True)
    add_backend_option(p)
    MAPPING.add(p)
    add_frame_options(p)
    p.set_defaults(func=cmd_map)


def add_roi(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path)
    p.add_argument("frame", type=Path)
    p.add_argument("--out", type=Path, required=True, help="rois.json to write")
    add_backend_option(p)
    MAPPING.add(p)
    add_frame_options(p)
    p.set_defaults(func=cmd_roi)


def add_score_simulated(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="model directory, .onnx file or TensorRT engine")
    p.add_argument("simulated", type=Path, help="a 'defectscope simulate' output folder")
    p.add_argument("--tolerance", type=float, help="pixels; default half the lattice spacing")
    p.add_argument("--known-only", action="store_true", help="leave unknown regions out")
    p.add_argument("--json", type=Path, help="write the scores here")
    add_backend_option(p)
    # What score_simulated takes of the map options.
    MAPPING.add(p, only=("stride", "mode", "background", "batch_size", "scale"))
    p.set_defaults(func=cmd_score_simulated)


def add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="patch dataset folder or frame file")
    p.add_argument("--model", type=Path, required=True, help="model dir, .onnx or engine")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", type=int, help="fixed number of clusters (default: by silhouette)")
    p.add_argument("--k-min", type=int, default=2)
    p.add_argument("--k-max", type=int, default=10)
    p.add_argument("--variance", type=float, default=0.95, help="PCA variance kept")
    p.add_argument("--stride", type=int, default=16, help="window stride for frames")
    add_backend_option(p)
    p.add_argument("--seed", type=int, default=0)
    MAPPING.add(p, only=("scale",))  # frames only: resampled to the model's scale
    add_frame_options(p)
    p.set_defaults(func=cmd_cluster)


def add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="HTML file (default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
