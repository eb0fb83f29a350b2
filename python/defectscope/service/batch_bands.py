"""One frame too large for a worker, mapped in bands of rows across the Dask workers.

The frame becomes a Dask array of ``band``-row chunks; ``dask.array.map_overlap``
gives each chunk a trailing halo of ``patch - stride`` rows, so every window whose
top-left corner lies in the chunk is whole, and each worker maps its band window by
window with its own engine. The bands add up to the map of the whole frame: the same
windows, labels, probabilities, embeddings, uncertainty and regions (to the rounding
of the engine, which may differ between processes and CPUs).

Scale matching (:mod:`defectscope.maps.scale`) is decided ONCE for the whole frame,
before it is cut into bands: the lattice is measured on at most 16 tiles of 256 x 256
px spread over the frame (a memmap is read only there), so every band is mapped at the
same factor and the decision costs the same whatever the frame's size. When a factor
is applied, the frame is resampled band by band into a temporary float32 memmap
(:func:`~defectscope.maps.scale.resampled_frame`; in memory when the frame is and the
result is under 1 GiB), whose bands are then mapped as above and deleted afterwards;
window origins come back in the original frame's pixels (``round(o / f)``), so the
result equals :meth:`Detector.find <defectscope.maps.detector.Detector.find>`'s map of
the whole frame.
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
        novelty=options.novelty,
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
        Stride, symmetry, NaN policy, background, batch size, ``scale`` (decided once
        for the whole frame, see the module's notes) and ``ood_share``; bands map
        window by window, so ``mode='dense'`` is refused.
    model_hash : str, optional
        The artifact's hash (:func:`~defectscope.service.batch_artifact.artifact_hash`),
        which keys the workers' engine caches; computed when not given.

    Returns
    -------
    MapResult
        In the original frame's pixels; ``info["scale"]`` and ``timing_ms["scale"]``
        as :meth:`Detector.find <defectscope.maps.detector.Detector.find>` gives them.

    Raises
    ------
    ValueError
        For a frame smaller than a patch, a bad band or options that bands cannot do.
    """
    from defectscope.maps.detector import (
        Detector,
        frame_guard,
        guard_info,
        novelty_names,
        novelty_sources,
    )
    from defectscope.maps.result import MapResult
    from defectscope.maps.scale import decide_scale, resampled_frame
    from defectscope.service.batch_artifact import artifact_hash
    from defectscope.tiling.tiler import check_frame

    options = resolve_options(options, stride=stride, background=background)
    if options.mode == "dense":
        raise ValueError("mode 'dense' cannot map a frame in bands; bands map window by window")
    artifact = str(artifact)
    model_hash = model_hash or artifact_hash(artifact)
    with Detector.load(
        artifact, backend=backend, warmup=False, background=options.background, dense=False
    ) as det:
        config, classes, background = det.engine.config, det.classes, det.background
        # Checked here, before any band is sent: a source the model lacks is an error.
        sources = novelty_sources(det.engine, options.novelty)
        novelty = novelty_names(*sources)
        # The density that checks the frame where other sources judge the windows: it
        # reads the embeddings the bands return, so the workers need not score it.
        guard = frame_guard(det.engine, sources[0]) if any(s is not None for s in sources) else None
    frame = check_frame(frame)
    patch = config.patch_size
    if frame.shape[0] < patch or frame.shape[1] < patch:
        raise ValueError(f"frame {frame.shape} is smaller than the {patch}x{patch} patch")
    stride = options.stride
    band = check_band(band, stride, patch)
    if calibration is not None:
        calibration.check_extent(frame.shape)
    started = time.perf_counter()
    decision = decide_scale(frame, calibration, config.scale, options.scale, min_side=patch)
    factor = decision.factor if decision.applied else 1.0
    resampling = time.perf_counter()
    with resampled_frame(frame, factor) as zoomed:
        scale_ms = decision.time_ms + (time.perf_counter() - resampling) * 1000
        origins, grid, n_bands = _map_bands(
            zoomed, client, band, patch, stride, n_classes=len(classes), config=config,
            artifact=artifact, model_hash=model_hash, backend=backend, threads=threads,
            options=options,
        )  # fmt: skip
        del zoomed
    rows, n_cols = grid.shape[:2]
    n_classes = len(classes)
    if factor != 1.0:  # back to the original frame's pixels, as Detector.find does
        origins = np.rint(origins / factor).astype(np.int64)
    uncertainty = grid[..., -2]
    has_density = not np.isnan(uncertainty).all()
    embeddings = np.ascontiguousarray(grid[..., n_classes:-2])
    frame_unknown = None
    if guard is not None and has_density:
        flat = embeddings.reshape(rows * n_cols, -1)
        frame_unknown = guard.score(flat)[2].reshape(rows, n_cols)
    total = (time.perf_counter() - started) * 1000
    return MapResult(
        origins=origins,
        grid_shape=(rows, n_cols),
        probabilities=np.ascontiguousarray(grid[..., :n_classes]),
        embeddings=embeddings,
        classes=classes,
        background=background,
        frame_shape=tuple(frame.shape),
        patch_size=patch,
        timing_ms={"total": total, "scale": scale_ms, "bands": n_bands},
        calibration=calibration,
        uncertainty=np.ascontiguousarray(uncertainty) if has_density else None,
        unknown=grid[..., -1].astype(bool) if has_density else None,
        info={
            "mode": "window",
            "reason": "mapped in bands across workers",
            "scale": {**decision.to_dict(), "time_ms": scale_ms},
            "novelty": novelty,
            **guard_info(None if frame_unknown is None else guard),
        },
        scale=factor,
        ood_threshold=options.ood_share,
        frame_unknown=frame_unknown,
    )


def _map_bands(
    frame, client, band, patch, stride, *, n_classes, config, artifact, model_hash, backend,
    threads, options,
):  # fmt: skip
    """Map ``frame`` (already at the model's scale) in bands; ``(origins, grid, bands)``
    with ``grid`` of shape ``(rows, cols, classes + embedding + 2)``."""
    import dask.array as da

    from defectscope.tiling.tiler import window_origins

    height, width = frame.shape
    chunks = band_chunks(height, band, patch)
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
    grid = client.compute(mapped).result() if client is not None else mapped.compute()
    rows = len(origins) // n_cols
    if grid.shape != (rows, n_cols, values):
        raise RuntimeError(f"bands gave a {grid.shape[:2]} window grid, expected {(rows, n_cols)}")
    return origins, grid, len(chunks)
