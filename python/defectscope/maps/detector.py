"""Streaming a frame through an engine: the runtime a microscope program calls.

>>> det = Detector.load("runs/cdte/model", backend="auto")      # doctest: +SKIP
>>> found = det.find(frame, MapOptions(stride=16, top_k=5))     # doctest: +SKIP
>>> found.result.labels, found.result.regions(), found.rois     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.engines.base import Engine, EngineError
from defectscope.engines.dense import (
    DenseEngine,
    TensorRTDenseEngine,
    dense_map_arrays,
    find_dense_all,
)
from defectscope.engines.loader import load_engine
from defectscope.engines.torch_dense import TorchDenseEngine, load_torch_dense
from defectscope.io.frames import Calibration, Frame
from defectscope.maps.options import MODES, NOVELTY, SYMMETRIES, MapOptions, resolve_options
from defectscope.maps.result import MapResult
from defectscope.maps.rois import select_rois
from defectscope.maps.scale import decide_scale, resampled_frame
from defectscope.tiling.tiler import NanPolicy, check_frame, tile, window_origins

log = logging.getLogger(__name__)

# Windows whose lattice residual a dense map scores per call (4 MB per channel of 64 px
# windows): at least THREADS * MIN_WINDOWS_PER_THREAD (128) of tiling.residual, so that
# every call is split over its threads.
RESIDUAL_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class Findings:
    """What :meth:`Detector.find` returns: the map and the ROIs ranked on it.

    Attributes
    ----------
    result : MapResult
        Per-window classes, confidences, uncertainty and regions.
    rois : list of dict
        The ``options.top_k`` best regions of interest, best first (see
        :func:`~defectscope.maps.rois.select_rois`).
    options : MapOptions
        The options the map was made with.
    """

    result: MapResult
    rois: list[dict]
    options: MapOptions


def _load_dense(
    artifact: Path, engine: Engine, backend: str, threads: int, required: bool
) -> list[DenseEngine | TensorRTDenseEngine]:
    """The dense graphs beside ``artifact`` that suit ``engine`` (see Detector.load).

    ONNX Runtime on the CPU runs the dense ONNX graphs; the TensorRT backend runs their
    TensorRT engines (``export --format tensorrt --dense``); PyTorch on a CUDA GPU runs the
    adapted dense network (``dense/dense.pt``, :mod:`~defectscope.engines.torch_dense`).
    """
    model_dir = artifact if artifact.is_dir() else artifact.parent
    prefer_int8 = getattr(engine, "precision", "int8") == "int8"
    if engine.name == "tensorrt":
        paths = find_dense_all(model_dir, prefer_int8, tensorrt=True, strict=required)
        if required and not paths:
            raise EngineError(
                f"{model_dir}: no dense TensorRT engines; build them with 'defectscope "
                f"export {model_dir} --format tensorrt --dense'"
            )
        return [TensorRTDenseEngine(path) for path in paths]
    if engine.name == "torch" and engine.device.type == "cuda":
        # A GPU without TensorRT: PyTorch runs the adapted dense network on the device.
        engines = load_torch_dense(model_dir, device="cuda")
        if required and not engines:
            raise EngineError(
                f"{model_dir}: no dense weights (dense/dense.pt); make them with "
                "'defectscope densify'"
            )
        return engines
    on_cpu_onnx = engine.name == "onnxruntime" and not getattr(engine, "on_gpu", False)
    if not on_cpu_onnx and not (artifact.is_dir() and backend == "auto"):
        if required:
            raise EngineError(
                f"{artifact}: dense graphs run on ONNX Runtime on the CPU or as TensorRT engines"
            )
        return []
    paths = find_dense_all(model_dir, prefer_int8=prefer_int8, strict=required)
    if required and not paths:
        raise EngineError(f"{model_dir}: no dense graphs; make them with 'defectscope densify'")
    return [DenseEngine(path, threads=threads) for path in paths]


class MapCancelled(RuntimeError):
    """A map was stopped before it finished (time limit or a cancel request)."""


def check_stride(stride, patch_size: int) -> int:
    """A window stride as a positive int, or an error naming the value."""
    if isinstance(stride, bool) or not isinstance(stride, int | np.integer) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    return int(stride)


def check_subregion(subregion, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)`` as ints inside a frame of ``shape``, or an error naming both.

    Integral floats (``40.0``) pass; a fractional bound is refused, not truncated.
    """
    try:
        values = [
            float(v) if isinstance(v, float | np.floating) else operator.index(v) for v in subregion
        ]
    except TypeError:
        values = None
    if (
        values is None
        or len(values) != 4
        or any(isinstance(v, float) and not v.is_integer() for v in values)
    ):
        raise ValueError(f"subregion must be four integers (y0, x0, y1, x1), got {subregion!r}")
    y0, x0, y1, x1 = (int(v) for v in values)
    if not (0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1]):
        raise ValueError(f"subregion {tuple(subregion)} is not inside the frame {tuple(shape)}")
    return y0, x0, y1, x1


