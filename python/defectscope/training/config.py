"""Training hyper-parameters, importable without PyTorch (the CLI shows their defaults)."""

from __future__ import annotations

import dataclasses

from defectscope.artifacts.metadata import N_BLOCKS
from defectscope.tiling.tiler import Normalization
from defectscope.training.augment import Augmentation


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; stored in the checkpoint's JSON."""

    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    seed: int = 0
    weights: str = "none"
    # With batch norm, random-init training converges in a few CPU epochs; plain
    # VGG-16 stays near chance for 10+ epochs on the public data.
    architecture: str = "vgg16_bn"
    trainable_blocks: int = N_BLOCKS
    patience: int = 6
    # Validation-loss drop (nats) that counts as progress for patience.
    min_delta: float = 0.01
    precision: str = "auto"  # auto | fp32 | bf16
    # Where training runs: auto takes a CUDA GPU when PyTorch sees one.
    device: str = "auto"  # auto | cpu | cuda
    embedding_dim: int = 256
    augmentation: Augmentation = Augmentation()
    normalization: Normalization = Normalization()
