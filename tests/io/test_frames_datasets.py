"""Reading images in every supported form and discovering datasets in both layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from defectscope.io.datasets import (
    DatasetError,
    PatchSet,
    discover,
    label_from_filename,
    load_patches,
)
from defectscope.io.files import atomic_write_json
from defectscope.io.frames import ImageReadError, read_image, to_gray


@pytest.fixture
def gray():
    return np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)


def test_formats_round_trip(tmp_path, gray):
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    tifffile.imwrite(tmp_path / "a.tif", rgba, compression="lzw")
    tifffile.imwrite(tmp_path / "b.tiff", gray.astype(np.uint16) * 200)
    Image.fromarray(np.dstack([gray] * 3)).save(tmp_path / "c.png")
    np.save(tmp_path / "d.npy", gray.astype(np.float32))
    Image.fromarray(gray).save(tmp_path / "e.jpg", quality=100)
    assert np.array_equal(read_image(tmp_path / "a.tif"), gray)
    b = read_image(tmp_path / "b.tiff")
    assert b.dtype == np.uint16 and np.array_equal(b, gray.astype(np.uint16) * 200)
    assert np.array_equal(read_image(tmp_path / "c.png"), gray)
    assert np.array_equal(read_image(tmp_path / "d.npy"), gray.astype(np.float32))
    assert np.abs(read_image(tmp_path / "e.jpg").astype(int) - gray).max() <= 3


def test_color_image_becomes_mean(gray):
    rgb = np.dstack([gray, gray // 2, np.zeros_like(gray)])
    out = to_gray(rgb)
    np.testing.assert_allclose(out, (gray.astype(np.float32) + gray // 2) / 3, rtol=1e-6)


def test_unreadable_files_named(tmp_path):
    bad = tmp_path / "Bulk_0.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(ImageReadError, match=r"Bulk_0\.tif"):
        read_image(bad)
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_image(tmp_path / "x.bmp")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 5, 5)))
    with pytest.raises(ImageReadError, match=r"shape \(2, 3, 5, 5\)"):
        read_image(tmp_path / "cube.npy")


def test_label_from_filename():
    assert label_from_filename("x/Twin_Bound_17.tif") == "Twin_Bound"
    with pytest.raises(DatasetError, match="no class label"):
        label_from_filename("x/Bulk.tif")


def _write_upstream(folder, gray, classes=("Bulk", "Vacancy_CdTe"), n=3):
    folder.mkdir(parents=True)
    for c in classes:
        for i in range(n):
            tifffile.imwrite(folder / f"{c}_{i}.tif", np.roll(gray, i), compression="lzw")


def test_both_layouts_agree(tmp_path, gray):
    _write_upstream(tmp_path / "up", gray)
    for c in ("Bulk", "Vacancy_CdTe"):
        (tmp_path / "byclass" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.roll(gray, i)).save(tmp_path / "byclass" / c / f"p{i}.png")
    a, b = load_patches(tmp_path / "up"), load_patches(tmp_path / "byclass")
    assert a.classes == b.classes == ["Bulk", "Vacancy_CdTe"]
    assert a.counts() == b.counts() == {"Bulk": 3, "Vacancy_CdTe": 3}
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_bad_files_error_or_skip(tmp_path, gray):
    _write_upstream(tmp_path / "d", gray)
    (tmp_path / "d" / "Bulk_9.tif").write_bytes(b"garbage")
    tifffile.imwrite(tmp_path / "d" / "Bulk_10.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"Bulk_10\.tif|Bulk_9\.tif"):
        load_patches(tmp_path / "d")
    patches = load_patches(tmp_path / "d", skip_bad=True)
    assert len(patches.labels) == 6
    assert sorted(p.split("/")[-1] for p, _ in patches.skipped) == ["Bulk_10.tif", "Bulk_9.tif"]


def test_empty_and_nested_folders(tmp_path, gray):
    (tmp_path / "empty" / "Bulk").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no images"):
        discover(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not found"):
        discover(tmp_path / "nowhere")
    (tmp_path / "up" / "DataSet_CdTe").mkdir(parents=True)
    (tmp_path / "up" / "DataSet_STO").mkdir()
    with pytest.raises(DatasetError, match="several datasets"):
        discover(tmp_path / "up")


def test_public_layout(public_data):
    patches = load_patches(public_data / "Image Data" / "DataSet_STO")
    assert patches.counts() == {"Bulk": 225, "Extra": 195, "IExtra": 143, "Mis": 201}
    assert patches.images.shape == (764, 64, 64)


def test_without_class_renumbers_and_keeps_groups_and_calibration():
    # Reference: the left-out patches picked by a list comprehension over names.
    classes = ["A", "B", "C"]
    labels = np.array([0, 1, 2, 1, 0, 2, 2], dtype=np.int64)
    images = np.arange(7, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    groups = np.array([10, 11, 12, 13, 14, 15, 16], dtype=np.int64)
    patches = PatchSet(
        images,
        labels,
        classes,
        [f"p{i}" for i in range(7)],
        groups=groups,
        pixel_size=0.02,
        unit="nm",
    )
    index = np.array([6, 1, 2, 3])
    kept = patches.without_class("B", index)
    expected = [i for i in index if classes[labels[i]] != "B"]
    assert kept.paths == [f"p{i}" for i in expected]
    assert kept.classes == ["A", "C"]
    assert [kept.classes[k] for k in kept.labels] == [classes[labels[i]] for i in expected]
    assert kept.labels.dtype == np.int64
    assert kept.groups.tolist() == groups[expected].tolist()
    assert (kept.pixel_size, kept.unit) == (0.02, "nm")
    np.testing.assert_array_equal(kept.images, images[expected])
    # Without an index every patch is a candidate; the source is left as it was.
    whole = patches.without_class("A")
    assert whole.paths == ["p1", "p2", "p3", "p5", "p6"] and whole.labels.tolist() == [
        0,
        1,
        0,
        1,
        1,
    ]
    assert patches.classes == classes and patches.labels.tolist() == labels.tolist()
    with pytest.raises(ValueError, match="'D' is not one of"):
        patches.without_class("D")
    with pytest.raises(TypeError, match="dtype bool"):
        patches.without_class("A", labels == 1)


def test_atomic_json_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"a": float("nan")})
    assert target.read_text().strip().endswith("}")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_shared_data_is_the_pinned_commit(public_data):
    from defectscope.io.datasets import UPSTREAM_DATA_FILES, UPSTREAM_DATA_SHA256, data_digest

    assert data_digest(public_data) == (UPSTREAM_DATA_SHA256, UPSTREAM_DATA_FILES)


def test_download_checks_every_file_and_keeps_nothing_wrong(tmp_path, monkeypatch):
    import pooch

    from defectscope.io import datasets

    def fake_retrieve(url, known_hash, fname, path, processor, progressbar):
        assert datasets.UPSTREAM_COMMIT in url  # the pinned commit, not a branch
        top = Path(path) / processor.extract_dir / "repo-main"
        (top / "Image Data" / "DataSet_STO").mkdir(parents=True)
        (top / "Image Data" / "DataSet_STO" / "Bulk_0.tif").write_bytes(b"tampered")
        return [str(top / "Image Data" / "DataSet_STO" / "Bulk_0.tif")]

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    with pytest.raises(datasets.DatasetError, match="does not match commit"):
        datasets._download_upstream(tmp_path)
    assert not (tmp_path / datasets.UPSTREAM_NAME).exists()

    def offline(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(pooch, "retrieve", offline)
    with pytest.raises(datasets.DatasetError, match="--data PATH"):
        datasets._download_upstream(tmp_path)


def test_download_of_the_right_files_is_accepted(public_data, tmp_path, monkeypatch):
    import shutil

    import pooch

    from defectscope.io import datasets

    def fake_retrieve(url, known_hash, fname, path, processor, progressbar):
        top = Path(path) / processor.extract_dir / f"repo-{datasets.UPSTREAM_COMMIT}"
        shutil.copytree(public_data / "Image Data", top / "Image Data")
        for name in datasets.DATASET_FRAMES.values():
            shutil.copy(public_data / name, top / name)
        return [str(p) for p in top.rglob("*") if p.is_file()]

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    final = datasets._download_upstream(tmp_path)
    assert final == tmp_path / datasets.UPSTREAM_NAME
    assert (final / "Image Data" / "DataSet_CdTe").is_dir()


def test_hidden_files_are_skipped_and_listed(tmp_path, gray, caplog):
    """Before: names beginning with '.' were left out without a word."""
    import logging

    _write_upstream(tmp_path / "up", gray)
    tifffile.imwrite(tmp_path / "up" / "._Bulk_0.tif", gray)
    (tmp_path / "up" / ".DS_Store").write_bytes(b"not an image: not listed")
    with caplog.at_level(logging.WARNING):
        patches = load_patches(tmp_path / "up")
    assert len(patches.labels) == 6
    assert patches.skipped == [(str(tmp_path / "up" / "._Bulk_0.tif"), patches.skipped[0][1])]
    assert "name begins with '.'" in patches.skipped[0][1]
    assert any("._Bulk_0.tif" in r.getMessage() for r in caplog.records)
    # One folder per class: hidden files, hidden folders inside and beside the classes.
    root = tmp_path / "byclass"
    for c in ("Bulk", "Vacancy"):
        (root / c / "more").mkdir(parents=True)
        Image.fromarray(gray).save(root / c / "p.png")
        Image.fromarray(gray).save(root / c / "more" / "q.png")
        Image.fromarray(gray).save(root / c / ".p.png")
    (root / "Bulk" / ".thumbs").mkdir()
    Image.fromarray(gray).save(root / "Bulk" / ".thumbs" / "p.png")
    (root / ".trash" / "Bulk").mkdir(parents=True)
    Image.fromarray(gray).save(root / ".trash" / "Bulk" / "x.png")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    patches = load_patches(root)
    assert patches.counts() == {"Bulk": 2, "Vacancy": 2}
    assert sorted(Path(p).relative_to(root).as_posix() for p, _ in patches.skipped) == [
        ".trash",
        "Bulk/.p.png",
        "Bulk/.thumbs",
        "Vacancy/.p.png",
    ]
    reasons = dict((Path(p).name, r) for p, r in patches.skipped)
    assert reasons[".trash"] == "hidden folder (name begins with '.'), 1 images not read"


def test_files_and_folders_get_the_umask_modes(tmp_path):
    """Written files 0666 and folders 0777 less the umask, as any new file (not mkstemp's 0600)."""
    import os
    import stat

    from defectscope.io.files import atomic_write_bytes, staging_dir

    for mask in (0o022, 0o027):
        old = os.umask(mask)
        try:
            atomic_write_bytes(tmp_path / f"f{mask}.bin", b"x")
            folder = staging_dir(tmp_path, f".stage{mask}-")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / f"f{mask}.bin").stat().st_mode) == 0o666 & ~mask
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
        assert folder.name.startswith(f".stage{mask}-{os.getpid()}-")


def test_replace_dir_swaps_a_finished_folder_in(tmp_path):
    from defectscope.io.files import remove_stale_staging, replace_dir, staging_dir

    target = tmp_path / "dense"
    target.mkdir()
    (target / "old.onnx").write_text("old")
    new = staging_dir(tmp_path, ".dense.staging-")
    (new / "new.onnx").write_text("new")
    replace_dir(new, target)
    assert [p.name for p in target.iterdir()] == ["new.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
    fresh = staging_dir(tmp_path, ".x-")
    replace_dir(fresh, tmp_path / "made")  # nothing there before
    assert (tmp_path / "made").is_dir()
    # A staging folder of a process that is gone is removed; one of a live process is not.
    dead = tmp_path / ".dense.staging-999999999-abc"
    dead.mkdir()
    live = staging_dir(tmp_path, ".dense.staging-")
    assert remove_stale_staging(tmp_path, ".dense.staging-") == [dead]
    assert live.is_dir() and not dead.exists()
