"""Maps of frames recorded unlike the training patches: issue 26's measurement.

Three parts, each a function that takes a :class:`~defectscope.maps.detector.Detector`
and frames, so a test drives them with a tiny model:

- :func:`synthetic_study`: frames of one crystal simulated at the training conditions
  (nominal) and shifted ones (lattice spacing in pixels x0.85-1.15 with no calibration,
  dose /3, scan-line jitter x2, column contrast exponent +-20 %, and all of them at
  once, see :func:`default_shifts`), each mapped with ``scale="auto"`` and
  ``scale="off"`` (the map before scale matching). Scored against the simulation's
  truth by :func:`score_regions` (a defect is found when a known region of its class
  lies within half a lattice spacing; a known region is right when a true defect of
  its class does) and :func:`centroid_scores` (one-to-one centroid matching, as
  ``score-simulated``).
- :func:`real_study`: a real frame resampled by 0.85-1.15 (``scipy.ndimage.zoom``, a
  bare array) mapped beside the original; :func:`label_agreement` compares each
  window label of the original's map with the label of the nearest window of the copy's
  map (unknown counts as a label of its own).
- :func:`cost_study`: the time of the scale step (``info["scale"]["time_ms"]``) beside
  the map's own total, per frame size.

:func:`run_domain_shift` runs the parts asked for and writes ``domain_shift.json``
(atomically, after every part) and ``domain_shift.md`` (the tables) into a folder;
``scripts/scale_study.py`` is its command line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.io.files import atomic_write_json, atomic_write_text
from defectscope.maps.detector import Detector
from defectscope.maps.options import MapOptions
from defectscope.maps.result import MapResult
from defectscope.simulate.dataset import SimulationSettings, simulate_frame
from defectscope.simulate.truth import match_pairs, read_truth
from defectscope.util.system import cpu_description

log = logging.getLogger(__name__)

# The shifts: lattice spacing (in pixels) and resampling factors, contrast.
SPACING_FACTORS = (0.85, 0.9, 1.1, 1.15)
ZOOMS = (0.85, 0.9, 1.1, 1.15)
CONTRAST_FACTORS = (0.8, 1.2)
SCALE_ARMS = ("auto", "off")
JSON_NAME = "domain_shift.json"
MARKDOWN_NAME = "domain_shift.md"
# The goals (Measure section).
GOALS = {
    "found": 0.9,  # share of defects near a known region of the right class, shifted frames
    "precision": 0.9,  # of known regions, shifted frames
    "unknown_share": 0.10,  # unknown windows of each shifted frame, at most
    "unknown_regions_per_defect": 0.2,  # on nominal frames, at most
    "agreement": 0.9,  # window labels of a resampled real frame vs the original's map
    "unknown_points": 5.0,  # unknown share of a resampled real frame vs the original's
}

# The crystal, defects and microscope of the synthetic study: SrTiO3 [001] at 0.02 nm per
# pixel (a = 3.905 Å, 19.5 px), with the three point-defect kinds that scripts/
# simulated_study.sh trains on and a 64-pixel patch shows (a half-emptied Sr or Ti-O
# column, a Ti column half Nb). Vacancies of O are left out: O columns are not seen
# in HAADF at this probe.
STUDY_CRYSTAL = {
    "structure": "srtio3",
    "zone": (0, 0, 1),
    "pixel_size": 0.02,
    "unit": "nm",
    "probe_fwhm": 0.08,
    "thickness": 4.0,
    "defects": "vacancy:Sr,vacancy:Ti,substitution:Ti>Nb",
    # The study's nominal frames are the plain ones it was measured with, not
    # simulate's randomized defaults.
    "exponent_range": None,
    "column_scatter": 0.0,
    "vary": 0.0,
}


def study_settings(**changes: Any) -> SimulationSettings:
    """The nominal settings of the synthetic study (:data:`STUDY_CRYSTAL`) with ``changes``.

    Raises
    ------
    ValueError
        Naming a setting out of range (:meth:`SimulationSettings.check`).
    """
    settings = SimulationSettings(**{**STUDY_CRYSTAL, **changes})
    settings.check()
    return settings


@dataclasses.dataclass(frozen=True)
class Shift:
    """How one condition's frames differ from the nominal ones.

    Frame ``k`` of the condition takes ``spacing[k % len(spacing)]`` and
    ``contrast[k % len(contrast)]``, so one condition may mix shifts over its frames.

    Attributes
    ----------
    name : str
    spacing : tuple of float
        Lattice spacing in pixels times this (the pixel size divided by it; no
        calibration reaches the detector).
    dose : float
        Electron dose times this.
    jitter : float
        Scan-line jitter times this.
    contrast : tuple of float
        Column contrast exponent (``Z ** exponent``) times this.
    """

    name: str
    spacing: tuple[float, ...] = (1.0,)
    dose: float = 1.0
    jitter: float = 1.0
    contrast: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "contrast", tuple(float(v) for v in self.contrast))
        values = (*self.spacing, self.dose, self.jitter, *self.contrast)
        if not self.spacing or not self.contrast or not all(_positive(v) for v in values):
            raise ValueError(f"shift {self.name!r}: every factor must be a positive number")

    @property
    def nominal(self) -> bool:
        """Whether the condition changes nothing."""
        return self.spacing == (1.0,) and self.contrast == (1.0,) and self.dose == self.jitter == 1

    def factors(self, index: int) -> dict[str, float]:
        """The factors of frame ``index``."""
        return {
            "spacing": self.spacing[index % len(self.spacing)],
            "dose": self.dose,
            "jitter": self.jitter,
            "contrast": self.contrast[index % len(self.contrast)],
        }

    def settings(self, nominal: SimulationSettings, index: int) -> SimulationSettings:
        """The simulation settings of frame ``index`` of this condition."""
        f = self.factors(index)
        instrument = dataclasses.replace(
            nominal.instrument,
            dose=nominal.instrument.dose * f["dose"],
            jitter=nominal.instrument.jitter * f["jitter"],
        )
        exponent_range = nominal.exponent_range
        if exponent_range is not None:
            exponent_range = (exponent_range[0] * f["contrast"], exponent_range[1] * f["contrast"])
        return dataclasses.replace(
            nominal,
            pixel_size=nominal.pixel_size / f["spacing"],
            exponent=nominal.exponent * f["contrast"],
            exponent_range=exponent_range,
            instrument=instrument,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_shifts() -> list[Shift]:
    """Nominal, each shift of the issue alone, and all at once.

    The combined condition gives every frame dose /3 and jitter x2, and cycles the
    spacing through 0.85, 1.15, 0.9, 1.1 and the contrast through x0.8, x1.2 (frame 0:
    x0.85 and x0.8, frame 1: x1.15 and x1.2, frame 2: x0.9 and x0.8, ...).
    """
    shifts = [Shift("nominal")]
    shifts += [Shift(f"spacing x{s:g}", spacing=(s,)) for s in SPACING_FACTORS]
    shifts += [Shift("dose /3", dose=1 / 3), Shift("jitter x2", jitter=2.0)]
    shifts += [Shift(f"contrast x{c:g}", contrast=(c,)) for c in CONTRAST_FACTORS]
    shifts.append(
        Shift(
            "all combined",
            spacing=(0.85, 1.15, 0.9, 1.1),
            dose=1 / 3,
            jitter=2.0,
            contrast=CONTRAST_FACTORS,
        )
    )
    return shifts


def _positive(value: Any) -> bool:
    return (
        isinstance(value, int | float | np.floating | np.integer)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclasses.dataclass(frozen=True)
class ShiftedFrame:
    """A simulated frame (a bare array: no calibration) and what is true of it.

    Attributes
    ----------
    data : ndarray (H, W)
    defects : list of dict
        ``type``, ``row``, ``col`` (frame pixels) of each defect.
    spacing_px : float
        The lattice spacing in the frame's pixels.
    factors : dict
        The shift's factors for this frame (see :meth:`Shift.factors`).
    """

    data: np.ndarray
    defects: list[dict[str, Any]]
    spacing_px: float
    factors: dict[str, float]


def shifted_frames(nominal: SimulationSettings, shift: Shift, frames: int) -> list[ShiftedFrame]:
    """``frames`` frames of ``shift`` (frame ``k`` is ``simulate_frame(settings, k)``).

    The defects' places come from ``nominal.seed`` and the frame index, so conditions
    that keep the pixel size (dose, jitter, contrast) hold the very same defects.
    """
    out = []
    for index in range(frames):
        settings = shift.settings(nominal, index)
        data, record = simulate_frame(settings, index)
        defects = [
            {"type": d["type"], "row": float(d["row"]), "col": float(d["col"])}
            for d in record["defects"]
        ]
        spacing_px = float(record["lattice_spacing"]) / settings.pixel_size
        out.append(ShiftedFrame(data, defects, spacing_px, shift.factors(index)))
    return out


# --------------------------------------------------------------------------- metrics


def is_unknown(region: dict) -> bool:
    """Whether a region is of unknown windows (``"unknown": true`` or its label)."""
    return bool(region.get("unknown")) or region.get("label") == "unknown"


def bbox_distance(points: np.ndarray, bbox: Sequence[float]) -> np.ndarray:
    """Euclidean distance of each point ``(row, col)`` to a region's box (0 inside).

    ``bbox`` is ``[y0, x0, y1, x1]`` with the ends exclusive, as regions give it: the
    box covers the pixel centres ``y0 .. y1 - 1`` and ``x0 .. x1 - 1``.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    y0, x0, y1, x1 = (float(v) for v in bbox)
    dy = np.maximum(np.maximum(y0 - points[:, 0], points[:, 0] - (y1 - 1)), 0.0)
    dx = np.maximum(np.maximum(x0 - points[:, 1], points[:, 1] - (x1 - 1)), 0.0)
    return np.hypot(dy, dx)


