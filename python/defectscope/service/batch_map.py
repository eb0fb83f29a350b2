"""One input of a batch run mapped into its output folder: the Dask task.

A frame is mapped through the one path from a frame to results,
:meth:`Detector.find <defectscope.maps.detector.Detector.find>` with the run's
:class:`~defectscope.maps.options.MapOptions`; a frame too large for a worker is mapped
in bands (:mod:`.batch_bands`) and its ROIs ranked once on the merged map. Its
outputs are made in a staging folder and swapped in whole, the record last
(:mod:`.batch_records`), so a frame is either complete or mapped again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.io.files import (
    atomic_write_json,
    file_hash,
    remove_stale_staging,
    replace_dir,
    staging_dir,
)
from defectscope.maps.options import MapOptions, resolve_options
from defectscope.service.batch_engines import cached_detector
from defectscope.service.batch_frames import frame_pixels, open_large_frame
from defectscope.service.batch_records import (
    INDEX_COLUMNS,
    RECORD,
    completed,
    new_row,
    output_folder,
    output_hashes,
    staging_prefixes,
)

# ROIs ranked per frame when neither ``top`` nor ``options`` says (the CLI's default).
BATCH_TOP = 10


def batch_options(
    options: MapOptions | None = None,
    stride: int | None = None,
    top: int | None = None,
    background: str | None = None,
    unknown: str | None = None,
) -> MapOptions:
    """The run's :class:`MapOptions` from ``options`` and the older keywords.

    Keywords left at None are not given; without ``options`` the given ones apply over
    the defaults, with ``top_k`` 10. With ``options`` a given keyword must agree.

    Raises
    ------
    ValueError
        For a bad value (naming the keyword) or a keyword that differs from ``options``.
    """
    if options is None and top is None:
        top = BATCH_TOP
    return resolve_options(options, stride=stride, top=top, background=background, unknown=unknown)


def options_text(options: MapOptions) -> str:
    """The options as one line of JSON, keys sorted: what records and the index hold."""
    return json.dumps(options.to_json(), sort_keys=True)


def reading(channel: str | None, frame_index: int | None, sum_frames: bool) -> dict[str, Any]:
    """How a file is read into a frame; part of the record (another reading remaps)."""
    return {"channel": channel, "frame": frame_index, "sum": bool(sum_frames)}


def describe_map(row: dict, result, rois: list[dict]) -> None:
    """The map's figures in its index row: counts, the frame's unknown share and whether
    it is out of distribution (None without a density), and the scale matching (factor,
    source, whether applied, warning; see :mod:`defectscope.maps.scale`)."""
    density = result.unknown is not None
    scale = result.info.get("scale") or {}
    row.update(
        n_windows=int(result.labels.size),
        n_regions=len(result.regions()),
        n_unknown_windows=int(result.unknown.sum()) if density else None,
        unknown_share=result.unknown_share if density else None,
        out_of_distribution=bool(result.out_of_distribution) if density else None,
        scale_factor=scale.get("factor"),
        scale_source=scale.get("source"),
        scale_applied=scale.get("applied"),
        scale_warning=scale.get("warning"),
        map_ms=round(float(result.timing_ms["total"]), 1),
    )
    if rois:
        row.update(
            top_roi_label=rois[0]["label"],
            top_roi_score=float(rois[0]["score"]),
            top_roi_center_y=float(rois[0]["center"][0]),
            top_roi_center_x=float(rois[0]["center"][1]),
        )


def write_frame_outputs(
    folder: Path,
    frame: np.ndarray,
    result,
    rois: list[dict],
    row: dict,
    read: dict[str, Any],
    inputs: list[str],
    started: float,
) -> dict:
    """Write a mapped frame's outputs and record; returns its finished 'ok' row.

    Everything goes into a staging folder beside ``folder`` (made with the umask's
    mode), the record last, and the staging folder then replaces ``folder`` whole: no
    output of an earlier map of this key survives beside the new ones.
    """
    from defectscope.outputs.map_files import write_map_outputs

    for prefix in staging_prefixes(folder):
        remove_stale_staging(folder.parent, prefix)  # left by a killed worker
    staging = staging_dir(folder.parent, staging_prefixes(folder)[0])
    try:
        write_map_outputs(frame, result, staging, inputs=inputs, rois=rois)
        atomic_write_json(staging / "rois.json", rois)
        describe_map(row, result, rois)
        row.update(status="ok", output=str(folder))
        row["total_ms"] = round((time.perf_counter() - started) * 1e3, 1)
        record = {**row, "reading": read, "outputs": output_hashes(staging)}
        atomic_write_json(staging / RECORD, record)
        replace_dir(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return row


def _failed(row: dict, path: str, exc: BaseException, started: float) -> dict:
    row.update(status="error", error=f"{path}: {type(exc).__name__}: {exc}")
    row["total_ms"] = round((time.perf_counter() - started) * 1e3, 1)
    return row


def map_file(
    path: str,
    out: str,
    artifact: str,
    model_hash: str,
    stride: int | None = None,
    top: int | None = None,
    backend: str = "auto",
    threads: int = 1,
    background: str | None = None,
    unknown: str | None = None,
    channel: str | None = None,
    frame_index: int | None = None,
    sum_frames: bool = False,
    large_pixels: int | None = None,
    options: MapOptions | None = None,
    source_key: str | None = None,
) -> dict:
    """Map one file into its output folder and return its index row (never raises).

    A frame whose outputs are complete for the same file, model, options and reading
    (see :func:`~defectscope.service.batch_records.completed`) is not mapped again;
    its stored row comes back with ``status`` 'skipped', naming this ``path``. A 2-D
    frame of more than ``large_pixels`` pixels is not read here: its row comes back
    with ``status`` 'large', for :func:`map_large_file` to map in bands.

    Parameters
    ----------
    path, out, artifact, model_hash
        The file, the run's output folder, the model and its
        :func:`~defectscope.service.batch_artifact.artifact_hash`.
    stride, top, background, unknown
        :class:`MapOptions` fields (``top`` is ``top_k``), or ``options``.
    backend, threads
        The engine and its threads (0: every core).
    channel, frame_index, sum_frames
        How a file of several signals or frames is read (see ``read_frame``).
    large_pixels : int, optional
        Above this many pixels a 2-D ``.npy``/TIFF frame is left to the bands.
    options : MapOptions, optional
    source_key : str, optional
        The file's path relative to the input root, naming its output folder
        (default: its file name). Not ``key``: Dask's ``submit`` takes that name.
    """
    from defectscope.io.frames import read_frame

    started = time.perf_counter()
    key = source_key or Path(path).name
    try:
        options = batch_options(options, stride, top, background, unknown)
    except (TypeError, ValueError) as exc:
        return _failed(new_row(path, key, model_hash, None), path, exc, started)
    row = new_row(path, key, model_hash, options_text(options))
    read = reading(channel, frame_index, sum_frames)
    try:
        digest = file_hash(path)
    except OSError as exc:
        return {**row, "status": "error", "error": f"{path}: {exc.strerror or exc}"}
    folder = output_folder(out, key)
    row.update(file_hash=digest, output=str(folder))
    expected = {
        "file_hash": digest,
        "model_hash": model_hash,
        "options": row["options"],
        "reading": read,
    }
    done = completed(folder, expected)
    if done is not None:
        stored = {column: done.get(column) for column in INDEX_COLUMNS}
        return {**stored, "file": str(path), "key": key, "output": str(folder), "status": "skipped"}
    pixels = frame_pixels(path) if large_pixels else None
    if pixels is not None and pixels > large_pixels:
        return {**row, "status": "large"}
    try:
        frame = read_frame(path, channel, frame_index, sum_frames)
        height, width = frame.data.shape
        row.update(height=height, width=width)
        if frame.calibration is not None:
            row.update(pixel_size=frame.calibration.scale[0], unit=frame.calibration.unit)
        detector = cached_detector(
            artifact, model_hash, backend, threads, options.background, options.batch_size
        )
        found = detector.find(frame, options)
        return write_frame_outputs(
            folder, frame.data, found.result, found.rois, row, read, [path, artifact], started
        )
    except Exception as exc:  # one bad file is a row with its error, the run goes on
        return _failed(row, path, exc, started)


def map_large_file(
    row: dict,
    client,
    artifact: str,
    options: MapOptions,
    band: int,
    backend: str = "auto",
    threads: int = 1,
    read: dict[str, Any] | None = None,
) -> dict:
    """Map a file flagged 'large' in bands across the workers; its finished row.

    Its ROIs are ranked once, on the merged map, by the same
    :func:`~defectscope.maps.rois.select_rois` (and unknown policy) as a whole frame's.
    Never raises: a failure is the row's error.
    """
    from defectscope.maps.rois import select_rois
    from defectscope.service.batch_bands import map_large_frame

    started = time.perf_counter()
    row = dict(row)
    path, folder = row["file"], Path(row["output"])
    try:
        frame = open_large_frame(path)
        row.update(height=frame.shape[0], width=frame.shape[1])
        result = map_large_frame(
            frame,
            artifact,
            client,
            band=band,
            backend=backend,
            threads=threads,
            options=options,
            model_hash=row["model_hash"],
        )
        rois = select_rois(result, options.top_k, options.min_spacing, unknown=options.unknown)
        read = read if read is not None else reading(None, None, False)
        inputs = [path, artifact]
        return write_frame_outputs(folder, frame, result, rois, row, read, inputs, started)
    except Exception as exc:
        return _failed(row, path, exc, started)


def task_lost(path: str | os.PathLike, key: str, model_hash: str, options_json: str, exc) -> dict:
    """The row of a file whose Dask task itself was lost (a worker killed too often)."""
    row = new_row(str(path), key, model_hash, options_json)
    row.update(status="error", error=f"{path}: {type(exc).__name__}: {exc}", worker=None)
    return row
