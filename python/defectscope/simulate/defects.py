"""Point defects: what to place (:class:`DefectSpec`, :func:`parse_defects`) and placing
them in a specimen (:func:`place_defects`).

Vacancies and substitutions take from one atom up to the whole column of a species;
interstitials sit at the emptiest place between columns.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from defectscope.simulate.specimen import Specimen, require_ase

DEFECT_KINDS = ("vacancy", "substitution", "interstitial", "antisite")

# A vacancy without an element skips elements lighter than this share of the heaviest's
# Z: their columns scatter under a sixth as much into a HAADF detector (Z ** 1.5 or
# steeper), so their vacancies do not show (O in SrTiO3, N in GaN), and a class of
# patches that look like the perfect lattice teaches a model to split the perfect lattice
# (issue 28: 140 regions for 12 multislice vacancies). Naming one (vacancy:O) still works.
VISIBLE_Z_SHARE = 0.3


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

    Species left out are chosen from the crystal: a vacancy without an element is a
    vacancy of every element that shows in HAADF (one kind each, heaviest first; Z at
    least :data:`VISIBLE_Z_SHARE` of the heaviest element's), an interstitial the
    heaviest element, an antisite the two heaviest (lighter replaced by
    heavier). A substitution must name both elements.

    Raises
    ------
    ValueError
        Naming the item that is not understood, an unknown element (``X``, Z = 0,
        included: it scatters nothing), one the crystal lacks, or a defect that changes
        nothing (an element replaced by itself).
    """
    ase = require_ase()
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
            # ASE knows "X" (Z = 0), a placeholder: as a defect it would change nothing.
            if ase.data.atomic_numbers.get(element, 0) < 1:
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
        if new and new == old:
            raise ValueError(f"defect {item!r}: replaces {old} by {old}, which changes nothing")
        if kind == "vacancy" and not old:
            z_max = ase.data.atomic_numbers[by_weight[-1]]
            visible = [
                e for e in by_weight if ase.data.atomic_numbers[e] >= VISIBLE_Z_SHARE * z_max
            ]
            specs.extend(DefectSpec(kind, element, None) for element in reversed(visible))
            continue
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


@dataclasses.dataclass
class PlacedDefect:
    """A defect put into a specimen: its kind, where (Å, in the field) and how many atoms."""

    spec: DefectSpec
    x: float
    y: float
    atoms_changed: int
    column_atoms: int


class _Spaced:
    """Points added one by one, and whether a new one is closer than ``separation`` to any.

    A hash grid of cells one separation wide: a point closer than that lies in one of
    the 3 x 3 cells around the new one, so a check costs O(1), not O(points placed).
    """

    def __init__(self, separation: float) -> None:
        self.separation = separation
        self.cells: dict[tuple[int, int], list[tuple[float, float]]] = {}

    def _cell(self, x: float, y: float) -> tuple[int, int]:
        return math.floor(x / self.separation), math.floor(y / self.separation)

    def too_close(self, site: np.ndarray) -> bool:
        if self.separation <= 0:
            return False
        cx, cy = self._cell(site[0], site[1])
        for i in (cx - 1, cx, cx + 1):
            for j in (cy - 1, cy, cy + 1):
                for px, py in self.cells.get((i, j), ()):
                    # The same expression as a scan over every point, so the same answer.
                    if math.hypot(*(site - (px, py))) < self.separation:
                        return True
        return False

    def add(self, x: float, y: float) -> None:
        if self.separation > 0:
            self.cells.setdefault(self._cell(x, y), []).append((x, y))


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

    Raises
    ------
    ValueError
        When an argument is out of range, or the field has no room for ``count``
        defects ``separation`` apart.
    """
    ase = require_ase()
    from scipy.spatial import cKDTree

    if not 0 < column_fraction <= 1:
        raise ValueError(f"column fraction must be in (0, 1], got {column_fraction}")
    if not (math.isfinite(separation) and separation >= 0):
        raise ValueError(f"defect separation must be a finite length >= 0, got {separation}")
    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite, got {margin}")
    if count < 0:
        raise ValueError(f"defect count must be >= 0, got {count}")
    xy, column = specimen.columns()
    tree = cKDTree(xy)
    lo, hi = margin, np.asarray(specimen.extent) - margin
    eligible = np.flatnonzero(np.all((xy >= lo) & (xy <= hi), axis=1))
    species_of = {spec.species: ase.data.atomic_numbers[spec.species] for spec in specs}
    # Each column's atoms in ascending order, by one stable sort (not a Python loop
    # over millions of atoms).
    by_column = np.argsort(column, kind="stable")
    bounds = np.searchsorted(column[by_column], np.arange(len(xy) + 1))
    sizes = np.diff(bounds)
    host = float(np.median(sizes[sizes > 0]))
    # Where an interstitial may go around a site: a 41 x 41 grid over one lattice spacing.
    grid = np.linspace(-0.5, 0.5, 41) * specimen.lattice_spacing
    offsets = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)

    def one_pass():
        # One random-order pass; the specimen changes only after a pass that fits all.
        placed: list[PlacedDefect] = []
        spaced = _Spaced(separation)
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
            if spaced.too_close(site):
                continue
            in_column = by_column[bounds[c] : bounds[c + 1]]
            if spec.kind == "interstitial":
                candidates = site + offsets
                gap, _ = tree.query(candidates)
                site = candidates[int(np.argmax(gap))]
                outside = np.any((site < lo) | (site > hi))
                if outside or spaced.too_close(site):
                    continue
                n_add = max(1, round(column_fraction * host))
                z = (np.arange(n_add) + 0.5) * specimen.thickness / n_add
                column_xy = np.broadcast_to(site, (n_add, 2))
                added_positions.append(np.column_stack([column_xy, z]))
                added_numbers.append(np.full(n_add, z_old))
                placed.append(PlacedDefect(spec, float(site[0]), float(site[1]), n_add, 0))
                spaced.add(float(site[0]), float(site[1]))
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
            spaced.add(float(site[0]), float(site[1]))
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
