"""A frame's map: per-window predictions (:class:`MapResult`) and the regions they form.

Nothing here draws or writes files (see :mod:`defectscope.outputs.map_files`).
"""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np
from scipy import ndimage

from defectscope.io.frames import Calibration


@dataclasses.dataclass
class MapResult:
    """Per-window predictions over a frame, on the grid of window positions.

    Attributes
    ----------
    origins : ndarray of int64, shape (rows * cols, 2)
        Top-left ``(row, col)`` of each window, row-major over the grid, in the
        original frame's pixels (rounded) even when the frame was resampled.
    grid_shape : (int, int)
        Windows along rows and columns.
    probabilities : ndarray of float32, shape (rows, cols, classes)
    embeddings : ndarray of float32, shape (rows, cols, d) or None
    classes : list of str
    background : str or None
        The defect-free class, if the model has one.
    frame_shape : (int, int)
        The original frame's shape (before any resampling).
    patch_size : int
        The model's patch side, in the pixels of the (resampled) frame it saw.
    timing_ms : dict
        ``total``, ``tiling`` (time the engine waited for patches) and ``engine``.
    calibration : Calibration or None
        Physical pixel coordinates, when the frame carried them.
    uncertainty : ndarray of float32, shape (rows, cols), or None
        How unlike the training data each window is, 0..1: the share of held-out
        in-distribution windows that score lower on the novelty sources used
        (``info["novelty"]``; the larger of two; see :mod:`~defectscope.artifacts.density`).
        None when the model carries no source the map asked for.
    unknown : ndarray of bool, shape (rows, cols), or None
        Windows beyond a source's threshold: "not like anything trained on". They
        form their own regions, labelled ``"unknown"``, whatever their softmax says.
    info : dict
        How the map was made: ``mode`` ('dense' or 'window'), the dense graph's
        ``native_stride`` and ``precision``, and ``reason`` when a dense map was not
        possible; ``scale`` (set by the detector) says how the resampling factor was found.
    scale : float
        The zoom the frame was resampled by before tiling (1: not resampled). A window
        covers :attr:`window_size` ``= patch_size / scale`` pixels of the original frame.
    ood_threshold : float
        Share of unknown windows above which the whole frame is
        :attr:`out_of_distribution`, in (0, 1].
    frame_unknown : ndarray of bool, shape (rows, cols), or None
        Windows the embedding's density calls unknown, kept when other sources judge
        the windows (every ``novelty`` but ``embedding`` and ``embedding+residual``,
        ``auto`` included on models that carry the head ensemble): the density
        still says whether the frame as a whole is unlike the training data
        (:attr:`out_of_distribution`). None: ``unknown`` says it alone.
    """

    origins: np.ndarray
    grid_shape: tuple[int, int]
    probabilities: np.ndarray
    embeddings: np.ndarray | None
    classes: list[str]
    background: str | None
    frame_shape: tuple[int, int]
    patch_size: int
    timing_ms: dict[str, float]
    calibration: Calibration | None = None
    uncertainty: np.ndarray | None = None
    unknown: np.ndarray | None = None
    info: dict = dataclasses.field(default_factory=dict)
    scale: float = 1.0
    ood_threshold: float = 0.25
    frame_unknown: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.frame_unknown is not None and (
            np.shape(self.frame_unknown) != tuple(self.grid_shape)
            or np.asarray(self.frame_unknown).dtype != bool
        ):
            raise ValueError(
                f"MapResult frame_unknown must be a bool grid of {tuple(self.grid_shape)}, "
                f"got {np.asarray(self.frame_unknown).dtype} {np.shape(self.frame_unknown)}"
            )
        scale = float(self.scale)
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"MapResult scale must be a positive finite factor, got {self.scale!r}"
            )
        threshold = float(self.ood_threshold)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(
                f"MapResult ood_threshold must lie in (0, 1], got {self.ood_threshold!r}"
            )

    @property
    def window_size(self) -> float:
        """A window's side in the original frame's pixels: ``patch_size / scale``."""
        return self.patch_size / self.scale

    @property
    def window_extent(self) -> int:
        """:attr:`window_size` rounded to whole pixels (at least 1): a window's pixel span."""
        return max(int(np.rint(self.window_size)), 1)

    @property
    def labels(self) -> np.ndarray:
        """Class index of each window, shape (rows, cols)."""
        return self.probabilities.argmax(axis=-1)

    @property
    def confidence(self) -> np.ndarray:
        """Probability of the predicted class, shape (rows, cols)."""
        return self.probabilities.max(axis=-1)

    @property
    def centers(self) -> np.ndarray:
        """Window centres ``(cy, cx)`` in pixels, shape (rows * cols, 2)."""
        return self.origins + (self.window_size - 1) / 2.0

    @property
    def defect_probability(self) -> np.ndarray:
        """1 - p(background) per window (rows, cols); the top class's confidence without one."""
        if self.background is None:
            return self.confidence
        return 1.0 - self.probabilities[..., self.classes.index(self.background)]

    @property
    def unknown_mask(self) -> np.ndarray:
        """``unknown``, or all False when the model has no density."""
        if self.unknown is None:
            return np.zeros(self.grid_shape, dtype=bool)
        return self.unknown

    @property
    def unknown_share(self) -> float:
        """Share of the frame's windows that are unknown; 0 without a density."""
        if self.unknown is None or self.unknown.size == 0:
            return 0.0
        return float(np.mean(self.unknown))

    @property
    def unexplained_share(self) -> float:
        """Share of the frame's windows that are unknown and not part of a known defect's
        ring (:func:`group_regions`): the unknown that no known defect explains."""
        if self.unknown is None or self.unknown.size == 0:
            return 0.0
        return float(np.mean(self.unknown & ~ring_mask(self)))

    @property
    def out_of_distribution(self) -> bool:
        """The frame as a whole is unlike the training data: its :attr:`unexplained_share`
        is above :attr:`ood_threshold`, or, with :attr:`frame_unknown`, the embedding
        density's is (never without a novelty source).

        The unknown windows of the rings around known defects (windows that see part
        of a defect, :func:`find_regions`) do not count: they say the frame holds
        defects, not that it is unlike the training data. On nominal synthetic frames
        crowded with defects they alone were 18-31 % of the windows.
        """
        if self.unknown is None:
            return False
        if self.unexplained_share > self.ood_threshold:
            return True
        checked = self.ood_check_share
        return checked is not None and checked > self.ood_threshold

    @property
    def ood_check_share(self) -> float | None:
        """With :attr:`frame_unknown`: the share of windows the embedding's density calls
        unknown away from known defects (as :attr:`unexplained_share`); else None."""
        if self.frame_unknown is None or self.unknown is None:
            return None
        # The density's unknown windows, with the rings of known defects left out alike.
        by_density = dataclasses.replace(self, unknown=self.frame_unknown, frame_unknown=None)
        return by_density.unexplained_share

    def regions(self, min_windows: int = 1) -> list[dict]:
        """Connected regions of defect windows, then of unknown windows (see :mod:`maps`)."""
        return find_regions(self, min_windows=min_windows)


