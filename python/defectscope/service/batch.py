"""Map a folder (or an archive) of microscope files on Dask, resumably.

Each frame is one Dask task (:func:`~.batch_map.map_file`); a worker keeps its engine
for every frame it maps (:mod:`.batch_engines`). Each input is keyed by its path
relative to the input root and gets its own output folder ``frames/<key>/``
(:mod:`.batch_sources`), made whole in a staging folder with its record last
(:mod:`.batch_records`). A rerun skips a frame whose record matches the file's hash,
the hash of everything the model loads (:mod:`.batch_artifact`), the map options and
the reading, and whose outputs are all there as recorded; a run stopped or a worker
killed part-way loses nothing but the frames in flight, which Dask reschedules. A
frame too large for a worker is mapped in bands across them (:mod:`.batch_bands`).
The index (``index.parquet`` and ``index.csv``, :mod:`.batch_index`) lists this run's
inputs, one row each.

Dask (``distributed``) and pyarrow are the ``scale`` extra; nothing else in the
package needs them. The names of the modules above are re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from defectscope.io.files import file_hash
from defectscope.maps.options import MapOptions
from defectscope.service.batch_artifact import artifact_files, artifact_hash
from defectscope.service.batch_bands import band_chunks, check_band, map_large_frame
from defectscope.service.batch_engines import cached_detector, clear_detectors, engine_threads
from defectscope.service.batch_frames import frame_pixels, open_large_frame
from defectscope.service.batch_index import write_index
from defectscope.service.batch_map import (
    batch_options,
    map_file,
    map_large_file,
    options_text,
    reading,
    task_lost,
)
from defectscope.service.batch_records import INDEX_COLUMNS, RECORD, completed, output_folder
from defectscope.service.batch_sources import find_sources, keyed_sources, owned_paths

__all__ = [
    "INDEX_COLUMNS",
    "RECORD",
    "artifact_files",
    "artifact_hash",
    "band_chunks",
    "cached_detector",
    "clear_detectors",
    "completed",
    "engine_threads",
    "file_hash",
    "find_sources",
    "frame_pixels",
    "keyed_sources",
    "map_file",
    "map_large_frame",
    "open_large_frame",
    "output_folder",
    "owned_paths",
    "run_batch",
    "write_index",
]

# Dask's loggers: quiet (WARNING) unless a run is verbose.
_DASK_LOGGERS = ("distributed", "dask")


@contextlib.contextmanager
def _dask_logging(level: int) -> Iterator[None]:
    """Dask's loggers at ``level`` in this process for the run, then as they were."""
    loggers = [logging.getLogger(name) for name in _DASK_LOGGERS]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.setLevel(old)


