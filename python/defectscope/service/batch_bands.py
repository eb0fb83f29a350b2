"""One frame too large for a worker, mapped in bands of rows across the Dask workers.

The frame becomes a Dask array of ``band``-row chunks; ``dask.array.map_overlap``
gives each chunk a trailing halo of ``patch - stride`` rows, so every window whose
top-left corner lies in the chunk is whole, and each worker maps its band window by
window with its own engine. The bands add up to the map of the whole frame: the same
windows, labels, probabilities, embeddings, uncertainty and regions (to the rounding
of the engine, which may differ between processes and CPUs).
"""

from __future__ import annotations

import itertools
import os
import time

import numpy as np

from defectscope.maps.options import MapOptions, resolve_options
from defectscope.service.batch_engines import cached_detector


def band_chunks(height: int, band: int, patch: int) -> tuple[int, ...]:
    """Row chunks of ``band`` rows; a remainder shorter than a patch joins the last one,
    so the chunk that holds the frame's bottom edge always holds a whole window."""
    chunks = [band] * (height // band)
    remainder = height - sum(chunks)
    if remainder and (remainder >= patch or not chunks):
        chunks.append(remainder)
    elif remainder:
        chunks[-1] += remainder
    return tuple(chunks)


def check_band(band, stride: int, patch: int | None = None) -> int:
    """``band`` as an int: a multiple of ``stride`` of at least ``patch`` rows."""
    least = patch or stride
    if (
        isinstance(band, bool)
        or not isinstance(band, int | np.integer)
        or band < least
        or band % stride
    ):
        raise ValueError(
            f"band must be a multiple of the stride ({stride}) of at least {least} rows, "
            f"got {band!r}"
        )
    return int(band)


def _map_band(
    band: np.ndarray,
    artifact: str,
    model_hash: str,
    backend: str,
    threads: int,
    options_json: dict,
    values: int,
) -> np.ndarray:
    """One band's windows as ``(rows, cols, classes + embedding + 2)``: probabilities,
    embedding, uncertainty (NaN without a density) and unknown (0/1).

    Window by window: a dense pass over a band would see the band's edges as the
    frame's (padding, normalization footprint), so bands would not add up to the map
    of the whole frame.
    """
    options = MapOptions.from_json(options_json)
    detector = cached_detector(
        artifact, model_hash, backend, threads, options.background, options.batch_size
    )
    result = detector.map(
        np.ascontiguousarray(band),
        stride=options.stride,
        nan_policy=options.nan_policy,
        symmetry=options.symmetry,
        mode="window",
    )
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
    stride: int | None = None,
    band: int = 1024,
    backend: str = "auto",
    threads: int = 1,
    calibration=None,
    background: str | None = None,
    options: MapOptions | None = None,
    model_hash: str | None = None,
):
    """Map one frame too large for a worker in bands across Dask workers.

    Parameters
    ----------
    frame : ndarray (H, W)
        In memory or a ``np.memmap`` (bands are read where they are mapped).
    artifact : path-like
        Model directory, ``.onnx`` file or TensorRT engine.
    client : distributed.Client, optional
        Default: the current client, or Dask's local scheduler without one.
    stride, background
        The :class:`MapOptions` fields of those names (default 16 and the model's);
        give them here or in ``options``, not differently in both.
    band : int
        Rows per band: a multiple of the stride, at least a patch.
    backend, threads
        The engine each worker loads, and its threads.
    calibration : Calibration, optional
        Of the whole frame.
    options : MapOptions, optional
        Stride, symmetry, NaN policy, background and batch size; bands map window by
        window, so ``mode='dense'`` is refused.
    model_hash : str, optional
        The artifact's hash (:func:`~defectscope.service.batch_artifact.artifact_hash`),
        which keys the workers' engine caches; computed when not given.

    Returns
    -------
    MapResult

    Raises
    ------
    ValueError
        For a frame smaller than a patch, a bad band or options that bands cannot do.
    """
    import dask.array as da

    from defectscope.maps.detector import Detector
    from defectscope.maps.result import MapResult
    from defectscope.service.batch_artifact import artifact_hash
    from defectscope.tiling.tiler import check_frame, window_origins

    options = resolve_options(options, stride=stride, background=background)
    if options.mode == "dense":
        raise ValueError("mode 'dense' cannot map a frame in bands; bands map window by window")
    artifact = str(artifact)
    model_hash = model_hash or artifact_hash(artifact)
    with Detector.load(
        artifact, backend=backend, warmup=False, background=options.background, dense=False
    ) as det:
        config, classes, background = det.engine.config, det.classes, det.background
    frame = check_frame(frame)
    patch = config.patch_size
    if frame.shape[0] < patch or frame.shape[1] < patch:
        raise ValueError(f"frame {frame.shape} is smaller than the {patch}x{patch} patch")
    stride = options.stride
    band = check_band(band, stride, patch)
    if calibration is not None:
        calibration.check_extent(frame.shape)
    height, width = frame.shape
    chunks = band_chunks(height, band, patch)
    n_classes = len(classes)
    values = n_classes + config.embedding_dim + 2
    origins = window_origins(frame.shape, patch, stride)
    n_cols = len(np.unique(origins[:, 1]))
    starts = np.cumsum((0, *chunks))
    # Windows whose top-left row lies in each chunk (the last chunk sees the edge).
    band_rows = tuple(
        int(((origins[::n_cols, 0] >= lo) & (origins[::n_cols, 0] < hi)).sum())
        for lo, hi in itertools.pairwise(starts)
    )
    lazy = da.from_array(frame, chunks=(chunks, width))
    mapped = da.map_overlap(
        _map_band,
        lazy,
        depth={0: (0, patch - stride), 1: 0},
        boundary="none",
        trim=False,
        dtype=np.float32,
        chunks=(band_rows, (n_cols,), (values,)),
        new_axis=[2],
        artifact=artifact,
        model_hash=model_hash,
        backend=backend,
        threads=threads,
        options_json=options.to_json(),
        values=values,
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
        info={"mode": "window", "reason": "mapped in bands across workers"},
    )
