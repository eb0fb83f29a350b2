"""Map geometry of a resampled frame (issue 26): windows ``patch_size / scale`` wide.

Maps are built by hand (no model): origins as the detector makes them for a frame
resampled by ``f`` (tile the resampled frame, then ``round(o / f)``), checked against
hand-computed centres, boxes and nearest-window pixel indices.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from defectscope.maps.result import MapResult, find_regions, pixel_grid_index, windows_csv
from defectscope.maps.rois import select_rois
from defectscope.tiling.tiler import window_origins


def _probabilities(defect: np.ndarray) -> np.ndarray:
    probs = np.empty((*defect.shape, 2), np.float32)
    probs[..., 0] = np.where(defect, 0.1, 0.9)
    probs[..., 1] = np.where(defect, 0.9, 0.1)
    return probs


def _resampled_map(frame_shape, factor, defect_windows=()):
    """A map of a frame resampled by ``factor``: origins back in the frame's pixels."""
    height, width = frame_shape
    resampled = (round(height * factor), round(width * factor))
    origins = np.round(window_origins(resampled, 64, 16) / factor).astype(np.int64)
    rows = len(np.unique(origins[:, 0]))
    cols = len(origins) // rows
    defect = np.zeros((rows, cols), bool)
    for r, c in defect_windows:
        defect[r, c] = True
    return MapResult(
        origins,
        (rows, cols),
        _probabilities(defect),
        None,
        ["Bulk", "A"],
        "Bulk",
        frame_shape,
        64,
        {},
        scale=factor,
    )


def _grid_map(row_origins, col_origins, frame_shape, defect, scale=1.0, embeddings=False):
    """A map on a hand-made origin grid."""
    grid = np.stack(np.meshgrid(row_origins, col_origins, indexing="ij"), axis=-1)
    shape = defect.shape
    emb = np.zeros((*shape, 3), np.float32) if embeddings else None
    return MapResult(
        grid.reshape(-1, 2).astype(np.int64),
        shape,
        _probabilities(defect),
        emb,
        ["Bulk", "A"],
        "Bulk",
        frame_shape,
        64,
        {},
        scale=scale,
    )


def test_scale_0_8_windows_are_80_px_and_boxes_clip_to_the_frame():
    # 107 x 127 px zoomed by 0.8 is 86 x 102: rows 0, 16, 22 and columns 0, 16, 32, 38
    # there, i.e. 0, 20, 28 (27.5 rounds to even) and 0, 20, 40, 48 (47.5) in the frame.
    result = _resampled_map((107, 127), 0.8, [(0, 0), (0, 1), (2, 3)])
    assert result.grid_shape == (3, 4)
    grid = result.origins.reshape(3, 4, 2)
    assert grid[:, 0, 0].tolist() == [0, 20, 28]
    assert grid[0, :, 1].tolist() == [0, 20, 40, 48]
    assert result.window_size == 80.0 and result.window_extent == 80
    np.testing.assert_array_equal(result.centers, result.origins + 39.5)
    corner, pair = sorted(find_regions(result), key=lambda r: r["n_windows"])
    # Window (2, 3) spans rows 28..107 and columns 48..127: one pixel past the frame each.
    assert corner["bbox"] == [28, 48, 107, 127]
    assert corner["centroid"] == pytest.approx([67.5, 87.5])
    assert pair["bbox"] == [0, 0, 80, 100]
    assert pair["centroid"] == pytest.approx([39.5, 49.5])  # equal weights: plain mean
    rows, cols = pixel_grid_index(result)
    # Centres 39.5, 59.5, 67.5 (rows): midpoints 49.5 and 63.5.
    np.testing.assert_array_equal(rows, np.repeat([0, 1, 2], [50, 14, 43]))
    # Centres 39.5, 59.5, 79.5, 87.5 (columns): midpoints 49.5, 69.5, 83.5.
    np.testing.assert_array_equal(cols, np.repeat([0, 1, 2, 3], [50, 20, 14, 43]))


def test_scale_1_25_windows_are_51_2_px():
    # 100 x 120 px zoomed by 1.25 is 125 x 150: rows 0, 16, 32, 48, 61 there are
    # 0, 13, 26, 38, 49 here (12.8, 25.6, 38.4, 48.8 rounded); columns likewise.
    result = _resampled_map((100, 120), 1.25, [(4, 6), (1, 2), (2, 2)])
    grid = result.origins.reshape(*result.grid_shape, 2)
    assert grid[:, 0, 0].tolist() == [0, 13, 26, 38, 49]
    assert grid[0, :, 1].tolist() == [0, 13, 26, 38, 51, 64, 69]
    assert result.window_size == pytest.approx(51.2) and result.window_extent == 51
    np.testing.assert_allclose(result.centers, result.origins + 25.1, atol=1e-12)
    column, corner = sorted(find_regions(result), key=lambda r: r["bbox"][0])
    assert corner["bbox"] == [49, 69, 100, 120]
    assert corner["centroid"] == pytest.approx([74.1, 94.1])
    assert column["bbox"] == [13, 26, 26 + 51, 26 + 51]
    assert column["centroid"] == pytest.approx([(38.1 + 51.1) / 2, 51.1])
    rows, cols = pixel_grid_index(result)
    # Row centres 25.1, 38.1, 51.1, 63.1, 74.1: midpoints 31.6, 44.6, 57.1, 68.6.
    np.testing.assert_array_equal(rows, np.repeat(np.arange(5), [32, 13, 13, 11, 31]))
    # Column centres 25.1, 38.1, 51.1, 63.1, 76.1, 89.1, 94.1.
    np.testing.assert_array_equal(cols, np.repeat(np.arange(7), [32, 13, 13, 12, 13, 9, 28]))
    table = list(csv.DictReader(io.StringIO(windows_csv(result))))
    # A resampled map's centres are written to four decimals (the window size is not whole).
    assert [row["cy"] for row in table[:: result.grid_shape[1]]] == [
        "25.1000",
        "38.1000",
        "51.1000",
        "63.1000",
        "74.1000",
    ]
    assert table[-1]["cx_norm"] == f"{(94.1 + 0.5) / 120:.6f}"


