"""Where patches were cut from: locating crops in a large frame.

Used to check a defect map against ground truth that the public data carries
implicitly: its labelled patches are crops of the large frames, so the frame
positions of the crops of each class say where that class must be mapped.
"""

from __future__ import annotations

import numpy as np


def match_template(frame: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Normalized cross-correlation of ``template`` at every valid position of ``frame``.

    ``skimage.feature.match_template`` (FFT correlation, window statistics from
    integral images). Returns an array of shape ``(H - h + 1, W - w + 1)`` in
    [-1, 1]; flat frame windows give 0.
    """
    from skimage.feature import match_template as skimage_match_template

    frame = np.asarray(frame, dtype=np.float64)
    template = np.asarray(template, dtype=np.float64)
    return skimage_match_template(frame, template)


def locate_patches(
    frame: np.ndarray, patches: np.ndarray, threshold: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``(row, col)`` of each patch in ``frame`` and its correlation.

    Patches whose best correlation is below ``threshold`` were not cut from this
    frame; their position is ``(-1, -1)``.
    """
    positions = np.full((len(patches), 2), -1, dtype=np.int64)
    scores = np.zeros(len(patches))
    for i, patch in enumerate(patches):
        ncc = match_template(frame, patch)
        best = int(ncc.argmax())
        scores[i] = ncc.flat[best]
        if scores[i] >= threshold:
            positions[i] = np.unravel_index(best, ncc.shape)
    return positions, scores


def recall_at_sources(
    result,
    positions: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    crop_size: int | None = None,
) -> dict[str, dict[str, float | None]]:
    """Per class: of the crops located in the frame, how many the map labels correctly.

    Each located crop is compared with the map's window whose centre is nearest to
    the crop's centre (at most half a stride away). Centres, not top-left corners:
    a window of a resampled map covers ``result.window_size`` pixels of the frame,
    not the crop's side, so only the centres mark the same place.

    Parameters
    ----------
    result : MapResult
        Map of the frame the crops were located in.
    positions : ndarray, shape (n, 2)
        Top-left ``(row, col)`` of each crop, from :func:`locate_patches`; ``-1`` rows
        are ignored.
    labels : ndarray of int, shape (n,)
        Class index of each crop in ``classes``.
    classes : list of str
        Names of ``labels``; must be among the map's classes.
    crop_size : int, optional
        The crops' side in frame pixels (default: the model's patch size, as for
        crops of the training patches located in the frame they were cut from).
    """
    size = result.patch_size if crop_size is None else crop_size
    if size < 1:
        raise ValueError(f"crop_size must be a positive number of pixels, got {crop_size}")
    centers = np.asarray(result.centers, dtype=np.float64)
    predicted = result.labels.ravel()
    report = {}
    for index, name in enumerate(classes):
        located = positions[(labels == index) & (positions[:, 0] >= 0)]
        if len(located) == 0:
            report[name] = {"located": 0, "recovered": None}
            continue
        located = located.astype(np.float64) + (size - 1) / 2.0
        distance = ((located[:, None, :] - centers[None]) ** 2).sum(-1)
        nearest = predicted[distance.argmin(axis=1)]
        hits = np.mean([result.classes[k] == name for k in nearest])
        report[name] = {"located": len(located), "recovered": float(hits)}
    return report