def score_regions(regions: list[dict], defects: list[dict], tolerance: float) -> dict[str, Any]:
    """Defects found by known regions of their class, and known regions that are right.

    Parameters
    ----------
    regions : list of dict
        A map's regions (``label``, ``bbox``, ``unknown``).
    defects : list of dict
        The truth: ``type``, ``row``, ``col`` in the frame's pixels.
    tolerance : float
        Pixels; half the lattice spacing in the study.

    Returns
    -------
    dict
        ``defects``; ``found`` (defects within ``tolerance`` of the box of a known region
        labelled with their type); ``found_any_class`` (of any known region);
        ``near_unknown`` (of an unknown region); ``known_regions``; ``right_regions``
        (known regions with a true defect of their label within ``tolerance``);
        ``unknown_regions``; ``per_type`` ``{type: [found, defects]}``.
    """
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a distance >= 0 in pixels, got {tolerance!r}")
    known = [r for r in regions if not is_unknown(r)]
    unknown = [r for r in regions if is_unknown(r)]
    positions = np.array([(d["row"], d["col"]) for d in defects], dtype=np.float64).reshape(-1, 2)
    types = np.array([str(d["type"]) for d in defects], dtype=object)
    near_known = np.zeros((len(known), len(defects)), dtype=bool)
    same = np.zeros((len(known), len(defects)), dtype=bool)
    for k, r in enumerate(known):
        near_known[k] = bbox_distance(positions, r["bbox"]) <= tolerance
        same[k] = types == str(r["label"])
    found = (near_known & same).any(axis=0)
    near_unknown = np.zeros(len(defects), dtype=bool)
    for region in unknown:
        near_unknown |= bbox_distance(positions, region["bbox"]) <= tolerance
    per_type: dict[str, list[int]] = {}
    for kind, hit in zip(types, found, strict=True):
        entry = per_type.setdefault(str(kind), [0, 0])
        entry[0] += int(hit)
        entry[1] += 1
    return {
        "defects": len(defects),
        "found": int(found.sum()),
        "found_any_class": int(near_known.any(axis=0).sum()),
        "near_unknown": int(near_unknown.sum()),
        "known_regions": len(known),
        "right_regions": int((near_known & same).any(axis=1).sum()),
        "unknown_regions": len(unknown),
        "per_type": per_type,
    }


