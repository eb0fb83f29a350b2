"""Novelty as disagreement between sampled predictions: MC dropout and a head ensemble.

Both score a window by the mutual information between the prediction and the sample
(BALD; Gal & Ghahramani 2016, Lakshminarayanan et al. 2017): the entropy of the mean
prediction minus the samples' mean entropy, high where the samples disagree, which is
how a Bayesian or ensemble model says "I have not seen this".

- Monte Carlo dropout in the head. The network's head is
  ``embedding -> Dropout(rate) -> Linear``, so dropout's effect needs no network run:
  each sample drops embedding features with probability ``rate`` (survivors scaled by
  ``1 / (1 - rate)``, as ``torch.nn.Dropout`` does in training) and applies the last
  layer. The samples are drawn once and shared by every window (each one thinned
  head, a draw of the weights), so a window's score does not depend on the batch it
  came in, and all samples cost one matrix product with the stacked thinned heads.
  :class:`DropoutNovelty` carries the masks, the head and a calibration on held-out
  known windows inside a model's record, so maps can use it
  (``novelty="mc_dropout"``) from the embedding every engine returns.
- A head ensemble: several heads (``Linear -> ReLU -> Linear``), each trained from its
  own random start on features of the shared, frozen network
  (:func:`defectscope.training.head_ensemble.train_head_ensemble`). On the embedding
  every engine returns, :class:`EnsembleNovelty` carries the heads and a calibration
  inside a model's record (``novelty="ensemble"``), as :class:`DropoutNovelty` does.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from defectscope.artifacts.density import (
    DEFAULT_QUANTILE,
    calibrated,
    calibration_of,
    calibration_record,
    decode_array,
    encode_array,
    read_calibration,
)
from defectscope.util.blas import one_blas_thread

# Windows per block (heads): a few block x heads float64 arrays are held at once; this
# many values each keeps them near 16 MB whatever the number of samples and classes.
_BLOCK_VALUES = 1 << 21
# Thinned heads every window is scored with. Over five mask seeds the leave-one-class-out
# AUROC of a CdTe class had a standard deviation of up to 0.09 with 32, 0.036 with 128
# (docs/novelty.md).
DROPOUT_SAMPLES = 128
# The most masks a stored record may hold (bounds the work a record can ask for).
MAX_DROPOUT_SAMPLES = 1024
# Windows per block of the head ensemble.
_BLOCK = 1024
DROPOUT_KIND = "mc-dropout-mutual-information"
ENSEMBLE_KIND = "head-ensemble-mutual-information"
# The most members and hidden units a stored ensemble may have (bounds the work and
# memory a record can ask for: at most 32 x 2048 hidden units per window).
MAX_ENSEMBLE_MEMBERS = 32
MAX_ENSEMBLE_HIDDEN = 2048


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


def dropout_masks(samples: int, width: int, rate: float, seed: int = 0) -> np.ndarray:
    """``samples`` dropout masks over ``width`` features, True where a feature is kept."""
    if not (np.isfinite(rate) and 0 <= rate < 1):
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if int(samples) != samples or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples}")
    rng = np.random.default_rng(seed)
    return rng.random((int(samples), int(width))) >= rate


def _thinned_heads(weight: np.ndarray, kept: np.ndarray, rate: float) -> np.ndarray:
    """The heads ``weight[c] * kept[s] / (1 - rate)`` stacked class-major:
    (classes * samples, d) float32."""
    thinned = (weight[:, None, :] * kept[None]).astype(np.float32) / np.float32(1.0 - rate)
    return thinned.reshape(len(weight) * len(kept), -1)


def _dropout_scores(
    embeddings: np.ndarray, stacked: np.ndarray, bias: np.ndarray, temperature: float
) -> DisagreementScores:
    """Mutual information of the ``stacked`` thinned heads (checked inputs)."""
    classes = len(bias)
    samples = len(stacked) // classes
    result = _Accumulator(len(embeddings), classes)
    step = max(1, _BLOCK_VALUES // len(stacked))
    for start in range(0, len(embeddings), step):
        block = embeddings[start : start + step]
        # Class-major (classes, samples, windows): reductions over classes are then
        # elementwise over whole arrays, not over a run of a few values per window.
        z = (stacked @ block.T).reshape(classes, samples, len(block)).astype(np.float64)
        z += bias[:, None, None]
        z /= temperature
        z -= z.max(axis=0)
        e = np.exp(z)
        total = e.sum(axis=0)
        p = e / total
        # Each sample's entropy as log(sum e^z) - sum p z: no log of a probability.
        entropy = np.log(total) - (p * z).sum(axis=0)
        rows = slice(start, start + len(block))
        result.probabilities[rows] = p.mean(axis=1).T
        result.mean_entropy[rows] = entropy.mean(axis=0)
    return result.scores()


def mc_dropout_scores(
    embeddings: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    rate: float,
    samples: int = DROPOUT_SAMPLES,
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
        Dropout masks drawn (:func:`dropout_masks`), shared by every window.
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
    kept = dropout_masks(samples, embeddings.shape[1], rate, seed)
    _check_temperature(temperature)
    return _dropout_scores(embeddings, _thinned_heads(weight, kept, rate), bias, temperature)


@dataclass(frozen=True)
class DropoutNovelty:
    """MC dropout of a model's head as a map's novelty source, calibrated like a density.

    A window's score is the mutual information of the thinned heads' predictions on its
    embedding (temperature 1, as the leave-one-class-out study scores it); its
    ``uncertainty`` is the share of held-out known windows that score lower, and it is
    ``unknown`` beyond their ``quantile``.

    Attributes
    ----------
    weight : ndarray, shape (classes, d)
    bias : ndarray, shape (classes,)
        The head's last layer.
    rate : float
        The head's dropout probability.
    kept : ndarray of bool, shape (samples, d)
        The dropout masks (True: feature kept).
    reference : ndarray, shape (r,)
        Quantiles of held-out known windows' scores.
    threshold : float
    quantile : float
    source : str
        What ``reference`` was measured on.
    """

    weight: np.ndarray
    bias: np.ndarray
    rate: float
    kept: np.ndarray
    reference: np.ndarray
    threshold: float
    quantile: float = DEFAULT_QUANTILE
    source: str = "validation"
    # How maps name this source in result.info["novelty"].
    novelty_name = "MC dropout"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.rate) and 0 < self.rate < 1):
            raise ValueError(f"MC dropout needs a dropout rate in (0, 1), got {self.rate}")
        # Built once: maps score a frame in many small chunks.
        object.__setattr__(self, "_stacked", _thinned_heads(self.weight, self.kept, self.rate))

    def disagreement(self, embeddings: np.ndarray) -> DisagreementScores:
        """Mean prediction, predictive entropy and mutual information per embedding."""
        embeddings = _finite_matrix(embeddings, "embeddings")
        if embeddings.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"embeddings are {embeddings.shape[1]}-D, the head reads {self.weight.shape[1]}"
            )
        # Small products: more BLAS threads would only spin afterwards, on the cores the
        # next frame's network needs (a 512² dense map took ~40 ms longer without this).
        with one_blas_thread():
            return _dropout_scores(embeddings, self._stacked, self.bias, 1.0)

    def score(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mutual information, uncertainty, unknown)`` per embedding."""
        return calibrated(
            self.disagreement(embeddings).mutual_information, self.reference, self.threshold
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": DROPOUT_KIND,
            "weight": encode_array(self.weight),
            "bias": encode_array(self.bias),
            "rate": float(self.rate),
            "masks": {
                "shape": list(self.kept.shape),
                "packbits_base64": base64.b64encode(np.packbits(self.kept)).decode(),
            },
            **calibration_record(self),
        }

    @classmethod
    def from_dict(
        cls, data: Any, n_classes: int | None = None, embedding_dim: int | None = None
    ) -> DropoutNovelty:
        """Read and check a stored record; ValueError names the bad field."""
        _check_record(data, "mc_dropout", DROPOUT_KIND)
        weight, bias = _check_layer(
            decode_array(data.get("weight"), "mc_dropout weight"),
            decode_array(data.get("bias"), "mc_dropout bias"),
            embedding_dim if embedding_dim is not None else _width(data.get("weight")),
            "mc_dropout head",
        )
        if n_classes is not None and len(weight) != n_classes:
            raise ValueError(f"mc_dropout head has {len(weight)} classes for {n_classes}")
        rate = data.get("rate")
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 < rate < 1:
            raise ValueError(f"mc_dropout rate must be in (0, 1), got {rate!r}")
        kept = _unpack_masks(data.get("masks"), weight.shape[1])
        reference, threshold, quantile = read_calibration(data, "mc_dropout")
        return cls(
            weight, bias, float(rate), kept, reference, threshold, quantile, str(data.get("source"))
        )


