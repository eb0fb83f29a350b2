"""Dense maps: one pass of the convolutional trunk over the frame, not one per window.

At stride 16 every pixel of a frame goes through VGG-16's convolutions 16 times when
each window is classified on its own. A dense artifact (made by
:func:`defectscope.export.dense.make_dense`) is the same network rewritten as a fully
convolutional graph over a whole region: the head's Linear on 2x2x512 becomes a 2x2
convolution, the classifier a 1x1 one. Its native step is 32 px with five stride-2
pools; 16 px with pool 5 at stride 1 and the head dilated by 2; 8 px with pool 4 at
stride 1 and block 5 dilated (shift-and-stitch in one pass).

Two things make a dense pass differ from windows classified one by one, and the
artifact is adapted to both: the input is normalized per pixel over the window's
footprint (:func:`~defectscope.tiling.tiler.normalize_region`) instead of per window, and
a window's border sees its real neighbours instead of zero padding.

Memory stays bounded on any frame: the trunk runs over crops that overlap by the
network's receptive margin, so a window's output does not depend on how the frame
was cut. This module imports neither PyTorch nor ONNX; it needs onnxruntime.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.artifacts.metadata import (
    DENSE_DIR,
    METADATA_KEY,
    OUTPUT_NAMES,
    WEIGHTS_SHA256,
    ArtifactMetadata,
    MetadataError,
    ModelConfig,
    check_sha256,
    parse_metadata_json,
)
from defectscope.artifacts.provenance import (
    ProvenanceError,
    cached_file_hash,
    check_weights,
    warn_once,
)
from defectscope.engines.base import Engine, EngineError
from defectscope.engines.tensorrt import TensorRTSession, read_engine_metadata
from defectscope.tiling.tiler import dense_channels, normalize_region, window_origins

log = logging.getLogger(__name__)

DENSE_INPUT = "frame"
NATIVE_STRIDES = (32, 16, 8)
DENSE_REPORT = "dense.json"
# Pixels beyond a window's edge that reach its output, per architecture (the value
# ``nets.dense.receptive_margin`` computes from the layers; a test holds them equal).
RECEPTIVE_MARGINS = {"vgg16": 90, "vgg16_bn": 90}


def dense_file(native_stride: int, precision: str = "fp32", target: str = "cpu") -> str:
    """The file name of a dense graph inside a model directory's ``dense/`` folder.

    ``target='tensorrt'`` names the symmetric INT8 graph a TensorRT engine is built from.
    """
    if precision == "fp32":
        return f"dense{native_stride}.onnx"
    return f"dense{native_stride}.int8{'.trt' if target == 'tensorrt' else ''}.onnx"


def dense_engine_file(native_stride: int, precision: str) -> str:
    """The file name of a dense graph's TensorRT engine (``fp16`` or ``int8``)."""
    return f"dense{native_stride}.{precision}.engine"


