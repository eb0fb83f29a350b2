"""Patch datasets: discovery in either layout, loading, and locating the public data.

Two layouts are read:

- upstream: one folder of ``<Class>_<n>.<ext>`` files (the label is the name before
  the last ``_<n>``), as in ``Image Data/DataSet_CdTe/`` of the public repository;
- one folder per class: ``<root>/<Class>/<anything>.<ext>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from defectscope.io.frames import IMAGE_SUFFIXES, ImageReadError, read_image

UPSTREAM_NAME = "defect-classification-in-stem-images"
# The public repository's data, pinned: the commit downloaded, and the SHA-256 of its data
# files' manifest (see data_digest). GitHub makes its zip archives on the fly and does not
# promise the same bytes twice, so the files inside are checked rather than the archive.
UPSTREAM_COMMIT = "c4cf67a7528a8e234d15238211c766c05bc3a8f4"
UPSTREAM_ARCHIVE = f"https://github.com/RAW-Ayyubi/{UPSTREAM_NAME}/archive/{UPSTREAM_COMMIT}.zip"
UPSTREAM_DATA_SHA256 = "576e19e7370e6742aa866612d868ab68cf0a039fe7836d50680d6a34609012b7"
UPSTREAM_DATA_FILES = 1885
DATASET_FOLDERS = {"cdte": "DataSet_CdTe", "sto": "DataSet_STO"}
# The large frames many of each dataset's patches were cropped from.
DATASET_FRAMES = {"cdte": "CdTe_Training_Image.tif", "sto": "STO_Training_Image.jpg"}
_NUMBERED = re.compile(r"^(?P<label>.+)_(?P<index>\d+)$")
HIDDEN_REASON = "hidden (name begins with '.'), not read"
log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset folder is missing, empty or inconsistent."""


