"""Fine-tuning the VGG-16 classifier on patches, with early stopping."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from defectscope.artifacts.metadata import ModelScale
from defectscope.io.datasets import PatchSet
from defectscope.nets.checkpoint import ModelConfig, guess_background, save_checkpoint
from defectscope.nets.device import (
    _autocast,
    _model_device,
    autocast_dtype,
    device_name,
    training_device,
)
from defectscope.nets.spectral import apply_spectral_norm, remove_spectral_norm
from defectscope.nets.vgg import DefectNet, build_model, describe_weights, resolve_weights
from defectscope.tiling.lattice import LatticePeriods, measure_patch_periods
from defectscope.tiling.residual import CENTRE_SHARE
from defectscope.tiling.tiler import Normalization, patches_to_inputs
from defectscope.training.augment import (
    DENSITY_AUGMENTATION_SEED,
    Augmentation,
    augment_batch,
    density_fit_sets,
)
from defectscope.training.config import TrainConfig

if TYPE_CHECKING:
    from defectscope.artifacts.density import FeatureDensity
    from defectscope.artifacts.disagreement import DropoutNovelty, EnsembleNovelty


@dataclasses.dataclass
class TrainResult:
    """A trained model and how it got there."""

    model: DefectNet
    config: ModelConfig
    history: list[dict[str, float]]
    best_epoch: int
    wall_time_s: float
    # What the kept model scores on (a subset of) its own training patches and on the
    # validation patches, in eval mode, and the chance level it is compared with.
    fit: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # Where the trunk started: ``auto`` resolved, with the shipped trunk's hash.
    start_weights: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def untrained(self) -> bool:
        """True when the kept model is near chance on its own training data."""
        return bool(self.fit) and self.fit["train_accuracy"] < self.fit["learned_above"]


@torch.inference_mode()
def predict_logits(
    model: DefectNet, inputs: np.ndarray, batch_size: int = 64, precision: str = "fp32"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and embeddings for normalized inputs, as float32 arrays."""
    model.eval()
    device = _model_device(model)
    dtype = autocast_dtype(precision, device.type)
    logits, embeddings = [], []
    for start in range(0, len(inputs), batch_size):
        batch = torch.from_numpy(inputs[start : start + batch_size]).to(device)
        with _autocast(device, dtype):
            out, emb = model.forward_with_embedding(batch)
        logits.append(out.float().cpu().numpy())
        embeddings.append(emb.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(embeddings)


# Patches used to re-estimate batch-norm statistics after each epoch.
BATCHNORM_PATCHES = 256


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, inputs: np.ndarray, batch_size: int = 32, precision: str = "fp32"
) -> bool:
    """Re-estimate every batch-norm layer's running mean and variance on ``inputs``.

    The running statistics are an exponential average (momentum 0.1) over training
    batches whose weights kept changing; after a few epochs on a small data set they
    are far from the statistics of the final weights, and the model in eval mode
    classifies everything as one class although it fits its training data. Averaging
    over fresh passes of the current weights ("precise BN") fixes that. ``precision``
    is that of the passes (training's: with bf16 autocast the statistics are those of
    the activations training saw, at about half the fp32 time). Returns False, doing
    nothing, for a model without batch norm.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers or len(inputs) == 0:
        return False
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the passes below
    model.train()
    device = _model_device(model)
    dtype = autocast_dtype(precision, device.type)
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        if len(batch) > 1:
            with _autocast(device, dtype):
                model(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.train(was_training)
    return True


def _epoch_loss(model: DefectNet, inputs: np.ndarray, labels: np.ndarray, precision: str):
    logits, _ = predict_logits(model, inputs, precision=precision)
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return loss, float((logits.argmax(1) == labels).mean())


class TrainingDataError(ValueError):
    """The patches cannot train a classifier (fewer than two classes)."""


def check_classes(patches: PatchSet, what: str = "training patches") -> None:
    """Refuse patches of fewer than two classes: one line naming what was found.

    A classifier of one class answers that class everywhere; the model it saves cannot
    be loaded (a model needs two classes or more), so it is refused before any work.
    """
    present = np.unique(patches.labels) if len(patches.labels) else np.array([], np.int64)
    if len(present) >= 2:
        return
    counts = patches.counts()
    found = ", ".join(f"{name} ({n} patches)" for name, n in counts.items() if n) or "no patches"
    missing = [name for name, n in counts.items() if not n]
    tail = f"; no patches of {', '.join(missing)}" if missing else ""
    raise TrainingDataError(
        f"{what}: a classifier needs patches of at least two classes, found "
        f"{len(present)}: {found}{tail}"
    )


def measure_training_scale(
    patches: PatchSet, pixel_size: float | None = None, unit: str = "nm"
) -> ModelScale:
    """The scale of training patches: their pixel size, when known, and lattice periods.

    Parameters
    ----------
    patches : PatchSet
        The patches the model trains on (their power spectra give the periods).
    pixel_size : float, optional
        Overrides ``patches.pixel_size`` (``train --pixel-size``), in ``unit``.
    unit : str
        Unit of ``pixel_size``.

    Returns
    -------
    ModelScale
        Its ``lattice`` is recorded also when no period could be measured (amorphous or
        noisy patches): ``measurable`` is False and ``reason`` says why.
    """
    if pixel_size is None and patches.pixel_size is not None:
        pixel_size, unit = patches.pixel_size, patches.unit
    try:
        lattice = measure_patch_periods(np.asarray(patches.images))
    except ValueError as exc:  # patches the measurement cannot take (too small, ...)
        lattice = LatticePeriods((), (), measurable=False, reason=str(exc))
    if pixel_size is None:
        return ModelScale(lattice=lattice)
    return ModelScale(float(pixel_size), unit, lattice)


def train_classifier(
    train: PatchSet,
    validation: PatchSet | None = None,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
    name: str = "training",
) -> TrainResult:
    """Fine-tune VGG-16 on ``train``, early-stopping on ``validation`` loss.

    Parameters
    ----------
    train : PatchSet
        Training patches.
    validation : PatchSet, optional
        Patches for early stopping (the weights of the best validation loss are
        kept). A loss below ``config.min_delta`` counts as solved: patience waits
        while it stays there (and training beats chance) and the latest such epoch is
        kept. Without it, training runs all epochs.
    config : TrainConfig
    progress : bool
        Show tqdm progress bars.
    name : str
        What is being trained (which split or fold), shown on the progress bar.

    Returns
    -------
    TrainResult
        Its ``config.scale`` holds the lattice periods measured on ``train`` and the
        pixel size (``config.pixel_size``, else ``train.pixel_size``), when known.

    Raises
    ------
    TrainingDataError
        When ``train`` holds fewer than two classes.
    """
    check_classes(train, name)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    classes = list(train.classes)
    weights = resolve_weights(config.weights, config.architecture)
    epochs, patience = config.schedule(weights)
    model = build_model(
        len(classes),
        weights=weights,
        patch_size=train.patch_size,
        embedding_dim=config.embedding_dim,
        trainable_blocks=config.trainable_blocks,
        architecture=config.architecture,
    )
    if config.spectral_norm is not None:
        apply_spectral_norm(model, config.spectral_norm, seed=config.seed)
    model_config = ModelConfig(
        classes=tuple(classes),
        patch_size=train.patch_size,
        normalization=config.normalization,
        embedding_dim=config.embedding_dim,
        architecture=config.architecture,
        background_class=guess_background(classes),
        scale=measure_training_scale(train, config.pixel_size, config.unit),
    )
    augmentation = config.training_augmentation
    device = training_device(config.device)
    model.to(device)
    trunk = [p for p in model.features.parameters() if p.requires_grad]
    head = [
        p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("features.")
    ]
    groups = [{"params": head, "lr": config.learning_rate}]
    if trunk:
        groups.append({"params": trunk, "lr": config.trunk_learning_rate(weights)})
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    dtype = autocast_dtype(config.precision, device.type)
    norm = config.normalization
    val_inputs = patches_to_inputs(validation.images, norm) if validation is not None else None

    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state, stale = np.inf, -1, None, 0
    progress_loss = np.inf  # validation loss at the last meaningful improvement
    n = len(train.labels)
    bn_subset = rng.permutation(n)[:BATCHNORM_PATCHES]
    bn_inputs = patches_to_inputs(train.images[bn_subset], norm)
    chance = chance_level(train.labels, len(classes))
    learned_above = chance + LEARNED_MARGIN * (1.0 - chance)
    started_learning = False
    # One tick per batch, so the bar moves every few seconds, not once an epoch.
    steps_per_epoch = sum(
        min(config.batch_size, n - s) >= 2 for s in range(0, n, config.batch_size)
    )
    bar = tqdm(
        total=epochs * steps_per_epoch,
        desc=f"{name}: epoch 1/{epochs}",
        unit="batch",
        disable=not progress,
    )
    for epoch in range(epochs):
        bar.set_description(f"{name}: epoch {epoch + 1}/{epochs}")
        model.train()
        order = rng.permutation(n)
        total, correct, seen = 0.0, 0, 0
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            if len(index) < 2:  # a batch of one makes no useful step
                continue
            raw = augment_batch(train.images[index], rng, augmentation)
            x = torch.from_numpy(patches_to_inputs(raw, norm)).to(device)
            y = torch.from_numpy(train.labels[index]).to(device)
            with _autocast(device, dtype):
                logits = model(x)
                loss = nn.functional.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            total += loss.item() * len(index)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(index)
        # Eval-mode statistics of this epoch's weights, before it is judged or kept.
        recalibrate_batchnorm(model, bn_inputs, config.batch_size, config.precision)
        record = {"epoch": epoch, "train_loss": total / seen, "train_accuracy": correct / seen}
        # An epoch before the model fits its training data beyond chance cannot be kept, and
        # patience only counts from there: a small validation fold can favour an untrained
        # model's near-uniform outputs.
        learning = record["train_accuracy"] >= learned_above
        started_learning = started_learning or learning
        if val_inputs is not None:
            val_loss, val_acc = _epoch_loss(model, val_inputs, validation.labels, config.precision)
            record.update(val_loss=val_loss, val_accuracy=val_acc)
            solved = val_loss < config.min_delta
            # Two solved losses differ by noise, so the later epoch replaces the kept one
            # even at a higher loss (best_loss is then the kept epoch's, not the lowest).
            both_solved = solved and best_loss < config.min_delta
            if learning and (val_loss < best_loss or both_solved):
                # The best weights are kept on any gain, but patience restarts only on a
                # meaningful one: a random split's near-copies keep shaving thousandths
                # off a loss of a few hundredths for as many epochs as are allowed.
                # Below min_delta, though, no meaningful drop is left to make: the
                # validation is solved and ranks noise (1e-4 to 6e-3 on simulated frames),
                # so patience waits and the latest solved epoch is kept, having seen the
                # most of what the augmentation draws beyond the validation patches (a
                # random split that gets there runs its whole schedule).
                if solved or val_loss < progress_loss - config.min_delta:
                    progress_loss, stale = val_loss, 0
                else:
                    stale += 1
                best_loss, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(model.state_dict())
            elif started_learning:
                stale += 1
        history.append(record)
        bar.set_postfix({k: round(v, 3) for k, v in record.items() if k != "epoch"})
        if val_inputs is not None and stale >= patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history) - 1
    # The kept weights, normalized, become plain ones: an ordinary VGG-16 from here on.
    model.eval()
    remove_spectral_norm(model)
    # What comes after (scoring, densities, export, saving) runs on the CPU model.
    model.to("cpu")
    result = TrainResult(model, model_config, history, best_epoch, time.perf_counter() - started)
    result.start_weights = describe_weights(weights, config.architecture)
    check_learning(result, bn_inputs, train.labels[bn_subset], val_inputs, validation, config)
    return result


# The kept model must beat chance by this share of the way from chance to perfect.
LEARNED_MARGIN = 0.2


def chance_level(labels: np.ndarray, n_classes: int) -> float:
    """Accuracy of always answering the most common class (at least 1 / classes)."""
    if len(labels) == 0:
        return 1.0 / max(n_classes, 1)
    return max(float(np.bincount(labels, minlength=n_classes).max() / len(labels)), 1 / n_classes)


def check_learning(
    result: TrainResult,
    train_inputs: np.ndarray,
    train_labels: np.ndarray,
    val_inputs: np.ndarray | None,
    validation: PatchSet | None,
    config: TrainConfig,
) -> None:
    """Score the kept model on training and validation patches; warn when it is near chance.

    Fills ``result.fit`` and ``result.warnings``. Near chance on its own training data
    means the run did not learn at all (``result.untrained``); near chance on
    validation means it learned something that does not carry to held-out regions.
    """
    n_classes = len(result.config.classes)
    logits, _ = predict_logits(result.model, train_inputs, precision=config.precision)
    train_accuracy = float((logits.argmax(1) == train_labels).mean())
    chance = chance_level(train_labels, n_classes)
    fit = {
        "train_accuracy": train_accuracy,
        "train_chance": chance,
        "learned_above": chance + LEARNED_MARGIN * (1 - chance),
        "n_train_checked": len(train_labels),
    }
    if train_accuracy < fit["learned_above"]:
        result.warnings.append(
            f"the kept model (epoch {result.best_epoch}) is near chance on its own training "
            f"data: accuracy {train_accuracy:.3f} against chance {chance:.3f}; it did not learn "
            "(try more epochs, another learning rate or --weights imagenet)"
        )
    if val_inputs is not None and validation is not None and len(validation.labels):
        val_logits, _ = predict_logits(result.model, val_inputs, precision=config.precision)
        val_accuracy = float((val_logits.argmax(1) == validation.labels).mean())
        val_chance = chance_level(validation.labels, n_classes)
        fit.update(validation_accuracy=val_accuracy, validation_chance=val_chance)
        # Validation of one class has a perfect majority baseline: nothing to judge by.
        several = len(np.unique(validation.labels)) > 1
        if several and val_accuracy < val_chance + LEARNED_MARGIN * (1 - val_chance):
            result.warnings.append(
                f"the kept model is near chance on validation: accuracy {val_accuracy:.3f} "
                f"against chance {val_chance:.3f} on {len(validation.labels)} held-out patches"
            )
    result.fit = fit


def _density_fit_sets(train: PatchSet, validation: PatchSet | None, augmentation, seed: int):
    """:func:`~defectscope.training.augment.density_fit_sets` of two patch sets."""
    held = None if validation is None else validation.images
    return density_fit_sets(train.images, train.labels, held, augmentation, seed)


def fit_model_density(
    model: DefectNet,
    train: PatchSet,
    validation: PatchSet | None,
    normalization: Normalization,
    precision: str = "fp32",
    *,
    augmentation: Augmentation | None = None,
    seed: int = DENSITY_AUGMENTATION_SEED,
):
    """The feature density of ``model``'s embedding (see :mod:`defectscope.artifacts.density`).

    Fitted on the training patches without geometric augmentation; its threshold set on
    the validation patches, in-distribution data the model did not train on.

    Parameters
    ----------
    model : DefectNet
    train, validation : PatchSet
        The patches the model trained on, and held-out ones (or None).
    normalization : Normalization
    precision : str
    augmentation : Augmentation, optional
        What training drew from (``TrainConfig.training_augmentation``). When its
        physical part is on, physically augmented copies join them (one of every
        training patch, and enough of every validation patch for a stable threshold;
        see :func:`~defectscope.training.augment.density_fit_sets`): the dose, jitter,
        blur and contrast the model learned to ignore are in distribution, and do not
        make a window unknown. None (the default) fits on the patches alone.
    seed : int
        Seed of the augmented copies.
    """
    return fit_model_novelty(
        model,
        train,
        validation,
        normalization,
        precision,
        augmentation=augmentation,
        seed=seed,
        dropout=False,
        ensemble=False,
    ).density


class ModelNovelty(NamedTuple):
    """What :func:`fit_model_novelty` fits: the sources that score a window's embedding."""

    density: FeatureDensity
    dropout: DropoutNovelty | None
    ensemble: EnsembleNovelty | None