def test_scale_1_is_the_patch_geometry():
    defect = np.zeros((5, 7), bool)
    defect[1:3, 1:3] = True
    result = _grid_map(np.arange(5) * 16, np.arange(7) * 16, (128, 160), defect)
    assert result.scale == 1.0 and result.window_size == 64 and result.window_extent == 64
    (region,) = find_regions(result)
    assert region["bbox"] == [16, 16, 96, 96]  # windows at 16 and 32, 64 px wide
    assert region["centroid"] == [55.5, 55.5]  # centres 47.5 and 63.5
    assert region["n_windows"] == 4 and "absorbed_unknown" not in region
    assert "frame_out_of_distribution" not in region  # no density: the old schema
    np.testing.assert_array_equal(result.centers, result.origins + 31.5)
    rows, cols = pixel_grid_index(result)
    np.testing.assert_array_equal(rows, np.repeat(np.arange(5), [40, 16, 16, 16, 40]))
    np.testing.assert_array_equal(cols, np.repeat(np.arange(7), [40, 16, 16, 16, 16, 16, 40]))
    table = list(csv.DictReader(io.StringIO(windows_csv(result))))
    assert (table[8]["row"], table[8]["cy"], table[8]["cx"]) == ("16", "47.5", "47.5")


@pytest.mark.parametrize(
    ("scale", "apart", "expected"),
    [
        (1.0, 4, 1),  # 56 px < 64: the second is too close
        (1.25, 4, 2),  # 56 px >= 51.2
        (1.0, 5, 2),  # 70 px >= 64
        (0.8, 5, 1),  # 70 px < 80
    ],
)
def test_roi_spacing_defaults_to_the_window_size(scale, apart, expected):
    defect = np.zeros((6, 12), bool)
    defect[2, 2] = defect[2, 2 + apart] = True
    origins = np.arange(12) * 14
    result = _grid_map(
        np.arange(6) * 14, origins, (6 * 14 + 80, 12 * 14 + 80), defect, scale, embeddings=True
    )
    assert len(select_rois(result, top=5)) == expected
    assert len(select_rois(result, top=5, min_spacing=10)) == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("scale", 0.0),
        ("scale", -1.0),
        ("scale", float("nan")),
        ("scale", float("inf")),
        ("ood_threshold", 0.0),
        ("ood_threshold", 1.5),
        ("ood_threshold", float("nan")),
    ],
)
def test_bad_scale_or_threshold_is_a_value_error_naming_it(key, value):
    with pytest.raises(ValueError, match=f"MapResult {key} must"):
        MapResult(
            np.zeros((4, 2), np.int64),
            (2, 2),
            np.zeros((2, 2, 2), np.float32),
            None,
            ["Bulk", "A"],
            "Bulk",
            (80, 80),
            64,
            {},
            **{key: value},
        )


def test_recall_at_sources_compares_centres_of_a_resampled_map():
    """A 64-px crop centred on a 128-px window (scale 0.5) is found there, not at the
    window whose top-left corner is nearest its own (failed before: compared corners)."""
    from defectscope.evaluation.provenance import recall_at_sources

    defect = np.zeros((3, 4), bool)
    defect[1, 1] = True  # the window at (32, 32), centre 95.5
    result = _grid_map(np.arange(3) * 32, np.arange(4) * 32, (192, 224), defect, scale=0.5)
    assert result.window_size == 128
    # Crop top-left (64, 64): centre 95.5 like window (1, 1); its corner is window (2, 2)'s.
    positions = np.array([[64, 64]])
    report = recall_at_sources(result, positions, np.array([1]), ["Bulk", "A"])
    assert report["A"] == {"located": 1, "recovered": 1.0}
    # Crops of another side say so: a 128-px crop at (32, 32) is window (1, 1) itself.
    report = recall_at_sources(result, np.array([[32, 32]]), np.array([1]), ["Bulk", "A"], 128)
    assert report["A"] == {"located": 1, "recovered": 1.0}
    with pytest.raises(ValueError, match="crop_size"):
        recall_at_sources(result, positions, np.array([1]), ["Bulk", "A"], 0)


def test_figure_titles_say_the_scale_and_nothing_at_scale_1(tmp_path):
    from defectscope.outputs.figures import map_note, map_overlay

    defect = np.zeros((5, 7), bool)
    defect[1:3, 1:3] = True
    plain = _grid_map(np.arange(5) * 16, np.arange(7) * 16, (128, 160), defect)
    assert map_note(plain) == ""
    scaled = _resampled_map((100, 120), 1.25, [(1, 2)])
    assert map_note(scaled) == "\nresampled x1.25 for the model"
    frame = np.random.default_rng(0).random((100, 120)).astype(np.float32)
    path = map_overlay(frame, scaled, tmp_path / "overlay.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