def centroid_scores(regions: list[dict], defects: list[dict], tolerance: float) -> dict[str, int]:
    """One-to-one matches of known regions' centroids to defects within ``tolerance``.

    As ``score-simulated --known-only``: nearest pairs first, whatever the labels;
    ``matched`` over ``defects`` is the recall, over ``regions`` the precision.
    """
    known = [r for r in regions if not is_unknown(r)]
    centres = np.array([r["centroid"] for r in known], dtype=np.float64).reshape(-1, 2)
    positions = np.array([(d["row"], d["col"]) for d in defects], dtype=np.float64).reshape(-1, 2)
    matched = len(match_pairs(centres, positions, tolerance))
    return {"defects": len(defects), "regions": len(known), "matched": matched}


def unknown_share(result: MapResult) -> float:
    """Share of the map's windows that are unknown (0 without a density)."""
    return float(np.mean(result.unknown_mask)) if result.unknown_mask.size else 0.0


def window_labels(result: MapResult) -> np.ndarray:
    """Each window's label, row-major: its class name, or ``"unknown"``."""
    names = np.array([*result.classes, "unknown"], dtype=object)
    index = np.asarray(result.labels).ravel().copy()
    index[np.asarray(result.unknown_mask).ravel()] = len(result.classes)
    return names[index]


def to_original_pixels(
    points: np.ndarray, resampled_shape: Sequence[int], original_shape: Sequence[int]
) -> np.ndarray:
    """Pixel positions ``(row, col)`` of a resampled copy in the original frame's pixels.

    The copy is ``scipy.ndimage.zoom(..., grid_mode=True)``: pixel edges line up, so a
    centre ``y_r`` sits at ``(y_r + 0.5) * H / H_r - 0.5`` (exact per axis, whatever
    rounding made the copy's shape).
    """
    ratio = np.asarray(original_shape[:2], np.float64) / np.asarray(resampled_shape[:2], np.float64)
    return (np.asarray(points, dtype=np.float64).reshape(-1, 2) + 0.5) * ratio - 0.5


def label_agreement(reference: MapResult, other: MapResult) -> dict[str, Any]:
    """How often a window of ``reference`` has the label of the nearest window of ``other``.

    ``other`` maps a resampled copy of ``reference``'s frame; its window centres
    (``other.centers``, in the copy's pixels) are brought to the original's pixels by
    :func:`to_original_pixels` from the two frame shapes. Unknown is a label of its own.

    Returns
    -------
    dict
        ``compared`` (the windows of ``reference``), ``agree`` and ``agreement``
        (their share).
    """
    from scipy.spatial import cKDTree

    centres = to_original_pixels(other.centers, other.frame_shape, reference.frame_shape)
    _, nearest = cKDTree(centres).query(np.asarray(reference.centers, dtype=np.float64))
    agree = window_labels(reference) == window_labels(other)[nearest]
    compared = int(agree.size)
    return {
        "compared": compared,
        "agree": int(agree.sum()),
        "agreement": float(agree.mean()) if compared else None,
    }


def resample(frame: np.ndarray, zoom: float) -> np.ndarray:
    """``frame`` as another magnification records it: cubic ``scipy.ndimage.zoom``
    (``grid_mode``, pixel edges aligned), float32, no calibration."""
    from scipy import ndimage

    if not _positive(zoom):
        raise ValueError(f"zoom must be a positive number, got {zoom!r}")
    data = np.asarray(frame, dtype=np.float32)
    return ndimage.zoom(data, zoom, order=3, grid_mode=True, mode="reflect")


