"""How far to zoom a frame before it is tiled, so it has the scale of the model's patches.

A model trained on 64 px patches at one magnification knows nothing of another: the
same lattice at 1.15x its spacing is a texture it never saw. :func:`decide_scale` finds
the zoom ``f`` that brings a frame to the model's scale (resampling by ``f`` gives the
frame's pixels the model's pixel size), in this order:

1. ``user``: the factor the options give (``MapOptions(scale=1.1)``, ``--scale 1.1``),
   applied as given;
2. ``calibration``: the frame and the model both have a pixel size in units that
   convert into each other (nm, Å, pm, µm, ...): ``f = frame pixel size / model pixel
   size``. A frame calibrated in ``px`` counts as uncalibrated;
3. ``lattice``: the frame's lattice periods measured in its power spectrum
   (:func:`~defectscope.tiling.lattice.measure_frame_periods`) matched to those the
   model recorded of its patches (:func:`~defectscope.tiling.lattice.match_scale`);
4. ``none``: the frame is mapped as it is.

``scale="off"`` measures nothing (``none``). A model trained before scale matching
records no scale: its frames are mapped as they are, with an info line, no warning.

A factor outside :data:`~defectscope.tiling.lattice.SCALE_RANGE`, a lattice period
that cannot be measured (vacuum, amorphous material, a frame of noise), a pixel size
that is not a finite positive number and units that cannot be converted give ONE
warning line (logged on the ``defectscope`` logger and kept in the decision's
``warning``), and the frame is mapped unscaled (or, for units, the lattice decides).
A factor within 2 % of 1 (:data:`NEGLIGIBLE`) is reported but not applied: the
resampling would cost more than it changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import mmap
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.artifacts.metadata import ModelScale
from defectscope.tiling.lattice import (
    LOBE_BINS,
    SCALE_RANGE,
    LatticePeriods,
    match_scale,
    measure_frame_periods,
    measure_patch_periods,
)
from defectscope.tiling.resample import resample_frame, resampled_shape

log = logging.getLogger("defectscope")

SOURCES = ("calibration", "lattice", "user", "none")
NEGLIGIBLE = 0.02
"""A measured factor within this of 1 is not applied (reported with ``applied: false``)."""
REFINE_PATCHES = 144
"""Patches cut from the frame to refine a lattice factor (:func:`refine_factor`)."""
REFINE_LIMIT = 0.02
"""The largest correction :func:`refine_factor` applies (the patch measurement's error
is a few tenths of a per cent; more means it found something else)."""
IN_MEMORY_BYTES = 1 << 30
"""A resampled frame larger than this (1 GiB of float32) goes to a temporary memmap."""

# Length units in metres: what a pixel size may be given in. Several spellings of the
# same unit (the Ångström sign U+212B and the letter Å U+00C5, the micro sign U+00B5
# and the Greek mu U+03BC) are all in use in microscope files.
_METRES = {
    "m": 1.0,
    "mm": 1e-3,
    "µm": 1e-6,
    "μm": 1e-6,
    "um": 1e-6,
    "micron": 1e-6,
    "microns": 1e-6,
    "micrometer": 1e-6,
    "micrometre": 1e-6,
    "nm": 1e-9,
    "nanometer": 1e-9,
    "nanometre": 1e-9,
    "å": 1e-10,
    "Å": 1e-10,
    "a": 1e-10,
    "ang": 1e-10,
    "angstrom": 1e-10,
    "angstroms": 1e-10,
    "ångström": 1e-10,
    "pm": 1e-12,
    "picometer": 1e-12,
    "picometre": 1e-12,
}
# Units that say "no physical calibration".
_PIXEL_UNITS = {"", "px", "pixel", "pixels", "<undefined>", "none"}


def unit_metres(unit: str | None) -> float | None:
    """One ``unit`` in metres, or None for a unit that is no length this module knows.

    ``nm``, ``Å`` (also ``A``, ``Å`` U+212B, ``angstrom``), ``pm``, ``µm`` (also ``um``,
    ``μm``), ``mm``, ``m``; case does not matter except that ``m`` and ``M`` differ
    (``M`` is no length).
    """
    if not isinstance(unit, str):
        return None
    text = unit.strip().replace("\u212b", "Å")
    if text in _METRES:
        return _METRES[text]
    if text.lower() in _METRES and text.lower() != "m":
        return _METRES[text.lower()]
    return None


def is_pixel_unit(unit: str | None) -> bool:
    """Whether ``unit`` means "pixels" (no physical calibration)."""
    return unit is None or (isinstance(unit, str) and unit.strip().lower() in _PIXEL_UNITS)


def convert(value: float, unit: str, to: str) -> float | None:
    """``value`` in ``unit`` expressed in ``to``; None when either is no known length."""
    a, b = unit_metres(unit), unit_metres(to)
    if a is None or b is None:
        return None
    return value * a / b


@dataclasses.dataclass(frozen=True)
class ScaleDecision:
    """What :func:`decide_scale` found: the zoom, where it came from and why.

    Attributes
    ----------
    factor : float
        The zoom found (``f > 1`` enlarges the frame), from ``source``; 1 when none
        was found. Outside the sane range it is reported, not applied.
    source : {'calibration', 'lattice', 'user', 'none'}
    applied : bool
        Whether the frame is resampled by ``factor`` (False within 2 % of 1, outside
        :data:`~defectscope.tiling.lattice.SCALE_RANGE`, or without a factor).
    frame_periods, model_periods : LatticePeriods or None
        The frame's measured lattice periods (None when not measured) and the model's.
    frame_pixel_size : float or None
        The frame's pixel size, in ``unit`` when it converts, else in ``frame_unit``.
    model_pixel_size : float or None
        The model's pixel size, in ``unit``.
    unit, frame_unit : str or None
        The unit the pixel sizes are given in (the model's, else the frame's), and the
        frame's own.
    warning : str or None
        One line saying why the frame is mapped unscaled (or how the factor was
        found against the odds); None when all went as it should.
    note : str or None
        A remark that is no warning (scale matching off, a model without a scale).
    time_ms : float
        Time of the decision (measurement included); the detector adds the resampling.
    """

    factor: float = 1.0
    source: str = "none"
    applied: bool = False
    frame_periods: LatticePeriods | None = None
    model_periods: LatticePeriods | None = None
    frame_pixel_size: float | None = None
    model_pixel_size: float | None = None
    unit: str | None = None
    frame_unit: str | None = None
    warning: str | None = None
    note: str | None = None
    time_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(
                f"scale source must be one of {', '.join(SOURCES)}, got {self.source!r}"
            )
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"scale factor must be finite and > 0, got {self.factor!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready ``result.info["scale"]`` record.

        ``factor``, ``source``, ``applied``, ``frame_periods_px`` and
        ``model_periods_px`` (lists of pixels, strongest first, or None),
        ``frame_pixel_size``, ``model_pixel_size``, ``unit``, ``frame_unit``,
        ``warning``, ``note`` and ``time_ms``; ``frame_lattice`` says why the frame's
        periods could not be measured, when they could not.
        """
        record: dict[str, Any] = {
            "factor": float(self.factor),
            "source": self.source,
            "applied": bool(self.applied),
            "frame_periods_px": _periods(self.frame_periods),
            "model_periods_px": _periods(self.model_periods),
            "frame_pixel_size": self.frame_pixel_size,
            "model_pixel_size": self.model_pixel_size,
            "unit": self.unit,
            "frame_unit": self.frame_unit,
            "warning": self.warning,
            "note": self.note,
            "time_ms": float(self.time_ms),
        }
        if self.frame_periods is not None and not self.frame_periods.measurable:
            record["frame_lattice"] = self.frame_periods.reason
        return record