def _check_record(data: Any, what: str, kind: str) -> None:
    """ValueError unless ``data`` is a stored record (an object) of ``kind``."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be an object, got {type(data).__name__}")
    if data.get("kind") != kind:
        raise ValueError(f"{what} kind must be {kind!r}, got {data.get('kind')!r}")


def _integers(values: Any, n: int) -> tuple[int, ...]:
    """``n`` JSON integers (not booleans, not floats); ValueError otherwise."""
    values = tuple(values)
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"need {n} integers, got {values!r}")
    return values


def _width(encoded: Any) -> int:
    try:
        return _integers(encoded["shape"], 2)[1]
    except (KeyError, TypeError, ValueError):
        raise ValueError("mc_dropout weight is not a valid encoded (classes, d) array") from None


def _unpack_masks(data: Any, width: int) -> np.ndarray:
    try:
        samples, columns = _integers(data["shape"], 2)
        bits = np.frombuffer(base64.b64decode(data["packbits_base64"], validate=True), np.uint8)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"mc_dropout masks are not valid ({exc})") from None
    if columns != width or not 1 <= samples <= MAX_DROPOUT_SAMPLES:
        raise ValueError(
            f"mc_dropout masks must be (1..{MAX_DROPOUT_SAMPLES} samples, {width}), "
            f"got ({samples}, {columns})"
        )
    if len(bits) != -(-samples * width // 8):
        raise ValueError(f"mc_dropout masks hold {len(bits)} bytes for ({samples}, {width})")
    return np.unpackbits(bits, count=samples * width).reshape(samples, width).astype(bool)


def fit_dropout_novelty(
    weight: np.ndarray,
    bias: np.ndarray,
    rate: float,
    held_out: np.ndarray,
    samples: int = DROPOUT_SAMPLES,
    seed: int = 0,
    quantile: float = DEFAULT_QUANTILE,
    source: str = "validation",
) -> DropoutNovelty:
    """MC dropout of the head ``(weight, bias, rate)``, calibrated on ``held_out``.

    Parameters
    ----------
    weight, bias : ndarray
        The head's last layer, ``(classes, d)`` and ``(classes,)``.
    rate : float
        The head's dropout probability, in [0, 1).
    held_out : ndarray, shape (m, d)
        Embeddings of known windows the model did not train on (``m >= 2``): their
        scores set the reference and the threshold.
    samples, seed : int
        Masks drawn (:func:`dropout_masks`).
    quantile : float
        Share of held-out known windows that stay known.
    source : str
        What ``held_out`` is, recorded.
    """
    held_out = _finite_matrix(held_out, "held-out embeddings")
    if len(held_out) < 2:
        raise ValueError(f"need at least 2 held-out embeddings, got {len(held_out)}")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    weight, bias = _check_layer(weight, bias, held_out.shape[1], "head")
    if not 0 < rate < 1:
        raise ValueError(f"MC dropout needs a dropout rate in (0, 1), got {rate}")
    if samples > MAX_DROPOUT_SAMPLES:
        raise ValueError(f"at most {MAX_DROPOUT_SAMPLES} samples, got {samples}")
    kept = dropout_masks(samples, held_out.shape[1], rate, seed)
    novelty = DropoutNovelty(weight, bias, float(rate), kept, np.zeros(2), 0.0)
    reference, threshold = calibration_of(
        novelty.disagreement(held_out).mutual_information, quantile
    )
    return dataclasses.replace(
        novelty, reference=reference, threshold=threshold, quantile=float(quantile), source=source
    )


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
    layers = _checked_members(members, features.shape[1])
    _check_temperature(temperature)
    return _ensemble_scores(features, layers, temperature)


def _checked_members(members: Sequence[HeadMember], width: int) -> list[tuple]:
    """Each member's ``((hidden_weight, hidden_bias), (weight, bias))`` as float32,
    checked to read ``width`` features and to agree on the classes."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
    layers = []
    for i, m in enumerate(members):
        hidden = _check_layer(m.hidden_weight, m.hidden_bias, width, f"member {i} hidden")
        out = _check_layer(m.weight, m.bias, hidden[0].shape[0], f"member {i} output")
        layers.append((hidden, out))
    classes = {out[0].shape[0] for _, out in layers}
    if len(classes) != 1:
        raise ValueError(f"ensemble members disagree on the number of classes: {sorted(classes)}")
    return layers