# ------------------------------------------------------------------------------- maps


def has_scale_option() -> bool:
    """Whether this build's :class:`MapOptions` has ``scale`` (scale matching)."""
    return "scale" in {f.name for f in dataclasses.fields(MapOptions)}


def map_options(stride: int, scale: str | float) -> MapOptions:
    """``MapOptions(stride=stride, scale=scale)``.

    Raises
    ------
    ValueError
        For ``scale`` other than ``"off"`` on a build without scale matching (there
        ``"off"`` is the only map there is).
    """
    if has_scale_option():
        return MapOptions(stride=stride, scale=scale)
    if scale == "off":
        return MapOptions(stride=stride)
    raise ValueError(
        f"scale {scale!r}: this defectscope has no scale matching (MapOptions.scale); "
        "measure with scales ('off',) only"
    )


def map_frame(detector: Detector, frame: np.ndarray, stride: int, scale: str | float) -> MapResult:
    """The map :meth:`Detector.find` makes of a bare array (no calibration)."""
    return detector.find(np.asarray(frame), map_options(stride, scale)).result


def scale_record(result: MapResult) -> dict[str, Any] | None:
    """``result.info["scale"]`` (factor, source, periods, warning, time), or None."""
    record = result.info.get("scale")
    return _jsonable(dict(record)) if isinstance(record, dict) else None


def _map_summary(result: MapResult) -> dict[str, Any]:
    ood = getattr(result, "out_of_distribution", None)
    return {
        "windows": int(np.prod(result.grid_shape)),
        "unknown_share": unknown_share(result),
        # Unknown windows outside the rings around known defects: what the rings (which
        # join their defect's region) do not explain, i.e. the lattice the model calls new.
        "unexplained_share": getattr(result, "unexplained_share", None),
        "out_of_distribution": None if ood is None else bool(ood),
        "scale": scale_record(result),
        "map_ms": float(result.timing_ms.get("total", float("nan"))),
        "mode": result.info.get("mode"),
    }


def _check_scales(scales: Iterable[str | float]) -> tuple[str | float, ...]:
    scales = tuple(scales)
    if not scales:
        raise ValueError("no scale arm given (e.g. 'auto' and 'off')")
    for scale in scales:
        if not (scale in ("auto", "off") or _positive(scale)):
            raise ValueError(f"scale {scale!r}: 'auto', 'off' or a positive factor")
        map_options(16, scale)  # a build without scale matching refuses 'auto' before any work
    return scales


def _arm_name(scale: str | float) -> str:
    return scale if isinstance(scale, str) else f"x{scale:g}"


# -------------------------------------------------------------------------- synthetic


def synthetic_study(
    detector: Detector,
    nominal: SimulationSettings,
    shifts: Sequence[Shift] | None = None,
    frames: int = 3,
    stride: int = 16,
    scales: Iterable[str | float] = SCALE_ARMS,
    on_condition: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Map nominal and shifted simulated frames with each scale arm; score them.

    Parameters
    ----------
    detector : Detector
        A model trained on frames of ``nominal`` (other seeds).
    nominal : SimulationSettings
        The test frames' nominal settings (``size``, ``seed``: frame ``k`` of a
        condition is ``simulate_frame(shift.settings(nominal, k), k)``).
    shifts : sequence of Shift, optional
        Default :func:`default_shifts`.
    frames : int
        Frames per condition.
    stride : int
    scales : iterable
        ``"auto"``, ``"off"`` or factors: one map of every frame for each.
    on_condition : callable, optional
        Called with the report after each condition (to write it as it grows).

    Returns
    -------
    dict
        ``settings``, ``stride``, ``frames``, ``scales`` and ``conditions``: per
        condition its shift, per frame the truth's counts and factors, and per arm the
        totals of :func:`score_regions` and :func:`centroid_scores`, the shares
        (``found``, ``precision``, ``recall``, ``centroid_precision``,
        ``unknown_regions_per_defect``), each frame's unknown share, the part of it
        outside the rings around known defects (``unexplained_share``) and scale record.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames per condition must be a positive integer, got {frames!r}")
    nominal.check()
    scales = _check_scales(scales)
    shifts = list(default_shifts() if shifts is None else shifts)
    report: dict[str, Any] = {
        "settings": _settings_json(nominal),
        "stride": stride,
        "frames_per_condition": frames,
        "scales": [_arm_name(s) for s in scales],
        "classes": list(detector.classes),
        "conditions": [],
    }
    for shift in shifts:
        started = time.perf_counter()
        test = shifted_frames(nominal, shift, frames)
        condition: dict[str, Any] = {
            "name": shift.name,
            "shift": shift.to_dict(),
            "frames": [
                {
                    "factors": f.factors,
                    "expected_factor": 1.0 / f.factors["spacing"],
                    "spacing_px": f.spacing_px,
                    "tolerance_px": f.spacing_px / 2,
                    "defects": len(f.defects),
                    "shape": list(f.data.shape),
                }
                for f in test
            ],
            "arms": {},
        }
        for scale in scales:
            totals: dict[str, Any] = {}
            per_frame = []
            for f in test:
                result = map_frame(detector, f.data, stride, scale)
                regions = result.regions()
                tolerance = f.spacing_px / 2
                scores = score_regions(regions, f.defects, tolerance)
                centroids = centroid_scores(regions, f.defects, tolerance)
                summary = _map_summary(result)
                per_frame.append({**summary, **scores, "centroids": centroids})
                _add(totals, {k: v for k, v in scores.items() if k != "per_type"})
                _add(totals, {f"centroid_{k}": v for k, v in centroids.items()})
                for kind, (hit, n) in scores["per_type"].items():
                    entry = totals.setdefault("per_type", {}).setdefault(kind, [0, 0])
                    entry[0] += hit
                    entry[1] += n
            condition["arms"][_arm_name(scale)] = {
                **totals,
                **_shares(totals),
                "unknown_share_per_frame": [p["unknown_share"] for p in per_frame],
                "unexplained_share_per_frame": [p["unexplained_share"] for p in per_frame],
                "factor_per_frame": [(p["scale"] or {}).get("factor") for p in per_frame],
                "source_per_frame": [(p["scale"] or {}).get("source") for p in per_frame],
                "frames": per_frame,
            }
        condition["seconds"] = time.perf_counter() - started
        report["conditions"].append(condition)
        log.info("synthetic: %s done in %.0f s", shift.name, condition["seconds"])
        if on_condition is not None:
            on_condition(report)
    return report