def fit_model_novelty(
    model: DefectNet,
    train: PatchSet,
    validation: PatchSet | None,
    normalization: Normalization,
    precision: str = "fp32",
    *,
    augmentation: Augmentation | None = None,
    seed: int = DENSITY_AUGMENTATION_SEED,
    dropout: bool = True,
    ensemble: bool = True,
    ensemble_seed: int = 0,
) -> ModelNovelty:
    """The embedding's density, the head's MC dropout and a head ensemble, from one pass.

    The density as :func:`fit_model_density` fits it. With ``dropout``, the MC dropout
    of the head (:class:`~defectscope.artifacts.disagreement.DropoutNovelty`); with
    ``ensemble``, five heads trained on the same embeddings the density is fitted on
    (:func:`~defectscope.training.head_ensemble.train_head_ensemble`, seeds from
    ``ensemble_seed``; :class:`~defectscope.artifacts.disagreement.EnsembleNovelty`).
    Both are calibrated on the same held-out patches as the density (the training
    patches when there are none), so all read on the scale of one set of known windows.
    MC dropout is None for a head trained without dropout, and either is None when not
    asked for.
    """
    from defectscope.artifacts.density import fit_density
    from defectscope.artifacts.disagreement import fit_dropout_novelty, fit_ensemble_novelty
    from defectscope.training.head_ensemble import train_head_ensemble

    def embeddings(images: np.ndarray) -> np.ndarray:
        inputs = patches_to_inputs(images, normalization)
        return predict_logits(model, inputs, precision=precision)[1]

    images, labels, held_out = _density_fit_sets(train, validation, augmentation, seed)
    trained = embeddings(images)
    held_out = None if held_out is None else embeddings(held_out)
    density = fit_density(trained, labels, len(train.classes), held_out)
    calibration = held_out if density.source == "validation" else trained
    sampled = None
    # A head trained without dropout has nothing to sample.
    if dropout and 0 < model.dropout.p < 1:
        head = model.classifier
        sampled = fit_dropout_novelty(
            head.weight.detach().float().cpu().numpy(),
            head.bias.detach().float().cpu().numpy(),
            model.dropout.p,
            calibration,
            source=density.source,
        )
    heads = None
    if ensemble:
        members = train_head_ensemble(trained, labels, len(train.classes), seed=ensemble_seed)
        heads = fit_ensemble_novelty(members, calibration, source=density.source)
    return ModelNovelty(density, sampled, heads)


