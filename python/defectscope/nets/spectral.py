"""Soft spectral normalization of the trunk, for training (DDU, Mukhoti et al. 2023).

A feature density can only tell new inputs from known ones if the trunk keeps
distances: DDU bounds each layer's Lipschitz constant from above with spectral
normalization (and from below with residual connections), and names VGG-16 as the
architecture whose densities collapse without. Here every convolution and linear layer
of the trunk and embedding has its weight scaled down to a spectral norm of at most
``coefficient`` (one power iteration per training step, on the weight as a matrix,
as in Miyato et al. 2018), and every batch norm's per-channel gain
``|gamma| / sqrt(running_var + eps)`` is bounded likewise.

The constraint only acts while training: :func:`remove_spectral_norm` bakes the
normalized weights into plain ones, so a trained model is an ordinary VGG-16 that every
export, dense graph and checkpoint path handles unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

# Power iterations when a layer is first constrained (then one per training step).
INITIAL_ITERATIONS = 100


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-12)


def _training_step(module: nn.Module) -> bool:
    """True in a training step (train mode, gradients on), the only time the estimates
    move: batch-norm re-estimation (no gradients) and evaluation read them as they are,
    so the statistics they gather are of the weights that are then used."""
    return module.training and torch.is_grad_enabled()


class _SoftSpectralNorm(nn.Module):
    """Parametrization ``W -> W / max(1, sigma(W) / coefficient)``.

    ``sigma`` is the power-iteration estimate of the largest singular value of ``W`` as
    a matrix (out, in x kernel), as in Miyato et al. 2018: a lower bound that one
    iteration per training step keeps close.
    """

    def __init__(self, weight: torch.Tensor, coefficient: float, generator: torch.Generator):
        super().__init__()
        matrix = weight.detach().flatten(1)
        self.coefficient = float(coefficient)
        u = torch.randn(matrix.shape[0], generator=generator, dtype=matrix.dtype)
        v = torch.randn(matrix.shape[1], generator=generator, dtype=matrix.dtype)
        self.register_buffer("u", _unit(u).to(matrix.device))
        self.register_buffer("v", _unit(v).to(matrix.device))
        # Start from a converged estimate, so the first steps are not scaled by noise.
        for _ in range(INITIAL_ITERATIONS):
            self._iterate(matrix)

    @torch.no_grad()
    def _iterate(self, matrix: torch.Tensor) -> None:
        self.v.copy_(_unit(matrix.t() @ self.u))
        self.u.copy_(_unit(matrix @ self.v))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = weight.flatten(1).to(self.u.dtype)
        # The norm in full precision, also under bf16 autocast.
        with torch.autocast(weight.device.type, enabled=False):
            if _training_step(self):
                self._iterate(matrix.detach())
            sigma = self.u @ matrix @ self.v
        return weight / torch.clamp(sigma / self.coefficient, min=1.0).to(weight.dtype)


class _BoundedBatchNormGain(nn.Module):
    """Parametrization of a batch norm's ``weight``: per-channel gain at most ``coefficient``.

    The gain ``|gamma| / sqrt(running_var + eps)`` is read on the running variance as it
    was at the last training step (DDU's SpectralBatchNorm reads it live; here
    batch-norm re-estimation resets the variance, and gammas that followed it mid-pass
    would skew the statistics gathered downstream).
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, coefficient: float):
        super().__init__()
        self.coefficient = float(coefficient)
        # A list, so the batch norm is not registered as this module's child (a cycle).
        self._norm = [norm]
        self.register_buffer("divisor", torch.ones((), device=norm.weight.device))
        self._update(norm.weight.detach())

    @torch.no_grad()
    def _update(self, gamma: torch.Tensor) -> None:
        norm = self._norm[0]
        gain = (gamma.abs() / torch.sqrt(norm.running_var + norm.eps)).max()
        self.divisor.copy_(torch.clamp(gain / self.coefficient, min=1.0))

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        if _training_step(self):
            self._update(gamma.detach())
        return gamma / self.divisor


def _targets(model: nn.Module):
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        # Frozen layers (set_trainable_blocks) keep their pretrained weights as they are.
        if weight is None or not weight.requires_grad:
            continue
        if isinstance(module, nn.Conv2d | nn.Linear) and not name.startswith("classifier"):
            yield module
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            yield module


def apply_spectral_norm(model: nn.Module, coefficient: float, seed: int = 0) -> int:
    """Constrain every trainable conv, embedding linear layer and batch norm of ``model``.

    The classifier (the last layer) stays free: the density lives on the embedding
    before it; frozen layers stay as they are. Returns the number of layers constrained.

    Raises
    ------
    ValueError
        For a coefficient that is not positive and finite.
    """
    coefficient = float(coefficient)
    if not (0 < coefficient < float("inf")):
        raise ValueError(
            f"spectral norm coefficient must be positive and finite, got {coefficient}"
        )
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for module in list(_targets(model)):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parametrization = _BoundedBatchNormGain(module, coefficient)
        else:
            parametrization = _SoftSpectralNorm(module.weight, coefficient, generator)
        parametrize.register_parametrization(module, "weight", parametrization)
        count += 1
    return count


def remove_spectral_norm(model: nn.Module) -> int:
    """Bake the constrained weights into plain parameters; returns how many were baked.

    Call it in eval mode (or without gradients): a training step would move the
    estimates once more, and the baked weights would not be those last evaluated.
    """
    count = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            count += 1
    return count
