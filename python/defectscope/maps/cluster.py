"""Unsupervised clustering of embeddings: standardize, PCA, K-means, silhouette-chosen k."""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.preprocessing import StandardScaler

# Silhouette is O(n^2); above this many items it is estimated on a fixed random sample.
SILHOUETTE_SAMPLE = 4000


@dataclasses.dataclass
class Clustering:
    """Result of :func:`cluster_embeddings`.

    Attributes
    ----------
    labels : ndarray of int, shape (n,)
        Cluster of each item.
    k : int
        Number of clusters used.
    silhouette : dict of int to float
        Silhouette score of every k tried.
    coordinates : ndarray, shape (n, components)
        PCA coordinates of each item.
    explained_variance : float
        Fraction of variance the PCA components keep.
    centers : ndarray, shape (k, components)
        Cluster centres in PCA space.
    """

    labels: np.ndarray
    k: int
    silhouette: dict[int, float]
    coordinates: np.ndarray
    explained_variance: float
    centers: np.ndarray

    def agreement(self, truth: np.ndarray) -> dict[str, float]:
        """Adjusted Rand index and normalized mutual information against labels."""
        return {
            "ari": float(adjusted_rand_score(truth, self.labels)),
            "nmi": float(normalized_mutual_info_score(truth, self.labels)),
        }


def cluster_embeddings(
    embeddings: np.ndarray,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 10),
    variance: float = 0.95,
    seed: int = 0,
) -> Clustering:
    """Cluster items by their embeddings.

    Parameters
    ----------
    embeddings : ndarray, shape (n, d)
        One row per item (network embeddings, or raw pixels for a baseline).
    k : int, optional
        Fixed number of clusters; otherwise the k in ``k_range`` (inclusive) with the
        highest silhouette score.
    k_range : (int, int)
        Smallest and largest k tried.
    variance : float
        Fraction of variance the PCA keeps (0 < variance <= 1), or an integer number of
        components when > 1.
    seed : int
        Seeds K-means and the silhouette sample.

    Returns
    -------
    Clustering

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.normal(0, 1, (50, 8)), rng.normal(8, 1, (50, 8))])
    >>> cluster_embeddings(x, k_range=(2, 5)).k
    2
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"embeddings must be (n >= 3, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    lo, hi = k_range
    if k is not None:
        lo = hi = int(k)
    hi = min(hi, len(x) - 1)
    if lo < 2 or lo > hi:
        raise ValueError(f"k must be in 2..{len(x) - 1}, got range ({k_range[0]}, {k_range[1]})")
    scaled = StandardScaler().fit_transform(x)
    n_components = variance if variance <= 1 else min(int(variance), *scaled.shape)
    pca = PCA(n_components=n_components, svd_solver="full", random_state=seed)
    coords = pca.fit_transform(scaled)
    sample = min(len(coords), SILHOUETTE_SAMPLE)
    scores: dict[int, float] = {}
    fits: dict[int, KMeans] = {}
    for kk in range(lo, hi + 1):
        model = KMeans(n_clusters=kk, n_init=10, random_state=seed).fit(coords)
        fits[kk] = model
        if len(np.unique(model.labels_)) < 2:
            scores[kk] = -1.0
            continue
        scores[kk] = float(
            silhouette_score(coords, model.labels_, sample_size=sample, random_state=seed)
        )
    best = max(scores, key=scores.get)
    return Clustering(
        labels=fits[best].labels_.astype(np.int64),
        k=best,
        silhouette=scores,
        coordinates=coords,
        explained_variance=float(pca.explained_variance_ratio_.sum()),
        centers=fits[best].cluster_centers_,
    )