@dataclasses.dataclass(frozen=True)
class DenseInfo:
    """What the runtime needs to cut a frame for a dense graph.

    Attributes
    ----------
    native_stride : int
        Step between the windows the graph computes (32, 16 or 8).
    margin : int
        Pixels beyond a window's edge that reach its output (receptive field).
    box : int
        Footprint of the per-pixel normalization.
    align : int
        Crop sizes must be multiples of this (the pools' combined step).
    """

    native_stride: int
    margin: int
    box: int
    align: int

    @classmethod
    def from_dict(cls, data: Any, source: str, config: ModelConfig | None = None) -> DenseInfo:
        """Check a dense graph's ``dense`` record, as ``model.json`` is checked.

        With the model's ``config``, the values that follow from it are checked too:
        ``box`` is the patch size (the footprint a window's z-score sees), ``margin`` the
        architecture's receptive margin, and a crop step ``align`` equal to the native
        stride. A value off any of these gives maps that are silently wrong, or crops
        that do not fit, so it is an error naming the field.
        """
        if not isinstance(data, dict):
            raise EngineError(f"{source}: dense metadata is missing or not an object: {data!r}")
        values = {}
        for key in ("native_stride", "margin", "box", "align"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise EngineError(
                    f"{source}: dense metadata {key} must be an integer, got {value!r}"
                )
            values[key] = value
        info = cls(**values)
        if info.native_stride not in NATIVE_STRIDES:
            raise EngineError(
                f"{source}: dense metadata native_stride must be one of {NATIVE_STRIDES}, "
                f"got {info.native_stride}"
            )
        if info.align != info.native_stride:
            raise EngineError(
                f"{source}: dense metadata align {info.align} does not match native_stride "
                f"{info.native_stride} (they are equal in a dense graph)"
            )
        if not 0 <= info.margin <= 4096:
            raise EngineError(
                f"{source}: dense metadata margin must be in 0..4096, got {info.margin}"
            )
        if info.box < 2 or info.box % 2:
            raise EngineError(f"{source}: dense metadata box must be even and >= 2, got {info.box}")
        if config is not None:
            if info.box != config.patch_size:
                raise EngineError(
                    f"{source}: dense metadata box {info.box} differs from the patch size "
                    f"{config.patch_size} (the normalization footprint is the window)"
                )
            if config.patch_size % 32:
                raise EngineError(
                    f"{source}: a dense graph needs a patch size that is a multiple of 32, "
                    f"got {config.patch_size}"
                )
            expected = RECEPTIVE_MARGINS.get(config.architecture)
            if expected is not None and info.margin != expected:
                raise EngineError(
                    f"{source}: dense metadata margin {info.margin} differs from the "
                    f"{config.architecture} receptive margin {expected}"
                )
        return info

    def grid_size(self, side: int, patch_size: int) -> int:
        """Windows along a region side of ``side`` px: what the graph's output must hold."""
        return (side - patch_size) // self.native_stride + 1


def _check_output_shapes(
    path, info: DenseInfo, config: ModelConfig, side: int, shapes: dict[str, tuple]
) -> None:
    """Refuse a graph whose outputs on a ``side``-px region disagree with its metadata.

    The number of windows per side gives away the graph's real native stride (an edited
    ``native_stride`` would index past its outputs, or read them on the wrong grid);
    the channels its class count and embedding width.
    """
    n = info.grid_size(side, config.patch_size)
    want = {
        OUTPUT_NAMES[0]: (1, len(config.classes), n, n),
        OUTPUT_NAMES[1]: (1, config.embedding_dim, n, n),
    }
    for name, expected in want.items():
        got = tuple(int(v) for v in shapes.get(name, ()))
        if got == expected:
            continue
        hint = ""
        if len(got) == 4 and got[2] > 1 and got[2] == got[3] and got[:2] == expected[:2]:
            actual = (side - config.patch_size) // (got[2] - 1)
            hint = f" (windows every {actual} px: native stride {actual})"
        raise EngineError(
            f"{path}: on a {side}x{side} region the graph's {name} has shape {got}{hint}, but "
            f"its metadata (native_stride {info.native_stride}, {len(config.classes)} classes, "
            f"embedding {config.embedding_dim}) says {expected}"
        )


class DenseEngine(Engine):
    """ONNX Runtime on a dense graph: a normalized region in, per-window maps out."""

    name = "onnxruntime-dense"

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError(f"{path}: needs onnxruntime (pip install onnxruntime)") from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Crops differ in size, so an arena keeps blocks it cannot reuse: without it a
        # 3584^2 frame peaked at 0.95 GiB instead of 1.3, at the same speed.
        options.enable_cpu_mem_arena = False
        if threads > 0:
            options.intra_op_num_threads = threads
        # ORT's threads otherwise spin for a while after each run, on the cores the
        # map's own work needs next (the lattice residual's scoring ran 1.4x slower right
        # after a run); a dense run is long, so waking them costs nothing measurable.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"{path}: not a loadable ONNX model ({exc})") from exc
        custom = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in custom:
            raise EngineError(f"{path}: ONNX model has no defectscope metadata")
        record = parse_metadata_json(custom[METADATA_KEY], str(path))
        metadata = ArtifactMetadata.from_record(record, str(path))
        check_weights(path, metadata.weights_sha256)
        super().__init__(**self.fields_of(metadata))
        self.path = Path(path)
        self.precision = metadata.precision
        self.dense = DenseInfo.from_dict(record.get("dense"), str(path), self.config)
        self.agreement = record["dense"].get("agreement")
        self.channels = dense_channels(self.config.normalization)
        self._probe()

    def _probe(self) -> None:
        """Run the graph once on a small blank region; refuse it if its outputs disagree."""
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != DENSE_INPUT:
            raise EngineError(
                f"{self.path}: a dense graph takes one input {DENSE_INPUT!r}, got "
                f"{[i.name for i in inputs]}"
            )
        shape = inputs[0].shape
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != self.channels):
            raise EngineError(
                f"{self.path}: input shape {shape}, but the metadata's normalization needs "
                f"(1, {self.channels}, height, width)"
            )
        side = self.config.patch_size + 2 * 32  # a multiple of every native stride
        region = np.zeros((self.channels, side, side), np.float32)
        try:
            outputs = self.session.run(None, {DENSE_INPUT: region[None]})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"{self.path}: the graph does not run on a region ({exc})") from exc
        names = [o.name for o in self.session.get_outputs()]
        shapes = {name: out.shape for name, out in zip(names, outputs, strict=False)}
        _check_output_shapes(self.path, self.dense, self.config, side, shapes)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "precision": self.precision,
            "native_stride": self.dense.native_stride,
            "path": str(self.path),
        }

    def run_region(self, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(h, w, classes)`` and embeddings ``(h, w, d)`` of a region.

        ``region`` is ``(C, H, W)`` from :func:`~defectscope.tiling.tiler.normalize_region`,
        H and W multiples of ``align``; output ``(i, j)`` is the window at
        ``(i * native_stride, j * native_stride)`` of the region.
        """
        x = np.ascontiguousarray(region[None], dtype=np.float32)
        probs, emb = self.session.run(None, {DENSE_INPUT: x})
        return probs[0].transpose(1, 2, 0), emb[0].transpose(1, 2, 0)


class TensorRTDenseEngine(Engine):
    """A TensorRT engine of a dense graph: the same ``run_region`` on the GPU.

    Built by ``defectscope export MODEL_DIR --format tensorrt --dense`` with an
    optimization profile over regions of one window up to ``max_side`` squared
    (``<engine>.json`` says which); device buffers for the largest region are
    allocated once.
    """

    name = "tensorrt-dense"

    def __init__(self, path: str | os.PathLike):
        self.session = TensorRTSession(path)
        metadata = read_engine_metadata(path)
        super().__init__(**self.fields_of(metadata))
        self.path = Path(path)
        self.precision = metadata.precision
        sidecar = f"{path}.json"
        self.dense = DenseInfo.from_dict(metadata.raw.get("dense"), sidecar, self.config)
        self.agreement = metadata.raw["dense"].get("agreement")
        self.channels = dense_channels(self.config.normalization)
        max_side = metadata.raw.get("max_side")
        if isinstance(max_side, bool) or not isinstance(max_side, int):
            raise EngineError(f"{sidecar}: max_side must be an integer, got {max_side!r}")
        self.max_side = max_side
        if self.max_side < self.config.patch_size + 2 * self.dense.margin + self.dense.align:
            raise EngineError(
                f"{path}: max_side {self.max_side} cannot hold a window and its margins"
            )
        if self.max_side % self.dense.align:
            raise EngineError(
                f"{sidecar}: max_side {self.max_side} is not a multiple of align {self.dense.align}"
            )
        largest = (1, self.channels, self.max_side, self.max_side)
        outputs = self.session.set_input_shape(DENSE_INPUT, largest)
        _check_output_shapes(path, self.dense, self.config, self.max_side, outputs)
        nbytes = {DENSE_INPUT: int(np.prod(largest)) * 4}
        nbytes.update({name: int(np.prod(shape)) * 4 for name, shape in outputs.items()})
        self.session.allocate(nbytes)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "precision": self.precision,
            "native_stride": self.dense.native_stride,
            "max_side": self.max_side,
            "path": str(self.path),
        }

    def run_region(self, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`DenseEngine.run_region`; regions up to ``max_side`` on each side."""
        x = np.ascontiguousarray(region[None], dtype=np.float32)
        if max(x.shape[2:]) > self.max_side:
            raise EngineError(
                f"region {x.shape[2:]} exceeds the TensorRT engine's max side {self.max_side}"
            )
        shapes = self.session.set_input_shape(DENSE_INPUT, x.shape)
        probs, emb = (np.empty(shapes[name], np.float32) for name in OUTPUT_NAMES)
        self.session.execute({DENSE_INPUT: x}, {OUTPUT_NAMES[0]: probs, OUTPUT_NAMES[1]: emb})
        return probs[0].transpose(1, 2, 0), emb[0].transpose(1, 2, 0)


def find_dense_all(
    model_dir: str | os.PathLike,
    prefer_int8: bool = True,
    tensorrt: bool = False,
    strict: bool = False,
) -> list[Path]:
    """The dense graphs of ``model_dir``, one per native stride (INT8 first by default).

    ``tensorrt``: their TensorRT engines instead of the ONNX graphs.

    Only graphs bound to this model are returned: the folder's ``dense.json`` must be
    there (``densify`` writes it last, so a folder without it is unfinished), record the
    SHA-256 of the model's weights, and list each graph with its own hash; a TensorRT
    engine's ``<engine>.json`` must describe it and the same weights. A graph that fails
    is, with ``strict`` (dense maps were asked for), a one-line error naming the hashes;
    without it, a warning, and the map runs window by window (or with the next precision).
    A folder made before hashes were recorded is used, with a warning.
    """
    model_dir = Path(model_dir)
    folder = model_dir / DENSE_DIR
    if not folder.is_dir():
        return []
    try:
        report = _dense_report(folder)
        check_weights(folder, report.get(WEIGHTS_SHA256), model_dir)
    except (EngineError, MetadataError) as exc:
        if strict:
            raise
        log.warning("%s; the dense graphs are not used, maps run window by window", exc)
        return []
    if tensorrt:
        names = (("int8", "fp16") if prefer_int8 else ("fp16", "int8"), dense_engine_file)
    else:
        names = (("int8", "fp32") if prefer_int8 else ("fp32", "int8"), dense_file)
    precisions, name_of = names
    found = []
    for native in NATIVE_STRIDES:
        for precision in precisions:
            path = folder / name_of(native, precision)
            if not path.is_file():
                continue
            try:
                _check_graph_file(path, report, model_dir, tensorrt)
            except (EngineError, MetadataError) as exc:
                if strict:
                    raise
                log.warning("%s; not used", exc)
                continue
            found.append(path)
            break
    return found


def check_dense_file(path: str | os.PathLike) -> None:
    """Refuse a file of a model's ``dense/`` folder that is not bound to the model.

    As :func:`find_dense_all` with ``strict``, for one graph (ONNX or TensorRT engine),
    e.g. the source of an engine about to be built.
    """
    path = Path(path)
    folder = path.parent
    report = _dense_report(folder)
    check_weights(folder, report.get(WEIGHTS_SHA256), folder.parent)
    _check_graph_file(path, report, folder.parent, path.suffix == ".engine")


def _dense_report(folder: Path) -> dict[str, Any]:
    """The checked ``dense.json`` of a dense folder, or an error saying what is wrong."""
    path = folder / DENSE_REPORT
    if not path.is_file():
        raise EngineError(
            f"{folder}: no {DENSE_REPORT} (densify did not finish); run 'defectscope densify' again"
        )
    try:
        report = parse_metadata_json(path.read_bytes(), str(path))
    except OSError as exc:
        raise EngineError(f"{path}: cannot read it ({exc})") from exc
    if not isinstance(report, dict):
        raise EngineError(f"{path}: must be a JSON object, got {type(report).__name__}")
    try:
        check_sha256(report.get(WEIGHTS_SHA256))
    except MetadataError as exc:
        raise EngineError(f"{path}: {exc}") from None
    files = report.get("files")
    if files is not None and not isinstance(files, dict):
        raise EngineError(f"{path}: files must map file names to SHA-256 digests, got {files!r}")
    return report


def _check_graph_file(path: Path, report: dict, model_dir: Path, tensorrt: bool) -> None:
    """Refuse a graph ``dense.json`` does not list with its hash, or a stale engine."""
    files = report.get("files")
    if tensorrt:
        # Built later by export, from the graphs: bound by its sidecar.
        read_engine_metadata(path)
        return
    if files is None:
        warn_once(
            f"{path.parent / DENSE_REPORT}: lists no graph hashes (written before "
            "defectscope recorded them); run densify again to bind the graphs"
        )
        return
    if path.name not in files:
        raise EngineError(
            f"{path}: not among the graphs {path.parent / DENSE_REPORT} lists (not made by "
            "the densify run that wrote it); run 'defectscope densify' again"
        )
    try:
        recorded = check_sha256(files[path.name], f"files[{path.name!r}]")
    except MetadataError as exc:
        raise EngineError(f"{path.parent / DENSE_REPORT}: {exc}") from None
    actual = cached_file_hash(path)
    if actual != recorded:
        raise ProvenanceError(
            f"{path}: sha256 {actual}, but {path.parent / DENSE_REPORT} records sha256 "
            f"{recorded} for it (changed since densify made it); run 'defectscope densify' again"
        )


def _axis_plan(
    length: int, stride: int, info: DenseInfo, patch: int, crop: int
) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray, np.ndarray]]]:
    """Window origins along one axis and the crops that compute them.

    Returns ``origins`` (as :func:`window_origins`) and a list of
    ``(start, size, rows_in_output, positions_in_origins)``: a crop of ``size`` pixels
    from ``start`` (zero-filled past the frame) computes the windows at
    ``start + native * k``; ``rows_in_output`` are those ``k`` and
    ``positions_in_origins`` where they go.
    """
    native, align = info.native_stride, info.align
    starts = np.unique(window_origins((length, patch), patch, (stride, 1))[:, 0])
    # Crops overlap by the margin rounded up to the native step: a window whose
    # footprint plus margin lies inside the crop does not see the crop's edge.
    halo = -(-info.margin // native) * native
    plans: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    regular = np.flatnonzero(starts % native == 0)
    padded = -(-length // align) * align  # zeros past the frame, the same for every crop
    # Origins (on the native grid) one crop can serve, then spread evenly over the crops.
    most = max(1, (crop - 2 * halo - patch) // native + 1)
    grid = (int(starts[regular[-1]]) // native + 1) if len(regular) else 0
    # A frame that fits one crop is one crop: no halo computed twice.
    n_crops = 1 if padded <= crop else max(1, -(-grid // most))
    span = -(-grid // n_crops) * native
    first = 0
    while first < len(regular):
        lo = int(starts[regular[first]])
        chosen = regular[(starts[regular] >= lo) & (starts[regular] < lo + span)]
        hi = int(starts[chosen[-1]])
        begin = max(0, lo - halo)
        end = min(padded, hi + patch + halo)
        size = -(-(end - begin) // align) * align
        if begin + size > padded:  # keep crops inside the padded frame where possible
            begin = max(0, padded - size)
        plans.append((begin, size, (starts[chosen] - begin) // native, chosen))
        first += len(chosen)
    # A last window flush with the edge is off the native grid: a crop of its own,
    # ending at the frame's edge so that its padding is the frame's.
    for index in np.flatnonzero(starts % native != 0):
        origin = int(starts[index])
        size = patch + max(0, min(origin, halo) // native * native)
        size = -(-size // align) * align
        begin = origin + patch - size
        if begin < 0:
            size -= -(begin // align) * align  # drop whole aligned steps above the frame
            begin = origin + patch - size
        plans.append((begin, size, np.array([(origin - begin) // native]), np.array([index])))
    return starts, plans


def crop_plan(
    engine: Engine, frame_shape: tuple[int, int], stride: int, crop: int
) -> tuple[np.ndarray, list, np.ndarray, list]:
    """Window origins and crops along both axes: ``(rows, row_plan, cols, col_plan)``.

    Shared by every dense engine (ONNX Runtime, TensorRT, PyTorch) so a window's output
    cannot depend on which one ran; see ``_axis_plan`` for a plan's entries.
    """
    info, patch = engine.dense, engine.config.patch_size
    if stride % info.native_stride:
        raise ValueError(
            f"stride {stride} is not a multiple of the dense graph's {info.native_stride}"
        )
    crop = max(crop, patch + 2 * info.margin + info.align)
    rows, row_plan = _axis_plan(frame_shape[0], stride, info, patch, crop)
    cols, col_plan = _axis_plan(frame_shape[1], stride, info, patch, crop)
    return rows, row_plan, cols, col_plan


def grid_origins(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(rows * cols, 2)`` int64 origins, row-major, as :func:`window_origins` lists them."""
    grid_rows, grid_cols = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([grid_rows.ravel(), grid_cols.ravel()], axis=1).astype(np.int64)


def dense_map_arrays(
    engine: DenseEngine | TensorRTDenseEngine,
    frame: np.ndarray,
    stride: int,
    keep_embeddings: bool = True,
    crop: int = 1536,
    threads: int = 1,
    cancel=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """Probabilities and embeddings of every window of ``frame``, computed densely.

    ``crop`` bounds the region run at once (peak memory about 0.9 GiB at 1536 with an
    INT8 graph; a frame that fits one crop is one pass).

    Returns ``(origins, probabilities (rows, cols, k), embeddings (rows, cols, d) or
    None)`` on the grid of :func:`~defectscope.tiling.tiler.window_origins`, or None when the
    frame holds values the dense normalization does not take (NaN or infinity): the
    per-window path handles those with its ``nan_policy``.
    """
    # A TensorRT engine takes regions up to the largest side of its profile.
    crop = min(crop, getattr(engine, "max_side", crop))
    height, width = frame.shape
    rows, row_plan, cols, col_plan = crop_plan(engine, frame.shape, stride, crop)
    n_classes = len(engine.classes)
    probabilities = np.empty((len(rows), len(cols), n_classes), np.float32)
    embeddings = (
        np.empty((len(rows), len(cols), engine.config.embedding_dim), np.float32)
        if keep_embeddings
        else None
    )
    for y0, h, out_rows, where_rows in row_plan:
        for x0, w, out_cols, where_cols in col_plan:
            if cancel is not None:
                cancel()
            region = np.zeros((engine.channels, h, w), np.float32)
            # The part inside the frame; past the frame the region stays zero, as
            # the first convolution's padding would be.
            fh, fw = min(h, height - y0), min(w, width - x0)
            normalized = normalize_region(
                frame,
                engine.config.normalization,
                origin=(y0, x0),
                shape=(fh, fw),
                box=engine.dense.box,
                threads=threads,
            )
            if normalized is None:
                return None
            region[:, :fh, :fw] = normalized
            probs, emb = engine.run_region(region)
            sub = np.ix_(out_rows, out_cols)
            probabilities[np.ix_(where_rows, where_cols)] = probs[sub]
            if embeddings is not None:
                embeddings[np.ix_(where_rows, where_cols)] = emb[sub]
    return grid_origins(rows, cols), probabilities, embeddings


def read_dense_report(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The agreement report ``make_dense`` left in ``model_dir/dense``, if any."""
    folder = Path(model_dir) / DENSE_DIR
    if not (folder / DENSE_REPORT).is_file():
        return None
    return _dense_report(folder)
