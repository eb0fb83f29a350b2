"""Feature-space density of the embedding: how unlike the training data a window is.

The softmax says which known class a window looks most like; it cannot say that a
window looks like none of them. Following deterministic-uncertainty methods
(Mahalanobis distance, DDU), the embeddings of the training patches are modelled as
class-conditional Gaussians with one shared covariance (Ledoit-Wolf shrunk, since there
are fewer patches than the 256 embedding dimensions need). A window's distance is its
smallest squared Mahalanobis distance to a class mean; its ``uncertainty`` is the share
of held-out in-distribution patches (the validation fold) that lie closer, and it is
``unknown`` beyond the ``quantile`` of those distances. It costs one small matrix
product per window on the embedding the engine already computed: no second network.

Numpy only, so every runtime (ONNX, TensorRT, the dense mode) can apply it.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import numpy as np

from defectscope.util.blas import one_blas_thread

DEFAULT_QUANTILE = 0.99
_REFERENCE_POINTS = 257
# Most quantiles a stored reference may hold: every scored chunk reads it, so a record
# of millions of points would slow each frame; training writes _REFERENCE_POINTS.
MAX_REFERENCE_POINTS = 65536


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """A float32 array as JSON: dtype, shape and little-endian bytes in base64."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return {
        "dtype": "float32",
        "shape": list(data.shape),
        "base64": base64.b64encode(data).decode(),
    }


def decode_array(data: Any, name: str) -> np.ndarray:
    """Inverse of :func:`encode_array`; ValueError naming ``name`` when malformed."""
    try:
        shape = tuple(data["shape"])
        if (
            data.get("dtype") != "float32"
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
            or any(v < 0 for v in shape)
        ):
            raise ValueError(f"dtype {data.get('dtype')!r}, shape {shape}")
        raw = base64.b64decode(data["base64"], validate=True)
        array = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ValueError(f"{name} is not a valid encoded array ({exc})") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values")
    return array


@dataclasses.dataclass(frozen=True)
class FeatureDensity:
    """Class-conditional Gaussians with a shared covariance on the embedding.

    Attributes
    ----------
    means : ndarray, shape (classes, d)
    whitening : ndarray, shape (k, d)
        ``W`` with ``||W (e - m)||²`` the squared Mahalanobis distance.
    reference : ndarray, shape (r,)
        Quantiles (0 to 1, evenly spaced) of the smallest distance of held-out
        in-distribution embeddings: the scale ``uncertainty`` is read on.
    threshold : float
        Distance beyond which a window is unknown (``reference`` at ``quantile``).
    quantile : float
    source : str
        What ``reference`` was measured on ("validation" or "training").
    """

    means: np.ndarray
    whitening: np.ndarray
    reference: np.ndarray
    threshold: float
    quantile: float = DEFAULT_QUANTILE
    source: str = "validation"

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each embedding to each class mean, (n, classes)."""
        z = np.asarray(embeddings, dtype=np.float32) @ self.whitening.T
        centres = self.means @ self.whitening.T
        # ||z - c||² = |z|² - 2 z·c + |c|², clipped at 0 against rounding.
        d2 = (z * z).sum(1)[:, None] - 2 * z @ centres.T + (centres * centres).sum(1)[None]
        return np.maximum(d2, 0.0)

    def score(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(distance, uncertainty, unknown)`` per embedding.

        ``distance``: smallest squared Mahalanobis distance to a class; ``uncertainty``:
        its position among held-out in-distribution distances, 0..1; ``unknown``:
        ``distance > threshold``.
        """
        # Small products: more BLAS threads would only spin afterwards, on the cores the
        # next frame's network needs (see defectscope.util.blas).
        with one_blas_thread():
            distance = self.distances(embeddings).min(axis=1)
        return calibrated(distance, self.reference, self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "tied-gaussian-mahalanobis",
            "means": encode_array(self.means),
            "whitening": encode_array(self.whitening),
            **calibration_record(self),
        }

    @classmethod
    def from_dict(
        cls, data: Any, n_classes: int | None = None, embedding_dim: int | None = None
    ) -> FeatureDensity:
        """Read and check a stored density; ValueError names the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"density must be an object, got {type(data).__name__}")
        means = decode_array(data.get("means"), "density means")
        whitening = decode_array(data.get("whitening"), "density whitening")
        if means.ndim != 2 or whitening.ndim != 2 or whitening.shape[1] != means.shape[1]:
            raise ValueError(f"density shapes do not fit: means {means.shape}, W {whitening.shape}")
        if n_classes is not None and means.shape[0] != n_classes:
            raise ValueError(f"density has {means.shape[0]} class means for {n_classes} classes")
        if embedding_dim is not None and means.shape[1] != embedding_dim:
            raise ValueError(f"density is {means.shape[1]}-D for a {embedding_dim}-D embedding")
        reference, threshold, quantile = read_calibration(data, "density")
        return cls(means, whitening, reference, threshold, quantile, str(data.get("source")))


def calibrated(
    score: np.ndarray, reference: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(score, uncertainty, unknown)``: ``score`` read on held-out known windows' scale.

    ``uncertainty`` is the share of held-out known windows (``reference``, their
    quantiles) that score lower, 0..1; ``unknown`` is ``score > threshold``. Every
    novelty source reads its own score this way, so their uncertainties compare.
    """
    levels = np.linspace(0.0, 1.0, len(reference))
    # Tied quantiles (scores clipped at 0: every sample agreeing) keep their lowest
    # level, so a window scoring as low as the most ordinary held-out windows is at 0.
    reference, first = np.unique(reference, return_index=True)
    uncertainty = np.interp(score, reference, levels[first]).astype(np.float32)
    return score.astype(np.float32), uncertainty, score > threshold


