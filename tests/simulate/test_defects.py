"""Point defects: parsing what to place, and placing it in a specimen."""

from __future__ import annotations

import math

import numpy as np
import pytest

ase = pytest.importorskip("ase", reason="simulation needs the optional 'simulate' extra (ASE)")

from defectscope.simulate import defects as df  # noqa: E402
from defectscope.simulate.specimen import Specimen, build_specimen, load_structure  # noqa: E402


def test_defects_change_the_atoms_they_say():
    atoms = load_structure("srtio3")
    specimen = build_specimen(atoms, (0, 0, 1), (120.0, 120.0), 39.05)
    before_xy, _ = specimen.columns()
    before = specimen.numbers.copy()
    specs = df.parse_defects("vacancy:Sr,substitution:Ti>Nb,interstitial:Sr", ["Sr", "Ti", "O"])
    rng = np.random.default_rng(3)
    placed = df.place_defects(specimen, specs, 3, 20.0, 30.0, 0.5, rng)
    placed.sort(key=lambda p: ["vacancy", "substitution", "interstitial"].index(p.spec.kind))
    assert [p.spec.kind for p in placed] == ["vacancy", "substitution", "interstitial"]
    sites = np.array([(p.x, p.y) for p in placed])
    assert np.all(sites >= 20.0) and np.all(sites <= 100.0)
    assert min(np.linalg.norm(sites[i] - sites[j]) for i in range(3) for j in range(i)) >= 30
    # Vacancy: 5 of the column's 10 Sr are gone; substitution: 5 of 10 Ti are now Nb.
    assert placed[0].atoms_changed == 5 and placed[1].atoms_changed == 5
    assert len(specimen.numbers) == len(before) - 5 + placed[2].atoms_changed
    assert int((specimen.numbers == 41).sum()) == 5
    # Interstitial: Sr atoms at a point away from every original column.
    xy = specimen.positions[:, :2]
    new = np.linalg.norm(xy - sites[2], axis=1) < 1e-9
    assert new.sum() == placed[2].atoms_changed and set(specimen.numbers[new]) == {38}
    assert np.linalg.norm(before_xy - sites[2], axis=1).min() > 1.3


def test_defect_parsing_errors():
    present = ["Cd", "Te"]
    assert df.parse_defects("antisite", present) == [df.DefectSpec("antisite", "Cd", "Te")]
    # A vacancy without an element: every element's that shows in HAADF, heaviest first.
    assert [s.label for s in df.parse_defects("vacancy", present)] == ["Vacancy_Te", "Vacancy_Cd"]
    assert [s.label for s in df.parse_defects("vacancy", ["Sr", "Ti", "O"])] == [
        "Vacancy_Sr",
        "Vacancy_Ti",
    ]
    assert [s.label for s in df.parse_defects("vacancy", ["Mo", "S"])] == [
        "Vacancy_Mo",
        "Vacancy_S",
    ]
    assert [s.label for s in df.parse_defects("vacancy", ["Ga", "N"])] == ["Vacancy_Ga"]
    assert [s.label for s in df.parse_defects("vacancy", ["Mg", "O"])] == [
        "Vacancy_Mg",
        "Vacancy_O",
    ]
    # Named, a light element's vacancy is placed all the same.
    assert df.parse_defects("vacancy:O,vacancy", ["Sr", "Ti", "O"])[0].label == "Vacancy_O"
    for text, message in [
        ("hole", "kind must be"),
        ("substitution:Cd", "substitution:Ti>Nb"),
        ("vacancy:Xx", "not a chemical element"),
        ("vacancy:Sr", "has no Sr"),
        ("vacancy,vacancy", "given twice"),
        ("vacancy,vacancy:Cd", "given twice"),
        ("", "no defects"),
    ]:
        with pytest.raises(ValueError, match=message):
            df.parse_defects(text, present)


@pytest.mark.parametrize(
    "text, message",
    [
        ("substitution:Ti>Ti", "replaces Ti by Ti, which changes nothing"),
        ("antisite:Sr>Sr", "replaces Sr by Sr, which changes nothing"),
        ("substitution:Ti>X", "'X' is not a chemical element"),
        ("antisite:Ti>X", "'X' is not a chemical element"),
        ("interstitial:X", "'X' is not a chemical element"),
    ],
)
def test_defects_that_change_nothing_are_refused(text, message):
    # Issue 25, finding 12: these were accepted and recorded as classes of patches
    # that show no defect (X is ASE's placeholder, Z = 0: it scatters nothing).
    with pytest.raises(ValueError, match=message):
        df.parse_defects(text, ["Sr", "Ti", "O"])


def test_room_for_defects_is_checked():
    atoms = load_structure("srtio3")
    specimen = build_specimen(atoms, (0, 0, 1), (40.0, 40.0), 8.0)
    specs = df.parse_defects("vacancy", ["Sr", "Ti", "O"])
    with pytest.raises(ValueError, match="room for"):
        df.place_defects(specimen, specs, 5, 5.0, 30.0, 1.0, np.random.default_rng(0))
    for args, message in [
        ((1, 5.0, math.nan, 1.0), "separation"),
        ((1, 5.0, 3.0, math.nan), "column fraction"),
        ((-1, 5.0, 3.0, 1.0), "count"),
    ]:
        with pytest.raises(ValueError, match=message):
            df.place_defects(specimen, specs, *args, np.random.default_rng(0))


def test_many_defects_are_placed_apart_in_n_log_n(deadline):
    # Issue 25, finding 8 (every pairwise step): a defect was checked against every
    # one placed before it. 12 000 on a 400 x 400 column field took many minutes;
    # a hash grid makes each check O(1).
    n = 400
    grid = (np.stack(np.mgrid[0:n, 0:n], -1).reshape(-1, 2) + 0.5) * 2.0
    positions = np.column_stack([grid, np.full(len(grid), 1.0)])
    specimen = Specimen(positions, np.full(len(grid), 38), (2.0 * n, 2.0 * n), 2.0, 2.0)
    specs = df.parse_defects("vacancy:Sr", ["Sr"])
    with deadline(120):
        placed = df.place_defects(specimen, specs, 12_000, 1.0, 4.5, 1.0, np.random.default_rng(1))
    sites = np.array([(p.x, p.y) for p in placed])
    assert len(sites) == 12_000 and len(specimen.numbers) == n * n - 12_000
    # Independent check of the separation: no pair of sites closer than 4.5.
    from scipy.spatial import cKDTree

    assert not cKDTree(sites).query_pairs(4.5 - 1e-9)
