"""Distill."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from defectscope.artifacts.metadata import guess_background
from defectscope.nets.checkpoint import load_checkpoint
from defectscope.nets.dense import DenseDefectNet
from defectscope.nets.vgg import DefectNet
from defectscope.tiling.tiler import dense_channels, normalize_region, tile, window_origins


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
    matching on the same windows (:func:`_carry_calibration`).
    """
    from defectscope.artifacts.density import FeatureDensity

    fitted = FeatureDensity.from_dict(density)
    window = fitted.distances(window_embeddings).min(axis=1)
    dense = fitted.distances(dense_embeddings).min(axis=1)
    return _carry_calibration(density, fitted, window, dense)


def match_dropout(
    dropout: dict[str, Any],
    student: DenseDefectNet,
    window_embeddings: np.ndarray,
    dense_embeddings: np.ndarray,
) -> dict[str, Any]:
    """The model's MC-dropout record for the dense graph ``student``.

    The thinned heads become the student's own last layer (distillation moved it) with
    the same masks; the reference and threshold are carried over by quantile matching
    the per-window model's scores to the student's on the same windows.
    """
    from defectscope.artifacts.density import encode_array
    from defectscope.artifacts.disagreement import DropoutNovelty

    fitted = DropoutNovelty.from_dict(dropout)
    conv = student.classifier
    weight = conv.weight.detach().float().cpu().numpy().reshape(conv.out_channels, -1)
    bias = conv.bias.detach().float().cpu().numpy()
    dense_head = DropoutNovelty(
        weight, bias, fitted.rate, fitted.kept, fitted.reference, fitted.threshold
    )
    window = fitted.disagreement(window_embeddings).mutual_information
    dense = dense_head.disagreement(dense_embeddings).mutual_information
    record = {**dropout, "weight": encode_array(weight), "bias": encode_array(bias)}
    return _carry_calibration(record, fitted, window, dense)


def match_ensemble(
    ensemble: dict[str, Any], window_embeddings: np.ndarray, dense_embeddings: np.ndarray
) -> dict[str, Any]:
    """The model's head-ensemble record read on the dense graph's scale.

    The members read the embedding, which distillation pulls towards the per-window
    one, so they stay; the reference and threshold are carried over by quantile
    matching (:func:`_carry_calibration`).
    """
    from defectscope.artifacts.disagreement import EnsembleNovelty

    fitted = EnsembleNovelty.from_dict(ensemble)
    window = fitted.disagreement(window_embeddings).mutual_information
    dense = fitted.disagreement(dense_embeddings).mutual_information
    return _carry_calibration(ensemble, fitted, window, dense)


def _carry_calibration(
    record: dict[str, Any], fitted: Any, window: np.ndarray, dense: np.ndarray
) -> dict[str, Any]:
    """``record`` with ``fitted``'s reference and threshold on the dense graph's scale.

    ``window`` and ``dense`` are the per-window model's and the dense graph's scores of
    the same windows: a score that is the per-window model's q-th quantile becomes the
    dense graph's q-th quantile (monotone, so the ranking of windows by uncertainty is
    the dense graph's own).
    """
    window, dense = np.sort(window), np.sort(dense)
    levels = np.linspace(0.0, 1.0, len(window))

    def carry(values: np.ndarray) -> np.ndarray:
        q = np.interp(values, window, levels)
        return np.interp(q, levels, dense)

    reference = np.maximum.accumulate(carry(np.asarray(fitted.reference, np.float64)))
    threshold = float(carry(np.array([fitted.threshold]))[0])
    if fitted.threshold >= window[-1]:  # nothing of the frames was unknown: keep it so
        threshold = max(threshold, float(dense[-1]) * 1.0001)
    return {
        **record,
        "reference": [float(v) for v in reference],
        "threshold": threshold,
        "source": f"{fitted.source}, quantile-matched to the dense graph on {len(window)} windows",
    }
