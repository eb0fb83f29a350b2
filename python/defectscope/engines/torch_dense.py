"""Dense maps through PyTorch, on a CUDA GPU (or the CPU): no TensorRT, no ONNX Runtime GPU.

A GPU workstation beside the microscope often has PyTorch with CUDA but neither TensorRT
nor onnxruntime-gpu. This engine runs a model directory's adapted dense network
(``dense/dense.pt``, written by ``defectscope densify``) with the same crop plan as the
ONNX and TensorRT dense engines (:func:`~defectscope.engines.dense.crop_plan`), but
keeps everything on the device: each crop's footprint is copied once from pinned host
memory, normalized on the device (the box-sum z-score of
:func:`~defectscope.tiling.tiler.normalize_region`, in float64 after scaling by a power
of two and subtracting a local reference, so neither scale nor offset costs precision),
run in bf16 or fp16 with channels-last and cuDNN autotuning, and written into device
arrays; only the per-window probabilities and embeddings come back.

The same code runs on the CPU (``device='cpu'``, fp32), which is how CI checks it
against the ONNX dense graph. PyTorch is imported when an engine is built, never when
this module is imported (the runtime imports without it).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.artifacts.metadata import (
    METADATA_KEY,
    ArtifactMetadata,
    parse_metadata_json,
)
from defectscope.engines.base import Engine, EngineError
from defectscope.engines.dense import (
    DENSE_DIR,
    NATIVE_STRIDES,
    DenseInfo,
    check_dense_file,
    crop_plan,
    dense_file,
    grid_origins,
)
from defectscope.tiling.tiler import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalization,
    check_frame,
    dense_channels,
    is_flat,
)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DENSE_WEIGHTS = "dense.pt"


def cuda_available() -> bool:
    """True when PyTorch is installed and sees a CUDA GPU (False without PyTorch)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def torch_dense_available(model_dir: str | os.PathLike) -> bool:
    """True when ``model_dir`` holds the adapted dense weights this engine runs."""
    return (Path(model_dir) / DENSE_DIR / DENSE_WEIGHTS).is_file()


