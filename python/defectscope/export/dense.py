"""Making a dense artifact from a trained model directory (PyTorch side of :mod:`dense`).

:class:`DenseDefectNet` rewrites a :class:`~defectscope.nets.vgg.DefectNet` as one fully
convolutional graph; :func:`distill_dense` adapts it to frame-consistent
normalization and real neighbours by matching the per-window model's outputs on
windows of unlabeled frames; :func:`make_dense` does both, measures agreement on
frames it did not adapt on and exports ONNX (FP32 and INT8) graphs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defectscope.artifacts.metadata import METADATA_KEY, OUTPUT_NAMES, guess_background
from defectscope.engines.dense import (
    DENSE_DIR,
    DENSE_INPUT,
    DenseEngine,
    dense_file,
    dense_map_arrays,
)
from defectscope.export.build import artifact_metadata, quantize_onnx_int8
from defectscope.io.frames import atomic_write_bytes, atomic_write_json
from defectscope.nets.checkpoint import load_checkpoint
from defectscope.nets.vgg import DefectNet
from defectscope.tiling.tiler import dense_channels, normalize_region, tile, window_origins


def _dilate(layer: nn.Conv2d, dilation: int) -> None:
    layer.dilation = (dilation, dilation)
    layer.padding = (dilation * (layer.kernel_size[0] // 2),) * 2


def _rewire(features: nn.Sequential, native_stride: int) -> int:
    """Set pools and convolutions of a VGG trunk for ``native_stride``, in place.

    Pools that keep stride 2 give the native step; later ones run at stride 1 with the
    layers after them dilated, which evaluates every shifted grid at once. Returns the
    dilation the head needs.
    """
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    kept = {32: 5, 16: 4, 8: 3}[native_stride]
    dilation = 1
    for index, layer in enumerate(features):
        if isinstance(layer, nn.MaxPool2d):
            if pools.index(index) >= kept:
                features[index] = nn.MaxPool2d(2, stride=1, dilation=dilation)
                dilation *= 2
            else:
                features[index] = nn.MaxPool2d(2, stride=2)
        elif isinstance(layer, nn.Conv2d):
            _dilate(layer, dilation)
    return dilation


class DenseDefectNet(nn.Module):
    """A :class:`DefectNet` as one fully convolutional pass over a region.

    Parameters
    ----------
    model : DefectNet
        Copied; its weights are not shared.
    native_stride : {32, 16, 8}
        Step between output windows.
    in_channels : {1, 3}
        1 folds the first convolution over the replicated gray channels (exact, a
        third of its work); 3 for ImageNet normalization, whose channels differ.
    temperature : float
        Softmax temperature of the calibrated probabilities.

    Notes
    -----
    ``forward`` takes ``(N, C, H, W)`` with H and W multiples of ``align`` and returns
    probabilities ``(N, classes, h, w)`` and embeddings ``(N, d, h, w)``; output
    ``(i, j)`` is the window at ``(i * native_stride, j * native_stride)``.
    """

    def __init__(
        self, model: DefectNet, native_stride: int = 32, in_channels: int = 1, temperature=1.0
    ):
        super().__init__()
        if native_stride not in (32, 16, 8):
            raise ValueError(f"native stride must be 32, 16 or 8, got {native_stride}")
        features = copy.deepcopy(model.features)
        first = features[0]
        if in_channels == 1 and first.in_channels == 3:
            folded = nn.Conv2d(1, first.out_channels, first.kernel_size, padding=first.padding)
            with torch.no_grad():
                folded.weight.copy_(first.weight.sum(dim=1, keepdim=True))
                folded.bias.copy_(first.bias)
            features[0] = folded
        dilation = _rewire(features, native_stride)
        self.features = features
        linear = model.embedding[1]
        side = round((linear.in_features // 512) ** 0.5)
        self.head = nn.Conv2d(512, linear.out_features, side, dilation=dilation)
        self.classifier = nn.Conv2d(linear.out_features, model.classifier.out_features, 1)
        with torch.no_grad():
            self.head.weight.copy_(linear.weight.view(linear.out_features, 512, side, side))
            self.head.bias.copy_(linear.bias)
            self.classifier.weight.copy_(model.classifier.weight[:, :, None, None])
            self.classifier.bias.copy_(model.classifier.bias)
        self.native_stride = native_stride
        self.align = 2 ** {32: 5, 16: 4, 8: 3}[native_stride]
        self.in_channels = in_channels
        self.temperature = float(temperature)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = torch.relu(self.head(self.features(x)))
        return self.classifier(embedding), embedding

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = self.forward_logits(x)
        return torch.softmax(logits / self.temperature, dim=1), embedding

    def with_stride(self, native_stride: int) -> DenseDefectNet:
        """The same weights rewired for another native stride."""
        twin = copy.deepcopy(self)
        dilation = _rewire(twin.features, native_stride)
        twin.head.dilation = (dilation, dilation)
        twin.native_stride = native_stride
        twin.align = 2 ** {32: 5, 16: 4, 8: 3}[native_stride]
        return twin


def receptive_margin(model: DefectNet, patch_size: int) -> int:
    """Pixels beyond a window's edge that can reach its output, from the layer list."""
    jump, reach = 1, 0  # reach: how far the field extends past one output cell's span
    for layer in model.features:
        if isinstance(layer, nn.Conv2d):
            reach += (layer.kernel_size[0] // 2) * jump
        elif isinstance(layer, nn.MaxPool2d):
            jump *= 2
    return reach


def _teacher_outputs(model, frame, origins, normalization, temperature, batch=128):
    outputs_p, outputs_e = [], []
    with torch.inference_mode():
        for start in range(0, len(origins), batch):
            patches = tile(
                frame,
                _patch_size(model),
                origins=origins[start : start + batch],
                normalization=normalization,
                threads=1,
            )
            logits, emb = model.forward_with_embedding(torch.from_numpy(patches))
            outputs_p.append(torch.softmax(logits / temperature, dim=1))
            outputs_e.append(emb)
    return torch.cat(outputs_p), torch.cat(outputs_e)


def _patch_size(model: DefectNet) -> int:
    """The window side a model was built for, from its head's input width."""
    side = round((model.embedding[1].in_features // 512) ** 0.5)
    return side * 32


def _teacher_grid(model, frame, patch, normalization, temperature, stride):
    """The per-window model's outputs on the ``stride`` grid of ``frame`` (rows, cols, ...)."""
    origins = window_origins(frame.shape, patch, stride, cover_edges=False)
    rows = len(np.unique(origins[:, 0]))
    p, e = _teacher_outputs(model, frame, origins, normalization, temperature)
    return p.reshape(rows, -1, p.shape[1]), e.reshape(rows, -1, e.shape[1])


def _pieces(frames: Sequence[np.ndarray], patch: int, most: int = 1024) -> list[tuple]:
    """Frames cut into pieces of at most ``most`` pixels a side, on a 32-pixel grid.

    Each piece is ``(frame, y0, x0, height, width)``; normalization still uses the
    whole frame's pixels around it.
    """
    pieces = []
    for frame in frames:
        height, width = frame.shape
        if min(height, width) < patch + 32:
            continue
        for y0 in range(0, height - patch - 31, most):
            for x0 in range(0, width - patch - 31, most):
                h = min(most, height - y0) // 32 * 32
                w = min(most, width - x0) // 32 * 32
                if min(h, w) >= patch + 32:
                    pieces.append((frame, y0, x0, h, w))
    return pieces


def distill_dense(
    model_dir: str | os.PathLike,
    frames: Sequence[np.ndarray],
    steps: int = 200,
    crop: int = 384,
    batch_size: int = 4,
    lr: float = 1e-4,
    embedding_weight: float = 1.0,
    trainable_blocks: int = 2,
    teacher_stride: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> tuple[DenseDefectNet, dict[str, Any]]:
    """Adapt the dense rewrite of a model to dense evaluation on unlabeled frames.

    The per-window model (the teacher: per-window normalization, zero padding) is
    run once on every window of the frames' ``teacher_stride`` grid. The dense
    model's frozen early blocks run once over each frame (per-pixel normalization,
    real neighbours, no crop edges); each step then crops those features, runs the
    last ``trainable_blocks`` conv blocks and the head at the teacher's stride and
    moves the calibrated probabilities towards the teacher's (cross-entropy to soft
    targets, each window weighted by the inverse frequency of the teacher's label, so
    rare defect windows count) and the embedding towards the teacher's (squared error
    relative to the teacher's scale, so the feature density fitted on the teacher
    still applies). Half the crops are centred on a window the teacher does not call
    background.

    Returns the dense model (native stride 32; see :meth:`DenseDefectNet.with_stride`)
    and a record of the run.
    """
    from tqdm.auto import tqdm

    from defectscope.util.progress import StepTimer

    if teacher_stride not in (32, 16):
        raise ValueError(f"teacher stride must be 32 or 16, got {teacher_stride}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    teacher, config, record = load_checkpoint(model_dir)
    teacher.eval()
    temperature = float(record.get("calibration", {}).get("temperature", 1.0))
    norm = config.normalization
    patch = config.patch_size
    student = DenseDefectNet(teacher, teacher_stride, dense_channels(norm), temperature)
    pieces = _pieces(frames, patch)
    if not pieces:
        raise ValueError(f"distillation needs frames of at least {patch + 32} pixels a side")
    # Layers before the first trainable block are frozen: run them once per piece.
    pools = [i for i, m in enumerate(student.features) if isinstance(m, nn.MaxPool2d)]
    first = pools[len(pools) - trainable_blocks - 1] + 1 if trainable_blocks < len(pools) else 0
    stem, top = student.features[:first], student.features[first:]
    step = 2 ** sum(1 for i in pools if i < first)  # pixels per stem cell
    for param in stem.parameters():
        param.requires_grad = False
    timer = StepTimer() if progress else None
    grids, stems = [], []
    with timer("dense: per-window and early-layer outputs") if timer else contextlib.nullcontext():
        for frame, y0, x0, h, w in pieces:
            region = normalize_region(frame, norm, (y0, x0), (h, w), patch)
            if region is None:
                raise ValueError("a distillation frame holds non-finite values")
            with torch.inference_mode():
                stems.append(stem(torch.from_numpy(region)[None])[0].clone())
            grids.append(
                _teacher_grid(
                    teacher,
                    frame[y0 : y0 + h, x0 : x0 + w],
                    patch,
                    norm,
                    temperature,
                    teacher_stride,
                )
            )
    labels = np.concatenate([g[0].argmax(-1).numpy().ravel() for g in grids])
    counts = np.bincount(labels, minlength=len(config.classes))
    class_weight = torch.tensor(
        np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0),
        dtype=torch.float32,
    ).clamp(max=50.0)
    background_name = config.background_class or guess_background(list(config.classes))
    background = config.classes.index(background_name) if background_name else None
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    scale = float(np.mean([g[1].pow(2).mean() for g in grids])) or 1.0
    losses = []
    started = time.perf_counter()
    student.train()
    cells = teacher_stride // step  # stem cells per teacher window step
    side = min(crop, *(min(p[3], p[4]) for p in pieces)) // 32 * 32
    n = (side - patch) // teacher_stride + 1  # windows along a crop's side
    bar = tqdm(range(steps), desc="dense: distilling", disable=not progress, unit="step")
    for _ in bar:
        features, target_p, target_e = [], [], []
        for _ in range(batch_size):
            k = int(rng.integers(len(pieces)))
            gp, ge = grids[k]
            rows, cols = gp.shape[:2]
            defects = (
                np.argwhere(gp.argmax(-1).numpy() != background) if background is not None else []
            )
            if len(defects) and rng.random() < 0.5:
                cy, cx = defects[int(rng.integers(len(defects)))]
                i0 = int(np.clip(cy - rng.integers(n), 0, rows - n))
                j0 = int(np.clip(cx - rng.integers(n), 0, cols - n))
            else:
                i0, j0 = int(rng.integers(rows - n + 1)), int(rng.integers(cols - n + 1))
            # Crops start on the 32-pixel grid so that every pool sees its own cells.
            i0, j0 = i0 - i0 % (32 // teacher_stride), j0 - j0 % (32 // teacher_stride)
            c = side // step
            features.append(stems[k][:, i0 * cells : i0 * cells + c, j0 * cells : j0 * cells + c])
            target_p.append(gp[i0 : i0 + n, j0 : j0 + n].permute(2, 0, 1))
            target_e.append(ge[i0 : i0 + n, j0 : j0 + n].permute(2, 0, 1))
        x, tp, te = torch.stack(features), torch.stack(target_p), torch.stack(target_e)
        weight = class_weight[tp.argmax(1)]
        embedding = torch.relu(student.head(top(x)))
        logits = student.classifier(embedding)
        log_p = torch.log_softmax(logits / temperature, dim=1)
        loss_p = (-(tp * log_p).sum(dim=1) * weight).sum() / weight.sum()
        loss_e = (embedding - te).pow(2).mean() / scale
        loss = loss_p + embedding_weight * loss_e
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append((loss_p.item(), loss_e.item()))
        bar.set_postfix(ce=f"{losses[-1][0]:.3f}", emb=f"{losses[-1][1]:.3f}")
    student.eval()
    for param in student.parameters():
        param.requires_grad = False
    # Embeddings of every teacher window, from both, for the density's recalibration.
    with torch.inference_mode():
        dense_embeddings = torch.cat(
            [torch.relu(student.head(top(f[None])))[0].flatten(1).T for f in stems]
        ).numpy()
    window_embeddings = torch.cat([g[1].reshape(-1, g[1].shape[-1]) for g in grids]).numpy()
    run = {
        "steps": steps,
        "crop": side,
        "batch_size": batch_size,
        "lr": lr,
        "trainable_blocks": trainable_blocks,
        "teacher_stride": teacher_stride,
        "seed": seed,
        "pieces": len(pieces),
        "teacher_windows": len(labels),
        "teacher_labels": {c: int(v) for c, v in zip(config.classes, counts, strict=True)},
        "seconds": round(time.perf_counter() - started, 1),
        "loss_first": list(losses[0]) if losses else None,
        "loss_last": [float(v) for v in np.mean(losses[-10:], axis=0)] if losses else None,
    }
    run["embeddings"] = (window_embeddings, dense_embeddings)
    return student.with_stride(32), run


def match_density(
    density: dict[str, Any], window_embeddings: np.ndarray, dense_embeddings: np.ndarray
) -> dict[str, Any]:
    """The model's feature density read on the dense graph's distance scale.

    The dense embedding follows the per-window one closely but not exactly, and a
    Mahalanobis distance magnifies small differences. The class means and whitening stay;
    the reference quantiles and the unknown threshold are carried over by quantile
    matching on the same windows: a distance that is the per-window model's q-th quantile
    becomes the dense graph's q-th quantile (monotone, so the ranking of windows by
    uncertainty is the dense graph's own).
    """
    from defectscope.artifacts.density import FeatureDensity

    fitted = FeatureDensity.from_dict(density)
    window = np.sort(fitted.distances(window_embeddings).min(axis=1))
    dense = np.sort(fitted.distances(dense_embeddings).min(axis=1))
    levels = np.linspace(0.0, 1.0, len(window))

    def carry(values: np.ndarray) -> np.ndarray:
        q = np.interp(values, window, levels)
        return np.interp(q, levels, dense)

    reference = np.maximum.accumulate(carry(np.asarray(fitted.reference, np.float64)))
    threshold = float(carry(np.array([fitted.threshold]))[0])
    if fitted.threshold >= window[-1]:  # nothing of the frames was unknown: keep it so
        threshold = max(threshold, float(dense[-1]) * 1.0001)
    return {
        **density,
        "reference": [float(v) for v in reference],
        "threshold": threshold,
        "source": f"{fitted.source}, quantile-matched to the dense graph on {len(window)} windows",
    }


def export_dense_onnx(
    student: DenseDefectNet,
    model_dir: str | os.PathLike,
    output: str | os.PathLike,
    margin: int,
    extra: dict[str, Any] | None = None,
    opset: int = 18,
    density: dict[str, Any] | None = None,
) -> Path:
    """Export a dense model with dynamic height and width (batch of one).

    ``density`` replaces the model's feature density in the metadata (the dense
    graph's recalibrated one, :func:`match_density`).
    """
    import onnx

    _, config, record = load_checkpoint(model_dir)
    metadata = artifact_metadata(config, record)
    if density is not None:
        metadata["density"] = density
    metadata["dense"] = {
        "native_stride": student.native_stride,
        "margin": margin,
        "box": config.patch_size,
        "align": student.align,
        **(extra or {}),
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, student.in_channels, 256, 256)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        raw = Path(tmp) / "dense.onnx"
        height, width = torch.export.Dim("height"), torch.export.Dim("width")
        torch.onnx.export(
            student.eval(),
            (example,),
            str(raw),
            input_names=[DENSE_INPUT],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({2: height, 3: width},),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        proto = onnx.load(str(raw))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
        onnx.checker.check_model(proto)
        atomic_write_bytes(output, proto.SerializeToString())
    return output


def per_window_map(model_dir, frame: np.ndarray, stride: int):
    """Per-window probabilities and embeddings on the grid, from the torch model."""
    model, config, record = load_checkpoint(model_dir)
    model.eval()
    temperature = float(record.get("calibration", {}).get("temperature", 1.0))
    origins = window_origins(frame.shape, config.patch_size, stride)
    p, e = _teacher_outputs(model, frame, origins, config.normalization, temperature)
    return origins, p.numpy(), e.numpy()


def agreement(
    window_probs: np.ndarray, dense_probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Share of windows where the dense and per-window labels agree, overall and per class."""
    want = window_probs.reshape(-1, len(classes)).argmax(1)
    got = dense_probs.reshape(-1, len(classes)).argmax(1)
    per_class = {
        name: {"windows": int((want == k).sum()), "agreement": float(np.mean(got[want == k] == k))}
        for k, name in enumerate(classes)
        if (want == k).any()
    }
    return {"windows": len(want), "agreement": float(np.mean(want == got)), "per_class": per_class}


def _split_for_check(frames: Sequence[np.ndarray], patch: int) -> tuple[list, list]:
    """Adapt on the top three quarters of each frame, check on the rest (no shared pixel)."""
    adapt, check = [], []
    for frame in frames:
        cut = int(frame.shape[0] * 0.75)
        if frame.shape[0] - cut >= patch + 32 and cut >= patch + 32:
            adapt.append(frame[:cut])
            check.append(frame[cut:])
        else:
            adapt.append(frame)
    return adapt, check


def measure_agreement(
    model_dir: str | os.PathLike,
    dense_path: str | os.PathLike,
    frames: Sequence[np.ndarray],
    stride: int,
    window_artifact: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Dense against per-window labels (and unknown flags) on ``frames``, per class.

    The per-window reference is ``window_artifact`` (an ONNX file, so that INT8 is
    compared with INT8) or the model directory's PyTorch model.
    """
    from defectscope.engines.base import OnnxEngine

    dense = DenseEngine(dense_path)
    reference = OnnxEngine(window_artifact) if window_artifact is not None else None
    # Each map's unknown flags on its own density: the dense graph's is recalibrated.
    window_density = None
    if reference is not None:
        window_density = reference.density
    else:
        record = load_checkpoint(model_dir)[2]
        if record.get("density") is not None:
            from defectscope.artifacts.density import FeatureDensity

            window_density = FeatureDensity.from_dict(record["density"])
    want_p, got_p, want_u, got_u = [], [], [], []
    for frame in frames:
        if reference is None:
            origins, p, e = per_window_map(model_dir, frame, stride)
        else:
            origins = window_origins(frame.shape, dense.config.patch_size, stride)
            p, e = [], []
            for start in range(0, len(origins), 64):
                patches = tile(
                    frame,
                    dense.config.patch_size,
                    origins=origins[start : start + 64],
                    normalization=dense.config.normalization,
                )
                pp, ee = reference.run(patches)
                p.append(pp)
                e.append(ee)
            p, e = np.concatenate(p), np.concatenate(e)
        arrays = dense_map_arrays(dense, frame, stride, keep_embeddings=True)
        if arrays is None:
            raise ValueError("a check frame holds non-finite values")
        dense_origins, dp, de = arrays
        if not np.array_equal(dense_origins, origins):
            raise RuntimeError("dense and per-window grids differ")  # a planner bug
        want_p.append(p)
        got_p.append(dp.reshape(len(origins), -1))
        if dense.density is not None and window_density is not None:
            want_u.append(window_density.score(e)[2])
            got_u.append(dense.density.score(de.reshape(len(origins), -1))[2])
    report = agreement(np.concatenate(want_p), np.concatenate(got_p), dense.classes)
    report["max_abs_diff_probabilities"] = float(
        np.abs(np.concatenate(want_p) - np.concatenate(got_p)).max()
    )
    if want_u:
        w, g = np.concatenate(want_u), np.concatenate(got_u)
        report["unknown_agreement"] = float(np.mean(w == g))
        report["unknown_share"] = {"window": float(w.mean()), "dense": float(g.mean())}
    report["reference"] = str(window_artifact) if window_artifact else "torch fp32"
    report["dense"] = str(dense_path)
    report["stride"] = stride
    return report


def make_dense(
    model_dir: str | os.PathLike,
    frames: Sequence[np.ndarray],
    check_frames: Sequence[np.ndarray] | None = None,
    native_strides: Sequence[int] = (16,),
    steps: int = 300,
    crop: int = 256,
    batch_size: int = 4,
    int8: bool = True,
    stride: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Adapt, export and check the dense graphs of ``model_dir`` (``defectscope densify``).

    Writes ``model_dir/dense/``: ``dense<N>.onnx`` (FP32), ``dense<N>.int8.onnx``
    (U8S8 QDQ, calibrated on normalized regions of the frames) and
    ``dense<N>.int8.trt.onnx`` (symmetric QDQ for TensorRT) per native stride, the
    adapted weights ``dense.pt`` and ``dense.json``: the distillation run and the
    agreement with the per-window model on ``check_frames`` (by default the bottom
    quarter of each frame, never seen while adapting).

    Returns the ``dense.json`` record.
    """
    model_dir = Path(model_dir)
    teacher, config, record_in = load_checkpoint(model_dir)
    patch = config.patch_size
    for native in native_strides:
        if native not in (32, 16, 8):
            raise ValueError(f"native strides must be 32, 16 or 8, got {native}")
    if check_frames is None:
        frames, check_frames = _split_for_check(frames, patch)
    student, run = distill_dense(
        model_dir, frames, steps, crop, batch_size, seed=seed, progress=progress
    )
    window_embeddings, dense_embeddings = run.pop("embeddings")
    density = None
    if record_in.get("density") is not None:
        density = match_density(record_in["density"], window_embeddings, dense_embeddings)
    out = model_dir / DENSE_DIR
    out.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, delete=False, suffix=".pt") as handle:
        torch.save(student.state_dict(), handle)
    os.replace(handle.name, out / "dense.pt")
    margin = receptive_margin(teacher, patch)
    # INT8 ranges from normalized regions of the adapting frames, all of one size.
    side = min(256, min(min(f.shape) for f in frames) // 32 * 32)
    rng = np.random.default_rng(seed)
    calibration = []
    for _ in range(16):
        frame = frames[int(rng.integers(len(frames)))]
        y0 = int(rng.integers(frame.shape[0] - side + 1))
        x0 = int(rng.integers(frame.shape[1] - side + 1))
        region = normalize_region(frame, config.normalization, (y0, x0), (side, side), patch)
        if region is not None:
            calibration.append(region)
    record: dict[str, Any] = {"distillation": run, "graphs": {}, "agreement": {}}
    for native in native_strides:
        graph = student.with_stride(native).eval()
        fp32 = export_dense_onnx(
            graph, model_dir, out / dense_file(native), margin, density=density
        )
        record["graphs"][f"{native}/fp32"] = fp32.name
        if int8:
            int8_path = quantize_onnx_int8(
                fp32,
                out / dense_file(native, "int8"),
                np.stack(calibration),
                input_name=DENSE_INPUT,
                batch_size=1,
            )
            record["graphs"][f"{native}/int8"] = int8_path.name
            # TensorRT takes only symmetric INT8: the graph its INT8 engine is built from
            # (export --format tensorrt --dense --precision int8, on a GPU machine).
            trt_path = quantize_onnx_int8(
                fp32,
                out / dense_file(native, "int8", "tensorrt"),
                np.stack(calibration),
                target="tensorrt",
                input_name=DENSE_INPUT,
                batch_size=1,
            )
            record["graphs"][f"{native}/int8-tensorrt"] = trt_path.name
    if check_frames:
        check_stride = stride if stride % min(native_strides) == 0 else min(native_strides)
        first = min(native_strides)
        record["agreement"]["fp32"] = measure_agreement(
            model_dir, out / dense_file(first), check_frames, check_stride
        )
        window_int8 = model_dir / "model.int8.onnx"
        if int8 and window_int8.is_file():
            record["agreement"]["int8"] = measure_agreement(
                model_dir,
                out / dense_file(first, "int8"),
                check_frames,
                check_stride,
                window_artifact=window_int8,
            )
    record["check_frames"] = [list(f.shape) for f in check_frames]
    atomic_write_json(out / "dense.json", record)
    return record
