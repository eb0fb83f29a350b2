"""A simulated dataset's truth: reading ``truth.json`` and matching found places to it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def read_truth(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``truth.json`` of a simulated dataset, with a clear error when it is not one."""
    path = Path(directory) / "truth.json"
    if not path.is_file():
        raise ValueError(f"{directory}: not a simulated dataset (no truth.json)")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("frames"), list):
        raise ValueError(f"{path}: not a simulated dataset's truth (no list of frames)")
    return record


def match_pairs(centres: np.ndarray, truth: np.ndarray, tolerance: float) -> list[tuple[int, int]]:
    """One-to-one matches ``(centre index, truth index)`` within ``tolerance``, nearest
    pairs first, ties by index (both arrays ``(n, 2)`` in one unit).

    Only pairs within the tolerance are looked at (a KD-tree finds them), so the cost
    grows as ``n log n`` with the points, not as their product.

    Raises
    ------
    ValueError
        When ``tolerance`` is negative or NaN, or a position is not finite.
    """
    from scipy.spatial import cKDTree

    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a distance >= 0, got {tolerance}")
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    if len(centres) == 0 or len(truth) == 0:
        return []
    if not (np.isfinite(centres).all() and np.isfinite(truth).all()):
        raise ValueError("positions to match must be finite numbers (found NaN or inf)")
    # The tree's distances may differ from norm's in the last bit: a slightly wider
    # search, then the exact test with the norm every caller computes.
    reach = tolerance * (1 + 1e-9) + 1e-12 if math.isfinite(tolerance) else math.inf
    near = cKDTree(centres).sparse_distance_matrix(cKDTree(truth), reach, output_type="ndarray")
    i, j = near["i"].astype(np.int64), near["j"].astype(np.int64)
    distance = np.linalg.norm(centres[i] - truth[j], axis=1)
    ok = distance <= tolerance
    i, j, distance = i[ok], j[ok], distance[ok]
    used_c, used_t, pairs = set(), set(), []
    for k in np.lexsort((j, i, distance)):
        a, b = int(i[k]), int(j[k])
        if a not in used_c and b not in used_t:
            used_c.add(a)
            used_t.add(b)
            pairs.append((a, b))
    return pairs


def match_regions(
    centres: np.ndarray, truth: np.ndarray, tolerance: float
) -> tuple[float, float, int]:
    """Recall and precision of found ``centres`` against ``truth`` (see :func:`match_pairs`).

    Returns
    -------
    recall, precision, matched
    """
    n_found, n_true = len(np.reshape(centres, (-1, 2))), len(np.reshape(truth, (-1, 2)))
    matched = len(match_pairs(centres, truth, tolerance))
    recall = matched / n_true if n_true else 1.0
    precision = matched / n_found if n_found else 1.0
    return recall, precision, matched
