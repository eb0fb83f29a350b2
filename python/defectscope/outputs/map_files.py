"""Writing a map's files: staged, then moved in, and never over the inputs.

``defectscope map`` writes ``windows.csv``, ``regions.json``, ``map.json``,
``overlay.png`` and ``confidence.png`` (and ``uncertainty.png`` with a density).
``map.json`` is the metadata of ``windows.csv`` and ``regions.json``
(:func:`map_summary`): how the map was made (dense or window by window), the scale
matching (``scale``: factor, source, measured periods, warning), the window size in the
frame's pixels, and whether the frame is out of distribution. They are made in a hidden
staging folder beside the output folder and moved in only when all succeeded. A staging
folder left by a process that was killed (SIGKILL, power loss) names its process id and
is removed by the next run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.io.files import staging_dir
from defectscope.maps.result import MapResult, windows_csv

MAP_FILES = (
    "windows.csv",
    "regions.json",
    "map.json",
    "overlay.png",
    "confidence.png",
    "uncertainty.png",
)


class OutputPathError(ValueError):
    """An output path would overwrite an input."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwrite(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> Path:
    """``output``, unless writing it would destroy one of ``inputs``.

    An input file may not be the output (by path or as the same file through a link),
    and no existing file inside an input folder (a model directory) may be.
    """
    output = Path(output)
    target = output.resolve()
    for item in inputs:
        item = Path(item)
        source = item.resolve()
        if item.is_dir():
            if output.exists() and source in target.parents:
                raise OutputPathError(
                    f"{output}: refusing to overwrite a file of the input folder {item}"
                )
        elif target == source or _same_file(output, item):
            raise OutputPathError(f"{output}: is the input {item}; choose another output path")
    return output


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Delete staging folders of ``out_dir`` whose writing process no longer runs."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.staging-(\d+)-")
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for entry in out_dir.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def map_summary(result: MapResult) -> dict[str, Any]:
    """What a map's files and replies say about the map as a whole (JSON-ready).

    ``result.info`` (``mode``, ``native_stride``, ``precision``, ``reason``, and
    ``scale``: the scale matching record, see :mod:`defectscope.maps.scale`), plus
    ``frame_shape``, ``grid_shape``, ``patch_size``, ``window_size`` (a window's side in
    the frame's pixels), ``classes``, ``background``, ``calibration`` (or None), and
    ``unknown_share``, ``unexplained_share``, ``out_of_distribution`` and
    ``ood_threshold`` (the first three None without a feature density), and
    ``ood_check_share`` (the embedding density's unexplained share where other
    sources judge the windows, else None). Windows and regions are in the original
    frame's pixels whatever the scale.
    """
    has_density = result.unknown is not None
    return {
        **result.info,
        "scale": result.info.get("scale"),
        "frame_shape": [int(v) for v in result.frame_shape],
        "grid_shape": [int(v) for v in result.grid_shape],
        "patch_size": int(result.patch_size),
        "window_size": float(result.window_size),
        "classes": list(result.classes),
        "background": result.background,
        "calibration": None if result.calibration is None else result.calibration.to_dict(),
        "unknown_share": result.unknown_share if has_density else None,
        "unexplained_share": result.unexplained_share if has_density else None,
        "out_of_distribution": bool(result.out_of_distribution) if has_density else None,
        "ood_threshold": float(result.ood_threshold),
        "ood_check_share": result.ood_check_share,
    }


def write_map_outputs(
    frame: np.ndarray,
    result: MapResult,
    out_dir: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    rois: list[dict] | None = None,
) -> Path:
    """Write ``windows.csv``, ``regions.json``, ``map.json`` (:func:`map_summary`),
    ``overlay.png``, ``confidence.png`` and, when the model has a density,
    ``uncertainty.png``.

    Everything is written in a staging folder beside ``out_dir`` first and then
    moved in, so a failure leaves nothing partial in ``out_dir``. ``inputs`` (the
    frame file, the model) are never overwritten. ``rois`` are drawn on the overlay
    as numbered markers.
    """
    from defectscope.outputs import figures

    out_dir = Path(out_dir)
    inputs = list(inputs)
    for name in MAP_FILES:
        refuse_overwrite(out_dir / name, inputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"{out_dir}: exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    # The umask's mode (0755 by default): mkdtemp's 0700 would stay after the rename.
    staging = staging_dir(out_dir.parent, f".{out_dir.name}.staging-")
    try:
        (staging / "windows.csv").write_text(windows_csv(result))
        regions = result.regions()
        (staging / "regions.json").write_text(json.dumps(regions, indent=2, allow_nan=False) + "\n")
        summary = json.dumps(map_summary(result), indent=2, allow_nan=False)
        (staging / "map.json").write_text(summary + "\n")
        figures.map_overlay(np.asarray(frame), result, staging / "overlay.png", rois=rois)
        figures.map_confidence(result, staging / "confidence.png", frame=np.asarray(frame))
        if result.uncertainty is not None:
            figures.map_uncertainty(np.asarray(frame), result, staging / "uncertainty.png")
        if not out_dir.exists():
            os.replace(staging, out_dir)
        else:
            for item in staging.iterdir():
                os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
