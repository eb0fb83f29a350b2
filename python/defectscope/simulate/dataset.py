"""Simulated STEM frames of a crystal with point defects at known places.

A crystal (a CIF file read by ASE, or the built-in SrTiO₃ and zinc-blende CdTe) is
turned so that its zone axis runs along the beam and cut to the scanned field and a
thickness; point defects then change atoms of chosen columns (vacancies and
substitutions take from one atom up to the whole column; interstitials sit at the
emptiest place between columns). Two renderers image the same atoms:

- ``fast``: incoherent HAADF, every atom contributes ``Z ** exponent`` at its projected
  position, convolved with a Gaussian probe (numpy + scipy only; a 1024² frame in about a
  second);
- ``multislice``: abTEM (``Potential``, ``Probe`` or PRISM ``SMatrix``, ``GridScan``,
  ``AnnularDetector``, optional ``FrozenPhonons``): slow, for fidelity on small fields.

The instrument then adds what it adds (:func:`acquire`): scan-line jitter, drift, a slow
intensity gradient, Poisson shot noise at a dose, gain, offset and read noise. Every
defect's position is carried through these distortions into the recorded frame's pixels.
:func:`simulate_dataset` writes frames (calibrated TIFF), ``truth.json`` and patch folders
in the layout ``train`` reads, with each frame its own group so no patch leaks across a
split.

ASE and abTEM are the optional ``simulate`` extra; :func:`render_incoherent` and
:func:`acquire` need only numpy and scipy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.io.files import atomic_write_bytes, atomic_write_json

DEFECT_KINDS = ("vacancy", "substitution", "interstitial", "antisite")
UNITS_PER_ANGSTROM = {"nm": 0.1, "Å": 1.0, "A": 1.0, "pm": 100.0}
# Built-in crystals: (species, fractional basis, space group, lattice parameter in Å).
BUILTIN_STRUCTURES = {
    "srtio3": (["Sr", "Ti", "O"], [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], 221, 3.905),
    "cdte": (["Cd", "Te"], [(0, 0, 0), (0.25, 0.25, 0.25)], 216, 6.481),
}
# Electron wavelength in Å at an energy in eV (relativistic).
_HC_KEV_A = 12.398419843320026
_ME_C2_KEV = 510.99895


def electron_wavelength(energy_ev: float) -> float:
    """Relativistic electron wavelength in Å."""
    e_kev = energy_ev / 1e3
    return _HC_KEV_A / math.sqrt(e_kev * (2 * _ME_C2_KEV + e_kev))


def _ase():
    try:
        import ase
        import ase.data
        import ase.io
        import ase.spacegroup
    except ImportError as exc:
        raise ImportError(
            "simulating a crystal needs ASE: pip install 'defectscope[simulate]'"
        ) from exc
    return ase


@dataclasses.dataclass(frozen=True)
class DefectSpec:
    """One kind of point defect to place.

    Attributes
    ----------
    kind : {'vacancy', 'substitution', 'interstitial', 'antisite'}
    species : str
        The element taken (vacancy), replaced (substitution, antisite) or added
        (interstitial).
    replacement : str, optional
        The element put in its place (substitution, antisite).
    """

    kind: str
    species: str
    replacement: str | None = None

    @property
    def label(self) -> str:
        """Class name of patches centred on this defect, e.g. ``Substitution_Ti_Nb``."""
        parts = [self.kind.capitalize(), self.species]
        if self.replacement:
            parts.append(self.replacement)
        return "_".join(parts)


def parse_defects(text: str, species_present: list[str]) -> list[DefectSpec]:
    """Defect kinds from ``vacancy,vacancy:Ti,substitution:Ti>Nb,interstitial,antisite``.

    Species left out are chosen from the crystal: the heaviest element for a vacancy or
    interstitial, the two heaviest (lighter replaced by heavier) for an antisite. A
    substitution must name both elements.

    Raises
    ------
    ValueError
        Naming the item that is not understood, an unknown element or one the crystal
        lacks.
    """
    ase = _ase()
    by_weight = sorted(set(species_present), key=lambda s: ase.data.atomic_numbers[s])
    specs: list[DefectSpec] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, _, arg = item.partition(":")
        kind = kind.strip().lower()
        if kind not in DEFECT_KINDS:
            raise ValueError(f"defect {item!r}: kind must be one of {', '.join(DEFECT_KINDS)}")
        old, _, new = arg.partition(">")
        old, new = old.strip(), new.strip()
        for element in (e for e in (old, new) if e):
            if element not in ase.data.atomic_numbers:
                raise ValueError(f"defect {item!r}: {element!r} is not a chemical element")
        if kind == "substitution" and not (old and new):
            raise ValueError(f"defect {item!r}: a substitution is written substitution:Ti>Nb")
        if kind == "antisite" and not old:
            if len(by_weight) < 2:
                raise ValueError(f"defect {item!r}: the crystal has one element, no antisite")
            old, new = by_weight[-2], by_weight[-1]
        if kind == "antisite" and not new:
            raise ValueError(f"defect {item!r}: an antisite is written antisite:Cd>Te")
        if kind in ("vacancy", "interstitial") and new:
            raise ValueError(f"defect {item!r}: a {kind} names one element")
        old = old or by_weight[-1]
        if kind != "interstitial" and old not in species_present:
            raise ValueError(
                f"defect {item!r}: the crystal has no {old} (it has {', '.join(by_weight)})"
            )
        specs.append(DefectSpec(kind, old, new or None))
    if not specs:
        raise ValueError("no defects given (e.g. --defects vacancy,interstitial)")
    if len({s.label for s in specs}) != len(specs):
        raise ValueError(f"defects {text!r}: a kind is given twice")
    return specs


def load_structure(structure: str | os.PathLike):
    """An ASE ``Atoms`` unit cell: ``srtio3``, ``cdte`` or a file ASE reads (CIF, ...).

    Raises
    ------
    ValueError
        When the file is missing or ASE cannot read a periodic crystal from it.
    """
    ase = _ase()
    name = str(structure)
    if name.lower() in BUILTIN_STRUCTURES:
        species, basis, group, a = BUILTIN_STRUCTURES[name.lower()]
        return ase.spacegroup.crystal(
            species, basis=basis, spacegroup=group, cellpar=[a, a, a, 90, 90, 90]
        )
    path = Path(name)
    if not path.is_file():
        raise ValueError(
            f"{path}: structure file not found (or give one of {', '.join(BUILTIN_STRUCTURES)})"
        )
    try:
        atoms = ase.io.read(path)
    except Exception as exc:  # ASE raises many types for unreadable files
        raise ValueError(
            f"{path}: ASE cannot read a structure ({type(exc).__name__}: {exc})"
        ) from exc
    if len(atoms) == 0 or abs(atoms.cell.volume) < 1e-6:
        raise ValueError(f"{path}: holds no periodic crystal (no atoms or no unit cell)")
    return atoms


def parse_zone(text: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """Zone axis ``[uvw]`` from ``"0,0,1"`` or ``"110"`` (single digits) or a tuple."""
    if isinstance(text, str):
        parts = text.replace(" ", "").split(",") if "," in text else list(text.strip("[]"))
        try:
            zone = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"zone axis {text!r}: write it as 0,0,1 or 110") from None
    else:
        zone = tuple(int(v) for v in text)
    if len(zone) != 3 or not any(zone):
        raise ValueError(f"zone axis {text!r}: three integers, not all zero")
    return zone  # type: ignore[return-value]


@dataclasses.dataclass
class Specimen:
    """Atoms of the field of view, the beam along +z, lengths in Å.

    Attributes
    ----------
    positions : ndarray, shape (n, 3)
        ``(x, y, z)``; the field is ``[0, extent[0]) x [0, extent[1])``, the slab
        ``[0, thickness)``.
    numbers : ndarray of int, shape (n,)
        Atomic numbers.
    extent : (float, float)
        Field size ``(x, y)``.
    thickness : float
    lattice_spacing : float
        Shortest in-plane distance between two columns of the same composition.
    """

    positions: np.ndarray
    numbers: np.ndarray
    extent: tuple[float, float]
    thickness: float
    lattice_spacing: float

    def columns(self, tolerance: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        """Projected column positions ``(m, 2)`` (x, y) and each atom's column index."""
        key = np.round(self.positions[:, :2] / tolerance).astype(np.int64)
        _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
        return self.positions[first, :2], inverse.ravel()