def novelty_records(novelty: ModelNovelty) -> dict[str, Any]:
    """``model.json``'s entries for the sources of ``novelty`` (those fitted)."""
    records = {"density": novelty.density.to_dict()}
    if novelty.dropout is not None:
        records["mc_dropout"] = novelty.dropout.to_dict()
    if novelty.ensemble is not None:
        records["head_ensemble"] = novelty.ensemble.to_dict()
    return records


def fit_patch_residual_density(
    train: PatchSet,
    validation: PatchSet | None,
    *,
    augmentation: Augmentation | None = None,
    seed: int = DENSITY_AUGMENTATION_SEED,
    centre: float | None = None,
):
    """The lattice-residual density of the training patches, threshold on the validation.

    See :mod:`defectscope.artifacts.residual_density`: what a window holds beyond its
    own ideal lattice, modelled per known class, so that a point defect of a kind no
    known class explains is unknown even where the embedding maps it onto a known one.

    Parameters
    ----------
    train, validation : PatchSet
        The patches the model trained on, and held-out ones (or None).
    augmentation : Augmentation, optional
        What training drew from. When its physical part is on, physically augmented
        copies of the training and validation patches join them, the same as for the
        embedding's density (:func:`fit_model_density`): dose, jitter, blur and column
        contrast change a window's residual (noise level, column heights) without
        making it a new defect.
    seed : int
        Seed of the augmented copies.
    centre : float, optional
        For patches centred on their defects: the residual's extremes are taken in the
        central square of this share of the side
        (:data:`~defectscope.tiling.residual.CENTRE_SHARE`), so a patch with a defect at
        its edge (a simulated ``Bulk`` patch beside one) is described by its centre.
        None: the whole patch, for patches whose defects may lie anywhere in them.
    """
    from defectscope.artifacts.residual_density import fit_residual_density

    images, labels, held_out = _density_fit_sets(train, validation, augmentation, seed)
    return fit_residual_density(images, labels, len(train.classes), held_out, centre=centre)