@dataclasses.dataclass
class PatchSet:
    """Patches of one dataset held in memory.

    Attributes
    ----------
    images : ndarray, shape (n, P, P)
        Gray patches in a common dtype.
    labels : ndarray of int64, shape (n,)
        Index into ``classes``.
    classes : list of str
        Sorted class names.
    paths : list of str
        Source file of each patch.
    skipped : list of (str, str)
        ``(path, reason)`` of what was left out: hidden files and folders (names
        beginning with ``.``) always, unreadable or odd-sized files with ``skip_bad``.
    groups : ndarray of int64, shape (n,), optional
        Independent group of each patch when the dataset says (``groups.json``, as
        ``simulate`` writes it); ``None``: found from the pixels (:mod:`grouping`).
    pixel_size : float, optional
        Pixel size of the patches, in ``unit``, when the data say (every patch a
        calibrated ImageJ TIFF of one pixel size, as ``simulate`` writes them).
    unit : str, optional
        Unit of ``pixel_size``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    paths: list[str]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    groups: np.ndarray | None = None
    pixel_size: float | None = None
    unit: str | None = None

    @property
    def patch_size(self) -> int:
        return int(self.images.shape[-1])

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}

    def subset(self, index: np.ndarray) -> PatchSet:
        return PatchSet(
            self.images[index],
            self.labels[index],
            self.classes,
            [self.paths[i] for i in index],
            groups=None if self.groups is None else self.groups[index],
            pixel_size=self.pixel_size,
            unit=self.unit,
        )

    def without_class(self, name: str, index: np.ndarray | None = None) -> PatchSet:
        """The patches not of class ``name``, the other classes renumbered in order.

        Groups and calibration are kept, so a model trained on the result (a
        leave-one-class-out study) still splits by group and records the pixel size.

        Parameters
        ----------
        name : str
            Class to leave out; one of ``classes``.
        index : ndarray of int, optional
            Patches to choose from (a split's part); all when omitted.

        Returns
        -------
        PatchSet
        """
        if name not in self.classes:
            raise ValueError(f"class {name!r} is not one of {self.classes}")
        drop = self.classes.index(name)
        index = np.arange(len(self.labels)) if index is None else np.asarray(index)
        if index.dtype.kind not in "iu" and index.size:
            raise TypeError(f"index must hold patch numbers (integers), got dtype {index.dtype}")
        index = index.astype(np.int64)
        kept = self.subset(index[self.labels[index] != drop])
        kept.labels = np.where(kept.labels > drop, kept.labels - 1, kept.labels).astype(np.int64)
        kept.classes = [c for c in self.classes if c != name]
        return kept


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def _is_hidden_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.name.startswith(".")


def _count_images(folder: Path) -> int:
    """Image files anywhere under ``folder`` (what a hidden folder keeps from being read)."""
    return sum(
        1
        for _, _, names in os.walk(folder)
        for name in names
        if Path(name).suffix.lower() in IMAGE_SUFFIXES
    )


def _hidden_entry(path: Path, skipped: list[tuple[str, str]] | None) -> None:
    """Note a hidden file, or a hidden folder that holds images, in ``skipped``."""
    if skipped is None:
        return
    if path.is_dir():
        count = _count_images(path)
        if count:
            skipped.append(
                (str(path), f"hidden folder (name begins with '.'), {count} images not read")
            )
    elif _is_hidden_image(path):
        skipped.append((str(path), HIDDEN_REASON))


def _class_images(folder: Path, skipped: list[tuple[str, str]] | None) -> list[Path]:
    """Image files under a class folder, hidden files and folders left out (and noted)."""
    found = []
    for top, dirs, names in os.walk(folder):
        top = Path(top)
        for name in sorted(d for d in dirs if d.startswith(".")):
            _hidden_entry(top / name, skipped)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = top / name
            if _is_image(path):
                found.append(path)
            else:
                _hidden_entry(path, skipped)
    return sorted(found)


def label_from_filename(path: str | os.PathLike) -> str:
    """Class of an upstream-layout file: the stem before the last ``_<n>``.

    Examples
    --------
    >>> label_from_filename("Image Data/DataSet_CdTe/Vacancy_CdTe_12.tif")
    'Vacancy_CdTe'
    """
    stem = Path(path).stem
    match = _NUMBERED.match(stem)
    if match is None:
        raise DatasetError(f"{path}: file name does not end in _<n>, so it has no class label")
    return match.group("label")


def discover(
    root: str | os.PathLike, skipped: list[tuple[str, str]] | None = None
) -> list[tuple[Path, str]]:
    """List ``(file, label)`` pairs under ``root`` in either layout.

    Files and folders whose names begin with ``.`` (system and editor files, checkpoint
    folders) are not read; each such image file, and each such folder that holds
    images, is appended to ``skipped`` as ``(path, reason)`` when a list is given.

    Raises
    ------
    DatasetError
        When ``root`` is missing, holds no images, or holds several datasets.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    entries = sorted(root.iterdir())
    files = [p for p in entries if _is_image(p)]
    if files:
        for path in entries:
            if path.name.startswith("."):
                _hidden_entry(path, skipped)
        return [(p, label_from_filename(p)) for p in files]
    for path in entries:
        if path.name.startswith("."):
            _hidden_entry(path, skipped)
    subdirs = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
    nested = [d for d in subdirs if d.name.startswith("DataSet_") or d.name == "Image Data"]
    if nested:
        names = ", ".join(str(d) for d in nested)
        raise DatasetError(
            f"{root}: holds several datasets ({names}); pass one of them, e.g. "
            f"'{root / 'Image Data' / 'DataSet_CdTe'}'"
        )
    items: list[tuple[Path, str]] = []
    for class_dir in subdirs:
        class_files = _class_images(class_dir, skipped)
        if not class_files:
            raise DatasetError(f"{class_dir}: class folder holds no images")
        items.extend((p, class_dir.name) for p in class_files)
    if not items:
        raise DatasetError(
            f"{root}: no images found (expected <Class>_<n> files or one folder per class; "
            f"types {', '.join(IMAGE_SUFFIXES)})"
        )
    return items


def load_patches(root: str | os.PathLike, skip_bad: bool = False) -> PatchSet:
    """Load every patch under ``root`` (either layout) into memory.

    Parameters
    ----------
    root : path-like
        Dataset folder.
    skip_bad : bool
        Leave out unreadable files and patches whose size differs from the most
        common one, recording them in ``PatchSet.skipped``; otherwise the first
        such file raises an error naming it.

    Returns
    -------
    PatchSet
        Hidden files and folders (names beginning with ``.``) are never read; they are
        listed in ``PatchSet.skipped`` and logged as a warning.
    """
    skipped: list[tuple[str, str]] = []
    items = discover(root, skipped)
    if skipped:
        log.warning(
            "%s: skipped %d hidden file(s) or folder(s) (names beginning with '.'): %s",
            root,
            len(skipped),
            ", ".join(Path(p).name for p, _ in skipped[:5]) + (", ..." if len(skipped) > 5 else ""),
        )
    images: list[np.ndarray] = []
    kept: list[tuple[Path, str]] = []
    for path, label in items:
        try:
            image = read_image(path)
        except ImageReadError as exc:
            if not skip_bad:
                raise DatasetError(f"{exc} (pass --skip-bad to leave such files out)") from exc
            skipped.append((str(path), str(exc)))
            continue
        images.append(np.asarray(image))
        kept.append((path, label))
    if not images:
        raise DatasetError(f"{root}: no readable images")
    shapes = [im.shape for im in images]
    common = max(set(shapes), key=shapes.count)
    if common[0] != common[1]:
        raise DatasetError(f"{root}: patches must be square, most are {common}")
    keep = []
    for i, (shape, (path, _)) in enumerate(zip(shapes, kept, strict=True)):
        if shape == common:
            keep.append(i)
        elif skip_bad:
            skipped.append((str(path), f"patch shape {shape} differs from {common}"))
        else:
            raise DatasetError(
                f"{path}: patch shape {shape} differs from the dataset's {common} "
                "(pass --skip-bad to leave such files out)"
            )
    images = [images[i] for i in keep]
    kept = [kept[i] for i in keep]
    dtype = np.result_type(*{im.dtype for im in images})
    classes = sorted({label for _, label in kept})
    index = {c: i for i, c in enumerate(classes)}
    pixel_size, unit = patch_calibration([p for p, _ in kept])
    return PatchSet(
        images=np.stack(images).astype(dtype, copy=False),
        labels=np.array([index[label] for _, label in kept], dtype=np.int64),
        classes=classes,
        paths=[str(p) for p, _ in kept],
        skipped=skipped,
        groups=_known_groups(Path(root), [p for p, _ in kept]),
        pixel_size=pixel_size,
        unit=unit,
    )


# ImageJ's names for "no length unit"; "A" is how ImageJ TIFFs spell Ångström.
_NO_UNIT = ("", "pixel", "pixels", "px", "inch", "none")
_UNIT_SPELLINGS = {"A": "Å", "angstrom": "Å", "um": "µm", "micron": "µm"}


def _imagej_pixel_size(path: Path) -> tuple[float, str] | None:
    """``(pixel size, unit)`` of an ImageJ TIFF with square calibrated pixels, else None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            unit = str((tif.imagej_metadata or {}).get("unit", "")).strip()
            tags = tif.pages[0].tags
            x, y = tags.get("XResolution"), tags.get("YResolution")
            if unit.lower() in _NO_UNIT or x is None or y is None:
                return None
            # Resolution is pixels per unit, a rational (numerator, denominator).
            (xn, xd), (yn, yd) = x.value, y.value
    except Exception:  # an odd TIFF has no calibration to offer; its pixels were read
        return None
    if not (xn > 0 and xd > 0 and yn > 0 and yd > 0):
        return None
    size_x, size_y = xd / xn, yd / yn
    if not (math.isfinite(size_x) and math.isclose(size_x, size_y, rel_tol=1e-6)):
        return None
    return size_x, length_unit(unit)


def length_unit(unit: str) -> str:
    """One spelling per length unit: ImageJ's and simulate's ``"A"`` is ``"Å"``, ``"um"``
    is ``"µm"``; other names as they are."""
    return _UNIT_SPELLINGS.get(unit, unit)


def patch_calibration(paths: list[Path]) -> tuple[float | None, str | None]:
    """The pixel size and unit all ``paths`` share, or ``(None, None)``.

    Only calibrated ImageJ TIFFs (``simulate`` writes them) say; a folder where a patch
    is not one, or where two patches disagree, has no pixel size (a warning says which
    two disagree). The headers alone are read.
    """
    if not paths or any(Path(p).suffix.lower() not in (".tif", ".tiff") for p in paths):
        return None, None
    first = None
    for path in paths:
        found = _imagej_pixel_size(Path(path))
        if found is None:
            return None, None
        if first is None:
            first = (path, found)
        elif found[1] != first[1][1] or not math.isclose(found[0], first[1][0], rel_tol=1e-6):
            log.warning(
                "patches of different pixel sizes (%s: %g %s, %s: %g %s): none is recorded",
                first[0], first[1][0], first[1][1], path, found[0], found[1],
            )  # fmt: skip
            return None, None
    return first[1]


def _known_groups(root: Path, paths: list[Path]) -> np.ndarray | None:
    """Group ids from ``root/groups.json`` (``{"Class/file.tif": group}``), if present.

    Raises
    ------
    DatasetError
        When the file is unreadable or leaves a patch without an integer group.
    """
    source = root / "groups.json"
    if not source.is_file():
        return None
    try:
        table = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{source}: not a readable JSON object ({exc})") from exc
    if not isinstance(table, dict):
        raise DatasetError(f"{source}: must map patch paths to group numbers")
    ids = []
    for path in paths:
        key = path.relative_to(root).as_posix()
        group = table.get(key)
        if isinstance(group, bool) or not isinstance(group, int):
            raise DatasetError(f"{source}: no integer group for {key!r}")
        ids.append(group)
    return np.array(ids, dtype=np.int64)


def _candidate_roots() -> list[Path]:
    here = Path.cwd().resolve()
    package_root = Path(__file__).resolve().parents[3]
    roots = []
    for base in (here, package_root):
        for parent in (base, *base.parents[:2]):
            roots.append(parent / "shared" / "datasets" / UPSTREAM_NAME)
            roots.append(parent / "datasets" / UPSTREAM_NAME)
    return roots


def cache_dir() -> Path:
    """Where downloaded data goes: ``$DEFECTSCOPE_CACHE`` or ``~/.cache/defectscope``."""
    return Path(os.environ.get("DEFECTSCOPE_CACHE", Path.home() / ".cache" / "defectscope"))


def data_files(root: Path) -> list[str]:
    """The public data's files under ``root``: ``Image Data/**`` and the two large frames."""
    names = [
        p.relative_to(root).as_posix() for p in (root / "Image Data").rglob("*") if p.is_file()
    ]
    names += [name for name in DATASET_FRAMES.values() if (root / name).is_file()]
    return sorted(names)


def data_digest(root: str | os.PathLike) -> tuple[str, int]:
    """SHA-256 of the manifest ``"<sha256>  <path>"`` (one line per data file, sorted).

    Equal to :data:`UPSTREAM_DATA_SHA256` exactly when ``root`` holds the pinned
    commit's data files, byte for byte, and no others.
    """
    root = Path(root)
    lines = []
    for name in data_files(root):
        digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
        lines.append(f"{digest}  {name}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), len(lines)


def _download_upstream(target: Path) -> Path:
    """Download the pinned commit with pooch, unzip it and check every data file."""
    try:
        import pooch
    except ImportError as exc:
        raise DatasetError(
            "downloading the public STEM data needs pooch (pip install 'defectscope[train]'), "
            "or pass the data folder with --data PATH"
        ) from exc
    target.mkdir(parents=True, exist_ok=True)
    final = target / UPSTREAM_NAME
    try:
        members = pooch.retrieve(
            UPSTREAM_ARCHIVE,
            known_hash=None,  # checked file by file below
            fname=f"{UPSTREAM_NAME}-{UPSTREAM_COMMIT[:12]}.zip",
            path=target,
            processor=pooch.Unzip(extract_dir=f"{UPSTREAM_NAME}-extract"),
            progressbar=True,
        )
    except Exception as exc:  # requests' and pooch's errors: no network, 404, disk
        raise DatasetError(
            "the STEM patch data was not found locally and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Get the public repository RAW-Ayyubi/"
            f"{UPSTREAM_NAME} (commit {UPSTREAM_COMMIT}) on a connected machine and pass "
            "its folder with --data PATH or DEFECTSCOPE_DATA=PATH."
        ) from exc
    extracted = target / f"{UPSTREAM_NAME}-extract"
    top = next((extracted / Path(m).relative_to(extracted).parts[0] for m in members), extracted)
    digest, count = data_digest(top)
    if digest != UPSTREAM_DATA_SHA256 or count != UPSTREAM_DATA_FILES:
        shutil.rmtree(extracted, ignore_errors=True)
        raise DatasetError(
            f"downloaded data ({count} files) does not match commit {UPSTREAM_COMMIT} "
            f"(manifest SHA-256 {digest}, expected {UPSTREAM_DATA_SHA256}); nothing was kept"
        )
    shutil.rmtree(final, ignore_errors=True)
    top.rename(final)
    shutil.rmtree(extracted, ignore_errors=True)
    return final


def locate_upstream(data: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Find the folder holding the public data (``Image Data/`` and the two frames).

    Looked up in order: ``data``, ``$DEFECTSCOPE_DATA``, a ``shared/datasets`` copy
    beside the working directory or the package, the download cache, and a
    download of the public repository archive into the cache.
    """
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise DatasetError(f"{path}: data folder not found (from --data)")
        return path
    env = os.environ.get("DEFECTSCOPE_DATA")
    if env:
        path = Path(env)
        if not path.exists():
            raise DatasetError(f"{path}: data folder not found (from DEFECTSCOPE_DATA)")
        return path
    for root in [*_candidate_roots(), cache_dir() / UPSTREAM_NAME]:
        if (root / "Image Data").is_dir():
            return root
    if not download:
        raise DatasetError("STEM patch data not found; pass --data PATH or set DEFECTSCOPE_DATA")
    return _download_upstream(cache_dir())


def dataset_folder(upstream: Path, name: str) -> Path:
    """Patch folder of dataset ``name`` ('cdte' or 'sto') in the upstream layout.

    A folder that is already a dataset (images or class folders) is returned as is.
    """
    key = name.lower()
    if key not in DATASET_FOLDERS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_FOLDERS)}")
    candidate = upstream / "Image Data" / DATASET_FOLDERS[key]
    if candidate.is_dir():
        return candidate
    if (upstream / DATASET_FOLDERS[key]).is_dir():
        return upstream / DATASET_FOLDERS[key]
    raise DatasetError(f"{upstream}: no 'Image Data/{DATASET_FOLDERS[key]}' folder")
