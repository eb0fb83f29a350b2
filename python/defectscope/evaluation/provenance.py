"""Where patches were cut from: locating crops in a large frame.

Used to check a defect map against ground truth that the public data carries
implicitly: its labelled patches are crops of the large frames, so the frame
positions of the crops of each class say where that class must be mapped.
"""

from __future__ import annotations

import os

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


class _FrameCorrelator:
    """Normalized cross-correlation of many same-sized templates with one frame.

    What :func:`match_template` computes, with the work every template shares done
    once: the frame's Fourier transform and its window sums (which skimage recomputes
    for each template, 90 % of the time of locating 1119 crops in a 768 px frame).
    A circular correlation over a transform at least as large as the frame gives the
    valid positions exactly: no product of a valid position wraps around.
    """

    # Memory for the templates correlated together: each one holds about four
    # frame-sized float64 arrays (its transform, the product, the correlation, the score).
    CHUNK_BYTES = 256 * 2**20

    def __init__(self, frame: np.ndarray, shape: tuple[int, int]) -> None:
        from scipy import fft

        frame = np.array(frame, dtype=np.float64)
        if frame.ndim != 2:
            raise ValueError(f"frame must be a 2-D image, got shape {frame.shape}")
        h, w = shape
        if frame.shape[0] < h or frame.shape[1] < w:
            raise ValueError(
                f"frame {frame.shape} is smaller than the templates {shape}: "
                "nothing can be located in it"
            )
        # Centred, so the window sums do not cancel a large offset away (uint16 frames
        # sit at thousands of counts); the correlation does not change.
        frame -= frame.mean()
        self.shape = shape
        self.fft_shape = (
            fft.next_fast_len(frame.shape[0], real=True),
            fft.next_fast_len(frame.shape[1], real=True),
        )
        self.frame_fft = fft.rfft2(frame, s=self.fft_shape)
        self.chunk = max(1, self.CHUNK_BYTES // (4 * 8 * self.fft_shape[0] * self.fft_shape[1]))
        # The cores this process may use (os.cpu_count() ignores a container's limit).
        self.workers = len(os.sched_getaffinity(0))
        self.valid = (frame.shape[0] - h + 1, frame.shape[1] - w + 1)
        sums = _window_sums(frame, shape)
        # Sum of squared deviations of each frame window from its own mean.
        self.frame_ssd = np.maximum(_window_sums(frame * frame, shape) - sums * sums / (h * w), 0)
        spread = np.sqrt(self.frame_ssd)
        self.inverse_spread = np.divide(1.0, spread, out=np.zeros_like(spread), where=spread > 0)
        self.smallest_ssd = float(self.frame_ssd.min())

    def correlate(self, templates: np.ndarray) -> np.ndarray:
        """``(n, H - h + 1, W - w + 1)`` correlations of ``templates`` (n, h, w), in [-1, 1]."""
        from scipy import fft

        templates = np.asarray(templates, dtype=np.float64)
        centred = templates - templates.mean(axis=(1, 2), keepdims=True)
        template_ssd = (centred * centred).sum(axis=(1, 2))
        # Correlation is convolution with the template turned by 180 degrees; the valid
        # position (r, c) then sits at (r + h - 1, c + w - 1) of the circular result.
        flipped = centred[:, ::-1, ::-1]
        product = fft.rfft2(flipped, s=self.fft_shape, workers=self.workers) * self.frame_fft
        full = fft.irfft2(product, s=self.fft_shape, workers=self.workers)
        h, w = self.shape
        numerator = full[:, h - 1 : h - 1 + self.valid[0], w - 1 : w - 1 + self.valid[1]]
        response = numerator * self.inverse_spread[None]
        template_spread = np.sqrt(template_ssd)
        response *= np.divide(
            1.0, template_spread, out=np.zeros_like(template_spread), where=template_spread > 0
        )[:, None, None]
        # Where the two spreads' product is below machine epsilon there is nothing to
        # compare: 0, as in skimage (flat windows and flat templates are 0 already).
        tiny = np.finfo(np.float64).eps ** 2
        for i, ssd in enumerate(template_ssd):
            if ssd > 0 and self.smallest_ssd * ssd <= tiny:
                response[i][self.frame_ssd * ssd <= tiny] = 0.0
        return response


def _window_sums(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Sum of ``image`` over every ``shape`` window at a valid position.

    One axis at a time, differencing after each running sum (as skimage does): the
    running sums then grow over one axis, not the whole frame, and cancel less.
    """
    h, w = shape
    rows = np.cumsum(image, axis=0)
    rows = np.concatenate([rows[h - 1 : h], rows[h:] - rows[:-h]])
    both = np.cumsum(rows, axis=1)
    return np.concatenate([both[:, w - 1 : w], both[:, w:] - both[:, :-w]], axis=1)


def locate_patches(
    frame: np.ndarray, patches: np.ndarray, threshold: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``(row, col)`` of each patch in ``frame`` and its correlation.

    The correlation is :func:`match_template`'s, for all patches at once. Patches whose
    best correlation is below ``threshold`` were not cut from this frame; their
    position is ``(-1, -1)``.

    Parameters
    ----------
    frame : ndarray, shape (H, W)
    patches : ndarray, shape (n, h, w)
        Patches of one size, at most the frame's.
    threshold : float
    """
    patches = np.asarray(patches)
    if patches.ndim != 3:
        raise ValueError(f"patches must be an array (n, h, w), got shape {patches.shape}")
    positions = np.full((len(patches), 2), -1, dtype=np.int64)
    scores = np.zeros(len(patches))
    if len(patches) == 0:
        return positions, scores
    correlator = _FrameCorrelator(frame, patches.shape[1:])
    for start in range(0, len(patches), correlator.chunk):
        ncc = correlator.correlate(patches[start : start + correlator.chunk])
        flat = ncc.reshape(len(ncc), -1)
        best = flat.argmax(axis=1)
        for offset, index in enumerate(best):
            i = start + offset
            scores[i] = flat[offset, index]
            if scores[i] >= threshold:
                positions[i] = np.unravel_index(index, ncc.shape[1:])
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