def training_record(result: TrainResult, config: TrainConfig, extra: dict[str, Any] | None = None):
    """JSON-ready description of a training run for the checkpoint."""
    training = dataclasses.asdict(config)
    # What training drew from: the physical part off where the switch turned it off.
    training["augmentation"] = dataclasses.asdict(config.training_augmentation)
    device = training_device(config.device)
    training["precision_used"] = str(autocast_dtype(config.precision, device.type) or "float32")
    training["device_used"] = device_name(config.device)
    if result.start_weights:
        training["weights_used"] = result.start_weights
        start = result.start_weights["weights"]
        epochs, patience = config.schedule(start)
        training["schedule"] = {
            "epochs": epochs,
            "patience": patience,
            "trunk_learning_rate": config.trunk_learning_rate(start),
        }
    return {
        "training": training,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "fit": result.fit,
        "warnings": result.warnings,
        "wall_time_s": round(result.wall_time_s, 2),
        "torch_version": torch.__version__,
        **(extra or {}),
    }


def save_training(
    directory: str | Path,
    result: TrainResult,
    config: TrainConfig,
    extra_record: dict[str, Any] | None = None,
) -> Path:
    """Save a trained model with its training record plus ``extra_record`` (metrics...)."""
    record = training_record(result, config, extra_record)
    return save_checkpoint(directory, result.model, result.config, record)