def calibration_of(
    held_out_scores: np.ndarray, quantile: float = DEFAULT_QUANTILE
) -> tuple[np.ndarray, float]:
    """``(reference, threshold)`` from held-out known windows' scores (see :func:`calibrated`)."""
    reference = np.quantile(held_out_scores, np.linspace(0, 1, _REFERENCE_POINTS))
    return reference, float(np.quantile(held_out_scores, quantile))


def calibration_record(source: Any) -> dict[str, Any]:
    """A calibrated source's ``reference``, ``threshold``, ``quantile`` and ``source`` as
    JSON (what :func:`read_calibration` reads back)."""
    return {
        "reference": [float(v) for v in source.reference],
        "threshold": float(source.threshold),
        "quantile": float(source.quantile),
        "source": source.source,
    }


def read_calibration(data: dict, what: str) -> tuple[np.ndarray, float, float]:
    """A stored record's ``(reference, threshold, quantile)``; ValueError names the bad one."""
    reference = data.get("reference", [])
    if isinstance(reference, list) and len(reference) > MAX_REFERENCE_POINTS:
        raise ValueError(
            f"{what} reference holds {len(reference)} numbers, at most "
            f"{MAX_REFERENCE_POINTS} are read"
        )
    if not isinstance(reference, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in reference
    ):
        raise ValueError(f"{what} reference must be a list of numbers")
    try:
        reference = np.asarray(reference, dtype=np.float64)
    except OverflowError:  # a JSON integer of 400 digits
        raise ValueError(f"{what} reference holds a number too large") from None
    threshold = data.get("threshold")
    quantile = data.get("quantile", DEFAULT_QUANTILE)
    if (
        reference.ndim != 1
        or len(reference) < 2
        or not np.isfinite(reference).all()
        or np.any(np.diff(reference) < 0)
    ):
        raise ValueError(f"{what} reference must be at least 2 sorted finite numbers")
    try:  # a JSON integer of 400 digits is a Python int that float() refuses
        finite = (
            isinstance(threshold, int | float)
            and not isinstance(threshold, bool)
            and np.isfinite(float(threshold))
        )
    except OverflowError:
        finite = False
    if not finite or threshold < 0:
        raise ValueError(f"{what} threshold must be a finite number >= 0, got {threshold!r}")
    if not isinstance(quantile, int | float) or isinstance(quantile, bool) or not 0 < quantile <= 1:
        raise ValueError(f"{what} quantile must be in (0, 1], got {quantile!r}")
    return reference, float(threshold), float(quantile)


def fit_density(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    held_out: np.ndarray | None = None,
    quantile: float = DEFAULT_QUANTILE,
) -> FeatureDensity:
    """Fit the density on training embeddings; set its scale on held-out ones.

    Parameters
    ----------
    embeddings : ndarray, shape (n, d)
        Embeddings of the training patches (eval mode, no augmentation).
    labels : ndarray of int, shape (n,)
    n_classes : int
        Classes absent from ``labels`` get the overall mean (they cannot be modelled).
    held_out : ndarray, shape (m, d), optional
        In-distribution embeddings not trained on (the validation fold): their
        distances set ``reference`` and ``threshold``. Without them the training
        embeddings do, which makes the threshold tighter than it should be.
    quantile : float
        Share of held-out in-distribution windows that stay known.
    """
    from sklearn.covariance import LedoitWolf

    embeddings = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or len(embeddings) != len(labels) or len(embeddings) < 2:
        raise ValueError(f"need (n >= 2, d) embeddings with n labels, got {embeddings.shape}")
    overall = embeddings.mean(axis=0)
    means = np.stack(
        [
            embeddings[labels == c].mean(axis=0) if np.any(labels == c) else overall
            for c in range(n_classes)
        ]
    )
    centred = embeddings - means[labels]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    values, vectors = np.linalg.eigh(covariance)
    floor = max(float(values.max()) * 1e-6, 1e-12)
    whitening = (vectors / np.sqrt(np.maximum(values, floor))).T
    density = FeatureDensity(
        means.astype(np.float32), whitening.astype(np.float32), np.array([0.0, 1.0]), 0.0
    )
    source = "validation" if held_out is not None and len(held_out) >= 2 else "training"
    reference_set = held_out if source == "validation" else embeddings
    distance = density.distances(reference_set).min(axis=1)
    reference, threshold = calibration_of(distance, quantile)
    return FeatureDensity(
        density.means, density.whitening, reference, threshold, float(quantile), source
    )
