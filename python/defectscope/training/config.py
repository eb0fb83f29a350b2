"""Training hyper-parameters, importable without PyTorch (the CLI shows their defaults)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from defectscope.artifacts.metadata import MAX_UNIT_LENGTH, N_BLOCKS
from defectscope.tiling.tiler import Normalization
from defectscope.training.augment import Augmentation

# (epochs at most, patience) by where the trunk starts. From random initialization VGG-16
# needs 20-30 epochs; a pretrained trunk converges in a few, and a short patience stops
# it there (issue 28: the main job in 10 minutes).
RANDOM_INIT_SCHEDULE = (30, 6)
PRETRAINED_SCHEDULE = (8, 3)
# The trunk's share of the learning rate when it starts pretrained (see trunk_lr_scale).
# Chosen on SrTiO3's grouped validation fold with the shipped trunk (split 1 of 5, which
# validated on fold 2 until 2026-12-06 and now on fold 3; 8 epochs): 0.01 -> 0.748,
# 0.1 -> 0.804, 0.3 -> 0.907, 1 -> 0.981 validation accuracy.
# A trunk pretrained on simulated frames still has to move to real ones.
PRETRAINED_TRUNK_LR_SCALE = 1.0


def _field(default: Any, help: str, **more: Any) -> Any:
    """A field whose metadata the command line builds its option from (see defectscope.cli)."""
    return dataclasses.field(default=default, metadata={"help": help, **more})


def _positive_finite(value: Any) -> bool:
    """A real number (not a bool) that is finite and > 0."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; stored in the checkpoint's JSON.

    Each field's metadata holds its command-line help (and choices, the option's
    spelling where it is not ``--field-name``), so a new setting is one edit here.
    """

    epochs: int | None = _field(
        None,
        "training epochs at most (early stopping may end sooner); default "
        f"{RANDOM_INIT_SCHEDULE[0]} from random initialization, {PRETRAINED_SCHEDULE[0]} from "
        "pretrained weights",
        minimum=1,
    )
    batch_size: int = _field(32, "patches per training step", minimum=1)
    learning_rate: float = _field(1e-4, "learning rate (AdamW)", flag="--lr")
    weight_decay: float = _field(1e-4, "AdamW weight decay", minimum=0)
    seed: int = _field(0, "random seed (splits, initialization, shuffling)")
    weights: str = _field(
        "auto",
        "auto (ImageNet when in the torch hub cache, else the shipped sim-haadf trunk; "
        "$DEFECTSCOPE_WEIGHTS overrides), imagenet (torch hub cache or download), sim-haadf "
        "(the trunk shipped in the package, pretrained on simulated HAADF crystals), none "
        "(random init) or a weights file",
    )
    # Below 1 a pretrained trunk moves slower than the new head (kept as an option: the
    # shipped trunk did best at 1, see PRETRAINED_TRUNK_LR_SCALE).
    trunk_lr_scale: float | None = _field(
        None,
        "the trunk's learning rate as a share of --lr; default "
        f"{PRETRAINED_TRUNK_LR_SCALE:g} from pretrained weights, 1 from random init",
        minimum=0,
    )
    # With batch norm, random-init training converges in a few CPU epochs; plain
    # VGG-16 stays near chance for 10+ epochs on the public data.
    architecture: str = _field(
        "vgg16_bn",
        "torchvision VGG-16, without or with batch normalization",
        choices=("vgg16", "vgg16_bn"),
    )
    trainable_blocks: int = _field(
        N_BLOCKS, "VGG-16 conv blocks that train, from the top (0 = head only, 5 = all)"
    )
    # Off by default: measured as one of issue 27's novelty methods (docs/novelty.md).
    spectral_norm: float | None = _field(
        None,
        "train with soft spectral normalization (DDU): every trunk conv and embedding "
        "layer's spectral norm, and every batch norm's gain, at most this coefficient "
        "(e.g. 3); baked into plain weights after training",
        minimum=0,
    )
    patience: int | None = _field(
        None,
        "epochs without a better validation loss before stopping; default "
        f"{RANDOM_INIT_SCHEDULE[1]} from random initialization, {PRETRAINED_SCHEDULE[1]} from "
        "pretrained weights",
        minimum=1,
    )
    # Validation-loss drop (nats) that counts as progress for patience; a loss below it
    # has no such drop left to make, so the validation counts as solved.
    min_delta: float = _field(
        0.01,
        "validation-loss drop (nats) that restarts the patience count; a validation loss "
        "below it counts as solved: patience waits and the latest solved epoch is kept",
        minimum=0,
    )
    precision: str = _field(
        "auto",
        "auto uses bf16 autocast where the CPU (AVX-512 BF16, AMX) or GPU has bf16",
        choices=("auto", "fp32", "bf16"),
    )
    # Where training runs: auto takes a CUDA GPU when PyTorch sees one.
    device: str = _field(
        "auto",
        "where training runs: auto takes a CUDA GPU when PyTorch sees one",
        choices=("auto", "cpu", "cuda"),
    )
    embedding_dim: int = _field(256, "width of the embedding layer before the classifier")
    # The scale of the patches, recorded in model.json: maps resample frames to it.
    pixel_size: float | None = _field(
        None,
        "pixel size of the training patches in --unit (recorded in model.json, so maps can "
        "bring calibrated frames to the patches' scale); default: the data's own, if any",
        minimum=0,
    )
    unit: str = _field("nm", "unit of --pixel-size (nm, Å, pm, ...)")
    physical_augmentation: bool = _field(
        True,
        "draw dose, scan jitter and drift, probe blur, column contrast and detector gain "
        "per training patch (--no-physical-augmentation turns it off)",
    )
    # Nested settings are set from Python; the command line leaves them at their defaults.
    augmentation: Augmentation = _field(
        Augmentation(), "random transforms of training patches", cli=False
    )
    normalization: Normalization = _field(
        Normalization(), "how raw patches become inputs", cli=False
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "patience"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(
                    f"{name} must be an integer >= 1 (or None: the default), got {value!r}"
                )
        scale = self.trunk_lr_scale
        if scale is not None and (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)
            or not 0 <= scale <= 10
        ):
            raise ValueError(f"trunk learning-rate scale must be in [0, 10], got {scale!r}")
        coefficient = self.spectral_norm
        if coefficient is not None and not _positive_finite(coefficient):
            raise ValueError(
                f"spectral norm coefficient (--spectral-norm) must be a finite number > 0, "
                f"got {coefficient!r}"
            )
        size = self.pixel_size
        if size is not None and not _positive_finite(size):
            raise ValueError(f"pixel size (--pixel-size) must be a finite number > 0, got {size!r}")
        unit = self.unit
        if not isinstance(unit, str) or not unit.strip() or len(unit) > MAX_UNIT_LENGTH:
            raise ValueError(f"unit (--unit) must be a short name like 'nm', got {unit!r}")

    def schedule(self, weights: str) -> tuple[int, int]:
        """``(epochs, patience)`` when training starts from ``weights`` (resolved): the
        fields where set, else :data:`RANDOM_INIT_SCHEDULE` or :data:`PRETRAINED_SCHEDULE`."""
        default = RANDOM_INIT_SCHEDULE if weights == "none" else PRETRAINED_SCHEDULE
        epochs = default[0] if self.epochs is None else self.epochs
        patience = default[1] if self.patience is None else self.patience
        return epochs, patience

    def trunk_learning_rate(self, weights: str) -> float:
        """The trunk's learning rate when training starts from ``weights`` (resolved)."""
        scale = self.trunk_lr_scale
        if scale is None:
            scale = 1.0 if weights == "none" else PRETRAINED_TRUNK_LR_SCALE
        return self.learning_rate * scale

    @property
    def training_augmentation(self) -> Augmentation:
        """The augmentation training applies: ``augmentation`` with its physical part off
        when ``physical_augmentation`` is False (the one switch the command line has)."""
        if self.physical_augmentation or not self.augmentation.physical:
            return self.augmentation
        return dataclasses.replace(self.augmentation, physical=False)
