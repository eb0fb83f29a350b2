"""Truth: reading truth.json and matching found places to it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defectscope.simulate import truth as tr


def test_match_regions_is_one_to_one():
    truth = np.array([[0.0, 0.0], [10.0, 0.0]])
    found = np.array([[0.5, 0.0], [0.2, 0.1], [30.0, 0.0]])
    recall, precision, matched = tr.match_regions(found, truth, 1.0)
    assert (recall, precision, matched) == (0.5, 1 / 3, 1)
    assert tr.match_regions(np.empty((0, 2)), truth, 1.0)[:2] == (0.0, 1.0)
    assert tr.match_pairs(found, truth, 1.0) == [(1, 0)]  # the nearer of two claims wins


def _greedy_by_all_pairs(centres, truth, tolerance):
    """The definition: every pair's distance, nearest first, ties by index."""
    pairs = sorted(
        (math.dist(c, t), i, j)
        for i, c in enumerate(centres)
        for j, t in enumerate(truth)
        if math.dist(c, t) <= tolerance
    )
    used_c, used_t, out = set(), set(), []
    for _, i, j in pairs:
        if i not in used_c and j not in used_t:
            used_c.add(i)
            used_t.add(j)
            out.append((i, j))
    return out


def test_match_pairs_is_the_greedy_definition():
    rng = np.random.default_rng(0)
    for _ in range(40):
        # Integer grids: many equal distances, so the tie order is tested too.
        centres = rng.integers(0, 12, (int(rng.integers(0, 25)), 2)).astype(float)
        truth = rng.integers(0, 12, (int(rng.integers(0, 25)), 2)).astype(float)
        tolerance = float(rng.choice([0.0, 1.0, 1.5, 2.0, 3.7]))
        assert tr.match_pairs(centres, truth, tolerance) == _greedy_by_all_pairs(
            centres, truth, tolerance
        )


def test_match_pairs_scales_as_n_log_n(deadline):
    # Issue 25, finding 8 (every pairwise step): the full distance matrix of 100 000
    # regions by 100 000 defects is 80 GB; only pairs within the tolerance are needed.
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 1e4, (100_000, 2))
    found = truth[::2] + rng.normal(0, 1e-3, (50_000, 2))
    with deadline(120):
        pairs = tr.match_pairs(found, truth, 1.0)
    assert len(pairs) == 50_000 and all(j == 2 * i for i, j in pairs)


def test_match_pairs_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="tolerance"):
        tr.match_pairs(np.zeros((1, 2)), np.zeros((1, 2)), math.nan)
    with pytest.raises(ValueError, match="finite"):
        tr.match_pairs(np.array([[math.nan, 0.0]]), np.zeros((1, 2)), 1.0)


def test_read_truth_names_what_is_not_a_dataset(tmp_path):
    with pytest.raises(ValueError, match=r"no truth\.json"):
        tr.read_truth(tmp_path)
    (tmp_path / "truth.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tr.read_truth(tmp_path)
    (tmp_path / "truth.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="no list of frames"):
        tr.read_truth(tmp_path)