# Sources scored from the embedding alone, by the engine attribute that carries each.
_RECORDED = {
    "mc_dropout": ("mc_dropout", "MC-dropout"),
    "ensemble": ("head_ensemble", "head-ensemble"),
}
# Sources paired with the lattice residual, by the source each pairs it with.
_WITH_RESIDUAL = {
    "mc_dropout+residual": "mc_dropout",
    "ensemble+residual": "ensemble",
    "embedding+residual": "embedding",
}
# What novelty="auto" maps with where the model carries both records: of the sources
# measured, the best leave-one-class-out AUROC over CdTe and SrTiO3 with the fewest held-out
# false alarms (docs/novelty.md).
AUTO_NOVELTY = "ensemble+residual"


def resolve_novelty(engine: Any, novelty: str) -> str:
    """The source ``novelty`` names on ``engine``: ``"auto"`` is :data:`AUTO_NOVELTY`
    where the engine carries both its records, else the densities it carries
    (``"embedding+residual"``, ``"embedding"`` or ``"residual"``; ``"auto"`` when it
    carries none). Other values are returned as they are.

    A map resolves ``auto`` on its window model, so a dense graph made before a record
    existed does not map the same frame with other sources than the window model would.
    """
    if novelty != "auto":
        return novelty
    residual = getattr(engine, "residual_density", None)
    if residual is not None and getattr(engine, "head_ensemble", None) is not None:
        return AUTO_NOVELTY
    density = getattr(engine, "density", None) is not None
    if residual is not None:
        return "embedding+residual" if density else "residual"
    return "embedding" if density else "auto"


def novelty_sources(engine: Any, novelty: str) -> tuple[Any, Any]:
    """The (embedding score, residual density) ``novelty`` asks for of ``engine``.

    The first is what scores a window from its embedding: the embedding's density, with
    ``novelty="mc_dropout"`` the head's MC dropout
    (:class:`~defectscope.artifacts.disagreement.DropoutNovelty`), or with
    ``novelty="ensemble"`` the head ensemble on the embedding
    (:class:`~defectscope.artifacts.disagreement.EnsembleNovelty`). A pair
    (``"ensemble+residual"``, ``"mc_dropout+residual"``, ``"embedding+residual"``)
    gives that source and the lattice-residual density. ``"auto"`` is
    :data:`AUTO_NOVELTY` where the engine carries both its records, else every density
    the engine carries (a model trained before the head ensemble existed).

    Raises
    ------
    ValueError
        When ``novelty`` names a source the engine's model does not carry.
    """
    novelty = resolve_novelty(engine, novelty)
    density = getattr(engine, "density", None)  # duck-typed engines may lack them
    residual = getattr(engine, "residual_density", None)
    if novelty == "auto":  # the engine carries no source
        return None, None
    if novelty == "embedding":
        residual = None
    elif novelty in ("residual", *_WITH_RESIDUAL):
        if residual is None:
            alone = _WITH_RESIDUAL.get(novelty, "embedding")
            raise ValueError(
                f"novelty {novelty!r}: the model carries no lattice-residual density "
                f"(trained before it existed; train it again, or use {alone!r})"
            )
        if novelty == "embedding+residual" and density is None:
            raise ValueError(
                f"novelty {novelty!r}: the model carries no embedding density "
                "(train it again, or use 'residual')"
            )
        if novelty != "embedding+residual":
            density = None
    recorded = _WITH_RESIDUAL.get(novelty, novelty)
    if recorded in _RECORDED:
        attribute, what = _RECORDED[recorded]
        density = getattr(engine, attribute, None)
        residual = residual if novelty in _WITH_RESIDUAL else None
        if density is None:
            raise ValueError(
                f"novelty {novelty!r}: the model carries no {what} record "
                "(trained before it existed; train it again, or use 'auto')"
            )
    return density, residual


def _carries(engine: Any, novelty: str) -> bool:
    """Whether ``engine`` holds what ``novelty`` asks for."""
    try:
        novelty_sources(engine, novelty)
    except ValueError:
        return False
    return True