def _periods(periods: LatticePeriods | None) -> list[float] | None:
    if periods is None or not periods.measurable:
        return None
    return [float(p) for p in periods.periods]


def _pixel_size(calibration: Any) -> tuple[float | None, str | None, str | None]:
    """``(size, unit, problem)`` of a frame's calibration: its pixel side (the geometric
    mean of its height and width), its unit, and a warning text for one that is unusable."""
    if calibration is None:
        return None, None, None
    unit = getattr(calibration, "unit", None)
    if is_pixel_unit(unit):
        return None, None, None
    try:
        sy, sx = (float(v) for v in calibration.scale)
    except (TypeError, ValueError, AttributeError):
        scale = getattr(calibration, "scale", None)
        return None, unit, f"the frame's pixel size {scale!r} is no pair of numbers"
    if not all(math.isfinite(v) and v > 0 for v in (sy, sx)):
        return (
            None,
            unit,
            (f"the frame's pixel size ({sy:g}, {sx:g}) {unit} is not a finite number > 0"),
        )
    return math.sqrt(sy * sx), unit, None


def decide_scale(
    frame: np.ndarray,
    calibration: Any,
    model_scale: ModelScale | None,
    option: str | float = "auto",
    min_side: int = 1,
) -> ScaleDecision:
    """The zoom that brings ``frame`` to the scale of the model's patches.

    Parameters
    ----------
    frame : ndarray, shape (H, W)
        The frame (or the part of it that is mapped); an ``np.memmap`` is read in at
        most 16 tiles of 256 x 256 px when its lattice is measured.
    calibration : Calibration or None
        The frame's; a ``px`` unit counts as none.
    model_scale : ModelScale or None
        ``engine.config.scale``; None for a model trained before scale matching.
    option : 'auto', 'off' or float
        :attr:`MapOptions.scale <defectscope.maps.options.MapOptions.scale>`.
    min_side : int
        The least side the resampled frame may have (the model's patch): a measured
        factor that shrinks the frame below it is not applied (with a warning).

    Returns
    -------
    ScaleDecision
        Warnings are logged once here (``defectscope`` logger) and kept in it.

    Raises
    ------
    ValueError
        For an ``option`` that is none of the above (MapOptions refuses it first), and
        for a user's factor that leaves the frame smaller than ``min_side``.
    """
    started = time.perf_counter()
    shape = tuple(np.shape(frame))
    decision = _decide(frame, calibration, model_scale, option)
    if decision.applied:
        low = min(resampled_shape(shape, decision.factor)) if min(shape) > 0 else 0
        if low < min_side:
            what = (
                f"the frame ({shape[0]} x {shape[1]} px) resampled by {decision.factor:.3g} "
                f"is smaller than the {min_side} px patch"
            )
            if decision.source == "user":
                raise ValueError(f"scale {decision.factor:g}: {what}")
            warning = "; ".join(filter(None, [decision.warning, f"{what}: mapped unscaled"]))
            decision = dataclasses.replace(decision, applied=False, warning=warning)
    decision = dataclasses.replace(decision, time_ms=(time.perf_counter() - started) * 1000)
    if decision.warning:
        log.warning("scale: %s", decision.warning)
    elif decision.note and option != "off":  # asked for: nothing to say
        log.info("scale: %s", decision.note)
    return decision