def _add(totals: dict[str, Any], values: dict[str, int]) -> None:
    for key, value in values.items():
        totals[key] = totals.get(key, 0) + value


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _shares(t: dict[str, Any]) -> dict[str, float | None]:
    return {
        "found_share": _ratio(t["found"], t["defects"]),
        "precision": _ratio(t["right_regions"], t["known_regions"]),
        "unknown_regions_per_defect": _ratio(t["unknown_regions"], t["defects"]),
        "recall": _ratio(t["centroid_matched"], t["centroid_defects"]),
        "centroid_precision": _ratio(t["centroid_matched"], t["centroid_regions"]),
    }


def _settings_json(settings: SimulationSettings) -> dict[str, Any]:
    record = dataclasses.asdict(settings)
    record["zone"] = list(settings.zone)
    return json.loads(json.dumps(record))


# ------------------------------------------------------------------------------- real


def real_study(
    detector: Detector,
    frame: np.ndarray,
    zooms: Sequence[float] = ZOOMS,
    stride: int = 16,
    scales: Iterable[str | float] = SCALE_ARMS,
) -> dict[str, Any]:
    """Map a real frame and copies resampled by ``zooms``; compare with the original's map.

    For every arm the original is mapped with that arm, and each copy's map is
    compared with it by :func:`label_agreement`; ``unknown_points`` is the copy's
    unknown share minus the original's, in percentage points.

    Returns
    -------
    dict
        ``shape``, ``stride``, per arm ``original`` (its map summary) and ``zooms``
        (per zoom: the copy's shape, map summary, agreement, unknown points).
    """
    frame = np.asarray(frame)
    if frame.ndim != 2:
        raise ValueError(f"a real frame must be one 2-D image, got shape {frame.shape}")
    scales = _check_scales(scales)
    zooms = tuple(zooms)
    for zoom in zooms:
        if not _positive(zoom):
            raise ValueError(f"zoom must be a positive number, got {zoom!r}")
    copies = {zoom: resample(frame, zoom) for zoom in zooms}
    report: dict[str, Any] = {"shape": list(frame.shape), "stride": stride, "arms": {}}
    for scale in scales:
        original = map_frame(detector, frame, stride, scale)
        base = _map_summary(original)
        rows = []
        for zoom, copy in copies.items():
            result = map_frame(detector, copy, stride, scale)
            summary = _map_summary(result)
            rows.append(
                {
                    "zoom": zoom,
                    "shape": list(copy.shape),
                    **summary,
                    **label_agreement(original, result),
                    "unknown_points": 100 * (summary["unknown_share"] - base["unknown_share"]),
                }
            )
        report["arms"][_arm_name(scale)] = {"original": base, "zooms": rows}
    return report


# ------------------------------------------------------------------------------- cost