def scan_fraction(y: float, x: float, shape: tuple[int, int]) -> list[float]:
    """Pixel position ``(y, x)`` as a fraction of the scan field, ``[y, x]`` in 0..1.

    Pixel ``i`` covers ``[i, i + 1)`` of an ``n``-pixel field, so its centre sits at
    ``(i + 0.5) / n``: the convention of scan controllers (Nion Swift's
    ``probe_position``, origin top-left). Clamped to the field.
    """
    height, width = shape
    return [min(max((y + 0.5) / height, 0.0), 1.0), min(max((x + 0.5) / width, 0.0), 1.0)]


def label_regions(result: MapResult, unknown: bool = False) -> tuple[np.ndarray, int]:
    """Connected components (8-neighbourhood) on the window grid.

    Of the known windows whose label is not the background (``unknown=False``), or of
    the unknown windows (``unknown=True``).
    """
    if unknown:
        mask = result.unknown_mask
    else:
        labels = result.labels
        if result.background is not None:
            mask = labels != result.classes.index(result.background)
        else:
            mask = np.ones_like(labels, dtype=bool)
        mask = mask & ~result.unknown_mask
    return ndimage.label(mask, structure=np.ones((3, 3), dtype=int))


def _axis_reach(origins: np.ndarray, window: float, axis: str) -> tuple[np.ndarray, np.ndarray]:
    """For each grid position along one axis, the first and last position whose window
    overlaps it (origins less than one window side apart)."""
    if np.any(np.diff(origins) < 0):
        raise ValueError(
            f"window {axis} origins must not decrease along the grid: {origins.tolist()}"
        )
    first = np.searchsorted(origins, origins - window, side="right")
    last = np.searchsorted(origins, origins + window, side="left") - 1
    return first, last