def train_model_dir(
    patches: PatchSet,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    validation: str = "grouped",
    extra_record: dict[str, Any] | None = None,
    *,
    residual_centre: float | None = None,
) -> TrainResult:
    """Train on all of ``patches`` but a validation fold, and save a model directory.

    Parameters
    ----------
    patches : PatchSet
    out : path-like
        Model directory to write.
    config : TrainConfig
    validation : {'grouped', 'random', 'none'}
        Held-out patches for early stopping and the temperature: one fold of
        independent groups (see :mod:`grouping`), falling back to a random 15 % when
        no class has three groups; a random 15 %; or none.
    extra_record : dict, optional
        Added to the model's JSON.
    residual_centre : float, optional
        Fit the lattice residual's density on the patches' central square of this
        share of the side (:func:`fit_patch_residual_density`; patches centred on their
        defects, as :func:`train_from_simulated` has); None: on the whole patch.

    Raises
    ------
    TrainingDataError
        When ``patches`` hold fewer than two classes (nothing is written).

    Notes
    -----
    What :func:`~defectscope.io.datasets.load_patches` left out (``patches.skipped``:
    hidden files, with ``skip_bad`` unreadable ones) is recorded in ``model.json`` under
    ``"skipped"``.
    """
    from defectscope.evaluation.grouping import find_groups
    from defectscope.evaluation.metrics import fit_temperature, grouped_split, random_split

    if validation not in ("grouped", "random", "none"):
        raise ValueError(f"validation must be grouped, random or none, got {validation!r}")
    check_classes(patches)
    held = np.array([], dtype=np.int64)
    used = validation
    if validation == "grouped":
        groups = patches.groups if patches.groups is not None else find_groups(patches.images).ids
        held = grouped_split(patches.labels, groups, patches.classes, seed=config.seed).validation
        if len(held) == 0:
            used = "random (no class has three independent groups)"
    if validation == "random" or (validation == "grouped" and len(held) == 0):
        held = random_split(patches.labels, patches.classes, seed=config.seed).validation
    val_set = patches.subset(held) if len(held) else None
    train_index = np.setdiff1d(np.arange(len(patches.labels)), held)
    train_set = patches.subset(train_index)
    result = train_classifier(train_set, val_set, config)
    record = {**(extra_record or {}), "validation": used}
    if patches.skipped:
        record["skipped"] = [{"path": path, "reason": reason} for path, reason in patches.skipped]
    novelty = fit_model_novelty(
        result.model,
        train_set,
        val_set,
        config.normalization,
        augmentation=config.training_augmentation,
        ensemble_seed=config.seed,
    )
    record.update(novelty_records(novelty))
    record["residual_density"] = fit_patch_residual_density(
        train_set, val_set, augmentation=config.training_augmentation, centre=residual_centre
    ).to_dict()
    if val_set is not None:
        logits, _ = predict_logits(
            result.model, patches_to_inputs(val_set.images, config.normalization)
        )
        record["calibration"] = {"temperature": fit_temperature(logits, val_set.labels)}
    save_training(out, result, config, extra_record=record)
    return result


