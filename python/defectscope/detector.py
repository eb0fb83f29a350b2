"""Streaming a frame through an engine: the runtime a microscope program calls.

>>> det = Detector.load("runs/cdte/model", backend="auto")      # doctest: +SKIP
>>> result = det.map(frame, stride=16)                          # doctest: +SKIP
>>> result.labels, result.confidence, result.regions()          # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from defectscope.engines import Engine, load_engine
from defectscope.io import Calibration, Frame
from defectscope.maps import MapResult
from defectscope.tiling import NanPolicy, tile, window_origins


class Detector:
    """A loaded, warmed engine that maps frames.

    Parameters
    ----------
    engine : Engine
    batch_size : int
        Patches per engine call; memory stays bounded by two such batches.
    threads : int
        Tiler threads (0: all cores).
    """

    def __init__(
        self, engine: Engine, batch_size: int = 64, threads: int = 0, background: str | None = None
    ):
        self.engine = engine
        if background is not None and background not in engine.classes:
            raise ValueError(f"background class {background!r} is not among {engine.classes}")
        self.background = background or engine.config.background_class
        self.batch_size = int(batch_size)
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="defectscope-tiler")
        self._buffers = [np.empty((self.batch_size, *engine.input_shape), np.float32) for _ in "ab"]

    @classmethod
    def load(
        cls,
        artifact: str | os.PathLike,
        backend: str = "auto",
        batch_size: int = 64,
        threads: int = 0,
        warmup: bool = True,
        background: str | None = None,
    ) -> Detector:
        """Open a model directory, ``.onnx`` file or TensorRT engine.

        ``background`` names the defect-free class when the model's own choice
        (a class named like 'bulk') is missing or wrong.
        """
        engine = load_engine(artifact, backend, threads=threads)
        detector = cls(engine, batch_size, threads, background)
        if warmup:
            detector.engine.run(np.zeros((1, *detector.engine.input_shape), np.float32))
        return detector

    @property
    def classes(self) -> list[str]:
        return self.engine.classes

    def _check_frame(self, frame) -> np.ndarray:
        frame = np.asarray(frame) if not isinstance(frame, np.ndarray) else frame
        if frame.ndim != 2:
            raise ValueError(f"frame must be a 2-D gray image, got shape {frame.shape}")
        size = self.engine.config.patch_size
        if frame.shape[0] < size or frame.shape[1] < size:
            raise ValueError(f"frame {frame.shape} is smaller than the {size}x{size} patch")
        return frame

    def map(
        self,
        frame: np.ndarray | Frame,
        stride: int = 16,
        keep_embeddings: bool = True,
        nan_policy: NanPolicy = "raise",
        calibration: Calibration | None = None,
    ) -> MapResult:
        """Classify every window of ``frame``.

        The tiler fills batch ``i + 1`` in a worker thread while the engine runs
        batch ``i`` (both release the GIL), so tiling hides behind inference.

        Parameters
        ----------
        frame : ndarray, shape (H, W), or Frame
            Any supported dtype and strides; ``np.memmap`` frames are read in place.
            A :class:`~defectscope.io.Frame` brings its calibration along.
        stride : int
            Window step in pixels.
        keep_embeddings : bool
            Keep per-window embeddings (needed for clustering).
        nan_policy : {'raise', 'zero', 'propagate'}
            See :func:`defectscope.tile`.
        calibration : Calibration, optional
            Pixel size, offset and unit; adds physical coordinates to the outputs.
        """
        started = time.perf_counter()
        if isinstance(frame, Frame):
            calibration = calibration or frame.calibration
            frame = frame.data
        frame = self._check_frame(frame)
        size = self.engine.config.patch_size
        norm = self.engine.config.normalization
        origins = window_origins(frame.shape, size, stride)
        rows = len(np.unique(origins[:, 0]))
        cols = len(origins) // rows
        n = len(origins)
        probabilities = np.empty((n, len(self.classes)), np.float32)
        embeddings = (
            np.empty((n, self.engine.config.embedding_dim), np.float32) if keep_embeddings else None
        )

        def fill(batch: int) -> int:
            chunk = origins[batch * self.batch_size : (batch + 1) * self.batch_size]
            tile(
                frame,
                size,
                origins=chunk,
                normalization=norm,
                out=self._buffers[batch % 2],
                nan_policy=nan_policy,
                threads=self.threads,
            )
            return len(chunk)

        n_batches = -(-n // self.batch_size)
        waited = engine_time = 0.0
        pending = self._pool.submit(fill, 0)
        for batch in range(n_batches):
            t0 = time.perf_counter()
            count = pending.result()
            waited += time.perf_counter() - t0
            if batch + 1 < n_batches:
                pending = self._pool.submit(fill, batch + 1)
            t1 = time.perf_counter()
            probs, emb = self.engine.run(self._buffers[batch % 2][:count])
            engine_time += time.perf_counter() - t1
            start = batch * self.batch_size
            probabilities[start : start + count] = probs
            if embeddings is not None:
                embeddings[start : start + count] = emb
        total = (time.perf_counter() - started) * 1000
        return MapResult(
            origins=origins,
            grid_shape=(rows, cols),
            probabilities=probabilities.reshape(rows, cols, -1),
            embeddings=None if embeddings is None else embeddings.reshape(rows, cols, -1),
            classes=self.classes,
            background=self.background,
            frame_shape=tuple(frame.shape),
            patch_size=size,
            timing_ms={"total": total, "tiling_wait": waited * 1000, "engine": engine_time * 1000},
            calibration=calibration,
        )

    def rois(
        self,
        frame: np.ndarray,
        k: int = 5,
        stride: int = 16,
        min_spacing: float | None = None,
        pixel_size: float | None = None,
        unit: str | None = None,
    ) -> list[dict]:
        """Map ``frame`` and return its ``k`` best regions of interest (see :mod:`rois`).

        ``pixel_size`` and ``unit`` calibrate a bare array; a
        :class:`~defectscope.io.Frame` with a calibration needs neither.
        """
        from defectscope.rois import select_rois

        calibration = None
        if pixel_size is not None:
            calibration = Calibration((pixel_size, pixel_size), (0.0, 0.0), unit or "px")
        result = self.map(frame, stride=stride, keep_embeddings=True, calibration=calibration)
        return select_rois(result, k, min_spacing)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