def frame_guard(engine: Any, density: Any) -> Any:
    """The embedding's density, where other sources judge the windows (``density``, the
    window score :func:`novelty_sources` chose, is not it): it still checks whether the
    frame as a whole is unlike the training data, which disagreement scores and the
    lattice residual miss (a frame of another material, pure noise). None otherwise."""
    guard = getattr(engine, "density", None)
    return None if guard is None or guard is density else guard


def novelty_names(density: Any, residual: Any) -> list[str]:
    """Names of the novelty sources used, for ``result.info['novelty']``."""
    names = [] if density is None else [getattr(density, "novelty_name", "embedding")]
    return names + ([] if residual is None else ["lattice residual"])


def guard_info(guard: Any) -> dict:
    """``info`` entry naming what checks the frame as a whole, where it is not the
    window's own sources."""
    return {} if guard is None else {"ood_check": "embedding density"}


def window_holes(frame: np.ndarray, origins: np.ndarray, size: int) -> np.ndarray:
    """Whether each window (top-left ``origins``, side ``size``) holds a non-finite pixel."""
    return np.array(
        [not np.isfinite(frame[r : r + size, c : c + size]).all() for r, c in origins], bool
    )


def score_novelty(
    density: Any,
    residual: Any,
    embeddings: np.ndarray | None,
    windows: np.ndarray | None,
    holes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(uncertainty, unknown)`` per window from the densities given (None: unused).

    Each density's uncertainty is the share of held-out known windows closer than the
    window, so the two read on one scale: the larger is kept, and a window either
    calls unknown is unknown. Windows with non-finite pixels (``holes``, or found in
    ``windows``) are not scored by the residual (the residual of a hole, filled or
    not, is meaningless): they keep the embedding's score, or, with the residual
    alone, are unknown at uncertainty 1.
    """
    u = k = None
    if density is not None:
        _, u, k = density.score(embeddings)
    if residual is not None:
        judged = np.isfinite(windows).all(axis=(1, 2))
        if holes is not None:
            judged &= ~holes
        ru = np.zeros(len(windows), np.float32)
        rk = np.zeros(len(windows), bool)
        if judged.size and judged.all():  # the usual case: no copy of the windows
            _, ru, rk = residual.score(windows)
        elif judged.any():
            _, ru[judged], rk[judged] = residual.score(windows[judged])
        if u is None:
            ru[~judged], rk[~judged] = 1.0, True
            u, k = ru, rk
        else:
            u, k = np.maximum(u, ru), k | rk
    return u, k


class Detector:
    """A loaded, warmed engine that maps frames.

    Parameters
    ----------
    engine : Engine
    batch_size : int
        Patches per engine call; memory stays bounded by two such batches.
    tiler_threads : int
        Threads of the C++ tiler. One is enough: tiling runs beside the engine and
        takes a few per cent of its time, and more would compete with the engine's
        threads for the cores.
    background : str, optional
        The defect-free class, when the model's own choice is missing or wrong.
    dense_engines : list of DenseEngine, optional
        Dense graphs of the same model (see :mod:`defectscope.engines.dense`); maps at a
        stride one of them serves run densely unless asked otherwise.

    Notes
    -----
    A detector may be shared between threads: maps run one at a time (they share
    the batch buffers), each call waiting for the one before.
    """

    def __init__(
        self,
        engine: Engine,
        batch_size: int = 64,
        tiler_threads: int = 1,
        background: str | None = None,
        dense_engines: list | None = None,
    ):
        self.engine = engine
        self.dense_engines = list(dense_engines or [])
        # (graph, novelty) pairs whose fallback to window maps was logged: once each.
        self._fallbacks_logged: set[tuple[int, str]] = set()
        # Side of the regions a dense map runs at once: bounds memory on any frame size.
        self.dense_crop = 1536
        for dense in self.dense_engines:
            if dense.classes != engine.classes:
                raise ValueError(
                    f"dense graph classes {dense.classes} differ from the model's {engine.classes}"
                )
            made_from = getattr(dense, "weights_sha256", None)
            weights = getattr(engine, "weights_sha256", None)
            if made_from and weights and made_from != weights:
                raise ValueError(
                    f"dense graph {getattr(dense, 'path', '')} was made from weights "
                    f"{made_from[:12]}, the model's are {weights[:12]}"
                )
        if background is not None and background not in engine.classes:
            raise ValueError(f"background class {background!r} is not among {engine.classes}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        if not isinstance(tiler_threads, int) or tiler_threads < 0:
            raise ValueError(f"tiler threads must be 0 (all cores) or more, got {tiler_threads!r}")
        self.background = background or engine.config.background_class
        self.batch_size = int(batch_size)
        self.tiler_threads = tiler_threads
        self._lock = threading.Lock()
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
        dense: bool | str | None = None,
        options: MapOptions | None = None,
        precision: str = "fp32",
    ) -> Detector:
        """Open a model directory, ``.onnx`` file or TensorRT engine.

        ``threads`` sets the engine's threads (0: its default, every core);
        ``background`` names the defect-free class when the model's own choice (a
        class named like 'bulk') is missing or wrong. ``dense``: ``'auto'`` loads the
        dense graphs a model directory holds (``defectscope densify``) when the backend
        runs ONNX on the CPU; ``True`` requires them; ``False`` maps window by window;
        by default it follows ``options.mode`` (dense: True, window: False, auto).
        ``options`` (:class:`MapOptions`), when given, sets the batch size and the
        background class instead. ``precision`` (``fp32``, ``bf16``, ``auto``) is for a
        model directory run on PyTorch (bf16 autocast on the CPU; ``auto``: where native).
        """
        if options is not None:
            batch_size = options.batch_size
            background = options.background or background
        if dense is None:  # from the options' mode: 'dense' needs the graphs, 'window' skips them
            mode = options.mode if options is not None else "auto"
            dense = {"auto": "auto", "dense": True, "window": False}[mode]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        if dense not in ("auto", True, False):
            raise ValueError(f"dense must be 'auto', True or False, got {dense!r}")
        engine = load_engine(artifact, backend, threads=threads, precision=precision)
        dense_engines = []
        if dense is not False:
            dense_engines = _load_dense(Path(artifact), engine, backend, threads, dense is True)
        detector = cls(engine, batch_size, background=background, dense_engines=dense_engines)
        if warmup:
            detector.engine.run(np.zeros((1, *detector.engine.input_shape), np.float32))
        return detector

    def dense_engine_for(self, stride: int):
        """The loaded dense graph that serves ``stride`` (coarsest first), or None."""
        for dense in sorted(self.dense_engines, key=lambda d: -d.dense.native_stride):
            if stride % dense.dense.native_stride == 0:
                return dense
        return None

    @property
    def classes(self) -> list[str]:
        return self.engine.classes

    def _check_frame(self, frame) -> np.ndarray:
        frame = check_frame(frame)
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
        timeout_s: float | None = None,
        cancel: Callable[[], bool] | None = None,
        symmetry: str = "none",
        mode: str = "auto",
        novelty: str = "auto",
    ) -> MapResult:
        """Classify every window of ``frame``.

        The tiler fills batch ``i + 1`` in a worker thread while the engine runs
        batch ``i`` (both release the GIL), so tiling hides behind inference.

        Parameters
        ----------
        frame : ndarray, shape (H, W), or Frame
            Any supported dtype, byte order and strides; ``np.memmap`` frames are read
            in place. A :class:`~defectscope.io.frames.Frame` brings its calibration along.
        stride : int
            Window step in pixels.
        keep_embeddings : bool
            Keep per-window embeddings (needed for clustering).
        nan_policy : {'raise', 'zero', 'propagate'}
            See :func:`defectscope.tile`.
        calibration : Calibration, optional
            Pixel size, offset and unit; adds physical coordinates to the outputs.
        timeout_s : float, optional
            Stop with :class:`MapCancelled` once this many seconds have passed
            (checked between batches).
        cancel : callable, optional
            Called between batches; when it returns True the map stops with
            :class:`MapCancelled` (a service shutting down, a newer frame).
        symmetry : {'none', 'd4'}
            ``d4`` averages each window's probabilities and embedding over the eight
            rotations and reflections of the square (the lattice's own symmetry in
            projection), at eight times the engine's cost. The uncertainty is scored
            on the averaged embedding.
        mode : {'auto', 'dense', 'window'}
            ``auto`` maps densely when a dense graph serves the stride (and
            ``symmetry`` is 'none'), else window by window; ``dense`` requires it;
            ``window`` classifies each window on its own. ``result.info`` says which
            ran and why.
        novelty : str
            One of :data:`~defectscope.maps.options.NOVELTY`.
            What makes a window unknown: the embedding's density (``embedding``),
            the lattice residual's (``residual``), the disagreement of the head's
            Monte Carlo dropout on the embedding (``mc_dropout``) or of the head
            ensemble on it (``ensemble``), each calibrated on the same held-out
            windows; or one of those with the lattice residual
            (``ensemble+residual``, ``mc_dropout+residual``, ``embedding+residual``;
            a window either flags is unknown and its uncertainty is the larger of
            the two). ``auto`` is :data:`AUTO_NOVELTY` where the model carries both,
            else every density it carries. Where other sources than the embedding's
            density judge the windows, that density still checks the frame as a
            whole (``result.frame_unknown``). ``result.info['novelty']`` names the
            sources used.

        Raises
        ------
        ValueError
            For a frame, stride or calibration that cannot be mapped, and when the
            engine gives non-finite probabilities.
        MapCancelled
            When ``timeout_s`` passed or ``cancel`` asked to stop.
        """
        started = time.perf_counter()
        if isinstance(frame, Frame):
            calibration = calibration or frame.calibration
            frame = frame.data
        frame = self._check_frame(frame)
        size = self.engine.config.patch_size
        stride = check_stride(stride, size)
        if symmetry not in SYMMETRIES:
            raise ValueError(f"symmetry must be one of {', '.join(SYMMETRIES)}, got {symmetry!r}")
        if calibration is not None:
            calibration.check_extent(frame.shape)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if novelty not in NOVELTY:
            raise ValueError(f"novelty must be one of {', '.join(NOVELTY)}, got {novelty!r}")
        novelty = resolve_novelty(self.engine, novelty)
        info: dict = {"mode": "window"}
        if mode != "window":
            dense = self.dense_engine_for(stride)
            if dense is None:
                info["reason"] = (
                    "no dense graph loaded (defectscope densify)"
                    if not self.dense_engines
                    else f"stride {stride} is not a multiple of a dense graph's native stride "
                    f"({', '.join(str(d.dense.native_stride) for d in self.dense_engines)})"
                )
            elif symmetry != "none":
                info["reason"] = f"symmetry {symmetry!r} runs window by window"
            elif mode == "auto" and not _carries(dense, novelty):
                # A dense graph made before the source existed: the window model may have it.
                info["reason"] = (
                    f"the dense graph carries no record for novelty {novelty!r} "
                    "(made before it existed; densify again)"
                )
                # Window maps cost many times dense ones: said once, not on every frame.
                if (id(dense), novelty) not in self._fallbacks_logged:
                    self._fallbacks_logged.add((id(dense), novelty))
                    log.warning("mapping window by window: %s", info["reason"])
            else:
                result = self._map_dense(
                    dense,
                    frame,
                    stride,
                    keep_embeddings,
                    calibration,
                    started,
                    timeout_s,
                    cancel,
                    novelty,
                )
                if result is not None:
                    return result
                info["reason"] = "the frame holds non-finite values; mapped window by window"
            if mode == "dense":
                raise ValueError(f"no dense map: {info['reason']}")
        norm = self.engine.config.normalization
        origins = window_origins(frame.shape, size, stride)
        rows = len(np.unique(origins[:, 0]))
        cols = len(origins) // rows
        n = len(origins)
        probabilities = np.empty((n, len(self.classes)), np.float32)
        embeddings = (
            np.empty((n, self.engine.config.embedding_dim), np.float32) if keep_embeddings else None
        )
        density, residual = novelty_sources(self.engine, novelty)
        scored = density is not None or residual is not None
        guard = frame_guard(self.engine, density) if scored else None
        frame_unknown = None if guard is None else np.empty(n, bool)
        # With nan_policy 'zero' the tiled windows are finite; the residual of a filled
        # hole is meaningless, so such windows are found in the frame itself.
        has_holes = (
            residual is not None
            and nan_policy == "zero"
            and frame.dtype.kind == "f"
            and not np.isfinite(frame).all()
        )
        uncertainty = np.empty(n, np.float32) if scored else None
        unknown = np.empty(n, bool) if scored else None

        def fill(batch: int) -> int:
            chunk = origins[batch * self.batch_size : (batch + 1) * self.batch_size]
            tile(
                frame,
                size,
                origins=chunk,
                normalization=norm,
                out=self._buffers[batch % 2],
                nan_policy=nan_policy,
                threads=self.tiler_threads,
            )
            return len(chunk)

        def stop_reason() -> str | None:
            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                return f"map stopped after the time limit of {timeout_s:g} s"
            if cancel is not None and cancel():
                return "map cancelled"
            return None

        n_batches = -(-n // self.batch_size)
        waited = engine_time = 0.0
        with self._lock:
            pending = self._pool.submit(fill, 0)
            try:
                for batch in range(n_batches):
                    t0 = time.perf_counter()
                    count = pending.result()
                    waited += time.perf_counter() - t0
                    reason = stop_reason()
                    if reason is not None:
                        raise MapCancelled(f"{reason} ({batch} of {n_batches} batches done)")
                    if batch + 1 < n_batches:
                        pending = self._pool.submit(fill, batch + 1)
                    t1 = time.perf_counter()
                    probs, emb = self._run(self._buffers[batch % 2][:count], symmetry)
                    engine_time += time.perf_counter() - t1
                    start = batch * self.batch_size
                    if not np.isfinite(probs).all():
                        bad = start + int(np.flatnonzero(~np.isfinite(probs).all(axis=1))[0])
                        raise ValueError(
                            f"the engine gave non-finite probabilities for the window at "
                            f"{tuple(int(v) for v in origins[bad])}"
                        )
                    probabilities[start : start + count] = probs
                    if embeddings is not None:
                        embeddings[start : start + count] = emb
                    if scored:
                        windows = self._buffers[batch % 2][:count, 0]
                        chunk = origins[start : start + count]
                        holes = window_holes(frame, chunk, size) if has_holes else None
                        u, k = score_novelty(density, residual, emb, windows, holes)
                        uncertainty[start : start + count] = u
                        unknown[start : start + count] = k
                        if guard is not None:
                            frame_unknown[start : start + count] = guard.score(emb)[2]
            finally:
                pending.cancel()
                # The tiler must not write into a buffer the next map uses.
                if not pending.cancelled():
                    try:
                        pending.result()
                    except Exception:  # already reported, or the map failed first
                        pass
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
            uncertainty=None if uncertainty is None else uncertainty.reshape(rows, cols),
            unknown=None if unknown is None else unknown.reshape(rows, cols),
            info={**info, "novelty": novelty_names(density, residual), **guard_info(guard)},
            frame_unknown=None if frame_unknown is None else frame_unknown.reshape(rows, cols),
        )

    def _map_dense(
        self,
        dense,
        frame,
        stride,
        keep_embeddings,
        calibration,
        started,
        timeout_s,
        cancel,
        novelty="auto",
    ) -> MapResult | None:
        def check() -> None:
            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                raise MapCancelled(f"map stopped after the time limit of {timeout_s:g} s")
            if cancel is not None and cancel():
                raise MapCancelled("map cancelled")

        density, residual = novelty_sources(dense, novelty)
        guard = frame_guard(dense, density) if density is not None or residual is not None else None
        keep = keep_embeddings or density is not None or guard is not None
        with self._lock:
            if isinstance(dense, TorchDenseEngine):  # normalizes and gathers on its device
                arrays = dense.map_arrays(frame, stride, keep, crop=self.dense_crop, cancel=check)
            else:
                arrays = dense_map_arrays(
                    dense,
                    frame,
                    stride,
                    keep_embeddings=keep,
                    crop=self.dense_crop,
                    threads=self.tiler_threads,
                    cancel=check,
                )
        if arrays is None:
            return None
        origins, probabilities, embeddings = arrays
        rows, cols = probabilities.shape[:2]
        if not np.isfinite(probabilities).all():
            raise ValueError("the dense graph gave non-finite probabilities")
        uncertainty = unknown = frame_unknown = None
        if density is not None or residual is not None:
            flat = None if embeddings is None else embeddings.reshape(rows * cols, -1)
            u = np.empty(rows * cols, np.float32)
            k = np.empty(rows * cols, bool)
            guarded = None if guard is None else np.empty(rows * cols, bool)
            # The residual needs each window's pixels, tiled chunk by chunk into a buffer
            # of this call's own (the detector's are shared with other threads' maps);
            # chunks of RESIDUAL_CHUNK windows keep the residual's per-call overhead
            # small at a few MB. The frame is finite here: a frame with holes maps
            # window by window.
            step = len(self._buffers[0])
            buffer = None
            if residual is not None:
                step = max(step, RESIDUAL_CHUNK)
                buffer = np.empty((step, *self._buffers[0].shape[1:]), np.float32)
            for start in range(0, rows * cols, step):
                chunk = origins[start : start + step]
                windows = None
                if buffer is not None:
                    tile(
                        frame,
                        dense.config.patch_size,
                        origins=chunk,
                        normalization=self.engine.config.normalization,
                        out=buffer,
                        threads=self.tiler_threads,
                    )
                    windows = buffer[: len(chunk), 0]
                part = None if flat is None else flat[start : start + len(chunk)]
                u[start : start + len(chunk)], k[start : start + len(chunk)] = score_novelty(
                    density, residual, part, windows
                )
                if guarded is not None:
                    guarded[start : start + len(chunk)] = guard.score(part)[2]
                check()
            uncertainty, unknown = u.reshape(rows, cols), k.reshape(rows, cols)
            if guarded is not None:
                frame_unknown = guarded.reshape(rows, cols)
        total = (time.perf_counter() - started) * 1000
        return MapResult(
            origins=origins,
            grid_shape=(rows, cols),
            probabilities=probabilities,
            embeddings=embeddings if keep_embeddings else None,
            classes=self.classes,
            background=self.background,
            frame_shape=tuple(frame.shape),
            patch_size=dense.config.patch_size,
            timing_ms={"total": total},
            calibration=calibration,
            uncertainty=uncertainty,
            unknown=unknown,
            info={
                "mode": "dense",
                "native_stride": dense.dense.native_stride,
                "precision": dense.precision,
                "novelty": novelty_names(density, residual),
                **guard_info(guard),
            },
            frame_unknown=frame_unknown,
        )

    def _run(self, inputs: np.ndarray, symmetry: str) -> tuple[np.ndarray, np.ndarray]:
        if symmetry == "none":
            return self.engine.run(inputs)
        probs = emb = None
        for turns in range(4):
            rotated = np.rot90(inputs, turns, axes=(2, 3))
            for view in (rotated, rotated[..., ::-1]):
                p, e = self.engine.run(np.ascontiguousarray(view))
                probs = p.astype(np.float64) if probs is None else probs + p
                emb = e.astype(np.float64) if emb is None else emb + e
        return (probs / 8).astype(np.float32), (emb / 8).astype(np.float32)

    def rois(
        self,
        frame: np.ndarray | Frame,
        k: int | None = None,
        stride: int | None = None,
        min_spacing: float | None = None,
        pixel_size: float | None = None,
        unit: str | None = None,
        unknown: str | None = None,
        mode: str | None = None,
        options: MapOptions | None = None,
    ) -> list[dict]:
        """Map ``frame`` and return its ``k`` best regions of interest (see :meth:`find`).

        ``k`` (default 5), ``stride`` (16), ``min_spacing``, ``unknown`` ('ignore') and
        ``mode`` ('auto') are the :class:`MapOptions` fields ``top_k``, ``stride``,
        ``min_spacing``, ``unknown`` and ``mode``; give them here or as ``options``
        (a keyword that differs from ``options`` is an error). ``pixel_size`` and
        ``unit`` calibrate a bare array; a :class:`~defectscope.io.frames.Frame` with a
        calibration needs neither.
        """
        if k is not None and (isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1):
            raise ValueError(f"the number of ROIs must be a positive integer, got {k!r}")
        options = resolve_options(
            options, top=k, stride=stride, min_spacing=min_spacing, unknown=unknown, mode=mode
        )
        calibration = None
        if pixel_size is not None:
            calibration = Calibration.square(pixel_size, unit or "px")
        return self.find(frame, options, calibration=calibration).rois

    def find(
        self,
        frame: np.ndarray | Frame,
        options: MapOptions | None = None,
        *,
        calibration: Calibration | None = None,
        timeout_s: float | None = None,
        cancel: Callable[[], bool] | None = None,
        subregion: tuple[int, int, int, int] | None = None,
    ) -> Findings:
        """Map ``frame`` and rank its ROIs: the one path from a frame to results.

        Parameters
        ----------
        frame : ndarray, shape (H, W), or Frame
            As in :meth:`map`; a :class:`~defectscope.io.frames.Frame` brings its
            calibration along.
        options : MapOptions, optional
            Stride, mode, symmetry, unknown policy, number of ROIs and the rest
            (default: :class:`MapOptions` ()). ``batch_size`` is the detector's own
            (see :meth:`load`).
        calibration : Calibration, optional
            Pixel size, offset and unit for a bare array (of the whole frame).
        timeout_s, cancel
            As in :meth:`map`.
        subregion : (y0, x0, y1, x1), optional
            Map only these rows ``y0:y1`` and columns ``x0:x1`` (a subscan's part of a
            survey); the map, its regions and the ROIs keep the whole frame's pixel
            (and calibrated) coordinates.

        Returns
        -------
        Findings
            ``result`` (the :class:`MapResult`), ``rois`` and ``options``.

        Raises
        ------
        ValueError
            As :meth:`map`, and for a background class the model lacks, a
            subregion outside the frame, or a ``scale`` factor that shrinks the frame
            below a patch.

        Notes
        -----
        Scale matching (``options.scale``, see :mod:`defectscope.maps.scale`): the
        frame (only the subregion, when one is given) is resampled to the scale of
        the model's patches before it is tiled, by a factor from the calibration, the
        frame's lattice period or the user, and mapped by :meth:`map` (window or
        dense, unchanged). The result is in the original frame's coordinates:
        ``origins`` are ``round(o / f)`` of the resampled frame's (plus the
        subregion's corner), ``frame_shape`` and ``calibration`` are the original
        frame's, ``result.scale`` is the zoom applied (1 when none) and each window
        spans ``result.window_size = patch_size / scale`` original pixels.
        ``result.info["scale"]`` records the factor, its source, whether it was
        applied, the measured periods and pixel sizes, a warning when the frame was
        mapped unscaled against the options' wish, and ``time_ms`` of the scale step
        (measurement and resampling), also ``timing_ms["scale"]`` and counted in
        ``timing_ms["total"]``. A memory-mapped frame is resampled band by band into
        a temporary memmap that is deleted afterwards. :meth:`map` itself never
        resamples.
        """
        options = options if options is not None else MapOptions()
        if not isinstance(options, MapOptions):
            raise TypeError(f"options must be MapOptions, got {type(options).__name__}")
        started = time.perf_counter()
        if isinstance(frame, Frame):
            calibration = calibration or frame.calibration
            frame = frame.data
        origin = (0, 0)
        frame = check_frame(frame)
        full_shape = tuple(frame.shape[:2])
        if calibration is not None:
            calibration.check_extent(full_shape)
        if subregion is not None:
            y0, x0, y1, x1 = check_subregion(subregion, frame.shape)
            origin = (y0, x0)
            frame = frame[y0:y1, x0:x1]  # a view: a memmap is not read here
        frame = self._check_frame(frame)
        size = self.engine.config.patch_size
        decision = decide_scale(
            frame,
            calibration,
            getattr(self.engine.config, "scale", None),
            options.scale,
            min_side=size,
        )
        factor = decision.factor if decision.applied else 1.0
        self._check_time(started, timeout_s, cancel, "before resampling the frame")
        resampling = time.perf_counter()
        with resampled_frame(frame, factor) as zoomed:
            scale_ms = decision.time_ms + (time.perf_counter() - resampling) * 1000
            remaining = None if timeout_s is None else timeout_s - (time.perf_counter() - started)
            self._check_time(started, timeout_s, cancel, "after resampling the frame")
            try:
                result = self.map(
                    zoomed,
                    stride=options.stride,
                    keep_embeddings=True,  # ROI novelty needs them
                    nan_policy=options.nan_policy,
                    calibration=None,  # the original frame's, set below
                    timeout_s=remaining,
                    cancel=cancel,
                    symmetry=options.symmetry,
                    mode=options.mode,
                    novelty=options.novelty,
                )
            except MapCancelled as exc:
                if remaining is not None and "time limit" in str(exc):
                    # The caller's limit, not what was left of it after the scale step.
                    raise MapCancelled(
                        str(exc).replace(
                            f"time limit of {remaining:g} s", f"time limit of {timeout_s:g} s"
                        )
                    ) from None
                raise
            except ValueError as exc:
                if factor != 1.0 and "contains NaN" in str(exc):
                    raise ValueError(f"{exc} (of the frame resampled by {factor:.4g})") from None
                raise
            del zoomed  # a temporary memmap goes with its folder
        # Back to the original frame's pixels: a window at o_r of the resampled frame
        # starts at o_r / f (pixel edges scale, see tiling.resample), rounded.
        origins = result.origins
        if factor != 1.0:
            origins = np.rint(origins / factor).astype(np.int64)
        if origin != (0, 0):
            origins = origins + np.asarray(origin, dtype=np.int64)
        record = {**decision.to_dict(), "time_ms": scale_ms}
        timing = dict(result.timing_ms)
        timing["scale"] = scale_ms
        timing["total"] = timing.get("total", 0.0) + scale_ms
        result = dataclasses.replace(
            result,
            origins=origins,
            frame_shape=full_shape,
            calibration=calibration,
            timing_ms=timing,
            info={**result.info, "scale": record},
            scale=factor,
            ood_threshold=options.ood_share,
        )
        if options.background is not None and options.background != result.background:
            if options.background not in result.classes:
                raise ValueError(
                    f"background class {options.background!r} is not among {result.classes}"
                )
            result = dataclasses.replace(result, background=options.background)
        rois = select_rois(result, options.top_k, options.min_spacing, unknown=options.unknown)
        if not options.keep_embeddings:
            result = dataclasses.replace(result, embeddings=None)
        return Findings(result, rois, options)

    @staticmethod
    def _check_time(started, timeout_s, cancel, when: str) -> None:
        if timeout_s is not None and time.perf_counter() - started > timeout_s:
            raise MapCancelled(f"map stopped after the time limit of {timeout_s:g} s ({when})")
        if cancel is not None and cancel():
            raise MapCancelled(f"map cancelled ({when})")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
