"""Map a folder (or an archive) of microscope files on Dask, resumably.

Each frame is one Dask task. A worker keeps its engine for every frame it maps
(one engine per worker process, loaded on its first frame). Each frame's outputs go
to their own folder, written atomically with a ``done.json`` record last; a rerun
skips frames whose record matches the file's and the model's hashes, so a run
stopped or a worker killed part-way loses nothing but the frames in flight, which
Dask reschedules. The index (``index.parquet`` and ``index.csv``) is rebuilt from
the records at the end of every run.

Dask (``distributed``) and pyarrow are the ``scale`` extra; nothing else in the
package needs them.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from defectscope.io.files import atomic_write_bytes, atomic_write_json, atomic_write_text, file_hash
from defectscope.io.frames import FRAME_SUFFIXES

INDEX_COLUMNS = (
    "file",
    "file_hash",
    "model_hash",
    "status",
    "error",
    "output",
    "height",
    "width",
    "pixel_size",
    "unit",
    "n_windows",
    "n_regions",
    "n_unknown_windows",
    "top_roi_label",
    "top_roi_score",
    "top_roi_center_y",
    "top_roi_center_x",
    "map_ms",
    "total_ms",
    "worker",
)
RECORD = "done.json"


def find_sources(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named, found in folders (recursively) or matched by globs, sorted, unique.

    Only files ``read_frame`` can open are taken from folders and globs; a TIA
    ``.emi`` is left out when its ``.ser`` data files are there (they hold the same
    image). A named file is always kept, so a wrong one gets its error row.
    """
    found: set[Path] = set()
    for source in sources:
        text = os.fspath(source)
        path = Path(text)
        if path.is_file():
            found.add(path.resolve())
            continue
        if path.is_dir():
            candidates = (p for p in path.rglob("*") if p.is_file())
        elif glob.has_magic(text):
            candidates = (Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        else:
            raise FileNotFoundError(f"{text}: no such file, folder or matching glob")
        found.update(p.resolve() for p in candidates if p.suffix.lower() in FRAME_SUFFIXES)
    files = sorted(found)
    return [
        p
        for p in files
        if not (p.suffix.lower() == ".emi" and any(p.parent.glob(f"{glob.escape(p.stem)}_*.ser")))
    ]


def artifact_hash(artifact: str | os.PathLike) -> str:
    """SHA-256 over a model artifact: a file, or every file of a model directory."""
    path = Path(artifact)
    if path.is_file():
        return file_hash(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model artifact not found")
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(item.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file_hash(item).encode())
    return digest.hexdigest()


def output_folder(out: Path, path: Path, digest: str) -> Path:
    """A frame's own output folder: its name plus a short content hash (names repeat)."""
    return out / "frames" / f"{path.stem}-{digest[:12]}"


def _completed(folder: Path, digest: str, model: str) -> dict | None:
    """The frame's record when its outputs are complete for this file and model."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if record.get("file_hash") != digest or record.get("model_hash") != model:
        return None
    if record.get("status") == "ok" and not (folder / "rois.json").is_file():
        return None
    return record


# One engine per worker process, kept between frames: loading costs more than a frame.
_DETECTORS: dict[tuple, object] = {}


def _detector(artifact: str, backend: str, threads: int, background: str | None):
    from defectscope.maps.detector import Detector

    key = (artifact, backend, threads, background)
    if key not in _DETECTORS:
        _DETECTORS[key] = Detector.load(
            artifact, backend=backend, threads=threads, background=background
        )
    return _DETECTORS[key]


def frame_pixels(path: str | os.PathLike) -> int | None:
    """Pixels of a 2-D ``.npy`` or TIFF frame from its header (None for other formats)."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        elif suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
        else:
            return None
    except Exception:  # unreadable: the normal path reports why
        return None
    return int(np.prod(shape[:2])) if len(shape) == 2 else None


def open_large_frame(path: str | os.PathLike) -> np.ndarray:
    """A 2-D ``.npy`` or uncompressed TIFF frame as a read-only memory map (else read)."""
    from defectscope.io.frames import read_frame

    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if suffix in (".tif", ".tiff"):
            import tifffile

            return tifffile.memmap(path, mode="r")
    except (ValueError, OSError):  # compressed or tiled: read it whole
        pass
    return read_frame(path).data


def _describe_map(row: dict, result, rois: list[dict]) -> None:
    """The map's figures in its index row."""
    row.update(
        n_windows=int(result.labels.size),
        n_regions=len(result.regions()),
        n_unknown_windows=int(result.unknown.sum()) if result.unknown is not None else None,
        map_ms=round(float(result.timing_ms["total"]), 1),
    )
    if rois:
        row.update(
            top_roi_label=rois[0]["label"],
            top_roi_score=float(rois[0]["score"]),
            top_roi_center_y=float(rois[0]["center"][0]),
            top_roi_center_x=float(rois[0]["center"][1]),
        )


def map_file(
    path: str,
    out: str,
    artifact: str,
    model_hash: str,
    stride: int = 16,
    top: int = 10,
    backend: str = "auto",
    threads: int = 1,
    background: str | None = None,
    unknown: str = "ignore",
    channel: str | None = None,
    frame_index: int | None = None,
    sum_frames: bool = False,
    large_pixels: int | None = None,
) -> dict:
    """Map one file into its output folder and return its index row (never raises).

    A frame whose outputs are already complete for the same file and model hashes
    is not mapped again; its stored row is returned with ``status`` 'skipped'. A
    2-D frame of more than ``large_pixels`` pixels is not read here: its row comes
    back with ``status`` 'large', for :func:`map_large_frame` to map in bands.
    """
    from defectscope.io.frames import read_frame
    from defectscope.maps.rois import select_rois
    from defectscope.outputs.map_files import write_map_outputs

    started = time.perf_counter()
    row = dict.fromkeys(INDEX_COLUMNS)
    row.update(file=str(path), model_hash=model_hash, worker=f"{os.uname().nodename}:{os.getpid()}")
    try:
        digest = file_hash(path)
    except OSError as exc:
        return {**row, "status": "error", "error": f"{path}: {exc.strerror or exc}"}
    folder = output_folder(Path(out), Path(path), digest)
    row.update(file_hash=digest, output=str(folder))
    done = _completed(folder, digest, model_hash)
    if done is not None:
        return {**done, "status": "skipped" if done["status"] == "ok" else done["status"]}
    pixels = frame_pixels(path) if large_pixels else None
    if pixels is not None and pixels > large_pixels:
        return {**row, "status": "large"}
    try:
        frame = read_frame(path, channel, frame_index, sum_frames)
        height, width = frame.data.shape
        row.update(height=height, width=width)
        if frame.calibration is not None:
            row.update(pixel_size=frame.calibration.scale[0], unit=frame.calibration.unit)
        detector = _detector(artifact, backend, threads, background)
        result = detector.map(frame, stride=stride)
        rois = select_rois(result, top, unknown=unknown)
        write_map_outputs(frame.data, result, folder, inputs=[path, artifact], rois=rois)
        atomic_write_json(folder / "rois.json", rois)
        _describe_map(row, result, rois)
        row["status"] = "ok"
    except Exception as exc:  # one bad file is a row with its error, the run goes on
        row.update(status="error", error=f"{path}: {type(exc).__name__}: {exc}")
    row["total_ms"] = round((time.perf_counter() - started) * 1e3, 1)
    if row["status"] == "ok":  # written last: the outputs are complete (errors are redone)
        atomic_write_json(folder / RECORD, row)
    return row


def _band_chunks(height: int, band: int, patch: int) -> tuple[int, ...]:
    """Row chunks of ``band`` rows; a remainder shorter than a patch joins the last one,
    so the chunk that holds the frame's bottom edge always holds a whole window."""
    chunks = [band] * (height // band)
    remainder = height - sum(chunks)
    if remainder and (remainder >= patch or not chunks):
        chunks.append(remainder)
    elif remainder:
        chunks[-1] += remainder
    return tuple(chunks)


def _map_band(
    band: np.ndarray,
    artifact: str,
    backend: str,
    threads: int,
    stride: int,
    patch: int,
    values: int,
    background: str | None = None,
) -> np.ndarray:
    """One band's windows as ``(rows, cols, classes + embedding + 2)``: probabilities,
    embedding, uncertainty (NaN without a density) and unknown (0/1).

    Window by window: a dense pass over a band would see the band's edges as the
    frame's (padding, normalization footprint), so bands would not add up to the map
    of the whole frame.
    """
    detector = _detector(artifact, backend, threads, background)
    result = detector.map(np.ascontiguousarray(band), stride=stride, mode="window")
    rows, cols = result.grid_shape
    out = np.full((rows, cols, values), np.nan, np.float32)
    n_classes = result.probabilities.shape[-1]
    out[..., :n_classes] = result.probabilities
    out[..., n_classes : values - 2] = result.embeddings
    if result.uncertainty is not None:
        out[..., -2] = result.uncertainty
        out[..., -1] = result.unknown
    return out


def map_large_frame(
    frame: np.ndarray,
    artifact: str | os.PathLike,
    client=None,
    stride: int = 16,
    band: int = 1024,
    backend: str = "auto",
    threads: int = 1,
    calibration=None,
    background: str | None = None,
):
    """Map one frame too large for a worker in bands across Dask workers.

    The frame becomes a Dask array of ``band``-row chunks (``band`` a multiple of the
    stride); ``dask.array.map_overlap`` gives each chunk a trailing halo of
    ``patch - stride`` rows, so every window whose top-left corner lies in the chunk
    is whole, and each worker maps its band with its own engine. The windows,
    probabilities, embeddings, uncertainty and regions equal those of
    ``Detector.map`` on the whole frame.

    Parameters
    ----------
    frame : ndarray (H, W)
        In memory or a ``np.memmap`` (bands are read where they are mapped).
    client : distributed.Client, optional
        Default: the current client, or Dask's local scheduler without one.

    Returns
    -------
    MapResult
    """
    import dask.array as da

    from defectscope.maps.detector import Detector, check_stride
    from defectscope.maps.result import MapResult
    from defectscope.tiling.tiler import check_frame, window_origins

    artifact = str(artifact)
    with Detector.load(
        artifact, backend=backend, warmup=False, background=background, dense=False
    ) as det:
        config, classes, background = det.engine.config, det.classes, det.background
    frame = check_frame(frame)
    patch = config.patch_size
    if frame.shape[0] < patch or frame.shape[1] < patch:
        raise ValueError(f"frame {frame.shape} is smaller than the {patch}x{patch} patch")
    stride = check_stride(stride, patch)
    if isinstance(band, bool) or not isinstance(band, int) or band < patch or band % stride:
        raise ValueError(
            f"band must be a multiple of the stride ({stride}) of at least {patch} rows, "
            f"got {band!r}"
        )
    if calibration is not None:
        calibration.check_extent(frame.shape)
    height, width = frame.shape
    chunks = _band_chunks(height, band, patch)
    n_classes = len(classes)
    values = n_classes + config.embedding_dim + 2
    origins = window_origins(frame.shape, patch, stride)
    n_cols = len(np.unique(origins[:, 1]))
    band_rows = []
    for index, rows in enumerate(chunks):
        start = sum(chunks[:index])
        # Windows whose top-left row lies in this chunk (the last chunk sees the edge).
        inside = (origins[::n_cols, 0] >= start) & (origins[::n_cols, 0] < start + rows)
        band_rows.append(int(inside.sum()))
    lazy = da.from_array(frame, chunks=(chunks, width))
    mapped = da.map_overlap(
        _map_band,
        lazy,
        depth={0: (0, patch - stride), 1: 0},
        boundary="none",
        trim=False,
        dtype=np.float32,
        chunks=(tuple(band_rows), (n_cols,), (values,)),
        new_axis=[2],
        artifact=artifact,
        backend=backend,
        threads=threads,
        stride=stride,
        patch=patch,
        values=values,
        background=background,
    )
    started = time.perf_counter()
    grid = client.compute(mapped).result() if client is not None else mapped.compute()
    rows = len(origins) // n_cols
    if grid.shape != (rows, n_cols, values):
        raise RuntimeError(f"bands gave a {grid.shape[:2]} window grid, expected {(rows, n_cols)}")
    uncertainty = grid[..., -2]
    has_density = not np.isnan(uncertainty).all()
    return MapResult(
        origins=origins,
        grid_shape=(rows, n_cols),
        probabilities=np.ascontiguousarray(grid[..., :n_classes]),
        embeddings=np.ascontiguousarray(grid[..., n_classes:-2]),
        classes=classes,
        background=background,
        frame_shape=(height, width),
        patch_size=patch,
        timing_ms={"total": (time.perf_counter() - started) * 1000, "bands": len(chunks)},
        calibration=calibration,
        uncertainty=np.ascontiguousarray(uncertainty) if has_density else None,
        unknown=grid[..., -1].astype(bool) if has_density else None,
    )


def _map_large_file(row: dict, client, artifact: str, options: dict, top: int, band: int):
    """Map a frame flagged 'large' in bands across the workers; its finished row."""
    from defectscope.maps.rois import select_rois
    from defectscope.outputs.map_files import write_map_outputs

    started = time.perf_counter()
    path, folder = row["file"], Path(row["output"])
    try:
        frame = open_large_frame(path)
        row.update(height=frame.shape[0], width=frame.shape[1])
        result = map_large_frame(
            frame,
            artifact,
            client,
            stride=options["stride"],
            band=band,
            backend=options["backend"],
            threads=options["threads"],
            background=options.get("background"),
        )
        rois = select_rois(result, top, unknown=options["unknown"])
        write_map_outputs(frame, result, folder, inputs=[path, artifact], rois=rois)
        atomic_write_json(folder / "rois.json", rois)
        _describe_map(row, result, rois)
        row["status"] = "ok"
    except Exception as exc:
        row.update(status="error", error=f"{path}: {type(exc).__name__}: {exc}")
    row["total_ms"] = round((time.perf_counter() - started) * 1e3, 1)
    if row["status"] == "ok":
        atomic_write_json(folder / RECORD, row)
    return row


def write_index(out: Path, rows: Sequence[dict]) -> Path:
    """Write ``index.parquet`` and its twin ``index.csv`` atomically; returns the Parquet path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: r["file"])
    table = pa.Table.from_pylist(
        [{c: r.get(c) for c in INDEX_COLUMNS} for r in rows], schema=_schema(pa)
    )
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    atomic_write_bytes(out / "index.parquet", buffer.getvalue().to_pybytes())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=INDEX_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "index.csv", text.getvalue())
    return out / "index.parquet"


def _schema(pa):
    numbers = {
        "height": pa.int64(),
        "width": pa.int64(),
        "n_windows": pa.int64(),
        "n_regions": pa.int64(),
        "n_unknown_windows": pa.int64(),
        "pixel_size": pa.float64(),
        "top_roi_score": pa.float64(),
        "top_roi_center_y": pa.float64(),
        "top_roi_center_x": pa.float64(),
        "map_ms": pa.float64(),
        "total_ms": pa.float64(),
    }
    return pa.schema([(c, numbers.get(c, pa.string())) for c in INDEX_COLUMNS])


def engine_threads(workers: int, cores: int | None = None) -> int:
    """Engine threads per worker so that workers x threads does not exceed the cores."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, workers))


def run_batch(
    sources: Iterable[str | os.PathLike],
    artifact: str | os.PathLike,
    out: str | os.PathLike,
    stride: int = 16,
    top: int = 10,
    scheduler: str = "local",
    workers: int | None = None,
    backend: str = "auto",
    background: str | None = None,
    unknown: str = "ignore",
    channel: str | None = None,
    frame_index: int | None = None,
    sum_frames: bool = False,
    progress: bool = True,
    large_pixels: int = 8192 * 8192,
    band: int = 1024,
) -> list[dict]:
    """Map every frame of ``sources`` on Dask and write the index under ``out``.

    Parameters
    ----------
    sources : iterable of path-like or str
        Files, folders (searched recursively) and globs.
    artifact : path-like
        Model directory, ``.onnx`` file or TensorRT engine; loaded once per worker.
    out : path-like
        ``frames/<name>-<hash>/`` per frame, plus ``index.parquet`` and ``index.csv``.
    scheduler : str
        'local' starts a ``distributed.LocalCluster`` of worker processes on this
        machine; ``tcp://host:8786`` sends the work to a running scheduler.
    workers : int, optional
        Worker processes of the local cluster (default: one per two cores, at
        least one); engine threads per worker are cores // workers.
    large_pixels : int
        A 2-D ``.npy`` or TIFF frame with more pixels is mapped in bands of
        ``band`` rows across the workers (:func:`map_large_frame`) instead of by
        one worker.

    Returns
    -------
    list of dict
        The index rows, sorted by file; ``status`` is 'ok', 'skipped' (done by an
        earlier run) or 'error' (with ``error``).
    """
    from distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    out = Path(out)
    artifact = str(Path(artifact).resolve())
    files = find_sources(sources)
    out.mkdir(parents=True, exist_ok=True)
    model_hash = artifact_hash(artifact)
    cores = len(os.sched_getaffinity(0))
    if scheduler == "local":
        workers = max(1, cores // 2) if workers is None else workers
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
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
        options = {
            "stride": stride,
            "top": top,
            "backend": backend,
            "threads": engine_threads(n_workers, cores) if cluster is not None else 0,
            "background": background,
            "unknown": unknown,
            "channel": channel,
            "frame_index": frame_index,
            "sum_frames": sum_frames,
            "large_pixels": large_pixels,
        }
        futures = [
            client.submit(
                map_file,
                str(f),
                str(out),
                artifact,
                model_hash,
                **options,
                pure=False,
            )
            for f in files
        ]
        rows = []
        bar = tqdm(total=len(futures), desc="frames", unit="frame", disable=not progress)
        for future in as_completed(futures):
            try:
                rows.append(future.result())
            except Exception as exc:  # the task itself was lost (e.g. killed too often)
                index = futures.index(future)
                rows.append(
                    {
                        **dict.fromkeys(INDEX_COLUMNS),
                        "file": str(files[index]),
                        "model_hash": model_hash,
                        "status": "error",
                        "error": f"{files[index]}: {type(exc).__name__}: {exc}",
                    }
                )
            bar.update()
        bar.close()
        for index, row in enumerate(rows):
            if row["status"] == "large":
                rows[index] = _map_large_file(row, client, artifact, options, top, band)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    write_index(out, rows)
    return sorted(rows, key=lambda r: r["file"])