def _decide(frame, calibration, model_scale, option) -> ScaleDecision:
    if option == "off":
        return ScaleDecision(note="scale matching is off")
    model_periods = None
    model_size = model_unit = None
    if model_scale is not None:
        model_periods = model_scale.lattice
        if model_scale.pixel_size is not None and not is_pixel_unit(model_scale.unit):
            model_size, model_unit = float(model_scale.pixel_size), model_scale.unit
    frame_size, frame_unit, problem = _pixel_size(calibration)
    unit = model_unit or frame_unit
    shown_size = frame_size
    if frame_size is not None and model_unit is not None:
        converted = convert(frame_size, frame_unit, model_unit)
        if converted is not None:
            shown_size = converted
    common = {
        "model_periods": model_periods,
        "frame_pixel_size": shown_size,
        "model_pixel_size": model_size,
        "unit": unit,
        "frame_unit": frame_unit,
    }
    if not isinstance(option, str):
        if isinstance(option, bool) or not isinstance(option, int | float | np.floating):
            raise ValueError(f"scale must be 'auto', 'off' or a factor, got {option!r}")
        factor = float(option)
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"scale factor must be finite and > 0, got {option!r}")
        return ScaleDecision(factor, "user", factor != 1.0, **common)
    if option != "auto":
        raise ValueError(f"scale must be 'auto', 'off' or a factor, got {option!r}")
    if model_scale is None:
        return ScaleDecision(
            note="the model records no scale (trained before scale matching): mapped unscaled",
            **common,
        )
    problems = [problem] if problem else []
    # 2. the calibration, when both sides have a pixel size that converts
    if shown_size is not None and model_size is not None:
        if unit_metres(frame_unit) is not None and unit_metres(model_unit) is not None:
            factor = shown_size / model_size
            return _checked(ScaleDecision(factor, "calibration", True, **common), problems)
        problems.append(
            f"the frame's unit {frame_unit!r} does not convert to the model's {model_unit!r}"
        )
    # 3. the lattice
    if model_periods is None or not model_periods.measurable:
        why = (
            "the model records no lattice period"
            if model_periods is None
            else "the model's patches showed no lattice period"
        )
        if problems:  # something the user gave was not usable: say so
            warning = "; ".join([*problems, f"{why}: mapped unscaled"])
            return ScaleDecision(warning=warning, **common)
        calibrated = "" if shown_size is None or model_size is not None else " or pixel size"
        return ScaleDecision(note=f"{why}{calibrated} to match: mapped unscaled", **common)
    frame_periods = measure_frame_periods(frame)
    common["frame_periods"] = frame_periods
    if not frame_periods.measurable:
        problems.append(
            f"no lattice period measurable in the frame ({frame_periods.reason}): mapped unscaled"
        )
        return ScaleDecision(warning="; ".join(problems), **common)
    factor = match_scale(model_periods, frame_periods)
    if factor is None or not (math.isfinite(factor) and factor > 0):
        problems.append(
            f"the frame's lattice periods {_px(frame_periods)} match none of the model's "
            f"{_px(model_periods)}: mapped unscaled"
        )
        return ScaleDecision(warning="; ".join(problems), **common)
    # A factor that stays unapplied after any correction the refinement can make is not
    # refined: frames at the model's scale, the common case, pay nothing for it.
    if abs(math.log(factor)) > math.log1p(NEGLIGIBLE) - math.log1p(REFINE_LIMIT / 2):
        factor = refine_factor(frame, factor, model_periods)
    return _checked(ScaleDecision(factor, "lattice", True, **common), problems)