def _read_graph_metadata(path: Path) -> dict[str, Any]:
    """The defectscope metadata of a dense ONNX graph (ONNX Runtime reads it, no onnx)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a runtime dependency
        raise EngineError(f"{path}: reading its metadata needs onnxruntime") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise EngineError(f"{path}: not a loadable ONNX model ({exc})") from exc
    custom = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in custom:
        raise EngineError(f"{path}: ONNX model has no defectscope metadata")
    return parse_metadata_json(custom[METADATA_KEY], str(path))


class TorchDenseEngine(Engine):
    """A model directory's dense network in PyTorch, on ``cuda`` or ``cpu``.

    Parameters
    ----------
    model_dir : path-like
        A model directory with ``weights.pt`` and ``dense/dense.pt`` plus the FP32 dense
        graph of ``native_stride`` (its metadata: margins, box, density, temperature).
    native_stride : {32, 16, 8}
    device : {'auto', 'cuda', 'cpu'}
        ``auto``: the GPU when PyTorch sees one.
    precision : {'auto', 'fp32', 'bf16', 'fp16'}
        ``auto``: bf16 on a GPU that has it (fp16 otherwise), fp32 on the CPU.

    Notes
    -----
    One engine serves one map at a time (the detector holds a lock around maps).
    """

    name = "torch-dense"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        native_stride: int = 16,
        device: str = "auto",
        precision: str = "auto",
    ):
        try:
            import torch
        except ImportError as exc:
            raise EngineError(
                f"{model_dir}: the PyTorch dense path needs PyTorch (pip install "
                "'defectscope[train]'); the ONNX dense graphs run without it"
            ) from exc
        from defectscope.nets.checkpoint import load_checkpoint
        from defectscope.nets.dense import DenseDefectNet

        if native_stride not in NATIVE_STRIDES:
            raise EngineError(f"native stride must be one of {NATIVE_STRIDES}, got {native_stride}")
        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}: {precision!r}")
        if device not in ("auto", "cuda", "cpu"):
            raise EngineError(f"device must be auto, cuda or cpu, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("device cuda: PyTorch sees no CUDA GPU here")
        model_dir = Path(model_dir)
        weights = model_dir / DENSE_DIR / DENSE_WEIGHTS
        graph = model_dir / DENSE_DIR / dense_file(native_stride)
        for needed in (weights, graph):
            if not needed.is_file():
                raise EngineError(
                    f"{needed}: missing; make the dense graphs with 'defectscope densify "
                    f"{model_dir}'"
                )
        for bound in (graph, weights):  # made from this model's weights, and unchanged
            check_dense_file(bound)
        record = _read_graph_metadata(graph)
        metadata = ArtifactMetadata.from_record(record, str(graph))
        super().__init__(**self.fields_of(metadata))
        self.dense = DenseInfo.from_dict(record.get("dense"), str(graph), metadata.config)
        if self.dense.native_stride != native_stride:
            raise EngineError(
                f"{graph}: metadata says native stride {self.dense.native_stride}, "
                f"the file name {native_stride}"
            )
        self.channels = dense_channels(self.config.normalization)
        self.path = graph

        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if precision == "auto":
            if self.device.type == "cuda":
                precision = (
                    "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
                )
            else:
                precision = "fp32"
        if self.device.type == "cpu" and precision == "fp16":
            raise EngineError("fp16 runs on a GPU; use fp32 or bf16 on the CPU")
        self.precision = precision
        self._dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

        teacher, _, _ = load_checkpoint(model_dir)
        # The state dict holds no stride: rewiring changes pools and dilations, not weights.
        net = DenseDefectNet(teacher, native_stride, self.channels, self.temperature)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as exc:  # a damaged or foreign file: torch raises many kinds
            raise EngineError(f"{weights}: not this model's dense weights ({exc})") from exc
        net = net.eval().to(self.device)
        if self.device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
            # Crops come in a few shapes: let cuDNN pick the fastest kernels once each.
            torch.backends.cudnn.benchmark = True
        self.net = net

    def describe(self) -> dict[str, Any]:
        info = {
            **super().describe(),
            "precision": self.precision,
            "native_stride": self.dense.native_stride,
            "device": str(self.device),
            "path": str(self.path),
        }
        if self.device.type == "cuda":
            info["gpu"] = self.torch.cuda.get_device_name(self.device)
        return info

    # -- the network ----------------------------------------------------------------

    def _forward(self, x):
        torch = self.torch
        with torch.inference_mode():
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                self.device.type,
                dtype=self._dtype or torch.bfloat16,
                enabled=self._dtype is not None,
            ):
                logits, embedding = self.net.forward_logits(x)
            probabilities = torch.softmax(logits.float() / self.temperature, dim=1)
        return probabilities, embedding.float()

    def run_region(self, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`DenseEngine.run_region <defectscope.engines.dense.DenseEngine.run_region>`:
        a normalized ``(C, H, W)`` region in, ``(h, w, classes)`` and ``(h, w, d)`` out."""
        x = self.torch.from_numpy(np.ascontiguousarray(region[None], dtype=np.float32))
        probs, emb = self._forward(x.to(self.device))
        return (
            probs[0].permute(1, 2, 0).cpu().numpy(),
            emb[0].permute(1, 2, 0).cpu().numpy(),
        )

    # -- normalization on the device --------------------------------------------------

    def _upload(self, frame: np.ndarray, rows: slice, cols: slice):
        """``frame[rows, cols]`` as a float64 tensor on the device, copied once."""
        torch = self.torch
        part = frame[rows, cols]
        if not part.dtype.isnative or part.dtype.kind not in "fiub" or part.dtype == np.float16:
            part = part.astype(np.float64)
        host = torch.from_numpy(np.ascontiguousarray(part))
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True).to(torch.float64)

    def normalize(self, frame: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]):
        """The normalized ``(C, h, w)`` float32 region at ``origin``, computed on the device.

        Equals :func:`~defectscope.tiling.tiler.normalize_region` within float32
        rounding; returns None where that returns None (a NaN or infinity in the
        footprint).
        """
        torch = self.torch
        norm: Normalization = self.config.normalization
        y0, x0 = origin
        h, w = shape
        height, width = frame.shape
        if norm.mode != "zscore":
            low, high = norm.resolve_range(frame.dtype)
            values = self._upload(frame, slice(y0, y0 + h), slice(x0, x0 + w))
            if not bool(torch.isfinite(values).all()):
                return None
            gray = ((values - low) / (high - low)).float()
            if norm.mode == "imagenet":
                mean = torch.as_tensor(IMAGENET_MEAN, device=self.device).view(3, 1, 1)
                std = torch.as_tensor(IMAGENET_STD, device=self.device).view(3, 1, 1)
                return ((gray[None] - mean) / std).float()
            return gray[None]
        box = self.dense.box
        half = box // 2
        # The footprint of every pixel of the region, clipped to the frame.
        fy0, fy1 = max(0, y0 - half), min(height, y0 + h - half + box)
        fx0, fx1 = max(0, x0 - half), min(width, x0 + w - half + box)
        values = self._upload(frame, slice(fy0, fy1), slice(fx0, fx1))
        if not bool(torch.isfinite(values).all()):
            return None
        # Scaled by a power of two (exact) so squares cannot overflow, then seen from a
        # local reference so the box sums hold deviations, not a large offset.
        peak = float(values.abs().max())
        if peak > 0:
            values = values * math.ldexp(1.0, -math.frexp(peak)[1])
        reference = values.mean()
        values = values - reference
        pad = torch.nn.functional.pad
        s1 = pad(values.cumsum(0).cumsum(1), (1, 0, 1, 0))
        s2 = pad((values * values).cumsum(0).cumsum(1), (1, 0, 1, 0))
        rows = torch.arange(y0, y0 + h, device=self.device)
        cols = torch.arange(x0, x0 + w, device=self.device)
        top = ((rows - half).clamp(0, height) - fy0)[:, None]
        bottom = ((rows - half + box).clamp(0, height) - fy0)[:, None]
        left = ((cols - half).clamp(0, width) - fx0)[None, :]
        right = ((cols - half + box).clamp(0, width) - fx0)[None, :]

        def box_sum(s):
            return s[bottom, right] - s[top, right] - s[bottom, left] + s[top, left]

        count = ((bottom - top) * (right - left)).to(torch.float64)
        mean = box_sum(s1) / count
        variance = (box_sum(s2) / count - mean * mean).clamp_min(0.0)
        sd = variance.sqrt()
        centre = values[y0 - fy0 : y0 - fy0 + h, x0 - fx0 : x0 - fx0 + w]
        flat = is_flat(sd, mean + reference)  # the tiler's rule: relative to the level
        out = torch.where(flat, 0.0, (centre - mean) / torch.where(sd > 0, sd, 1.0))
        return out[None].float()

    # -- a whole frame ----------------------------------------------------------------

    def map_arrays(
        self,
        frame: np.ndarray,
        stride: int,
        keep_embeddings: bool = True,
        crop: int = 1536,
        cancel=None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """Every window of ``frame`` on the device; the contract of
        :func:`~defectscope.engines.dense.dense_map_arrays` (same origins, same grid).
        """
        torch = self.torch
        frame = check_frame(frame)
        height, width = frame.shape
        rows, row_plan, cols, col_plan = crop_plan(self, frame.shape, stride, crop)
        probabilities = torch.empty(
            (len(rows), len(cols), len(self.classes)), dtype=torch.float32, device=self.device
        )
        embeddings = (
            torch.empty(
                (len(rows), len(cols), self.config.embedding_dim),
                dtype=torch.float32,
                device=self.device,
            )
            if keep_embeddings
            else None
        )
        for y0, h, out_rows, where_rows in row_plan:
            for x0, w, out_cols, where_cols in col_plan:
                if cancel is not None:
                    cancel()
                fh, fw = min(h, height - y0), min(w, width - x0)
                normalized = self.normalize(frame, (y0, x0), (fh, fw))
                if normalized is None:
                    return None
                region = torch.zeros((1, self.channels, h, w), device=self.device)
                region[0, :, :fh, :fw] = normalized
                probs, emb = self._forward(region)
                r_out = torch.as_tensor(out_rows, device=self.device)[:, None]
                c_out = torch.as_tensor(out_cols, device=self.device)[None, :]
                r_at = torch.as_tensor(where_rows, device=self.device)[:, None]
                c_at = torch.as_tensor(where_cols, device=self.device)[None, :]
                probabilities[r_at, c_at] = probs[0].permute(1, 2, 0)[r_out, c_out]
                if embeddings is not None:
                    embeddings[r_at, c_at] = emb[0].permute(1, 2, 0)[r_out, c_out]
        return (
            grid_origins(rows, cols),
            probabilities.cpu().numpy(),
            embeddings.cpu().numpy() if embeddings is not None else None,
        )


def load_torch_dense(
    model_dir: str | os.PathLike, device: str = "auto", precision: str = "auto"
) -> list[TorchDenseEngine]:
    """A :class:`TorchDenseEngine` per native stride whose FP32 graph ``model_dir`` holds."""
    model_dir = Path(model_dir)
    if not torch_dense_available(model_dir):
        return []
    report = model_dir / DENSE_DIR / "dense.json"
    strides = [s for s in NATIVE_STRIDES if (model_dir / DENSE_DIR / dense_file(s)).is_file()]
    if report.is_file():
        try:
            json.loads(report.read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"{report}: unreadable dense report ({exc})") from exc
    return [TorchDenseEngine(model_dir, s, device, precision) for s in strides]
