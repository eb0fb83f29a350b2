"""VGG-16 patch classifier with an exposed embedding.

torchvision's VGG-16 convolutional trunk (13 conv layers in 5 blocks) is kept
as is, so ImageNet weights load through torchvision's weights API. Its
classifier expects 7x7 feature maps from 224-pixel images; for 64-pixel STEM
patches the trunk gives 2x2x512, so the head is replaced by
``flatten -> Linear(2048, embedding_dim) -> ReLU -> Dropout -> Linear(n_classes)``
and the ``embedding_dim`` activations are the embedding used for clustering.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from defectscope.artifacts.metadata import N_BLOCKS
from defectscope.nets import shipped

# Overrides what ``--weights auto`` means (e.g. ``none`` to pin random initialization).
WEIGHTS_ENV = "DEFECTSCOPE_WEIGHTS"

ARCHITECTURES = {
    "vgg16": (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1),
    "vgg16_bn": (torchvision.models.vgg16_bn, torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1),
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be had."""


class DefectNet(nn.Module):
    """VGG-16 trunk plus a small head; ``forward`` returns logits.

    Parameters
    ----------
    n_classes : int
        Number of defect classes.
    patch_size : int
        Input side in pixels (a multiple of 32).
    embedding_dim : int
        Width of the penultimate layer exposed by :meth:`embed`.
    dropout : float
        Dropout before the last layer during training.
    """

    def __init__(
        self,
        n_classes: int,
        patch_size: int = 64,
        embedding_dim: int = 256,
        dropout: float = 0.5,
        architecture: str = "vgg16",
    ):
        super().__init__()
        if patch_size % 32:
            raise ValueError(f"patch size must be a multiple of 32 for VGG-16, got {patch_size}")
        if architecture not in ARCHITECTURES:
            known = ", ".join(ARCHITECTURES)
            raise ValueError(f"architecture must be one of {known}, got {architecture!r}")
        self.architecture = architecture
        self.features = ARCHITECTURES[architecture][0](weights=None).features
        side = patch_size // 32
        self.embedding = nn.Sequential(
            nn.Flatten(), nn.Linear(512 * side * side, embedding_dim), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embedding_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding, shape ``(batch, embedding_dim)``."""
        return self.embedding(self.features(x))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and embedding from one pass."""
        emb = self.embed(x)
        return self.classifier(self.dropout(emb)), emb

    def set_trainable_blocks(self, n_blocks: int) -> None:
        """Freeze all but the last ``n_blocks`` conv blocks (0 trains the head only)."""
        if not 0 <= n_blocks <= N_BLOCKS:
            raise ValueError(f"trainable blocks must be in 0..{N_BLOCKS}, got {n_blocks}")
        # Each conv block ends with a max-pool; train from the end of block 5 - n.
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        first_trainable = pools[N_BLOCKS - n_blocks - 1] + 1 if n_blocks < N_BLOCKS else 0
        for index, layer in enumerate(self.features):
            for param in layer.parameters():
                param.requires_grad = index >= first_trainable


def imagenet_cache_path(architecture: str = "vgg16") -> Path:
    """Where torchvision's weights API keeps the ImageNet file of ``architecture``."""
    url = ARCHITECTURES[architecture][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state_dict(architecture: str) -> dict[str, torch.Tensor]:
    weights = ARCHITECTURES[architecture][1]
    try:
        # The standard route: torch hub cache first, download otherwise.
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # urllib, hash and file errors all mean "not available"
        raise WeightsUnavailableError(
            "ImageNet VGG-16 weights are not in the torch hub cache and could not be "
            f"downloaded ({type(exc).__name__}: {exc}). On a connected machine fetch "
            f"{weights.url} and copy it to {imagenet_cache_path(architecture)} (or pass "
            "--weights PATH to that file), or train from scratch with --weights none."
        ) from exc


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and I/O errors all mean "not loadable"
        raise WeightsUnavailableError(f"{path}: cannot load weights ({exc})") from exc


def _load_trunk(model: DefectNet, state: dict[str, torch.Tensor], source: str) -> None:
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    trunk = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    if not trunk:
        raise WeightsUnavailableError(f"{source}: holds no 'features.*' VGG-16 weights")
    try:
        model.features.load_state_dict(trunk, strict=True)
    except RuntimeError as exc:
        raise WeightsUnavailableError(f"{source}: not VGG-16 trunk weights ({exc})") from exc


def resolve_weights(weights: str | os.PathLike, architecture: str = "vgg16_bn") -> str:
    """What ``weights`` means here: ``auto`` becomes ``$DEFECTSCOPE_WEIGHTS`` when set,
    else ``imagenet`` when torchvision's ImageNet file is in the torch hub cache, else
    the shipped trunk for ``architecture`` (:data:`shipped.DEFAULT_TRUNK`), else
    ``none``; anything else is returned as given."""
    choice = str(weights)
    if choice != "auto":
        return choice
    override = os.environ.get(WEIGHTS_ENV, "").strip()
    if override and override != "auto":
        return override
    if imagenet_cache_path(architecture).is_file():
        return "imagenet"
    return shipped.default_trunk(architecture) or "none"


def describe_weights(choice: str, architecture: str = "vgg16_bn") -> dict[str, str]:
    """A record of where a trunk started: the choice and, for a shipped trunk or a
    file, its SHA-256 (``model.json`` keeps it)."""
    record = {"weights": choice}
    if choice in shipped.shipped_trunks():
        manifest = shipped.read_manifest(choice)
        record.update(
            shipped_sha256=manifest["sha256"], recipe_sha256=manifest.get("recipe_sha256", "")
        )
    elif choice not in ("none", "imagenet") and Path(choice).is_file():
        record["sha256"] = shipped.file_hash(Path(choice))
    return record


def build_model(
    n_classes: int,
    weights: str | os.PathLike = "none",
    patch_size: int = 64,
    embedding_dim: int = 256,
    trainable_blocks: int = N_BLOCKS,
    dropout: float = 0.5,
    architecture: str = "vgg16",
) -> DefectNet:
    """Build the classifier and initialise its trunk.

    Parameters
    ----------
    n_classes : int
        Number of classes of the new head.
    weights : {'auto', 'imagenet', 'none'}, a shipped trunk's name, or a path
        ``imagenet``: torchvision's ``VGG16_Weights.IMAGENET1K_V1`` from the torch hub
        cache or downloaded; a shipped trunk's name (``sim-haadf``): the package's
        pretrained trunk, its SHA-256 checked against its manifest; a path: a
        torchvision VGG-16 state dict (or any file whose ``features.*`` keys match);
        ``none``: random initialization; ``auto``: see :func:`resolve_weights`.
    patch_size, embedding_dim, dropout
        See :class:`DefectNet`.
    trainable_blocks : int
        Conv blocks that train, counted from the top (0..5).
    architecture : {'vgg16', 'vgg16_bn'}
        torchvision's VGG-16, without or with batch normalization.

    Raises
    ------
    WeightsUnavailableError
        When the weights cannot be loaded; there is never a silent fallback to random.
    """
    model = DefectNet(n_classes, patch_size, embedding_dim, dropout, architecture)
    choice = resolve_weights(weights, architecture)
    if choice == "imagenet":
        _load_trunk(model, _imagenet_state_dict(architecture), f"ImageNet {architecture}")
    elif choice in shipped.shipped_trunks():
        try:
            path, _ = shipped.verified_weights(choice, architecture)
        except shipped.ShippedTrunkError as exc:
            raise WeightsUnavailableError(str(exc)) from None
        _load_trunk(model, _read_state(path), str(path))
    elif choice != "none":
        path = Path(choice)
        if not path.is_file():
            origin = f" (from ${WEIGHTS_ENV})" if str(weights) == "auto" else ""
            names = ", ".join(shipped.shipped_trunks()) or "none installed"
            raise WeightsUnavailableError(
                f"{path}{origin}: weights file not found; weights are auto, imagenet, none, "
                f"a shipped trunk ({names}) or a file"
            )
        _load_trunk(model, _read_state(path), str(path))
    model.set_trainable_blocks(trainable_blocks)
    return model