def refine_factor(frame: np.ndarray, factor: float, model_periods: LatticePeriods) -> float:
    """``factor`` corrected for what measuring on small patches does to a period.

    The model's periods come from its 64 px training patches, the frame's from 256 px
    tiles; a peak's sub-pixel position on a patch is off by a few tenths of a per cent
    (the window's lobe meets the neighbouring peaks and the centre's leakage), enough to
    move windows by a few pixels across a frame. So patches of the model's size are cut
    from the frame resampled by ``factor`` (:data:`REFINE_PATCHES` spread over it, each
    resampled alone from a small region, so a memmap is read in pieces) and measured
    as the training patches were; their match to the model's periods is the remaining
    correction. A correction beyond :data:`REFINE_LIMIT`, or none found, leaves
    ``factor`` as it is.
    """
    if model_periods.longest is None or not (SCALE_RANGE[0] <= factor <= SCALE_RANGE[1]):
        return factor
    side = round(model_periods.longest * LOBE_BINS)  # the training patches' side
    height, width = np.shape(frame)
    # region of the frame that resamples to a patch, with a margin for the spline
    reach = math.ceil(side / factor) + 8
    if side < 16 or min(height, width) < reach:
        return factor
    count = math.isqrt(REFINE_PATCHES)
    rows = np.linspace(0, height - reach, count).round().astype(int)
    cols = np.linspace(0, width - reach, count).round().astype(int)
    patches = []
    for y in np.unique(rows):
        for x in np.unique(cols):
            region = np.asarray(frame[y : y + reach, x : x + reach], dtype=np.float32)
            if not np.isfinite(region).all():
                continue
            zoomed = resample_frame(region, factor)
            top = (zoomed.shape[0] - side) // 2
            left = (zoomed.shape[1] - side) // 2
            patches.append(zoomed[top : top + side, left : left + side])
    if len(patches) < 4:
        return factor
    correction = match_scale(model_periods, measure_patch_periods(np.stack(patches)))
    if correction is None or abs(math.log(correction)) > math.log1p(REFINE_LIMIT):
        return factor
    return factor * correction