def cost_study(
    detector: Detector,
    frames: dict[int, np.ndarray],
    stride: int = 16,
    scales: Iterable[str | float] = SCALE_ARMS,
    repeats: int = 2,
) -> dict[str, Any]:
    """Time of the scale step and of the whole map, per frame, the least of ``repeats``.

    Parameters
    ----------
    frames : dict
        A name (the side in pixels) to a frame.

    Returns
    -------
    dict
        ``cpu`` and per frame and arm ``scale_ms`` (``info["scale"]["time_ms"]``, None
        where the map has no scale step), ``total_ms`` and the windows mapped.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    scales = _check_scales(scales)
    rows = []
    for name, frame in frames.items():
        arms = {}
        for scale in scales:
            runs = []
            for _ in range(repeats):
                result = map_frame(detector, frame, stride, scale)
                record = scale_record(result) or {}
                runs.append((float(result.timing_ms["total"]), record.get("time_ms"), result))
            total, scale_ms, result = min(runs, key=lambda r: r[0])
            arms[_arm_name(scale)] = {
                "total_ms": total,
                "scale_ms": scale_ms,
                "windows": int(np.prod(result.grid_shape)),
                "factor": (scale_record(result) or {}).get("factor"),
                "mode": result.info.get("mode"),
            }
        rows.append({"frame": name, "shape": list(np.shape(frame)), "arms": arms})
        log.info("cost: %s done", name)
    return {"cpu": cpu_description(), "repeats": repeats, "stride": stride, "frames": rows}


def cost_frames(
    nominal: SimulationSettings, sizes: Iterable[int], spacing: float = 1.1
) -> dict[str, np.ndarray]:
    """Synthetic lattice frames of ``sizes`` (the nominal crystal, its spacing in
    pixels times ``spacing``, so an ``auto`` map resamples them)."""
    shift = Shift(f"spacing x{spacing:g}", spacing=(spacing,))
    out = {}
    for size in sizes:
        settings = dataclasses.replace(nominal, size=int(size))
        out[f"{int(size)}²"] = shifted_frames(settings, shift, 1)[0].data
    return out


# --------------------------------------------------------------------------- training


def simulate_training_set(
    settings: SimulationSettings, out: str | os.PathLike, progress: bool = False
) -> Path:
    """The nominal training frames and patches in ``out`` (``simulate``'s layout).

    A complete dataset already in ``out`` made with the same settings is reused (the
    simulation is deterministic); one made with other settings is refused.
    """
    from defectscope.simulate.dataset import recorded_settings, simulate_dataset

    out = Path(out)
    if (out / "truth.json").is_file():
        truth = read_truth(out)
        same = recorded_settings(truth) == _settings_json(settings)
        if not same or not truth.get("complete"):
            raise ValueError(
                f"{out}: holds a simulated dataset made with other settings (or incomplete); "
                "remove it or give another --out"
            )
        log.info("training set: reusing %s", out)
        return out
    simulate_dataset(settings, out, progress=progress)
    return out


def train_study_model(dataset: str | os.PathLike, out: str | os.PathLike, config) -> dict[str, Any]:
    """Train a model directory on a simulated dataset, as ``train --simulated`` does.

    A run that did not learn keeps its model (as ``train`` does) and says so in the
    returned record and a logged warning: the study's tables then measure that model.

    Returns
    -------
    dict
        ``path``, ``epochs_run``, ``seconds``, ``untrained`` and ``warnings``.

    Raises
    ------
    ValueError
        When ``out`` already holds a model (reuse it with ``--model`` instead).
    """
    from defectscope.io.datasets import load_patches
    from defectscope.training.loop import train_from_simulated

    dataset, out = Path(dataset), Path(out)
    if (out / "model.json").exists():
        raise ValueError(f"{out}: already holds a model; pass it as --model to reuse it")
    patches = load_patches(dataset / "patches")
    record = {"simulated_data": str(dataset), "study": "domain shift (issue 26)"}
    result = train_from_simulated(patches, out, config, "grouped", None, record)
    warnings = list(result.warnings)
    if result.untrained:
        warnings.append("training did not learn: the tables measure an untrained model")
    for warning in warnings:
        log.warning("%s: %s", out, warning)
    return {
        "path": str(out),
        "epochs_run": len(result.history),
        "seconds": float(result.wall_time_s),
        "untrained": bool(result.untrained),
        "warnings": warnings,
    }


# ------------------------------------------------------------------------------ report


def _jsonable(obj: Any) -> Any:
    """JSON-ready: numpy values as Python ones, non-finite floats as None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, int | str):
        return obj
    return str(obj)


def write_report(out: str | os.PathLike, report: dict[str, Any]) -> None:
    """``domain_shift.json`` and ``domain_shift.md`` in ``out``, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = _jsonable(report)
    report["goals"] = goal_summary(report)
    atomic_write_json(out / JSON_NAME, report)
    atomic_write_text(out / MARKDOWN_NAME, markdown(report))


def goal_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Per scale arm, the issue's goals against the worst value measured (None: not run).

    Shifted means every synthetic condition but the nominal one.
    """
    arms: dict[str, dict[str, Any]] = {}
    for condition in (report.get("synthetic") or {}).get("conditions", []):
        nominal = condition["name"] == "nominal"
        for arm, r in condition["arms"].items():
            g = arms.setdefault(arm, {})
            if nominal:
                g["unknown_regions_per_defect"] = r["unknown_regions_per_defect"]
                continue
            for key, value, worst in (
                ("found", r["found_share"], min),
                ("precision", r["precision"], min),
                ("unknown_share", max(r["unknown_share_per_frame"], default=None), max),
            ):
                if value is not None:
                    g[key] = value if g.get(key) is None else worst(g[key], value)
    for real in report.get("real", []):
        for arm, r in real["arms"].items():
            g = arms.setdefault(arm, {})
            for row in r["zooms"]:
                if row["agreement"] is not None:
                    g["agreement"] = min(g.get("agreement", 1.0), row["agreement"])
                g["unknown_points"] = max(g.get("unknown_points", 0.0), abs(row["unknown_points"]))
    out: dict[str, Any] = {"targets": dict(GOALS)}
    for arm, g in arms.items():
        met = {}
        for key, value in g.items():
            if value is None:
                continue
            upper = key in ("unknown_share", "unknown_regions_per_defect", "unknown_points")
            met[key] = value <= GOALS[key] if upper else value >= GOALS[key]
        out[arm] = {"worst": g, "met": met}
    return out


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _factors(values: list, sources: list) -> str:
    if not any(v is not None for v in values):
        return "–"
    shown = ", ".join("–" if v is None else f"{v:.3f}" for v in values)
    kinds = sorted({str(s) for s in sources if s is not None})
    return f"{shown} ({'/'.join(kinds)})" if kinds else shown


