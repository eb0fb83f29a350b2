"""STEM-appropriate augmentation of raw gray patches (before normalization).

A crystal lattice seen down a zone axis keeps its defect class under the
square's symmetries (90-degree rotations, flips) and under small shifts; scan
noise and detector gain change from frame to frame. Colour, scale and shear
changes are left out: they would alter lattice spacings that identify defects.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Strengths of each random transform; ``Augmentation.off()`` disables all."""

    rotate_flip: bool = True
    max_shift: int = 4
    gamma_range: tuple[float, float] = (0.75, 1.33)
    noise_std: float = 0.08

    @classmethod
    def off(cls) -> Augmentation:
        return cls(rotate_flip=False, max_shift=0, gamma_range=(1.0, 1.0), noise_std=0.0)


def augment_batch(
    patches: np.ndarray, rng: np.random.Generator, config: Augmentation = Augmentation()
) -> np.ndarray:
    """Return randomly transformed float32 copies of ``patches`` (n, P, P).

    Shifts reflect at the border so no constant padding enters the lattice;
    gamma acts on the patch scaled to 0..1, then the original range is restored;
    noise is Gaussian with a standard deviation relative to each patch's own.
    """
    out = np.empty(patches.shape, dtype=np.float32)
    size = patches.shape[-1]
    for i, patch in enumerate(patches.astype(np.float32, copy=False)):
        if config.rotate_flip:
            patch = np.rot90(patch, k=int(rng.integers(4)))
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
        if config.max_shift > 0:
            s = config.max_shift
            padded = np.pad(patch, s, mode="reflect")
            dy, dx = rng.integers(0, 2 * s + 1, size=2)
            patch = padded[dy : dy + size, dx : dx + size]
        lo, hi = float(patch.min()), float(patch.max())
        gamma = float(rng.uniform(*config.gamma_range))
        if hi > lo and gamma != 1.0:
            patch = ((patch - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
        if config.noise_std > 0:
            sigma = float(rng.uniform(0, config.noise_std)) * float(patch.std())
            patch = patch + rng.normal(0.0, sigma, size=patch.shape).astype(np.float32)
        out[i] = patch
    return out