def train_from_simulated(
    simulated: PatchSet,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    validation: str = "grouped",
    real: PatchSet | None = None,
    extra_record: dict[str, Any] | None = None,
    finetune_blocks: int | None = None,
    *,
    residual_centre: float | None = CENTRE_SHARE,
) -> TrainResult:
    """Train on simulated patches only, or pretrain on them and fine-tune on ``real``.

    Parameters
    ----------
    simulated : PatchSet
        Patches written by :func:`defectscope.simulate.dataset.simulate_dataset` (their
        ``groups`` are the frames, so validation never shares a frame with training).
    out : path-like
        Model directory. With ``real``, the simulated model is kept in
        ``out/pretrained`` and its trunk starts the fine-tuning (a new head: the real
        classes need not be the simulated ones).
    config : TrainConfig
        Used for both trainings; ``config.weights`` starts the simulated one. Its
        ``pixel_size`` is that of ``real`` when given (the simulated patches' own,
        ``simulated.pixel_size``, is recorded for the pretraining), else it overrides
        the simulated patches' own.
    validation : {'grouped', 'random', 'none'}
    real : PatchSet, optional
    extra_record : dict, optional
        Added to model.json, next to ``"simulated"``.
    finetune_blocks : int, optional
        Conv blocks, counted from the top, that fine-tuning on ``real`` trains (the
        rest keep the simulated weights); default ``config.trainable_blocks``.
    residual_centre : float, optional
        The simulated training's lattice-residual density looks at this share of the
        patches' centres (see Notes); None: the whole patch, for a folder whose patches
        are not centred on their defects.

    Raises
    ------
    TrainingDataError
        When the simulated (or real) patches hold fewer than two classes: before any
        training.
    RuntimeError
        When the simulated pretraining did not learn (its model is kept for inspection).

    Notes
    -----
    ``simulate`` cuts every defect patch centred on its defect, so the simulated
    training's lattice-residual density takes the residual's extremes in the patches'
    centres (``residual_centre``, :func:`train_model_dir`): a ``Bulk``
    patch cut beside a defect (``simulate --bulk-near-defects``) then stays a lattice
    to it. The fine-tuning on ``real`` patches, whose defects may lie anywhere in them,
    fits it on the whole patch.
    """
    from defectscope.artifacts.metadata import WEIGHTS_FILE

    check_classes(simulated, "simulated patches")
    if real is not None:
        check_classes(real, "real patches")
    out = Path(out)
    source = {"classes": simulated.classes, "patches": simulated.counts()}
    if real is None:
        record = {**(extra_record or {}), "simulated": {**source, "use": "simulated only"}}
        return train_model_dir(
            simulated, out, config, validation, record, residual_centre=residual_centre
        )
    pretrained = out / "pretrained"
    # config.pixel_size describes the real patches; the simulated ones carry their own.
    pre = train_model_dir(
        simulated,
        pretrained,
        dataclasses.replace(config, pixel_size=None),
        validation,
        {"simulated": {**source, "use": "pretraining"}},
        residual_centre=residual_centre,
    )
    if pre.untrained:
        raise RuntimeError(
            f"{pretrained}: pretraining on the simulated patches did not learn "
            f"({pre.fit['train_accuracy']:.2f} on its own patches); nothing was fine-tuned"
        )
    fine = dataclasses.replace(
        config,
        weights=str(pretrained / WEIGHTS_FILE),
        trainable_blocks=config.trainable_blocks if finetune_blocks is None else finetune_blocks,
    )
    record = {
        **(extra_record or {}),
        "simulated": {
            **source,
            "use": "pretrained on simulated patches, fine-tuned on real ones",
            "pretrained": str(pretrained),
            "pretraining_epochs": len(pre.history),
        },
    }
    return train_model_dir(real, out, fine, validation, record)