def _ensemble_scores(features: np.ndarray, layers: list[tuple], temperature: float):
    """Mutual information of the checked ``layers`` on checked ``features``."""
    result = _Accumulator(len(features), layers[0][1][0].shape[0])
    for start in range(0, len(features), _BLOCK):
        block = features[start : start + _BLOCK]
        logits = np.stack(
            [np.maximum(block @ hw.T + hb, 0) @ w.T + b for (hw, hb), (w, b) in layers]
        )
        result.add(
            slice(start, start + len(block)), _softmax(logits.astype(np.float64) / temperature)
        )
    return result.scores()


@dataclass(frozen=True)
class EnsembleNovelty:
    """A head ensemble on the embedding as a map's novelty source, calibrated like a density.

    Every member is a head ``Linear -> ReLU -> Linear`` trained from its own start on
    the embeddings of the training patches
    (:func:`~defectscope.training.head_ensemble.train_head_ensemble`). A window's score
    is the mutual information between the members' predictions and the member
    (temperature 1); its ``uncertainty`` is the share of held-out known windows that
    score lower, and it is ``unknown`` beyond their ``quantile``. It reads the
    embedding every engine returns, so window, dense, ONNX and TensorRT maps all score
    it without another network.

    Attributes
    ----------
    members : tuple of HeadMember
        At least two heads reading the embedding.
    reference : ndarray, shape (r,)
        Quantiles of held-out known windows' scores.
    threshold : float
    quantile : float
    source : str
        What ``reference`` was measured on.
    """

    members: tuple[HeadMember, ...]
    reference: np.ndarray
    threshold: float
    quantile: float = DEFAULT_QUANTILE
    source: str = "validation"
    # How maps name this source in result.info["novelty"].
    novelty_name = "head ensemble"

    def __post_init__(self) -> None:
        members = tuple(self.members)
        if not 2 <= len(members) <= MAX_ENSEMBLE_MEMBERS:
            raise ValueError(
                f"an ensemble needs 2..{MAX_ENSEMBLE_MEMBERS} members, got {len(members)}"
            )
        object.__setattr__(self, "members", members)
        width = np.shape(members[0].hidden_weight)
        if len(width) != 2 or width[1] < 1:
            raise ValueError(f"ensemble members must read at least one feature, got {width}")
        # Checked once: maps score a frame in many small chunks.
        object.__setattr__(self, "_layers", _checked_members(members, width[1]))
        if self._layers[0][1][0].shape[0] < 1:
            raise ValueError("ensemble members must have at least one class")

    @property
    def width(self) -> int:
        """Width of the embedding the members read."""
        return int(np.shape(self.members[0].hidden_weight)[1])

    def disagreement(self, embeddings: np.ndarray) -> DisagreementScores:
        """Mean prediction, predictive entropy and mutual information per embedding."""
        embeddings = _finite_matrix(embeddings, "embeddings")
        if embeddings.shape[1] != self.width:
            raise ValueError(
                f"embeddings are {embeddings.shape[1]}-D, the ensemble reads {self.width}"
            )
        # Small products, as for MC dropout: one BLAS thread leaves the cores to the network.
        with one_blas_thread():
            return _ensemble_scores(embeddings, self._layers, 1.0)

    def score(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mutual information, uncertainty, unknown)`` per embedding."""
        return calibrated(
            self.disagreement(embeddings).mutual_information, self.reference, self.threshold
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": ENSEMBLE_KIND,
            "members": [
                {
                    "hidden_weight": encode_array(m.hidden_weight),
                    "hidden_bias": encode_array(m.hidden_bias),
                    "weight": encode_array(m.weight),
                    "bias": encode_array(m.bias),
                }
                for m in self.members
            ],
            **calibration_record(self),
        }

    @classmethod
    def from_dict(
        cls, data: Any, n_classes: int | None = None, embedding_dim: int | None = None
    ) -> EnsembleNovelty:
        """Read and check a stored record; ValueError names the bad field."""
        _check_record(data, "head_ensemble", ENSEMBLE_KIND)
        stored = data.get("members")
        if not isinstance(stored, list) or not 2 <= len(stored) <= MAX_ENSEMBLE_MEMBERS:
            raise ValueError(
                f"head_ensemble members must be a list of 2..{MAX_ENSEMBLE_MEMBERS} heads"
            )
        members = []
        for i, member in enumerate(stored):
            what = f"head_ensemble member {i}"
            if not isinstance(member, dict):
                raise ValueError(f"{what} must be an object, got {type(member).__name__}")
            arrays = {
                key: decode_array(member.get(key), f"{what} {key}")
                for key in ("hidden_weight", "hidden_bias", "weight", "bias")
            }
            hidden_weight = arrays["hidden_weight"]
            if hidden_weight.ndim != 2 or not 1 <= len(hidden_weight) <= MAX_ENSEMBLE_HIDDEN:
                raise ValueError(
                    f"{what} hidden weight must be (1..{MAX_ENSEMBLE_HIDDEN}, d), "
                    f"got shape {hidden_weight.shape}"
                )
            width = embedding_dim if embedding_dim is not None else hidden_weight.shape[1]
            hidden = _check_layer(hidden_weight, arrays["hidden_bias"], width, f"{what} hidden")
            out = _check_layer(arrays["weight"], arrays["bias"], len(hidden[0]), f"{what} output")
            if n_classes is not None and len(out[0]) != n_classes:
                raise ValueError(f"{what} has {len(out[0])} classes for {n_classes}")
            members.append(HeadMember(*hidden, *out))
        if (
            len({len(m.bias) for m in members}) != 1
            or len({m.hidden_weight.shape[1] for m in members}) != 1
        ):
            raise ValueError("head_ensemble members disagree on their classes or input width")
        reference, threshold, quantile = read_calibration(data, "head_ensemble")
        return cls(tuple(members), reference, threshold, quantile, str(data.get("source")))


def fit_ensemble_novelty(
    members: Sequence[HeadMember],
    held_out: np.ndarray,
    quantile: float = DEFAULT_QUANTILE,
    source: str = "validation",
) -> EnsembleNovelty:
    """The head ensemble ``members``, calibrated on ``held_out``.

    Parameters
    ----------
    members : sequence of HeadMember
        Heads trained on the embedding
        (:func:`~defectscope.training.head_ensemble.train_head_ensemble`).
    held_out : ndarray, shape (m, d)
        Embeddings of known windows the members did not train on (``m >= 2``): their
        scores set the reference and the threshold.
    quantile : float
        Share of held-out known windows that stay known.
    source : str
        What ``held_out`` is, recorded.
    """
    held_out = _finite_matrix(held_out, "held-out embeddings")
    if len(held_out) < 2:
        raise ValueError(f"need at least 2 held-out embeddings, got {len(held_out)}")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    novelty = EnsembleNovelty(tuple(members), np.zeros(2), 0.0)
    reference, threshold = calibration_of(
        novelty.disagreement(held_out).mutual_information, quantile
    )
    return dataclasses.replace(
        novelty, reference=reference, threshold=threshold, quantile=float(quantile), source=source
    )
