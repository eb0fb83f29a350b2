"""Novelty as disagreement between sampled predictions: MC dropout and a head ensemble.

Both score a window by the mutual information between the prediction and the sample
(BALD; Gal & Ghahramani 2016, Lakshminarayanan et al. 2017): the entropy of the mean
prediction minus the samples' mean entropy, high where the samples disagree, which is
how a Bayesian or ensemble model says "I have not seen this".

- Monte Carlo dropout in the head. The network's head is
  ``embedding -> Dropout(rate) -> Linear``, so dropout's effect needs no network run:
  each sample drops embedding features with probability ``rate`` (survivors scaled by
  ``1 / (1 - rate)``, as ``torch.nn.Dropout`` does in training) and applies the last
  layer.
- A head ensemble: several heads (``Linear -> ReLU -> Linear``), each trained from its
  own random start on the shared, frozen trunk's features
  (:func:`defectscope.training.head_ensemble.train_head_ensemble`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Windows per block: MC dropout holds about three samples x block x embedding float32
# arrays at once (mask, product, logits' input), ~100 MB at 32 samples of 256 features.
_BLOCK = 1024


@dataclass(frozen=True)
class DisagreementScores:
    """Per-window results of sampled predictions.

    Attributes
    ----------
    probabilities : ndarray, shape (n, classes)
        Mean softmax over the samples.
    predictive_entropy : ndarray, shape (n,)
        Entropy (nats) of the mean prediction: total uncertainty.
    mutual_information : ndarray, shape (n,)
        Predictive entropy minus the samples' mean entropy: the part the samples
        disagree on.
    """

    probabilities: np.ndarray
    predictive_entropy: np.ndarray
    mutual_information: np.ndarray


@dataclass(frozen=True)
class HeadMember:
    """One head of an ensemble: ``relu(x @ hidden_weight.T + hidden_bias) @ weight.T + bias``."""

    hidden_weight: np.ndarray
    hidden_bias: np.ndarray
    weight: np.ndarray
    bias: np.ndarray


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    return -np.sum(p * np.log(np.clip(p, 1e-30, None)), axis=axis)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def _finite_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} hold NaN or infinite values")
    return x


def _check_layer(weight: np.ndarray, bias: np.ndarray, inputs: int, what: str):
    weight = np.asarray(weight, dtype=np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    if weight.ndim != 2 or weight.shape[1] != inputs:
        raise ValueError(f"{what} weight must be (outputs, {inputs}), got shape {weight.shape}")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{what} bias must be ({weight.shape[0]},), got shape {bias.shape}")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ValueError(f"{what} weight or bias hold NaN or infinite values")
    return weight, bias


def _check_temperature(temperature: float) -> None:
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")


class _Accumulator:
    """Running mean prediction and mean entropy over samples, block by block."""

    def __init__(self, n: int, classes: int):
        self.probabilities = np.zeros((n, classes), np.float64)
        self.mean_entropy = np.zeros(n, np.float64)

    def add(self, rows: slice, p: np.ndarray) -> None:
        # p: (samples, rows, classes)
        self.probabilities[rows] = p.mean(axis=0)
        self.mean_entropy[rows] = _entropy(p).mean(axis=0)

    def scores(self) -> DisagreementScores:
        total = _entropy(self.probabilities)
        # Rounding can leave a hair below zero where every sample agrees.
        mutual = np.maximum(total - self.mean_entropy, 0.0)
        return DisagreementScores(self.probabilities, total, mutual)


def mc_dropout_scores(
    embeddings: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    rate: float,
    samples: int = 32,
    seed: int = 0,
    temperature: float = 1.0,
) -> DisagreementScores:
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
    DisagreementScores
    """
    embeddings = _finite_matrix(embeddings, "embeddings")
    weight, bias = _check_layer(weight, bias, embeddings.shape[1], "head")
    if not (np.isfinite(rate) and 0 <= rate < 1):
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    _check_temperature(temperature)
    rng = np.random.default_rng(seed)
    keep = np.float32(1.0 / (1.0 - rate))
    result = _Accumulator(len(embeddings), weight.shape[0])
    for start in range(0, len(embeddings), _BLOCK):
        block = embeddings[start : start + _BLOCK]
        masks = (rng.random((int(samples), *block.shape), dtype=np.float32) >= rate) * keep
        logits = np.einsum("snd,cd->snc", masks * block, weight) + bias
        result.add(
            slice(start, start + len(block)), _softmax(logits.astype(np.float64) / temperature)
        )
    return result.scores()


def head_ensemble_scores(
    features: np.ndarray, members: Sequence[HeadMember], temperature: float = 1.0
) -> DisagreementScores:
    """The ensemble's mean prediction and its members' disagreement on ``features``.

    Parameters
    ----------
    features : ndarray, shape (n, d)
        The shared trunk's output, flattened (what every member's head reads).
    members : sequence of HeadMember
        At least two heads.
    temperature : float
        Logits are divided by it before the softmax.
    """
    features = _finite_matrix(features, "features")
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
    layers = []
    for i, m in enumerate(members):
        hidden = _check_layer(
            m.hidden_weight, m.hidden_bias, features.shape[1], f"member {i} hidden"
        )
        out = _check_layer(m.weight, m.bias, hidden[0].shape[0], f"member {i} output")
        layers.append((hidden, out))
    classes = {out[0].shape[0] for _, out in layers}
    if len(classes) != 1:
        raise ValueError(f"ensemble members disagree on the number of classes: {sorted(classes)}")
    _check_temperature(temperature)
    result = _Accumulator(len(features), classes.pop())
    for start in range(0, len(features), _BLOCK):
        block = features[start : start + _BLOCK]
        logits = np.stack(
            [np.maximum(block @ hw.T + hb, 0) @ w.T + b for (hw, hb), (w, b) in layers]
        )
        result.add(
            slice(start, start + len(block)), _softmax(logits.astype(np.float64) / temperature)
        )
    return result.scores()