def _checked(decision: ScaleDecision, problems: list[str]) -> ScaleDecision:
    """``decision`` with its factor checked against the sane range and the 2 % rule."""
    f = decision.factor
    low, high = SCALE_RANGE
    if not low <= f <= high:
        problems.append(
            f"scale factor {f:.3g} from the {decision.source} is outside {low:g}-{high:g}: "
            "mapped unscaled"
        )
        return dataclasses.replace(decision, applied=False, warning="; ".join(problems))
    applied = abs(f - 1.0) >= NEGLIGIBLE
    return dataclasses.replace(decision, applied=applied, warning="; ".join(problems) or None)


def _px(periods: LatticePeriods) -> str:
    return "(" + ", ".join(f"{p:.2f}" for p in periods.periods) + " px)"


def describe(record: dict[str, Any] | None) -> str:
    """One line for a report or a summary from an ``info["scale"]`` record.

    ``"scale x1.12 from the lattice (frame 8.93 px, model 10.00 px)"``, ``"scale x1.01
    from the lattice (...), not applied (within 2% of 1)"``, ``"scale warning: no lattice
    period measurable in the frame (...): mapped unscaled"``.
    """
    if not record:
        return "scale: not recorded"
    factor, source = record.get("factor"), record.get("source")
    warning = record.get("warning")
    if source == "none" or factor is None:
        if warning:
            return f"scale warning: {warning}"
        return f"scale: {record.get('note') or 'mapped unscaled'}"
    if source == "lattice":
        frame, model = record.get("frame_periods_px"), record.get("model_periods_px")
        how = f" (frame {frame[0]:.2f} px, model {model[0]:.2f} px)" if frame and model else ""
        line = f"scale x{float(factor):.3g} from the lattice{how}"
    elif source == "calibration":
        unit = record.get("unit") or ""
        line = (
            f"scale x{float(factor):.3g} from the calibration (frame "
            f"{record['frame_pixel_size']:.4g} {unit}, model {record['model_pixel_size']:.4g} "
            f"{unit} per pixel)"
        )
    else:
        line = f"scale x{float(factor):.3g} given by the user"
    if not record.get("applied"):
        line += ", not applied"
        if not warning and abs(float(factor) - 1) < NEGLIGIBLE:
            line += f" (within {NEGLIGIBLE:.0%} of 1)"
    if warning:
        line += f"; warning: {warning}"
    return line


def memory_mapped(array: Any) -> bool:
    """Whether ``array`` (or an array it is a view of) lies in a memory-mapped file."""
    seen = 0
    while array is not None and seen < 64:
        if isinstance(array, np.memmap | mmap.mmap):
            return True
        array = getattr(array, "base", None)
        seen += 1
    return False


@contextlib.contextmanager
def resampled_frame(
    frame: np.ndarray, factor: float, directory: str | Path | None = None
) -> Iterator[np.ndarray]:
    """``frame`` zoomed by ``factor`` for the duration of a ``with`` block.

    A factor of exactly 1 yields ``frame`` itself. A memory-mapped frame (or a result
    over :data:`IN_MEMORY_BYTES`) is resampled band by band into a float32
    ``np.memmap`` in a temporary folder (in ``directory``, default the system's
    temporary folder: ``TMPDIR``), deleted when the block ends, so a frame too large
    for memory is never held there, neither whole nor twice. Otherwise the result is
    an in-memory float32 array.

    Raises
    ------
    ValueError
        As :func:`~defectscope.tiling.resample.resample_frame` (a factor that leaves
        no pixel, a frame that is no 2-D array of numbers).
    """
    if factor == 1.0:
        yield frame
        return
    shape = resampled_shape(np.shape(frame), factor)
    if not (memory_mapped(frame) or shape[0] * shape[1] * 4 > IN_MEMORY_BYTES):
        yield resample_frame(frame, factor)
        return
    folder = Path(tempfile.mkdtemp(prefix="defectscope-scale-", dir=directory))
    try:
        out = np.memmap(folder / "resampled.float32", dtype=np.float32, mode="w+", shape=shape)
        resample_frame(frame, factor, out=out)
        yield out
    finally:
        # On POSIX the pages stay readable until the last view goes; the file is gone.
        shutil.rmtree(folder, ignore_errors=True)