def _positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_run(
    artifact: Path,
    out: Path,
    scheduler,
    workers,
    backend,
    channel,
    frame_index,
    sum_frames,
    large_pixels,
    band,
    stride: int,
) -> None:
    """Refuse bad settings before any work (and before a cluster starts)."""
    from defectscope.engines.loader import BACKENDS

    _positive_int("workers", workers, allow_none=True)
    _positive_int("large_pixels", large_pixels)
    check_band(band, stride)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(scheduler, str) or not scheduler:
        raise ValueError(f"scheduler must be 'local' or a scheduler address, got {scheduler!r}")
    if channel is not None and not isinstance(channel, str):
        raise ValueError(f"channel must be a signal name, got {channel!r}")
    if frame_index is not None and (
        isinstance(frame_index, bool) or not isinstance(frame_index, int) or frame_index < 0
    ):
        raise ValueError(f"frame must be an integer >= 0, got {frame_index!r}")
    if not isinstance(sum_frames, bool):
        raise ValueError(f"sum_frames must be true or false, got {sum_frames!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    target = out.resolve()
    if target == artifact or (artifact.is_dir() and artifact in target.parents):
        # Outputs in the model directory would change its hash and remap every frame.
        raise ValueError(f"{out}: lies in the model directory {artifact}; choose another --out")


def run_batch(
    sources: Iterable[str | os.PathLike],
    artifact: str | os.PathLike,
    out: str | os.PathLike,
    stride: int | None = None,
    top: int | None = None,
    scheduler: str = "local",
    workers: int | None = None,
    backend: str = "auto",
    background: str | None = None,
    unknown: str | None = None,
    channel: str | None = None,
    frame_index: int | None = None,
    sum_frames: bool = False,
    progress: bool = True,
    large_pixels: int = 8192 * 8192,
    band: int = 1024,
    options: MapOptions | None = None,
    verbose: bool = False,
) -> list[dict]:
    """Map every frame of ``sources`` on Dask and write the index under ``out``.

    Parameters
    ----------
    sources : iterable of path-like or str
        Files, folders (searched recursively) and globs. What the run writes under
        ``out`` is never an input (see
        :func:`~defectscope.service.batch_sources.owned_paths`).
    artifact : path-like
        Model directory, ``.onnx`` file or TensorRT engine; loaded once per worker.
    out : path-like
        ``frames/<key>/`` per input (``<key>`` its path relative to the input root),
        plus ``index.parquet`` and ``index.csv``. Not inside the model directory.
    stride, top, background, unknown
        The :class:`MapOptions` fields ``stride``, ``top_k``, ``background`` and
        ``unknown``; give them here or in ``options`` (default: MapOptions' defaults
        with ``top_k`` 10). The options are recorded with every frame, and a frame
        mapped with other options is mapped again.
    scheduler : str
        'local' starts a ``distributed.LocalCluster`` of worker processes on this
        machine; ``tcp://host:8786`` sends the work to a running scheduler.
    workers : int, optional
        Worker processes of the local cluster (default: one per two cores, at
        least one); engine threads per worker are cores // workers.
    backend : str
        Engine backend (see ``load_engine``).
    channel, frame_index, sum_frames
        How files of several signals or frames are read (see ``read_frame``).
    progress : bool
        Show a progress bar.
    large_pixels : int
        A 2-D ``.npy`` or TIFF frame with more pixels is mapped in bands of
        ``band`` rows across the workers (:func:`map_large_frame`) instead of by
        one worker.
    band : int
        Rows per band: a multiple of the stride (and at least a patch).
    options : MapOptions, optional
    verbose : bool
        Let Dask log at INFO; by default its loggers say only WARNING and above.

    Returns
    -------
    list of dict
        The index rows, sorted by key; ``status`` is 'ok', 'skipped' (done by an
        earlier run) or 'error' (with ``error``).

    Raises
    ------
    ValueError
        For bad options or settings, before any cluster starts (the message names
        the setting).
    FileNotFoundError
        For a source or model that does not exist.
    """
    options = batch_options(options, stride, top, background, unknown)
    out = Path(out)
    artifact_path = Path(artifact).resolve()
    _check_run(
        artifact_path,
        out,
        scheduler,
        workers,
        backend,
        channel,
        frame_index,
        sum_frames,
        large_pixels,
        band,
        options.stride,
    )
    artifact = str(artifact_path)
    files = keyed_sources(sources, out)
    model_hash = artifact_hash(artifact)
    out.mkdir(parents=True, exist_ok=True)
    read = reading(channel, frame_index, sum_frames)
    level = logging.INFO if verbose else logging.WARNING
    with _dask_logging(level):
        rows = _run_on_dask(
            files, artifact, out, model_hash, options, scheduler, workers, backend, read,
            progress, large_pixels, band, level,
        )  # fmt: skip
    write_index(out, rows)
    return sorted(rows, key=lambda r: (r["key"] or "", r["file"]))


def _run_on_dask(
    files, artifact, out, model_hash, options, scheduler, workers, backend, read, progress,
    large_pixels, band, level,
) -> list[dict]:  # fmt: skip
    from distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    cores = len(os.sched_getaffinity(0))
    if scheduler == "local":
        workers = max(1, cores // 2) if workers is None else workers
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=level,
        )
        client = Client(cluster)
    else:
        cluster = None
        client = Client(scheduler)
    try:
        try:
            print(f"Dask dashboard: {client.dashboard_link}")
        except (KeyError, AttributeError):  # no dashboard (bokeh not installed)
            print(f"Dask scheduler: {client.scheduler.address}")
        n_workers = max(1, len(client.scheduler_info()["workers"]))
        threads = engine_threads(n_workers, cores) if cluster is not None else 0
        text = options_text(options)
        futures = [
            client.submit(
                map_file,
                str(source.path),
                str(out),
                artifact,
                model_hash,
                backend=backend,
                threads=threads,
                channel=read["channel"],
                frame_index=read["frame"],
                sum_frames=read["sum"],
                large_pixels=large_pixels,
                options=options,
                source_key=source.key,
                pure=False,
            )
            for source in files
        ]
        rows = []
        bar = tqdm(total=len(futures), desc="frames", unit="frame", disable=not progress)
        for future in as_completed(futures):
            try:
                rows.append(future.result())
            except Exception as exc:  # the task itself was lost (e.g. killed too often)
                source = files[futures.index(future)]
                rows.append(task_lost(source.path, source.key, model_hash, text, exc))
            bar.update()
        bar.close()
        for index, row in enumerate(rows):
            if row["status"] == "large":
                rows[index] = map_large_file(
                    row, client, artifact, options, band, backend, threads, read
                )
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return rows
