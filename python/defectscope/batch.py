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

from defectscope.io import FRAME_SUFFIXES, atomic_write_bytes, atomic_write_json, atomic_write_text

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
_CHUNK = 1 << 20


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


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
    from defectscope.detector import Detector

    key = (artifact, backend, threads, background)
    if key not in _DETECTORS:
        _DETECTORS[key] = Detector.load(
            artifact, backend=backend, threads=threads, background=background
        )
    return _DETECTORS[key]


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
) -> dict:
    """Map one file into its output folder and return its index row (never raises).

    A frame whose outputs are already complete for the same file and model hashes
    is not mapped again; its stored row is returned with ``status`` 'skipped'.
    """
    from defectscope.io import read_frame
    from defectscope.outputs import write_map_outputs
    from defectscope.rois import select_rois

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
    try:
        frame = read_frame(path, channel, frame_index, sum_frames)
        height, width = frame.data.shape
        row.update(height=height, width=width)
        if frame.calibration is not None:
            row.update(pixel_size=frame.calibration.scale[0], unit=frame.calibration.unit)
        detector = _detector(artifact, backend, threads, background)
        result = detector.map(frame, stride=stride)
        write_map_outputs(frame.data, result, folder, inputs=[path, artifact])
        rois = select_rois(result, top, unknown=unknown)
        atomic_write_json(folder / "rois.json", rois)
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
        row["status"] = "ok"
    except Exception as exc:  # one bad file is a row with its error, the run goes on
        row.update(status="error", error=f"{path}: {type(exc).__name__}: {exc}")
    row["total_ms"] = round((time.perf_counter() - started) * 1e3, 1)
    if row["status"] == "ok":  # written last: the outputs are complete (errors are redone)
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

    Returns
    -------
    list of dict
        The index rows, sorted by file; ``status`` is 'ok', 'skipped' (done by an
        earlier run) or 'error' (with ``error``).
    """
    from distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    out = Path(out)
    artifact = str(Path(artifact).resolve())
    files = find_sources(sources)
    out.mkdir(parents=True, exist_ok=True)
    model_hash = artifact_hash(artifact)
    cores = len(os.sched_getaffinity(0))
    if scheduler == "local":
        workers = workers or max(1, cores // 2)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
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
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    write_index(out, rows)
    return sorted(rows, key=lambda r: r["file"])
