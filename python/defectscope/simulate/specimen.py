"""The specimen: a crystal (ASE) turned to a zone axis and cut to a field and a thickness.

A crystal is a CIF file (or anything ASE reads) or one of the built-in SrTiO₃ and
zinc-blende CdTe. :func:`build_specimen` fills the scanned field with whole lattice
translations, so every projected column holds the atoms the crystal puts along the
thickness. Lengths are in Å, the beam along +z.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

# Built-in crystals, one per family the shipped trunk is pretrained on: (species,
# fractional basis, space group, cell parameters a, b, c in Å and angles in degrees).
BUILTIN_STRUCTURES = {
    # cubic perovskite
    "srtio3": (["Sr", "Ti", "O"], [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], 221,
               (3.905, 3.905, 3.905, 90, 90, 90)),
    # zinc blende
    "cdte": (["Cd", "Te"], [(0, 0, 0), (0.25, 0.25, 0.25)], 216,
             (6.481, 6.481, 6.481, 90, 90, 90)),
    # rock salt
    "mgo": (["Mg", "O"], [(0, 0, 0), (0.5, 0.5, 0.5)], 225, (4.212, 4.212, 4.212, 90, 90, 90)),
    # wurtzite
    "gan": (["Ga", "N"], [(1 / 3, 2 / 3, 0), (1 / 3, 2 / 3, 0.377)], 186,
            (3.189, 3.189, 5.185, 90, 90, 120)),
    # fcc metal
    "au": (["Au"], [(0, 0, 0)], 225, (4.078, 4.078, 4.078, 90, 90, 90)),
    # a 2-D hexagonal sheet (one MoS2 layer, 16 Å cell along c: layers stack in register,
    # so every projection along [001] is the monolayer's)
    "mos2": (["Mo", "S"], [(1 / 3, 2 / 3, 0), (2 / 3, 1 / 3, 1.565 / 16)], 187,
             (3.16, 3.16, 16.0, 90, 90, 120)),
}  # fmt: skip
# Atoms build_specimen may generate before it cuts the field (positions alone take
# 24 bytes each, and the cut holds two copies): past this, simulate tiles instead.
MAX_ATOMS = 50_000_000


def require_ase():
    """The ``ase`` package with the submodules the simulation uses, or a clear error."""
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


def load_structure(structure: str | os.PathLike):
    """An ASE ``Atoms`` unit cell: a :data:`BUILTIN_STRUCTURES` name or a file ASE reads.

    Raises
    ------
    ValueError
        When the file is missing or ASE cannot read a periodic crystal from it.
    """
    ase = require_ase()
    name = str(structure)
    if name.lower() in BUILTIN_STRUCTURES:
        species, basis, group, cellpar = BUILTIN_STRUCTURES[name.lower()]
        return ase.spacegroup.crystal(species, basis=basis, spacegroup=group, cellpar=list(cellpar))
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
        try:
            zone = tuple(int(v) for v in text)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"zone axis {text!r}: three integers, not all zero") from None
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
        if len(key) == 0:
            return self.positions[:0, :2], np.zeros(0, dtype=np.int64)
        key -= key.min(axis=0)
        span = int(key[:, 1].max()) + 1
        if (int(key[:, 0].max()) + 1) * span < 2**62:
            # One int64 per atom in the (x, y) order: a 1-D unique, many times faster
            # than unique rows, with the same columns in the same order.
            key = key[:, 0] * span + key[:, 1]
            _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        else:
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


def _translation_range(
    cell: np.ndarray, rotation: np.ndarray, extent: tuple[float, float], thickness: float
) -> tuple[np.ndarray, np.ndarray]:
    box = np.array([extent[0], extent[1], thickness])
    corners = np.stack(np.meshgrid(*[[0.0, 1.0]] * 3, indexing="ij"), -1).reshape(-1, 3) * box
    # Lattice translations whose cell can reach the box: corners into fractional coordinates.
    frac = corners @ rotation @ np.linalg.inv(cell)
    return np.floor(frac.min(0)) - 1, np.ceil(frac.max(0)) + 1


def specimen_atoms(
    atoms, zone: tuple[int, int, int], extent: tuple[float, float], thickness: float
) -> float:
    """How many atoms :func:`build_specimen` generates before it cuts the field (its cost).

    Returns ``inf`` for a field too large to count.
    """
    if not all(math.isfinite(v) and 0 < v < 1e9 for v in (*extent, thickness)):
        return math.inf
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    lo, hi = _translation_range(cell, _orientation(cell, zone), extent, thickness)
    # Python integers: a product of three large counts does not overflow.
    cells = math.prod(int(b - a + 1) for a, b in zip(lo, hi, strict=True))
    return float(cells * len(atoms))


def build_specimen(
    atoms, zone: tuple[int, int, int], extent: tuple[float, float], thickness: float
) -> Specimen:
    """Cut an oriented slab of ``atoms`` (an ASE unit cell) to a field and a thickness (Å).

    The field is filled with whole translations of the unit cell, so every column holds
    the atoms the crystal puts along ``thickness``.

    Raises
    ------
    ValueError
        When the field or thickness is not a positive finite length, needs more than
        :data:`MAX_ATOMS` atoms, or holds no atom at all.
    """
    if min(extent) <= 0 or thickness <= 0 or not all(map(math.isfinite, (*extent, thickness))):
        raise ValueError(f"field {extent} and thickness {thickness} must be positive, finite")
    count = specimen_atoms(atoms, zone, extent, thickness)
    if count > MAX_ATOMS:
        raise ValueError(
            f"field {extent[0]:.4g} x {extent[1]:.4g} x {thickness:.4g} Å needs {count:.3g} "
            f"atoms, over the limit of {MAX_ATOMS:.0e}; make it smaller"
        )
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    rotation = _orientation(cell, zone)
    box = np.array([extent[0], extent[1], thickness])
    lo, hi = _translation_range(cell, rotation, extent, thickness)
    translations = np.stack(
        np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
    ).reshape(-1, 3)
    basis = np.asarray(atoms.get_scaled_positions(wrap=True))
    crystal = ((translations[:, None, :] + basis[None]) @ cell).reshape(-1, 3)
    # A small offset keeps lattice planes off the box's faces, where rounding would decide.
    lab = crystal @ rotation.T + 0.05
    inside = np.all((lab >= 0) & (lab < box), axis=1)
    if not inside.any():
        raise ValueError(
            f"field {extent[0]:.4g} x {extent[1]:.4g} Å by {thickness:.4g} Å holds no atom; "
            "make the field (size x pixel size) or the thickness larger"
        )
    numbers = np.tile(np.asarray(atoms.numbers), len(translations))[inside]
    specimen = Specimen(lab[inside], numbers, (float(extent[0]), float(extent[1])), thickness, 0.0)
    specimen.lattice_spacing = _lattice_spacing(specimen)
    return specimen


def _lattice_spacing(specimen: Specimen) -> float:
    """Distance from the column nearest the field's centre to the nearest column of the
    same composition (the same multiset of atomic numbers); the larger field side when
    no other column has it.

    Linear after the O(n log n) column grouping: compositions are rows of per-element
    counts, compared all at once, not atom lists per column.
    """
    xy, column = specimen.columns()
    elements, element = np.unique(specimen.numbers, return_inverse=True)
    counts = np.bincount(
        column * len(elements) + element.ravel(), minlength=len(xy) * len(elements)
    ).reshape(len(xy), len(elements))
    centre = np.asarray(specimen.extent) / 2
    ref = int(np.argmin(np.linalg.norm(xy - centre, axis=1)))
    same = np.all(counts == counts[ref], axis=1)
    same[ref] = False
    if not same.any():
        return float(max(specimen.extent))
    return float(np.linalg.norm(xy[same] - xy[ref], axis=1).min())
