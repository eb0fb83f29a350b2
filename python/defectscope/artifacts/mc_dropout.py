"""Monte Carlo dropout in the classifier head, from embeddings alone.

The network's head is ``embedding -> Dropout(rate) -> Linear``, so dropout's effect on
the prediction needs no network run: each sample drops embedding features with
probability ``rate`` (survivors scaled by ``1 / (1 - rate)``, as ``torch.nn.Dropout``
does in training) and applies the last layer. The score is the mutual information
between the prediction and the dropout mask (BALD; Gal & Ghahramani 2016): high where
the samples disagree, which is how MC dropout says "the model has not seen this".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Windows per block: samples x block x embedding float32 stays near 32 MB at the defaults.
_BLOCK = 1024


@dataclass(frozen=True)
class DropoutScores:
    """Per-window results of Monte Carlo dropout.

    Attributes
    ----------
    probabilities : ndarray, shape (n, classes)
        Mean softmax over the samples.
    predictive_entropy : ndarray, shape (n,)
        Entropy (nats) of the mean prediction: total uncertainty.
    mutual_information : ndarray, shape (n,)
        Predictive entropy minus the samples' mean entropy: the part the dropout
        samples disagree on.
    """

    probabilities: np.ndarray
    predictive_entropy: np.ndarray
    mutual_information: np.ndarray


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    return -np.sum(p * np.log(np.clip(p, 1e-30, None)), axis=axis)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def mc_dropout_scores(
    embeddings: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    rate: float,
    samples: int = 32,
    seed: int = 0,
    temperature: float = 1.0,
) -> DropoutScores:
    """Monte Carlo dropout of the head ``Linear(weight, bias)`` over ``embeddings``.

    Parameters
    ----------
    embeddings : ndarray, shape (n, d)
        Penultimate-layer embeddings (what the head's dropout acts on).
    weight : ndarray, shape (classes, d)
    bias : ndarray, shape (classes,)
        The head's last layer.
    rate : float
        Dropout probability, in [0, 1).
    samples : int
        Dropout masks drawn per window.
    seed : int
        Seed of the masks: the same call gives the same scores.
    temperature : float
        Logits are divided by it before the softmax.

    Returns
    -------
    DropoutScores
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    weight = np.asarray(weight, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {embeddings.shape}")
    if weight.ndim != 2 or weight.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"head weight must be (classes, {embeddings.shape[1]}), got shape {weight.shape}"
        )
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"head bias must be ({weight.shape[0]},), got shape {bias.shape}")
    if not (np.isfinite(rate) and 0 <= rate < 1):
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings hold NaN or infinite values")
    n, classes = len(embeddings), weight.shape[0]
    rng = np.random.default_rng(seed)
    probabilities = np.empty((n, classes), np.float64)
    mean_entropy = np.empty(n, np.float64)
    keep = np.float32(1.0 / (1.0 - rate))
    for start in range(0, n, _BLOCK):
        block = embeddings[start : start + _BLOCK]
        masks = (rng.random((int(samples), *block.shape), dtype=np.float32) >= rate) * keep
        logits = np.einsum("snd,cd->snc", masks * block, weight) + bias
        p = _softmax(logits.astype(np.float64) / temperature)
        probabilities[start : start + len(block)] = p.mean(axis=0)
        mean_entropy[start : start + len(block)] = _entropy(p).mean(axis=0)
    total = _entropy(probabilities)
    # Rounding can leave a hair below zero where every sample agrees.
    return DropoutScores(probabilities, total, np.maximum(total - mean_entropy, 0.0))