def _dilate(
    mask: np.ndarray, rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Windows that overlap a window of ``mask``: a separable dilation by each position's
    reach (:func:`_axis_reach`), through cumulative sums (linear in the grid's size)."""
    counts = np.cumsum(mask, axis=0, dtype=np.int64)
    counts = np.concatenate([np.zeros((1, mask.shape[1]), np.int64), counts])
    along = (counts[rows[1] + 1] - counts[rows[0]]) > 0
    counts = np.cumsum(along, axis=1, dtype=np.int64)
    counts = np.concatenate([np.zeros((mask.shape[0], 1), np.int64), counts], axis=1)
    return (counts[:, cols[1] + 1] - counts[:, cols[0]]) > 0


@dataclasses.dataclass(frozen=True)
class RegionGroups:
    """How a map's windows group into regions (see :func:`find_regions`).

    Attributes
    ----------
    known : ndarray of int, shape (rows, cols)
        Label image of the defect components (:func:`label_regions`), 1..``n_known``.
    n_known : int
    unknown : ndarray of int or None
        Label image of the unknown components that stay unknown regions, relabelled
        1..``n_unknown`` in their original order; None without a density.
    n_unknown : int
    absorbed : ndarray of int, shape (rows, cols)
        For each unknown window joined to a defect region, that region's label in
        ``known``; 0 elsewhere.
    """

    known: np.ndarray
    n_known: int
    unknown: np.ndarray | None
    n_unknown: int
    absorbed: np.ndarray


def _ring_components(result: MapResult, min_windows: int = 1):
    """Label images and which unknown components are rings (see :func:`group_regions`).

    Returns ``(known, n_known, unknown, n_unknown, hosts, stays, reach)``: ``hosts`` the
    defect components of at least ``min_windows`` windows, ``stays[k]`` whether unknown
    component ``k`` stays unknown (index 0 unused), ``reach`` each axis's reach or None.
    Needs a density (``result.unknown``).
    """
    known, n_known = label_regions(result)
    unknown, n_unknown = label_regions(result, unknown=True)
    sizes = np.bincount(known.ravel(), minlength=n_known + 1)
    hosts = np.where(sizes[known] >= min_windows, known, 0)
    stays = np.ones(n_unknown + 1, dtype=bool)
    if n_unknown == 0 or not hosts.any():
        return known, n_known, unknown, n_unknown, hosts, stays, None
    grid = result.origins.reshape(*result.grid_shape, 2)
    size = result.window_size
    reach = (_axis_reach(grid[:, 0, 0], size, "row"), _axis_reach(grid[0, :, 1], size, "column"))
    within = _dilate(hosts > 0, *reach)
    stays = np.bincount(unknown[~within], minlength=n_unknown + 1) > 0
    stays[0] = True  # label 0 is no unknown component: never a ring
    return known, n_known, unknown, n_unknown, hosts, stays, reach


def ring_mask(result: MapResult) -> np.ndarray:
    """Unknown windows that join a defect region (:func:`group_regions`), shape (rows, cols).

    All False without a density.
    """
    if result.unknown is None:
        return np.zeros(result.grid_shape, dtype=bool)
    _, _, unknown, _, _, stays, _ = _ring_components(result)
    return ~stays[unknown]


def group_regions(result: MapResult, min_windows: int = 1) -> RegionGroups:
    """Defect components, and unknown components either joined to one or left unknown.

    An unknown component is joined when every one of its windows overlaps a window of
    a defect component of at least ``min_windows`` windows (window origins less than
    :attr:`MapResult.window_size` apart along both axes): it is the ring of windows
    that see part of that defect. Each of its windows goes to the defect it is nearest
    to (Chebyshev distance of window origins, then Euclidean, then the lower label), so
    a ring shared by two defects is split between them, never merging them. A
    component with any window beyond that reach stays unknown, whole.
    """
    if result.unknown is None:
        known, n_known = label_regions(result)
        return RegionGroups(known, n_known, None, 0, np.zeros_like(known))
    known, n_known, unknown, n_unknown, hosts, stays, reach = _ring_components(result, min_windows)
    absorbed = np.zeros_like(known)
    if reach is None:
        return RegionGroups(known, n_known, unknown, n_unknown, absorbed)
    reach_rows, reach_cols = reach
    grid = result.origins.reshape(*result.grid_shape, 2)
    row_origins, col_origins = grid[:, 0, 0], grid[0, :, 1]
    slices = ndimage.find_objects(unknown)
    for k in np.flatnonzero(~stays[1:]) + 1:
        rs, cs = slices[k - 1]
        members = np.argwhere(unknown[rs, cs] == k) + np.array([rs.start, cs.start])
        # Every defect window that may reach a member lies in the members' reach.
        er = slice(int(reach_rows[0][rs].min()), int(reach_rows[1][rs].max()) + 1)
        ec = slice(int(reach_cols[0][cs].min()), int(reach_cols[1][cs].max()) + 1)
        candidates = np.argwhere(hosts[er, ec] > 0) + np.array([er.start, ec.start])
        labels = hosts[candidates[:, 0], candidates[:, 1]]
        dy = np.abs(row_origins[members[:, 0], None] - row_origins[None, candidates[:, 0]]).astype(
            np.float64
        )
        dx = np.abs(col_origins[members[:, 1], None] - col_origins[None, candidates[:, 1]]).astype(
            np.float64
        )
        order = np.lexsort(
            (np.broadcast_to(labels, dy.shape), np.hypot(dy, dx), np.maximum(dy, dx)), axis=-1
        )
        absorbed[members[:, 0], members[:, 1]] = labels[order[:, 0]]
    stays[0] = False
    lookup = np.zeros(n_unknown + 1, dtype=unknown.dtype)
    lookup[stays] = np.arange(1, int(stays.sum()) + 1)
    return RegionGroups(known, n_known, lookup[unknown], int(stays.sum()), absorbed)


def region_records(
    result: MapResult,
    components: np.ndarray,
    count: int,
    unknown: bool = False,
    absorbed: np.ndarray | None = None,
) -> list[dict]:
    """The JSON record of every labelled region of ``components``, in label order.

    Properties come from ``scipy.ndimage`` over the whole label image at once
    (``sum_labels``, ``find_objects``), not one mask per region. Regions of unknown
    windows (``unknown=True``) are labelled ``"unknown"``, score their mean
    uncertainty and are centred on their windows' plain mean. ``absorbed`` (defect
    regions only, :attr:`RegionGroups.absorbed`) adds the unknown windows joined to
    each region to its ``n_windows``, ``frame_fraction`` and ``bbox`` and records
    their number as ``"absorbed_unknown"``; label, score, centroid and uncertainty
    stay those of the region's own windows.
    """
    if count == 0:
        return []
    height, width = result.frame_shape
    size = result.window_size
    extent = result.window_extent
    index = np.arange(1, count + 1)
    probs = result.probabilities.astype(np.float64)
    if result.background is not None:
        probs = probs.copy()
        probs[..., result.classes.index(result.background)] = 0
    class_sums = np.stack(
        [ndimage.sum_labels(probs[..., c], components, index) for c in range(probs.shape[-1])],
        axis=1,
    )
    if unknown:
        weight = result.uncertainty.astype(np.float64)
    else:
        weight = result.defect_probability.astype(np.float64)
    uncertainty_sum = (
        ndimage.sum_labels(result.uncertainty.astype(np.float64), components, index)
        if result.uncertainty is not None
        else None
    )
    grid = result.origins.reshape(*result.grid_shape, 2).astype(np.float64) + (size - 1) / 2.0
    own = ndimage.sum_labels(np.ones_like(weight), components, index)
    joined = components
    if absorbed is not None and not unknown:
        joined = np.where(absorbed > 0, absorbed, components)
    n_windows = ndimage.sum_labels(np.ones_like(weight), joined, index)
    weight_sum = ndimage.sum_labels(weight, components, index)
    weighted = [ndimage.sum_labels(weight * grid[..., a], components, index) for a in (0, 1)]
    plain = [ndimage.sum_labels(grid[..., a], components, index) for a in (0, 1)]
    row_origins = result.origins.reshape(*result.grid_shape, 2)[:, 0, 0]
    col_origins = result.origins.reshape(*result.grid_shape, 2)[0, :, 1]
    flags = {}
    if result.unknown is not None:
        unexplained = result.unexplained_share
        flags = {
            "frame_out_of_distribution": result.out_of_distribution,
            "frame_unknown_share": result.unknown_share,
            "frame_unexplained_share": unexplained,
        }
        if result.ood_check_share is not None:
            flags["ood_check_share"] = result.ood_check_share
    records = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(joined, max_label=count)):
        if weight_sum[k] > 1e-12 and not unknown:
            cy, cx = weighted[0][k] / weight_sum[k], weighted[1][k] / weight_sum[k]
        else:
            cy, cx = plain[0][k] / own[k], plain[1][k] / own[k]
        record = {
            "label": "unknown" if unknown else result.classes[int(class_sums[k].argmax())],
            "score": float(weight_sum[k] / own[k]),
            "centroid": [float(cy), float(cx)],
            # A window spans [origin, origin + extent), clipped to the frame.
            "bbox": [
                int(row_origins[rows.start]),
                int(col_origins[cols.start]),
                int(min(row_origins[rows.stop - 1] + extent, height)),
                int(min(col_origins[cols.stop - 1] + extent, width)),
            ],
            "n_windows": int(n_windows[k]),
            "frame_fraction": float(n_windows[k] / components.size),
            "centroid_norm": scan_fraction(float(cy), float(cx), (height, width)),
        }
        if absorbed is not None and not unknown:
            record["absorbed_unknown"] = int(n_windows[k] - own[k])
        if uncertainty_sum is not None:
            record["uncertainty"] = float(uncertainty_sum[k] / own[k])
            record["unknown"] = unknown
            if unknown:
                # What the softmax would have called it, for the record.
                record["nearest_class"] = result.classes[int(class_sums[k].argmax())]
        record.update(flags)
        if result.calibration is not None:
            record["centroid_calibrated"] = result.calibration.to_physical(cy, cx)
            record["unit"] = result.calibration.unit
        records.append(record)
    return records


def find_regions(result: MapResult, min_windows: int = 1) -> list[dict]:
    """Connected regions (8-neighbourhood on the window grid) of defect windows, then unknown.

    Each region is ``{"label", "score", "centroid": [y, x], "bbox": [y0, x0, y1, x1],
    "n_windows", "frame_fraction" (its share of all windows),
    "centroid_norm": [(y+0.5)/H, (x+0.5)/W]}`` (:func:`scan_fraction`),
    plus ``"uncertainty"`` (mean over its windows) and ``"unknown"`` when the model has
    a density. Defect regions: known windows whose label is not the background;
    ``label`` is the class with the largest summed probability over the region's
    windows; ``score`` the mean defect probability (1 - p(background)); the centroid is
    the defect-probability-weighted mean of window centres; the bbox spans the
    windows' pixels (each window :attr:`MapResult.window_size` wide in the original
    frame, rounded; end exclusive, clipped to the frame); sorted by score, highest
    first. ``min_windows`` counts a defect region's own (known) windows. Unknown
    regions (``"label": "unknown"``, ``"unknown": true``, ``"nearest_class"``) follow,
    made of windows unlike anything trained on whatever their softmax says, scored by
    their mean uncertainty.

    Rings. A model trained on centred defects finds the windows that see only part of
    a defect unlike anything it was trained on, so each defect used to come with a
    ring of unknown windows around it: a second, unknown region for the same defect
    (about one per defect on nominal synthetic frames). Those windows overlap the
    defect's windows, hence its pixels, so the honest reading is that they see that
    defect: an unknown component whose windows ALL overlap a window of one or more
    defect regions (:func:`group_regions`) is joined to them. Its windows count in the
    region's ``n_windows``, ``frame_fraction`` and ``bbox`` and are reported as
    ``"absorbed_unknown"`` (present, 0 or more, on every defect region of a model with
    a density); the label, score, centroid and uncertainty stay the defect's own.
    An unknown component reaching further than one window from every defect (an area
    unlike the training data, not a defect's edge) stays an unknown region, whole. The
    windows stay unknown in ``windows.csv``; only their grouping changes.

    With a density every region also carries ``"frame_out_of_distribution"``
    (:attr:`MapResult.out_of_distribution`: the frame's share of unknown windows that
    no ring explains, or the embedding density's where other sources judge the windows,
    is above its threshold, so even its known regions come from a frame unlike the
    training data), ``"frame_unknown_share"`` (all unknown windows)
    and ``"frame_unexplained_share"`` (those outside rings, the share compared), and
    with the density's check ``"ood_check_share"`` (its share, compared too).
    """
    groups = group_regions(result, min_windows=min_windows)
    with_density = groups.unknown is not None
    found = region_records(
        result, groups.known, groups.n_known, absorbed=groups.absorbed if with_density else None
    )
    regions = [r for r in found if r["n_windows"] - r.get("absorbed_unknown", 0) >= min_windows]
    regions.sort(key=lambda r: (-r["score"], -r["n_windows"]))
    if with_density:
        found = [
            r
            for r in region_records(result, groups.unknown, groups.n_unknown, unknown=True)
            if r["n_windows"] >= min_windows
        ]
        found.sort(key=lambda r: (-r["score"], -r["n_windows"]))
        regions += found
    return regions


def window_coordinates(result: MapResult) -> tuple[list[str], list[list[str]]]:
    """Header and per-window cells locating every window of a map.

    ``row,col`` (window top-left), ``cy,cx`` (centre, pixels), ``cy_norm,cx_norm``
    (centre as a fraction of the frame, :func:`scan_fraction`) and, with a
    calibration, ``cy_<unit>,cx_<unit>`` (centre in physical units).
    """
    cal = result.calibration
    header = ["row", "col", "cy", "cx", "cy_norm", "cx_norm"]
    if cal is not None:
        header += [f"cy_{cal.unit}", f"cx_{cal.unit}"]
    rows = []
    # Unscaled centres are whole or half pixels; a resampled map's window size is not.
    digits = 1 if result.scale == 1.0 else 4
    for (row, col), (cy, cx) in zip(result.origins, result.centers, strict=True):
        cells = [str(int(row)), str(int(col)), f"{cy:.{digits}f}", f"{cx:.{digits}f}"]
        cells += [f"{v:.6f}" for v in scan_fraction(cy, cx, result.frame_shape)]
        if cal is not None:
            cells += [f"{v:.6g}" for v in cal.to_physical(cy, cx)]
        rows.append(cells)
    return header, rows


def windows_csv(result: MapResult) -> str:
    """One CSV row per window: where it is, its label, confidence and probabilities.

    Columns: those of :func:`window_coordinates`, then ``label,confidence,p_<class>...``,
    and ``uncertainty,unknown`` (0/1) when the model has a density.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header, coordinates = window_coordinates(result)
    extra = ["uncertainty", "unknown"] if result.uncertainty is not None else []
    writer.writerow(header + ["label", "confidence"] + [f"p_{c}" for c in result.classes] + extra)
    probs = result.probabilities.reshape(-1, len(result.classes))
    labels = result.labels.ravel()
    if result.uncertainty is not None:
        tails = [
            [f"{u:.6f}", str(int(k))]
            for u, k in zip(result.uncertainty.ravel(), result.unknown_mask.ravel(), strict=True)
        ]
    else:
        tails = [[]] * len(labels)
    for cells, label, p, tail in zip(coordinates, labels, probs, tails, strict=True):
        writer.writerow(
            cells + [result.classes[label], f"{p[label]:.6f}"] + [f"{v:.6f}" for v in p] + tail
        )
    return buffer.getvalue()


def pixel_grid_index(result: MapResult) -> tuple[np.ndarray, np.ndarray]:
    """For each frame row/column, the index of the window whose centre is nearest.

    Centres are ``origin + (window_size - 1) / 2`` in the original frame's pixels.
    """
    origins = result.origins.reshape(*result.grid_shape, 2)
    centers_y = origins[:, 0, 0] + (result.window_size - 1) / 2.0
    centers_x = origins[0, :, 1] + (result.window_size - 1) / 2.0

    def nearest(centers: np.ndarray, length: int) -> np.ndarray:
        midpoints = (centers[1:] + centers[:-1]) / 2.0
        return np.searchsorted(midpoints, np.arange(length), side="right")

    return nearest(centers_y, result.frame_shape[0]), nearest(centers_x, result.frame_shape[1])
