"""Simulated datasets: the settings, one frame, patches and the folder ``train`` reads.

A frame is made in four steps, each its own module: the crystal turned to a zone axis
and cut to the field (:mod:`~defectscope.simulate.specimen`), point defects placed in it
(:mod:`~defectscope.simulate.defects`), its atoms imaged by the ``fast`` or the
``multislice`` renderer (:mod:`~defectscope.simulate.renderers`), and the instrument's
distortions and noise (:mod:`~defectscope.simulate.instrument`), through which every
defect's position is carried into the recorded frame's pixels.
:func:`simulate_dataset` writes frames (calibrated TIFF), ``truth.json`` and patch
folders in the layout ``train`` reads, with each frame its own group so no patch leaks
across a split; :mod:`~defectscope.simulate.truth` reads and matches the truth.

Every setting is checked before any work (:meth:`SimulationSettings.check`, then the
crystal and the field's cost), and the dataset is made in a staging folder renamed into
place at the end: a folder with a ``truth.json`` is always a whole dataset.

ASE and abTEM are the optional ``simulate`` extra; :func:`render_incoherent` and
:func:`acquire` need only numpy and scipy. The names that lived here before the split
(``DefectSpec``, ``build_specimen``, ``acquire``, ``match_regions``, ...) are still
importable from this module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.io.files import atomic_write_bytes, atomic_write_json, staging_dir
from defectscope.simulate.defects import (
    DEFECT_KINDS,
    DefectSpec,
    PlacedDefect,
    parse_defects,
    place_defects,
)
from defectscope.simulate.instrument import MAX_DOSE, Instrument, acquire
from defectscope.simulate.renderers import (
    Multislice,
    electron_wavelength,
    render_incoherent,
    render_multislice,
)
from defectscope.simulate.specimen import (
    BUILTIN_STRUCTURES,
    MAX_ATOMS,
    Specimen,
    build_specimen,
    load_structure,
    parse_zone,
    specimen_atoms,
)
from defectscope.simulate.truth import match_pairs, match_regions, read_truth

__all__ = [
    "BUILTIN_STRUCTURES",
    "DEFECT_KINDS",
    "MAX_ATOMS",
    "MAX_DOSE",
    "MAX_FIELD_SIDE",
    "MAX_SIZE",
    "UNITS_PER_ANGSTROM",
    "DefectSpec",
    "Instrument",
    "Multislice",
    "PlacedDefect",
    "SimulationSettings",
    "Specimen",
    "acquire",
    "build_specimen",
    "cut_patches",
    "electron_wavelength",
    "load_structure",
    "match_pairs",
    "match_regions",
    "parse_defects",
    "parse_zone",
    "place_defects",
    "read_truth",
    "recorded_settings",
    "render_incoherent",
    "render_multislice",
    "simulate_dataset",
    "simulate_frame",
]

log = logging.getLogger(__name__)

UNITS_PER_ANGSTROM = {"nm": 0.1, "Å": 1.0, "A": 1.0, "pm": 100.0}
# Largest frame side; larger fields are simulated as tiles.
MAX_SIZE = 16384
# Largest rendered side: the frame plus the scan margin (drift and jitter) on both
# sides; the clean image alone is 8 bytes a pixel (3.2 GB at this side).
MAX_FIELD_SIDE = 20000
# Beam energies abTEM's relativistic wavelength and potentials are meant for.
_ENERGY_RANGE_EV = (1e3, 1e7)


@dataclasses.dataclass(frozen=True)
class SimulationSettings:
    """Everything :func:`simulate_dataset` needs; lengths in ``unit``.

    ``vary`` draws each frame's probe FWHM, thickness, dose and column fraction from
    ``value * U(1 - vary, 1 + vary)`` (the Z exponent a quarter as much, or uniformly
    from ``exponent_range``), so a model trained on the frames does not learn one
    microscope's settings. The exponent sets how columns of different Z compare; in
    multislice HAADF of SrTiO3 the Ti-O columns come out fainter against Sr than
    ``Z ** 1.7`` says (channelling), so a wide range covers what the fast model misses.
    ``column_scatter`` (fast renderer) multiplies each projected column's intensity by
    its own factor ``N(1, column_scatter)`` (clipped to 0.5-1.5): columns of one kind
    differ in multislice and in real frames (channelling, static displacements, surface
    layers) by about 10 %, against 5 % from shot noise alone, and a model that never saw
    that calls a dim bulk column a vacancy.
    """

    structure: str = dataclasses.field(
        default="srtio3", metadata={"help": "srtio3, cdte or a file ASE reads (CIF)"}
    )
    zone: tuple[int, int, int] = dataclasses.field(
        default=(0, 0, 1), metadata={"help": "zone axis [uvw] along the beam"}
    )
    pixel_size: float = dataclasses.field(default=0.02, metadata={"help": "pixel size in --unit"})
    unit: str = dataclasses.field(
        default="nm",
        metadata={"help": "length unit of the settings", "choices": ("nm", "Å", "A", "pm")},
    )
    probe_fwhm: float = dataclasses.field(default=0.08, metadata={"help": "in --unit"})
    defects: str = dataclasses.field(
        default="vacancy",
        metadata={
            "help": "comma list: vacancy[:El], substitution:El>El, interstitial[:El], "
            "antisite[:El>El]; vacancy without El: every element with Z >= 0.3 of the "
            "heaviest's (lighter ones do not show in HAADF)"
        },
    )
    frames: int = dataclasses.field(default=4, metadata={"help": "number of frames"})
    size: int = dataclasses.field(default=1024, metadata={"help": "frame side in pixels"})
    thickness: float = dataclasses.field(
        default=8.0, metadata={"help": "specimen thickness in --unit"}
    )
    defects_per_frame: int | None = dataclasses.field(
        default=None, metadata={"help": "default: one per (2.5 patches)^2"}
    )
    column_fraction: float = dataclasses.field(
        default=0.5,
        metadata={
            "help": "share of a column's atoms of the species a vacancy/substitution takes "
            "(>= 1 atom)"
        },
    )
    exponent: float = dataclasses.field(
        default=1.7,
        metadata={
            "help": "fast renderer: Z ** EXPONENT where no exponent range is set (Python: "
            "exponent_range=None; on the command line --exponent-range E E fixes it)"
        },
    )
    # The randomized ranges are the defaults: a model trained on one exponent and
    # identical columns found 3 of 15 vacancies in multislice frames (issue 28).
    exponent_range: tuple[float, float] | None = dataclasses.field(
        default=(1.5, 3.2),
        metadata={
            "help": "fast renderer: draw each frame's exponent from [LO, HI] "
            "(domain randomization)",
            "metavar": ("LO", "HI"),
        },
    )
    column_scatter: float = dataclasses.field(
        default=0.05,
        metadata={
            "help": "fast renderer: each column's intensity times N(1, S), clipped to 0.5-1.5"
        },
    )
    renderer: str = dataclasses.field(
        default="fast",
        metadata={
            "help": "fast (incoherent) or multislice (abTEM)",
            "choices": ("fast", "multislice"),
        },
    )
    patch_size: int = dataclasses.field(default=64, metadata={"help": "patch side in pixels"})
    patches_per_defect: int = dataclasses.field(
        default=4, metadata={"help": "patches cut around each defect"}
    )
    # A map's windows beside a defect see part of it off-centre; Bulk patches that never
    # hold one leave those windows unlike every class (the unknown rings round defects).
    # On by default since the lattice residual of a simulated training looks at the
    # patch centres (training.loop.train_from_simulated), so it no longer learns from
    # them that a defect is Bulk.
    bulk_near_defects: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "Bulk patches may hold a defect outside their central square of half "
            "their side, as a map's windows beside a defect do, half of them placed beside "
            "one (default: on; --no-bulk-near-defects: no defect anywhere in a Bulk patch, "
            "as before 2026-12-05)"
        },
    )
    vary: float = dataclasses.field(
        default=0.2,
        metadata={
            "help": "draw each frame's probe, thickness, dose, column fraction within +-VARY"
        },
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed"})
    instrument: Instrument = dataclasses.field(
        default=Instrument(),
        metadata={"help": "scan and detector: dose, jitter, drift, gradient (see Instrument)"},
    )
    multislice: Multislice = dataclasses.field(
        default=Multislice(),
        metadata={"help": "abTEM settings: energy, phonons, PRISM, scan sampling (see Multislice)"},
    )

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range (NaN and inf included).

        Cheap (no crystal is read); :func:`simulate_dataset` then checks the crystal,
        the defects and the field's cost before it writes anything.
        """
        if self.unit not in UNITS_PER_ANGSTROM:
            raise ValueError(f"unit {self.unit!r}: one of {', '.join(UNITS_PER_ANGSTROM)}")
        if not isinstance(self.structure, str | os.PathLike) or not str(self.structure):
            raise ValueError(f"structure {self.structure!r}: a name or a file")
        if not isinstance(self.defects, str):
            raise ValueError(f"defects {self.defects!r}: a comma list such as 'vacancy'")
        parse_zone(self.zone)
        for name in ("frames", "size", "patch_size", "patches_per_defect", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"{name.replace('_', ' ')} must be an integer, got {value!r}")
        if not isinstance(self.bulk_near_defects, bool):
            raise ValueError(
                f"bulk near defects must be true or false, got {self.bulk_near_defects!r}"
            )
        count = self.defects_per_frame
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0
        ):
            raise ValueError(f"defects per frame must be an integer >= 0, got {count!r}")
        for name in ("pixel_size", "probe_fwhm", "thickness", "exponent"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', ' ')} must be positive, got {value}")
        if self.exponent > 4:
            raise ValueError(f"exponent must be in (0, 4], got {self.exponent}")
        if not 0 < self.column_fraction <= 1:
            raise ValueError(f"column fraction must be in (0, 1], got {self.column_fraction}")
        if self.renderer not in ("fast", "multislice"):
            raise ValueError(f"renderer {self.renderer!r}: fast or multislice")
        if self.exponent_range is not None and not (
            len(self.exponent_range) == 2
            and all(math.isfinite(v) and 0 < v <= 4 for v in self.exponent_range)
            and self.exponent_range[0] <= self.exponent_range[1]
        ):
            raise ValueError(f"exponent range must be 0 < LO <= HI <= 4, got {self.exponent_range}")
        if not 0 <= self.vary < 1:
            raise ValueError(f"vary must be in [0, 1), got {self.vary}")
        if not 0 <= self.column_scatter <= 0.5:
            raise ValueError(f"column scatter must be in [0, 0.5], got {self.column_scatter}")
        if self.frames < 1 or self.patches_per_defect < 1:
            raise ValueError("frames and patches per defect must be at least 1")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.size > MAX_SIZE:
            raise ValueError(f"frame size {self.size} is over {MAX_SIZE} pixels; simulate tiles")
        if self.size < 2 * self.patch_size:
            raise ValueError(f"frame size {self.size} must be at least twice the patch size")
        if self.patch_size < 16:
            raise ValueError(f"patch size must be at least 16, got {self.patch_size}")
        # The widest probe a frame can draw (vary) must fit the frame, or the image is
        # a blur and its kernel larger than the image.
        widest = self.probe_fwhm * (1 + self.vary) / self.pixel_size
        if not widest <= self.size:
            raise ValueError(
                f"probe FWHM {self.probe_fwhm:g} {self.unit} at pixel size {self.pixel_size:g} "
                f"{self.unit} is {widest:.4g} pixels, wider than the {self.size}-pixel frame; "
                "raise --pixel-size or lower --probe-fwhm"
            )
        self.instrument.check()
        side = self.size + 2 * self.instrument.margin()
        if side > MAX_FIELD_SIDE:
            raise ValueError(
                f"the frame plus its scan margin for drift and jitter is {side} pixels a side "
                f"({self.size} + 2 x {self.instrument.margin()}), over the limit of "
                f"{MAX_FIELD_SIDE}; lower --size, --drift or --jitter"
            )
        # Defects go where the distortions cannot move them out of the frame or closer
        # than half a patch to its edge (see simulate_frame): that band must exist.
        margin = self.instrument.margin()
        if self.defects_per_frame != 0 and self.size <= 2 * margin + self.patch_size + 4:
            raise ValueError(
                f"drift {tuple(self.instrument.drift)} and jitter {self.instrument.jitter} "
                f"pixels need a margin of {margin} pixels on each side: a {self.size}-pixel "
                f"frame leaves no room for a defect's patch (it must be over 2 x {margin} + "
                f"{self.patch_size} + 4); lower --drift or raise --size"
            )
        self._check_multislice()

    def _check_multislice(self) -> None:
        ms = self.multislice
        lo, hi = _ENERGY_RANGE_EV
        if not (math.isfinite(ms.energy) and lo <= ms.energy <= hi):
            raise ValueError(
                f"energy must be {lo / 1e3:g} to {hi / 1e3:g} keV, got {ms.energy / 1e3:g} keV"
            )
        for name in ("potential_sampling", "slice_thickness", "detector_inner"):
            value = getattr(ms, name)
            if not (math.isfinite(value) and value > 0):
                label = name.replace("_", " ")
                raise ValueError(f"multislice {label} must be positive, got {value}")
        if not (math.isfinite(ms.phonon_sigma) and ms.phonon_sigma >= 0):
            raise ValueError(f"phonon sigma must be >= 0, got {ms.phonon_sigma}")
        if ms.detector_outer is not None and not (
            math.isfinite(ms.detector_outer) and ms.detector_outer > 0
        ):
            raise ValueError(f"detector outer angle must be positive, got {ms.detector_outer}")
        if ms.phonons < 0 or ms.prism_interpolation < 0:
            raise ValueError("phonon configurations and PRISM interpolation must be >= 0")
        if ms.scan_sampling is not None and not (0 < ms.scan_sampling < 1e3):
            raise ValueError(f"scan sampling must be positive, got {ms.scan_sampling} Å")
        if self.renderer == "multislice" and ms.scan_sampling is not None:
            span = (self.size + 2 * self.instrument.margin()) * _angstrom(self, self.pixel_size)
            if span / ms.scan_sampling > MAX_SIZE:
                raise ValueError(
                    f"scan sampling {ms.scan_sampling:g} Å makes {span / ms.scan_sampling:.4g} "
                    f"scan positions a side, over the limit of {MAX_SIZE}"
                )


def _angstrom(settings: SimulationSettings, value: float) -> float:
    return value / UNITS_PER_ANGSTROM[settings.unit]


def _prepare(settings: SimulationSettings) -> tuple[Any, list[DefectSpec]]:
    """The crystal and the defects, after every check that needs them: the frame spans
    at least a unit cell, the thinnest slab holds atoms, and the field's atoms stay
    under :data:`MAX_ATOMS` (the cost of every later step)."""
    settings.check()
    atoms = load_structure(settings.structure)
    specs = parse_defects(settings.defects, sorted(set(atoms.get_chemical_symbols())))
    pixel = _angstrom(settings, settings.pixel_size)
    cell = abs(float(atoms.cell.volume)) ** (1 / 3)
    span = settings.size * pixel
    if span < cell:
        raise ValueError(
            f"pixel size {settings.pixel_size:g} {settings.unit}: the {settings.size}-pixel "
            f"frame spans {span:.3g} Å, less than one unit cell ({cell:.3g} Å); raise "
            "--pixel-size or --size"
        )
    margin = settings.instrument.margin()
    side = settings.size + 2 * margin
    extent = (side * pixel, side * pixel)
    thickest = _angstrom(settings, settings.thickness * (1 + settings.vary))
    cost = specimen_atoms(atoms, settings.zone, extent, thickest)
    if cost > MAX_ATOMS:
        raise ValueError(
            f"the {side}-pixel field ({settings.size} + 2 x {margin} for drift and jitter) of "
            f"{extent[0]:.4g} Å, {thickest:.4g} Å thick, needs {cost:.3g} atoms, over the "
            f"limit of {MAX_ATOMS:.0e}; lower --size, --pixel-size, --thickness or --drift"
        )
    thinnest = _angstrom(settings, settings.thickness * (1 - settings.vary))
    small = min(extent[0], 4 * cell)
    try:  # a few cells suffice to see whether the slab holds an atom layer
        build_specimen(atoms, settings.zone, (small, small), thinnest)
    except ValueError:
        raise ValueError(
            f"thickness {settings.thickness:g} {settings.unit}: a slab {thinnest:.3g} Å thick "
            f"holds no atom of {settings.structure} along {list(settings.zone)}; make it thicker"
        ) from None
    return atoms, specs


def simulate_frame(settings: SimulationSettings, index: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One recorded frame and its record: ``defects`` (positions in frame pixels and in
    ``unit``), ``lattice_spacing`` (``unit``) and the frame's drawn ``conditions``.

    Raises
    ------
    ValueError
        Naming the setting out of range (see :meth:`SimulationSettings.check`), or when
        the field has no room for the defects asked for.
    """
    atoms, specs = _prepare(settings)
    rng = np.random.default_rng([settings.seed, index])

    def vary() -> float:
        return float(rng.uniform(1 - settings.vary, 1 + settings.vary))

    conditions = {
        "probe_fwhm": settings.probe_fwhm * vary(),
        "exponent": (
            float(rng.uniform(*settings.exponent_range))
            if settings.exponent_range
            else settings.exponent * (1 + (vary() - 1) / 4)
        ),
        "thickness": settings.thickness * vary(),
        "dose": settings.instrument.dose * vary(),
        "column_fraction": min(1.0, settings.column_fraction * vary()),
    }
    instrument = dataclasses.replace(settings.instrument, dose=conditions["dose"])
    pixel = _angstrom(settings, settings.pixel_size)
    margin = instrument.margin()
    side = settings.size + 2 * margin
    extent = (side * pixel, side * pixel)
    thickness = _angstrom(settings, conditions["thickness"])
    specimen = build_specimen(atoms, settings.zone, extent, thickness)
    count = settings.defects_per_frame
    if count is None:  # one defect per (2.5 patches)^2, so their patches stay apart
        count = max(len(specs), int((settings.size / (2.5 * settings.patch_size)) ** 2))
    placed = place_defects(
        specimen,
        specs,
        count,
        # The scan distortions move a site by up to the margin again.
        margin=(2 * margin + settings.patch_size / 2 + 2) * pixel,
        separation=1.25 * settings.patch_size * pixel,
        column_fraction=conditions["column_fraction"],
        rng=rng,
    )
    origin = (0.0, 0.0)
    if settings.renderer == "fast":
        atom_scale = None
        if settings.column_scatter > 0:
            _, column = specimen.columns()
            factor = rng.normal(1.0, settings.column_scatter, column.max() + 1)
            atom_scale = np.clip(factor, 0.5, 1.5)[column]
        clean = render_incoherent(
            specimen.positions, specimen.numbers, (side, side), pixel,
            _angstrom(settings, conditions["probe_fwhm"]), origin, conditions["exponent"],
            atom_scale,
        )  # fmt: skip
    else:
        clean = render_multislice(
            specimen, (side, side), pixel, _angstrom(settings, conditions["probe_fwhm"]), origin,
            settings.multislice, seed=int(rng.integers(2**31)),
        )  # fmt: skip
    frame, to_frame = acquire(clean, margin, instrument, rng)
    per_unit = UNITS_PER_ANGSTROM[settings.unit]
    defects = []
    for d in placed:
        row, col = to_frame(d.y / pixel - margin, d.x / pixel - margin)
        defects.append(
            {
                "type": d.spec.label,
                "kind": d.spec.kind,
                "species": d.spec.species,
                "replacement": d.spec.replacement,
                "atoms_changed": d.atoms_changed,
                "column_atoms": d.column_atoms,
                "row": float(row),
                "col": float(col),
                "y": float(row) * settings.pixel_size,
                "x": float(col) * settings.pixel_size,
            }
        )
    spacing = specimen.lattice_spacing * per_unit
    return frame, {"defects": defects, "lattice_spacing": spacing, "conditions": conditions}


# With bulk_near_defects, the share of Bulk patches placed beside a defect (the rest lie
# anywhere clear): drawn uniformly, too few hold one for the feature density to learn what
# a window beside a defect sees, and those windows stay unknown (issue 26's rings).
BESIDE_DEFECT_SHARE = 0.5


def cut_patches(
    frame: np.ndarray,
    defects: list[dict[str, Any]],
    patch_size: int,
    per_defect: int,
    rng: np.random.Generator,
    bulk_near_defects: bool = False,
) -> list[tuple[str, np.ndarray]]:
    """``(class, patch)`` pairs: patches around each defect (shifted up to an eighth of a
    patch) and as many ``Bulk`` patches per frame as the average defect class has, placed
    where no defect lies within the patch (and 4 pixels around it), or, with
    ``bulk_near_defects``, where none lies in its central square of half its side (a
    quarter of a patch from its centre along either axis, and at least an eighth plus 8
    pixels: beyond the defect patches' shift and training's), so Bulk also holds what a
    window beside a defect sees: then :data:`BESIDE_DEFECT_SHARE` of them are placed
    beside a defect drawn at random (it lies between that clearance and 4 pixels past the
    patch's edge along the farther axis, uniformly), the rest anywhere clear."""
    from scipy.spatial import cKDTree

    if not isinstance(bulk_near_defects, bool):
        raise TypeError(f"bulk_near_defects must be true or false, got {bulk_near_defects!r}")

    height, width = frame.shape
    half = patch_size // 2
    out: list[tuple[str, np.ndarray]] = []
    centres = np.array([(d["row"], d["col"]) for d in defects]).reshape(-1, 2)

    def crop(row: float, col: float) -> np.ndarray | None:
        top, left = int(np.rint(row)) - half, int(np.rint(col)) - half
        if top < 0 or left < 0 or top + patch_size > height or left + patch_size > width:
            return None
        return frame[top : top + patch_size, left : left + patch_size]

    shift = max(patch_size // 8, 1)
    for d in defects:
        for _ in range(per_defect):
            dy, dx = rng.integers(-shift, shift + 1, size=2)
            patch = crop(d["row"] + dy, d["col"] + dx)
            if patch is not None:
                out.append((d["type"], patch))
    kinds = {d["type"] for d in defects}
    wanted = len(out) // max(len(kinds), 1)
    # Beyond the defect patches' shift (an eighth) plus training's shift of up to 4 px
    # twice over, so a shifted Bulk patch never holds a defect where a defect patch does.
    clear = max(patch_size // 4, shift + 8) if bulk_near_defects else half + 4
    # Nearest defect in the max norm by a KD-tree: a draw costs log(defects), not defects.
    tree = cKDTree(centres) if len(centres) else None
    beside = round(wanted * BESIDE_DEFECT_SHARE) if bulk_near_defects and len(centres) else 0
    reach = half + 4  # up to just past the patch's edge
    bulk, tries = 0, 50 * max(wanted, 1)
    for attempt in range(tries):
        if bulk >= wanted:
            break
        # Half the tries at most for those beside a defect, so a frame with no room
        # beside its defects still gets its Bulk patches from anywhere clear.
        if bulk < beside and attempt < tries // 2:
            offset = rng.uniform(-reach, reach, size=2)
            if np.abs(offset).max() < clear:
                continue
            row, col = centres[rng.integers(len(centres))] + offset
        else:
            row, col = rng.uniform(half, height - half), rng.uniform(half, width - half)
        if tree is not None and tree.query((row, col), p=np.inf)[0] < clear:
            continue
        patch = crop(row, col)
        if patch is not None:
            out.append(("Bulk", patch))
            bulk += 1
    return out


def _write_tiff(path: Path, frame: np.ndarray, pixel_size: float, unit: str) -> None:
    import io as _io

    import tifffile

    buffer = _io.BytesIO()
    tifffile.imwrite(
        buffer,
        frame,
        imagej=True,
        resolution=(1 / pixel_size, 1 / pixel_size),
        metadata={"unit": "A" if unit == "Å" else unit, "axes": "YX"},
    )
    atomic_write_bytes(path, buffer.getvalue())


def simulate_dataset(
    settings: SimulationSettings, out: str | os.PathLike, progress: bool = True
) -> dict[str, Any]:
    """Write ``frames``, ``truth.json`` and ``patches/<Class>/`` (+ ``groups.json``) to ``out``.

    Everything is checked before any work: the settings, the crystal, the defects, the
    field's cost, and that ``out`` holds no dataset (no ``truth.json``, no files in
    ``frames/`` or ``patches/``). The dataset is made in a staging folder beside
    ``out`` (``.NAME.partial-*``, its ``truth.json`` rewritten after every frame) and
    moved into place when the last frame is done, ``truth.json`` last: ``out`` holds a
    dataset only when it is whole. A run that fails or is interrupted after a frame
    leaves the staging folder with what it made, and says where.

    Returns
    -------
    dict
        The truth record written to ``out/truth.json``.

    Raises
    ------
    ValueError
        Naming the setting out of range, or ``out`` when it already holds a dataset.
    """
    from tqdm import tqdm

    _, specs = _prepare(settings)
    settings_record = _settings_record(settings)
    out = Path(out)
    _refuse_existing(out)
    target = out.resolve()
    stage = staging_dir(target.parent, f".{target.name}.partial-")
    rng = np.random.default_rng([settings.seed, 1 << 20])
    frames, groups, lattice_spacing = [], {}, None
    counts: dict[str, int] = {}
    started = time.perf_counter()
    try:
        (stage / "frames").mkdir()
        bar = tqdm(
            range(settings.frames), desc=f"simulate ({settings.renderer})", disable=not progress
        )
        for index in bar:
            frame, frame_record = simulate_frame(settings, index)
            defects, lattice_spacing = frame_record["defects"], frame_record["lattice_spacing"]
            name = f"frame_{index:04d}.tif"
            _write_tiff(stage / "frames" / name, frame, settings.pixel_size, settings.unit)
            for n, (label, patch) in enumerate(
                cut_patches(
                    frame,
                    defects,
                    settings.patch_size,
                    settings.patches_per_defect,
                    rng,
                    settings.bulk_near_defects,
                )
            ):
                relative = f"{label}/frame{index:04d}_{n:05d}.tif"
                target_file = stage / "patches" / relative
                target_file.parent.mkdir(parents=True, exist_ok=True)
                _write_tiff(target_file, patch, settings.pixel_size, settings.unit)
                groups[relative] = index
                counts[label] = counts.get(label, 0) + 1
            frames.append({"file": f"frames/{name}", "shape": list(frame.shape), **frame_record})
            seconds = time.perf_counter() - started
            record = {
                "settings": settings_record,
                # What the defects text meant when this ran (its meaning can change:
                # bare 'vacancy' once included invisible light-element vacancies).
                "defect_classes": [spec.label for spec in specs],
                "lattice_spacing": lattice_spacing,
                "unit": settings.unit,
                "frames": frames,
                "complete": index + 1 == settings.frames,
                "patches": counts,
                "seconds": seconds,
                "frames_per_minute": 60 * len(frames) / max(seconds, 1e-9),
            }
            # After every frame, so an interrupted run keeps the truth of what it wrote.
            atomic_write_json(stage / "patches" / "groups.json", groups)
            atomic_write_json(stage / "truth.json", record)
        _publish(stage, target)
    except BaseException:
        if frames:
            log.warning("simulate: the %d frames made so far are kept in %s", len(frames), stage)
        else:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    return record


def _refuse_existing(out: Path) -> None:
    """Refuse an ``out`` that holds a dataset, or a part of one, before any work."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; give an empty or new --out")
    if (out / "truth.json").exists():
        raise ValueError(
            f"{out}: already holds a simulated dataset (truth.json); give an empty or new --out"
        )
    for sub in ("frames", "patches"):
        path = out / sub
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"{path}: already holds files; give an empty or new --out")


def _publish(stage: Path, target: Path) -> None:
    """Move the finished dataset from ``stage`` to ``target``, ``truth.json`` last."""
    try:
        os.rename(stage, target)  # absent or empty: the dataset appears whole, at once
        return
    except OSError:
        if not target.is_dir():
            raise
    # A folder that holds other files: move the parts in (an empty frames/ or patches/
    # there is replaced), truth.json last, so it is a dataset only once whole.
    _refuse_existing(target)  # nothing made it a dataset while this one was made
    for name in ("frames", "patches"):
        if (stage / name).exists():
            os.replace(stage / name, target / name)
    os.replace(stage / "truth.json", target / "truth.json")
    shutil.rmtree(stage, ignore_errors=True)


# Settings added after datasets were first written, with the value older datasets were
# made with: a truth.json without them still describes the same simulation.
_LATER_SETTINGS = {"bulk_near_defects": False}


def recorded_settings(truth: dict[str, Any]) -> dict[str, Any] | None:
    """A ``truth.json``'s settings, with settings added since filled in as they were made."""
    settings = truth.get("settings")
    if not isinstance(settings, dict):
        return None
    return {**_LATER_SETTINGS, **settings}


def _settings_record(settings: SimulationSettings) -> dict[str, Any]:
    record = dataclasses.asdict(settings)
    record["zone"] = list(settings.zone)
    try:
        return json.loads(json.dumps(record, allow_nan=False))
    except (TypeError, ValueError) as exc:  # check() refuses NaN; this names anything else
        raise ValueError(f"simulation settings cannot be recorded as JSON: {exc}") from None