def markdown(report: dict[str, Any]) -> str:
    """The measurement tables of a :func:`run_domain_shift` report."""
    lines = ["# Domain shift: maps of frames recorded unlike the training patches", ""]
    lines.append(f"CPU: {report.get('cpu', 'unknown')}.")
    synthetic = report.get("synthetic")
    if synthetic:
        s = synthetic["settings"]
        lines += [
            "",
            "## Synthetic frames",
            "",
            f"{s['structure']} [{''.join(str(v) for v in s['zone'])}], defects "
            f"{s['defects']}, {s['size']}² frames at {s['pixel_size']:g} {s['unit']}/px "
            f"nominal (no calibration reaches the detector), "
            f"{synthetic['frames_per_condition']} frames per condition, stride "
            f"{synthetic['stride']}. Model: {synthetic.get('model', {}).get('path', '?')}. "
            "Found: defects within half a lattice spacing of the box of a known region "
            "of their class; precision: known regions with a defect of their class "
            "within half a spacing; recall / precision: centroids matched one to one "
            "(known regions, any class); factor: the scale step's, expected 1/spacing.",
            "",
        ]
        for warning in synthetic.get("model", {}).get("warnings", []):
            lines += [f"**Warning (model):** {warning}", ""]
        lines += [
            "| condition | scale | defects | found | known regions | precision "
            "| unknown windows per frame | unknown outside defect rings "
            "| unknown regions / defect | recall / precision "
            "| factor per frame (source) | expected |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in synthetic["conditions"]:
            expected = ", ".join(f"{f['expected_factor']:.3f}" for f in c["frames"])
            for arm, r in c["arms"].items():
                unknown = ", ".join(_pct(u) for u in r["unknown_share_per_frame"])
                unexplained = r.get("unexplained_share_per_frame") or []
                unexplained = ", ".join(_pct(u) for u in unexplained) or "–"
                lines.append(
                    f"| {c['name']} | {arm} | {r['defects']} | {r['found']} "
                    f"({_pct(r['found_share'])}) | {r['known_regions']} | "
                    f"{_num(r['precision'])} | {unknown} | {unexplained} | "
                    f"{_num(r['unknown_regions_per_defect'], 2)} | {_num(r['recall'])} / "
                    f"{_num(r['centroid_precision'])} | "
                    f"{_factors(r['factor_per_frame'], r['source_per_frame'])} | {expected} |"
                )
    for real in report.get("real", []):
        lines += [
            "",
            f"## Real frame: {real['name']}",
            "",
            f"{real['frame']} ({real['shape'][0]}×{real['shape'][1]}), model "
            f"{real['model']}, resampled by scipy.ndimage.zoom (cubic, no calibration), "
            f"stride {real['stride']}. Agreement: windows of the original's map whose label "
            "(unknown is a label) the nearest window of the copy's map shares.",
            "",
            "| zoom | scale | windows | label agreement | unknown | original unknown "
            "| Δ points | factor (source) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm, r in real["arms"].items():
            base = r["original"]
            lines.append(
                f"| 1 (original) | {arm} | {base['windows']} | – | "
                f"{_pct(base['unknown_share'])} | – | – | "
                f"{_factors([(base['scale'] or {}).get('factor')], [(base['scale'] or {}).get('source')])} |"  # noqa: E501
            )
            for row in r["zooms"]:
                sc = row["scale"] or {}
                lines.append(
                    f"| {row['zoom']:g} | {arm} | {row['windows']} | {_pct(row['agreement'])} | "
                    f"{_pct(row['unknown_share'])} | {_pct(base['unknown_share'])} | "
                    f"{row['unknown_points']:+.1f} | "
                    f"{_factors([sc.get('factor')], [sc.get('source')])} |"
                )
    cost = report.get("cost")
    if cost:
        lines += [
            "",
            "## Cost",
            "",
            f"Synthetic lattice frames (spacing ×1.1, so an auto map resamples), stride "
            f"{cost['stride']}, least of {cost['repeats']} runs; {cost['cpu']}.",
            "",
            "| frame | scale | windows | scale step ms | map total ms |",
            "|---|---|---|---|---|",
        ]
        for row in cost["frames"]:
            for arm, r in row["arms"].items():
                lines.append(
                    f"| {row['frame']} | {arm} | {r['windows']} | {_num(r['scale_ms'], 1)} | "
                    f"{r['total_ms']:.0f} |"
                )
    goals = report.get("goals") or {}
    arms = [a for a in goals if a != "targets"]
    if arms:
        lines += ["", "## Goals (worst value measured)", "", "| goal | target |"]
        lines[-1] += "".join(f" {a} |" for a in arms)
        lines.append("|---|---|" + "---|" * len(arms))
        for key, target in goals["targets"].items():
            upper = key in ("unknown_share", "unknown_regions_per_defect", "unknown_points")
            cells = []
            for arm in arms:
                value = goals[arm]["worst"].get(key)
                met = goals[arm]["met"].get(key)
                text = "–" if value is None else f"{value:.3g} ({'met' if met else 'not met'})"
                cells.append(text)
            lines.append(f"| {key} | {'≤' if upper else '≥'} {target:g} | " + " | ".join(cells))
            lines[-1] += " |"
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- run


@dataclasses.dataclass(frozen=True)
class RealFrame:
    """A real frame to resample and the model that maps it."""

    name: str
    model: Path
    frame: Path


def run_domain_shift(
    out: str | os.PathLike,
    *,
    synthetic: bool = True,
    model: str | os.PathLike | None = None,
    train_settings: SimulationSettings | None = None,
    train_config=None,
    test_settings: SimulationSettings | None = None,
    frames: int = 3,
    shifts: Sequence[Shift] | None = None,
    real: Sequence[RealFrame] = (),
    zooms: Sequence[float] = ZOOMS,
    cost_sizes: Sequence[int] = (512, 2048),
    cost_repeats: int = 2,
    stride: int = 16,
    scales: Iterable[str | float] = SCALE_ARMS,
    backend: str = "auto",
    threads: int = 0,
) -> dict[str, Any]:
    """Run the parts asked for and write the report into ``out`` after each.

    Parameters
    ----------
    out : path-like
        Folder of ``domain_shift.json`` and ``domain_shift.md``; without ``model`` the
        training set (``out/train``) and the model (``out/model``) are made there.
    synthetic : bool
        Run :func:`synthetic_study` and, with ``cost_sizes``, :func:`cost_study` on
        the synthetic model.
    model : path-like, optional
        A model directory trained on ``train_settings`` frames, instead of training.
    train_settings : SimulationSettings, optional
        Default :func:`study_settings` (32 frames of 512², seed 0).
    train_config : TrainConfig, optional
        Default ``TrainConfig(epochs=10, seed=0)``.
    test_settings : SimulationSettings, optional
        Default ``train_settings`` with 768² frames and seed 1000 (frames never
        trained on).
    frames, shifts, zooms, stride, scales
        See :func:`synthetic_study` and :func:`real_study`.
    real : sequence of RealFrame
    cost_sizes, cost_repeats
        Frame sides of :func:`cost_study` (empty: no cost part), and its repeats.
    backend, threads
        Of :meth:`Detector.load`.

    Returns
    -------
    dict
        The report written to ``out/domain_shift.json``.
    """
    from defectscope._version import __version__
    from defectscope.io.frames import read_frame

    out = Path(out)
    scales = _check_scales(scales)
    real = list(real)
    if not synthetic and not real:
        raise ValueError("nothing to measure: ask for the synthetic study, real frames, or both")
    for item in real:  # every input is checked before hours of work start
        if not (Path(item.model) / "model.json").is_file() and not Path(item.model).is_file():
            raise ValueError(f"real frame {item.name}: {item.model} is no model")
        if not Path(item.frame).is_file():
            raise ValueError(f"real frame {item.name}: {item.frame} does not exist")
    if model is not None and not Path(model).exists():
        raise ValueError(f"model {model} does not exist")
    train_settings = train_settings or study_settings(frames=32, size=512, seed=0)
    test_settings = test_settings or dataclasses.replace(train_settings, size=768, seed=1000)
    train_settings.check()
    test_settings.check()
    report: dict[str, Any] = {
        "defectscope": __version__,
        "cpu": cpu_description(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scales": [_arm_name(s) for s in scales],
        "scale_matching": has_scale_option(),
    }
    out.mkdir(parents=True, exist_ok=True)
    if synthetic:
        model_record: dict[str, Any]
        if model is None:
            from defectscope.training.config import TrainConfig

            config = train_config or TrainConfig(epochs=10, seed=0)
            started = time.perf_counter()
            dataset = simulate_training_set(train_settings, out / "train")
            model_record = {
                **train_study_model(dataset, out / "model", config),
                "trained_here": True,
                "training_settings": _settings_json(train_settings),
                "epochs": config.epochs,
                "seed": config.seed,
                "seconds_with_simulation": time.perf_counter() - started,
            }
            model = out / "model"
        else:
            model_record = {"path": str(model), "trained_here": False}
        with Detector.load(model, backend=backend, threads=threads) as detector:

            def save(partial: dict) -> None:
                report["synthetic"] = {**partial, "model": model_record}
                write_report(out, report)

            save(synthetic_study(detector, test_settings, shifts, frames, stride, scales, save))
            if cost_sizes:
                frames_by_size = cost_frames(test_settings, cost_sizes)
                report["cost"] = cost_study(detector, frames_by_size, stride, scales, cost_repeats)
                write_report(out, report)
    report["real"] = []
    for item in real:
        data = read_frame(item.frame).data  # a bare array: no calibration reaches the map
        with Detector.load(item.model, backend=backend, threads=threads) as detector:
            part = real_study(detector, data, zooms, stride, scales)
        report["real"].append(
            {"name": item.name, "model": str(item.model), "frame": str(item.frame), **part}
        )
        log.info("real: %s done", item.name)
        write_report(out, report)
    write_report(out, report)
    return _jsonable(report)