def _orientation(cell: np.ndarray, zone: tuple[int, int, int]) -> np.ndarray:
    """Rotation (rows ex, ey, ez) with ez along the zone and ex along a short lattice vector."""
    beam = np.asarray(zone, dtype=np.float64) @ cell
    ez = beam / np.linalg.norm(beam)
    grid = np.stack(np.meshgrid(*[np.arange(-3, 4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    vectors = grid @ cell
    length = np.linalg.norm(vectors, axis=1)
    perpendicular = (length > 1e-6) & (np.abs(vectors @ ez) < 1e-6 * np.maximum(length, 1))
    if perpendicular.any():
        ex = vectors[perpendicular][np.argmin(length[perpendicular])]
    else:  # an irrational zone of a low-symmetry cell: any perpendicular direction
        ex = np.cross(ez, [0.0, 0.0, 1.0] if abs(ez[2]) < 0.9 else [1.0, 0.0, 0.0])
    ex = ex - (ex @ ez) * ez
    ex /= np.linalg.norm(ex)
    return np.stack([ex, np.cross(ez, ex), ez])


def build_specimen(
    atoms, zone: tuple[int, int, int], extent: tuple[float, float], thickness: float
) -> Specimen:
    """Cut an oriented slab of ``atoms`` (an ASE unit cell) to a field and a thickness (Å).

    The field is filled with whole translations of the unit cell, so every column holds
    the atoms the crystal puts along ``thickness``.
    """
    if min(extent) <= 0 or thickness <= 0 or not all(map(math.isfinite, (*extent, thickness))):
        raise ValueError(f"field {extent} and thickness {thickness} must be positive, finite")
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    rotation = _orientation(cell, zone)
    box = np.array([extent[0], extent[1], thickness])
    corners = np.stack(np.meshgrid(*[[0.0, 1.0]] * 3, indexing="ij"), -1).reshape(-1, 3) * box
    # Lattice translations whose cell can reach the box: corners into fractional coordinates.
    frac = corners @ rotation @ np.linalg.inv(cell)
    lo, hi = np.floor(frac.min(0)) - 1, np.ceil(frac.max(0)) + 1
    count = np.prod(hi - lo + 1) * len(atoms)
    if count > 5e7:
        raise ValueError(f"field {extent} x {thickness} Å needs {count:.0f} atoms; make it smaller")
    translations = np.stack(
        np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
    ).reshape(-1, 3)
    basis = np.asarray(atoms.get_scaled_positions(wrap=True))
    crystal = ((translations[:, None, :] + basis[None]) @ cell).reshape(-1, 3)
    # A small offset keeps lattice planes off the box's faces, where rounding would decide.
    lab = crystal @ rotation.T + 0.05
    inside = np.all((lab >= 0) & (lab < box), axis=1)
    numbers = np.tile(np.asarray(atoms.numbers), len(translations))[inside]
    specimen = Specimen(lab[inside], numbers, (float(extent[0]), float(extent[1])), thickness, 0.0)
    specimen.lattice_spacing = _lattice_spacing(specimen)
    return specimen


def _lattice_spacing(specimen: Specimen) -> float:
    xy, column = specimen.columns()
    centre = np.asarray(specimen.extent) / 2
    signature = [tuple(sorted(specimen.numbers[column == c])) for c in range(len(xy))]
    ref = int(np.argmin(np.linalg.norm(xy - centre, axis=1)))
    same = np.array([s == signature[ref] for s in signature])
    same[ref] = False
    if not same.any():
        return float(max(specimen.extent))
    return float(np.linalg.norm(xy[same] - xy[ref], axis=1).min())


@dataclasses.dataclass
class PlacedDefect:
    """A defect put into a specimen: its kind, where (Å, in the field) and how many atoms."""

    spec: DefectSpec
    x: float
    y: float
    atoms_changed: int
    column_atoms: int


def place_defects(
    specimen: Specimen,
    specs: list[DefectSpec],
    count: int,
    margin: float,
    separation: float,
    column_fraction: float,
    rng: np.random.Generator,
) -> list[PlacedDefect]:
    """Change ``specimen`` in place: ``count`` defects, kinds in turn, at least
    ``separation`` Å apart and ``margin`` Å from the field's edges.

    ``column_fraction`` of the species' atoms in a column are taken or replaced (at
    least one); an interstitial adds that share of a column's atoms at the in-plane
    point farthest from every column near the chosen site.
    """
    ase = _ase()
    from scipy.spatial import cKDTree

    if not 0 < column_fraction <= 1:
        raise ValueError(f"column fraction must be in (0, 1], got {column_fraction}")
    xy, column = specimen.columns()
    tree = cKDTree(xy)
    lo, hi = margin, np.asarray(specimen.extent) - margin
    eligible = np.flatnonzero(np.all((xy >= lo) & (xy <= hi), axis=1))
    species_of = {spec.species: ase.data.atomic_numbers[spec.species] for spec in specs}
    members = [[] for _ in range(len(xy))]
    for atom, c in enumerate(column):
        members[c].append(atom)
    host = float(np.median([len(m) for m in members if m]))
    # Where an interstitial may go around a site: a 41 x 41 grid over one lattice spacing.
    grid = np.linspace(-0.5, 0.5, 41) * specimen.lattice_spacing
    offsets = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)

    def one_pass():
        # One random-order pass; the specimen changes only after a pass that fits all.
        placed: list[PlacedDefect] = []
        removed = np.zeros(len(specimen.numbers), dtype=bool)
        numbers = specimen.numbers.copy()
        added_positions, added_numbers = [], []
        first = int(rng.integers(len(specs)))  # kinds in turn, from a random one
        for c in rng.permutation(eligible):
            if len(placed) >= count:
                break
            spec = specs[(first + len(placed)) % len(specs)]
            z_old = species_of[spec.species]
            site = xy[c]
            if any(math.hypot(*(site - (p.x, p.y))) < separation for p in placed):
                continue
            in_column = np.array(members[c])
            if spec.kind == "interstitial":
                candidates = site + offsets
                gap, _ = tree.query(candidates)
                site = candidates[int(np.argmax(gap))]
                outside = np.any((site < lo) | (site > hi))
                if outside or any(math.hypot(*(site - (p.x, p.y))) < separation for p in placed):
                    continue
                n_add = max(1, round(column_fraction * host))
                z = (np.arange(n_add) + 0.5) * specimen.thickness / n_add
                column_xy = np.broadcast_to(site, (n_add, 2))
                added_positions.append(np.column_stack([column_xy, z]))
                added_numbers.append(np.full(n_add, z_old))
                placed.append(PlacedDefect(spec, float(site[0]), float(site[1]), n_add, 0))
                continue
            of_species = in_column[numbers[in_column] == z_old]
            if len(of_species) == 0:
                continue
            k = max(1, round(column_fraction * len(of_species)))
            chosen = rng.choice(of_species, size=k, replace=False)
            if spec.kind == "vacancy":
                removed[chosen] = True
            else:
                numbers[chosen] = ase.data.atomic_numbers[spec.replacement]
            placed.append(PlacedDefect(spec, float(site[0]), float(site[1]), k, len(in_column)))
        return placed, removed, numbers, added_positions, added_numbers

    # Random placement can leave no room for the last defect: try other orders first.
    for _ in range(20):
        placed, removed, numbers, added_positions, added_numbers = one_pass()
        if len(placed) == count:
            break
    else:
        raise ValueError(
            f"room for {len(placed)} of {count} defects {separation:.1f} Å apart in a "
            f"{specimen.extent[0]:.0f} x {specimen.extent[1]:.0f} Å field; ask for fewer"
        )
    keep = ~removed
    specimen.positions = np.concatenate([specimen.positions[keep], *added_positions])
    specimen.numbers = np.concatenate([numbers[keep], *added_numbers]).astype(np.int64)
    return placed


def render_incoherent(
    positions: np.ndarray,
    numbers: np.ndarray,
    shape: tuple[int, int],
    pixel_size: float,
    probe_fwhm: float,
    origin: tuple[float, float] = (0.0, 0.0),
    exponent: float = 1.7,
    atom_scale: np.ndarray | None = None,
) -> np.ndarray:
    """Incoherent HAADF image: ``Z ** exponent`` per atom, blurred by a Gaussian probe.

    Pixel ``(i, j)`` samples the point ``x = origin[0] + j * pixel_size``,
    ``y = origin[1] + i * pixel_size`` (the units of ``positions``). Atoms are spread
    onto their four nearest pixels (bilinear), then convolved with the probe.
    ``atom_scale`` (one factor per atom) multiplies each atom's weight.

    Returns
    -------
    ndarray of float64, shape ``shape``
    """
    from scipy.ndimage import gaussian_filter

    if pixel_size <= 0 or probe_fwhm <= 0:
        raise ValueError(f"pixel size {pixel_size} and probe FWHM {probe_fwhm} must be positive")
    image = np.zeros(shape, dtype=np.float64)
    col = (positions[:, 0] - origin[0]) / pixel_size
    row = (positions[:, 1] - origin[1]) / pixel_size
    weight = np.asarray(numbers, dtype=np.float64) ** exponent
    if atom_scale is not None:
        atom_scale = np.asarray(atom_scale, dtype=np.float64)
        if atom_scale.shape != weight.shape:
            raise ValueError(f"atom_scale shape {atom_scale.shape}: one per atom is {weight.shape}")
        weight = weight * atom_scale
    r0, c0 = np.floor(row).astype(np.int64), np.floor(col).astype(np.int64)
    fr, fc = row - r0, col - c0
    for dr, dc, w in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        r, c = r0 + dr, c0 + dc
        ok = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
        # bincount sums repeated pixels in one pass (np.add.at is many times slower).
        flat = r[ok] * shape[1] + c[ok]
        image += np.bincount(flat, weight[ok] * w[ok], minlength=image.size).reshape(shape)
    sigma = probe_fwhm / (2 * math.sqrt(2 * math.log(2))) / pixel_size
    return gaussian_filter(image, sigma, mode="constant")


@dataclasses.dataclass(frozen=True)
class Multislice:
    """abTEM settings for the multislice renderer.

    The probe's convergence semi-angle comes from the requested FWHM
    (``0.514 λ / FWHM``, the Airy disk), so both renderers see the same probe size.
    """

    energy: float = 200e3
    # 0.05 Å reaches 167 mrad at 200 kV; coarser grids cut the annulus to medium angles,
    # where a half-emptied Sr column of SrTiO3 showed brighter than a full one (coherent
    # scattering), not darker as in HAADF.
    potential_sampling: float = 0.05
    slice_thickness: float = 2.0
    detector_inner: float = 4.5  # in units of the convergence semi-angle (~70 mrad)
    detector_outer: float | None = None  # mrad; None: as far as the sampling allows
    phonons: int = 0
    phonon_sigma: float = 0.08
    prism_interpolation: int = 0  # 0: plain multislice; n >= 1: PRISM with this factor
    scan_sampling: float | None = None  # Å; None: the pixel size, else Fourier-interpolated


def render_multislice(
    specimen: Specimen,
    shape: tuple[int, int],
    pixel_size: float,
    probe_fwhm: float,
    origin: tuple[float, float],
    settings: Multislice = Multislice(),
    seed: int = 0,
) -> np.ndarray:
    """HAADF image of ``specimen`` by abTEM multislice (or PRISM), on the same pixel grid
    as :func:`render_incoherent` (lengths in Å)."""
    try:
        import abtem
        from ase import Atoms
    except ImportError as exc:
        raise ImportError(
            "the multislice renderer needs abTEM: pip install 'defectscope[simulate]'"
        ) from exc
    abtem.config.set({"device": "cpu", "fft": "fftw" if _has_pyfftw() else "numpy"})
    atoms = Atoms(
        numbers=specimen.numbers,
        positions=specimen.positions,
        cell=[specimen.extent[0], specimen.extent[1], specimen.thickness],
        pbc=True,
    )
    if settings.phonons:
        atoms = abtem.FrozenPhonons(
            atoms, num_configs=settings.phonons, sigmas=settings.phonon_sigma, seed=seed
        )
    potential = abtem.Potential(
        atoms,
        sampling=settings.potential_sampling,
        slice_thickness=settings.slice_thickness,
        projection="infinite",
        parametrization="lobato",
    )
    semiangle = 0.514 * electron_wavelength(settings.energy) / probe_fwhm * 1e3  # mrad
    step = settings.scan_sampling or pixel_size
    end = (origin[0] + shape[1] * pixel_size, origin[1] + shape[0] * pixel_size)
    scan = abtem.GridScan(start=origin, end=end, sampling=step)
    detector = abtem.AnnularDetector(
        inner=settings.detector_inner * semiangle, outer=settings.detector_outer
    )
    if settings.prism_interpolation:
        s_matrix = abtem.SMatrix(
            potential=potential,
            energy=settings.energy,
            semiangle_cutoff=semiangle,
            interpolation=settings.prism_interpolation,
        )
        measurement = s_matrix.scan(scan=scan, detectors=detector)
    else:
        probe = abtem.Probe(energy=settings.energy, semiangle_cutoff=semiangle)
        measurement = probe.scan(potential=potential, scan=scan, detectors=detector)
    measurement = measurement.compute(progress_bar=False)
    if settings.scan_sampling and settings.scan_sampling != pixel_size:
        measurement = measurement.interpolate(pixel_size)
    image = np.asarray(measurement.array, dtype=np.float64).T  # abTEM's arrays are (x, y)
    out = np.zeros(shape)
    rows, cols = min(shape[0], image.shape[0]), min(shape[1], image.shape[1])
    out[:rows, :cols] = image[:rows, :cols]
    return out


def _has_pyfftw() -> bool:
    try:
        import pyfftw  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Instrument:
    """What the microscope adds to a clean image.

    Attributes
    ----------
    dose : float
        Expected electron counts at the brightest columns (Poisson noise).
    jitter : float
        Standard deviation, in pixels, of each scan line's shift along x.
    drift : (float, float)
        Total drift ``(y, x)`` in pixels over the frame (a linear shear and stretch).
    gradient : float
        Largest relative change of a slow, linear intensity ramp across the frame.
    gain, offset, read_noise : float
        Detector counts per electron, dark level and Gaussian read noise in counts.
    """

    dose: float = 200.0
    jitter: float = 0.3
    drift: tuple[float, float] = (2.0, 3.0)
    gradient: float = 0.15
    gain: float = 4.0
    offset: float = 100.0
    read_noise: float = 2.0

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        finite = all(map(math.isfinite, (self.dose, self.jitter, *self.drift, self.gradient)))
        if not finite or not all(map(math.isfinite, (self.gain, self.offset, self.read_noise))):
            raise ValueError(f"instrument settings must be finite numbers: {self}")
        if self.dose <= 0:
            raise ValueError(f"dose must be positive, got {self.dose}")
        if self.jitter < 0 or self.read_noise < 0 or self.gain <= 0:
            raise ValueError("jitter and read noise must be >= 0, gain > 0")
        if not 0 <= self.gradient < 2:
            raise ValueError(f"gradient must be in [0, 2), got {self.gradient}")
        if max(abs(v) for v in self.drift) > 1e4 or self.jitter > 1e3:
            raise ValueError(f"drift {self.drift} or jitter {self.jitter} pixels is too large")

    def margin(self) -> int:
        """Pixels of clean image needed around the frame for the scan distortions."""
        return math.ceil(4 * self.jitter + max(abs(v) for v in self.drift)) + 2


def acquire(
    clean: np.ndarray, margin: int, instrument: Instrument, rng: np.random.Generator
) -> tuple[np.ndarray, Any]:
    """Record a frame from ``clean`` (the field plus ``margin`` pixels on every side).

    Returns
    -------
    frame : ndarray of uint16, shape ``clean.shape - 2 * margin``
    to_frame : callable
        ``to_frame(row, col)`` maps clean-image pixel coordinates (without the margin)
        to the recorded frame's, through drift and jitter.
    """
    from scipy.ndimage import map_coordinates

    height, width = clean.shape[0] - 2 * margin, clean.shape[1] - 2 * margin
    if height < 1 or width < 1:
        raise ValueError(f"clean image {clean.shape} is smaller than its margin {margin}")
    shift_x = rng.normal(0.0, instrument.jitter, height) + instrument.drift[1] * np.arange(
        height
    ) / max(height, 1)
    stretch_y = instrument.drift[0] / max(height, 1)
    rows = np.arange(height, dtype=np.float64)
    rr = np.repeat(rows * (1 + stretch_y) + margin, width).reshape(height, width)
    cc = np.arange(width, dtype=np.float64)[None, :] + margin + shift_x[:, None]
    image = map_coordinates(clean, [rr, cc], order=3, mode="nearest")
    image = np.clip(image, 0, None) / max(np.percentile(clean, 99.9), 1e-12)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = (np.cos(angle) * (xx / width - 0.5) + np.sin(angle) * (yy / height - 0.5)) * 2
    image *= 1 + instrument.gradient * 0.5 * ramp
    counts = rng.poisson(np.clip(image, 0, None) * instrument.dose).astype(np.float64)
    signal = counts * instrument.gain + instrument.offset
    signal += rng.normal(0.0, instrument.read_noise, signal.shape)
    frame = np.clip(np.rint(signal), 0, np.iinfo(np.uint16).max).astype(np.uint16)

    def to_frame(row: float, col: float) -> tuple[float, float]:
        i = row / (1 + stretch_y)
        k = int(np.clip(round(i), 0, height - 1))
        return i, col - shift_x[k]

    return frame, to_frame


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

    structure: str = "srtio3"
    zone: tuple[int, int, int] = (0, 0, 1)
    pixel_size: float = 0.02
    unit: str = "nm"
    probe_fwhm: float = 0.08
    defects: str = "vacancy"
    frames: int = 4
    size: int = 1024
    thickness: float = 8.0
    defects_per_frame: int | None = None
    column_fraction: float = 0.5
    exponent: float = 1.7
    exponent_range: tuple[float, float] | None = None
    column_scatter: float = 0.0
    renderer: str = "fast"
    patch_size: int = 64
    patches_per_defect: int = 4
    vary: float = 0.0
    seed: int = 0
    instrument: Instrument = Instrument()
    multislice: Multislice = Multislice()

    def check(self) -> None:
        if self.unit not in UNITS_PER_ANGSTROM:
            raise ValueError(f"unit {self.unit!r}: one of {', '.join(UNITS_PER_ANGSTROM)}")
        for name in ("pixel_size", "probe_fwhm", "thickness", "exponent"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', ' ')} must be positive, got {value}")
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
        if self.size > 16384:
            raise ValueError(f"frame size {self.size} is over 16384 pixels; simulate tiles")
        if self.size < 2 * self.patch_size:
            raise ValueError(f"frame size {self.size} must be at least twice the patch size")
        if self.patch_size < 16:
            raise ValueError(f"patch size must be at least 16, got {self.patch_size}")
        self.instrument.check()
        ms = self.multislice
        if not (ms.energy > 0 and math.isfinite(ms.energy)):
            raise ValueError(f"energy must be positive, got {ms.energy} eV")
        if ms.phonons < 0 or ms.prism_interpolation < 0:
            raise ValueError("phonon configurations and PRISM interpolation must be >= 0")
        if ms.scan_sampling is not None and not (0 < ms.scan_sampling < 1e3):
            raise ValueError(f"scan sampling must be positive, got {ms.scan_sampling} Å")


def _angstrom(settings: SimulationSettings, value: float) -> float:
    return value / UNITS_PER_ANGSTROM[settings.unit]


def simulate_frame(settings: SimulationSettings, index: int) -> tuple[np.ndarray, dict[str, Any]]:
    """One recorded frame and its record: ``defects`` (positions in frame pixels and in
    ``unit``), ``lattice_spacing`` (``unit``) and the frame's drawn ``conditions``."""
    settings.check()
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
    atoms = load_structure(settings.structure)
    specs = parse_defects(settings.defects, sorted(set(atoms.get_chemical_symbols())))
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


def cut_patches(
    frame: np.ndarray,
    defects: list[dict[str, Any]],
    patch_size: int,
    per_defect: int,
    rng: np.random.Generator,
) -> list[tuple[str, np.ndarray]]:
    """``(class, patch)`` pairs: patches around each defect (shifted up to an eighth of a
    patch) and as many ``Bulk`` patches per frame as the average defect class has, placed
    where no defect lies within the patch (and 4 pixels around it)."""
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
    clear = half + 4
    for _ in range(50 * max(wanted, 1)):
        if sum(label == "Bulk" for label, _ in out) >= wanted:
            break
        row, col = rng.uniform(half, height - half), rng.uniform(half, width - half)
        if len(centres) and np.any(np.max(np.abs(centres - (row, col)), axis=1) < clear):
            continue
        patch = crop(row, col)
        if patch is not None:
            out.append(("Bulk", patch))
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

    Returns
    -------
    dict
        The truth record written to ``out/truth.json``.
    """
    from tqdm import tqdm

    settings.check()
    out = Path(out)
    for sub in ("frames", "patches"):
        if (out / sub).exists() and any((out / sub).iterdir()):
            raise ValueError(f"{out / sub}: already holds files; give an empty or new --out")
    (out / "frames").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([settings.seed, 1 << 20])
    frames, groups, lattice_spacing = [], {}, None
    counts: dict[str, int] = {}
    started = time.perf_counter()
    bar = tqdm(range(settings.frames), desc=f"simulate ({settings.renderer})", disable=not progress)
    for index in bar:
        frame, frame_record = simulate_frame(settings, index)
        defects, lattice_spacing = frame_record["defects"], frame_record["lattice_spacing"]
        name = f"frame_{index:04d}.tif"
        _write_tiff(out / "frames" / name, frame, settings.pixel_size, settings.unit)
        for n, (label, patch) in enumerate(
            cut_patches(frame, defects, settings.patch_size, settings.patches_per_defect, rng)
        ):
            relative = f"{label}/frame{index:04d}_{n:05d}.tif"
            target = out / "patches" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_tiff(target, patch, settings.pixel_size, settings.unit)
            groups[relative] = index
            counts[label] = counts.get(label, 0) + 1
        frames.append({"file": f"frames/{name}", "shape": list(frame.shape), **frame_record})
        seconds = time.perf_counter() - started
        record = {
            "settings": _settings_record(settings),
            "lattice_spacing": lattice_spacing,
            "unit": settings.unit,
            "frames": frames,
            "complete": index + 1 == settings.frames,
            "patches": counts,
            "seconds": seconds,
            "frames_per_minute": 60 * len(frames) / max(seconds, 1e-9),
        }
        # After every frame, so an interrupted run keeps the truth of what it wrote.
        atomic_write_json(out / "patches" / "groups.json", groups)
        atomic_write_json(out / "truth.json", record)
    return record


def _settings_record(settings: SimulationSettings) -> dict[str, Any]:
    record = dataclasses.asdict(settings)
    record["zone"] = list(settings.zone)
    return json.loads(json.dumps(record))


def read_truth(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``truth.json`` of a simulated dataset, with a clear error when it is not one."""
    path = Path(directory) / "truth.json"
    if not path.is_file():
        raise ValueError(f"{directory}: not a simulated dataset (no truth.json)")
    return json.loads(path.read_text())


def match_pairs(centres: np.ndarray, truth: np.ndarray, tolerance: float) -> list[tuple[int, int]]:
    """One-to-one matches ``(centre index, truth index)`` within ``tolerance``, nearest
    pairs first (both arrays ``(n, 2)`` in one unit)."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    if len(centres) == 0 or len(truth) == 0:
        return []
    distance = np.linalg.norm(centres[:, None] - truth[None], axis=2)
    used_c, used_t, pairs = set(), set(), []
    for flat in np.argsort(distance, axis=None, kind="stable"):
        i, j = divmod(int(flat), len(truth))
        if distance[i, j] > tolerance:
            break
        if i not in used_c and j not in used_t:
            used_c.add(i)
            used_t.add(j)
            pairs.append((i, j))
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
