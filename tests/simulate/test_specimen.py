"""Specimens: structures, zone axes, the cut field and its lattice spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest

ase = pytest.importorskip("ase", reason="simulation needs the optional 'simulate' extra (ASE)")

from defectscope.simulate import specimen as sp  # noqa: E402


def test_srtio3_001_columns_and_spacing():
    atoms = sp.load_structure("srtio3")
    specimen = sp.build_specimen(atoms, (0, 0, 1), (39.05, 39.05), 39.05)
    xy, column = specimen.columns()
    compositions = {}
    for c in range(len(xy)):
        numbers = tuple(sorted(set(specimen.numbers[column == c].tolist())))
        compositions.setdefault(numbers, []).append(int((column == c).sum()))
    # Perovskite [001]: pure Sr columns, Ti-O columns, pure O columns; 10 cells thick.
    assert set(compositions) == {(38,), (8, 22), (8,)}
    assert set(compositions[(38,)]) == {10} and set(compositions[(8, 22)]) == {20}
    assert len(compositions[(38,)]) == 100 and len(compositions[(8,)]) == 200
    assert specimen.lattice_spacing == pytest.approx(3.905, abs=1e-6)


def test_cdte_110_dumbbells():
    atoms = sp.load_structure("cdte")
    specimen = sp.build_specimen(atoms, (1, 1, 0), (40.0, 40.0), 30.0)
    xy, column = specimen.columns()
    cd = np.array([48 in specimen.numbers[column == c] for c in range(len(xy))])
    assert all(len(set(specimen.numbers[column == c].tolist())) == 1 for c in range(len(xy)))
    # Zinc blende along [110]: each Cd column has a Te column a/4 = 1.620 Å away.
    from scipy.spatial import cKDTree

    inner = np.all((xy > 3) & (xy < 37), axis=1)
    nearest, _ = cKDTree(xy[~cd]).query(xy[cd & inner])
    assert np.allclose(nearest, 6.481 / 4, atol=1e-6)
    # Same-composition columns form a centred rectangular net, a/sqrt(2) by a: the
    # nearest two are a * sqrt(3/8) apart.
    assert specimen.lattice_spacing == pytest.approx(6.481 * math.sqrt(3 / 8), abs=1e-6)


def _spacing_by_pairs(specimen) -> float:
    """The definition, pair by pair: every column's atom list against every other's."""
    key = np.round(specimen.positions[:, :2] / 1e-3).astype(np.int64)
    _, first, column = np.unique(key, axis=0, return_index=True, return_inverse=True)
    xy, column = specimen.positions[first, :2], column.ravel()
    signature = [tuple(sorted(specimen.numbers[column == c].tolist())) for c in range(len(xy))]
    ref = int(np.argmin(np.hypot(*(xy - np.asarray(specimen.extent) / 2).T)))
    others = [c for c in range(len(xy)) if c != ref and signature[c] == signature[ref]]
    if not others:
        return float(max(specimen.extent))
    return min(math.dist(xy[c], xy[ref]) for c in others)


@pytest.mark.parametrize(
    "structure, zone",
    [("srtio3", (0, 0, 1)), ("srtio3", (1, 1, 0)), ("srtio3", (1, 1, 1)), ("cdte", (1, 1, 0))],
)
def test_lattice_spacing_is_the_pairwise_definition(structure, zone):
    atoms = sp.load_structure(structure)
    specimen = sp.build_specimen(atoms, zone, (30.0, 26.0), 12.0)
    assert specimen.lattice_spacing == pytest.approx(_spacing_by_pairs(specimen), abs=1e-9)
    # Columns: one per distinct projected position, each atom in the one it sits in.
    xy, column = specimen.columns()
    assert len(np.unique(np.round(xy / 1e-3), axis=0)) == len(xy)
    assert np.abs(specimen.positions[:, :2] - xy[column]).max() <= 1e-3


def test_a_large_field_is_cut_in_n_log_n(deadline):
    # Issue 25, finding 8: 'simulate --size 128 --drift 1500 0' renders a 3136-pixel
    # field (627 Å, 2.6 million atoms, 100 000 columns); the spacing compared every
    # column with every atom (hours). Grouped by sorting, it takes seconds.
    atoms = sp.load_structure("srtio3")
    with deadline(150):
        specimen = sp.build_specimen(atoms, (0, 0, 1), (627.2, 627.2), 80.0)
    assert len(specimen.numbers) > 2_500_000
    assert specimen.lattice_spacing == pytest.approx(3.905, abs=1e-6)


def test_field_cost_and_empty_fields_are_named():
    atoms = sp.load_structure("srtio3")
    assert sp.specimen_atoms(atoms, (0, 0, 1), (1e300, 1e300), 10.0) == math.inf
    with pytest.raises(ValueError, match="over the limit of 5e"):
        sp.build_specimen(atoms, (0, 0, 1), (5000.0, 5000.0), 400.0)
    with pytest.raises(ValueError, match="holds no atom"):
        sp.build_specimen(atoms, (0, 0, 1), (20.0, 20.0), 1e-300)


def test_zone_and_structure_errors():
    assert sp.parse_zone("110") == (1, 1, 0) and sp.parse_zone("0,0,1") == (0, 0, 1)
    for text in ("0,0,0", "1,a,0", "1,1", (0, 0, 0), (1, None, 0)):
        with pytest.raises(ValueError, match="zone axis"):
            sp.parse_zone(text)
    with pytest.raises(ValueError, match="not found"):
        sp.load_structure("/nonexistent/thing.cif")
