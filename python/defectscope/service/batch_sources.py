"""Which files a batch run maps, and the key each one is known by.

A run's inputs are files named, found in folders (recursively) or matched by globs.
Each is keyed by its path relative to the *input root*, the deepest folder that holds
every source, so ``a.npy`` and ``sub/a.npy`` are two frames however alike their names
and bytes. What the run writes is never an input: the output folder and anything under
it are left out, or, when the output folder is itself an input folder (``batch IN
--out IN``), its ``frames/`` folder and the index files. Nor is a frame's output folder
of another run (a folder holding a batch record, ``done.json``) searched.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from defectscope.io.frames import FRAME_SUFFIXES

# What run_batch writes under its output folder, and the record in each frame's folder.
FRAMES_DIR = "frames"
INDEX_FILES = ("index.parquet", "index.csv")
RECORD = "done.json"


@dataclass(frozen=True)
class Source:
    """One input file: its resolved path and its key (path relative to the input root)."""

    path: Path
    key: str


def _glob_base(pattern: str) -> Path:
    """The folder a glob searches: its leading components without wildcards."""
    parts = Path(pattern).parts
    base = []
    for part in parts:
        if glob.has_magic(part):
            break
        base.append(part)
    return Path(*base) if base else Path(".")


def owned_paths(out: str | os.PathLike, sources: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The resolved paths under ``out`` that a run writes or owns, never to be inputs.

    The whole output folder, unless it is an input folder or above one: then its
    ``frames/`` folder and its index files only (the frames beside them are inputs).
    """
    out = Path(out).resolve()
    folders = [Path(s).resolve() for s in map(os.fspath, sources) if Path(s).is_dir()]
    if any(folder == out or out in folder.parents for folder in folders):
        return [out / FRAMES_DIR, *(out / name for name in INDEX_FILES)]
    return [out]


def _inside(path: Path, excluded: list[Path]) -> bool:
    return any(path == e or e in path.parents for e in excluded)


def _is_output_folder(folder: Path, seen: dict[Path, bool]) -> bool:
    """True when ``folder`` is a frame's output folder (it holds a batch record)."""
    if folder not in seen:
        seen[folder] = (folder / RECORD).is_file()
    return seen[folder]


def find_sources(
    sources: Iterable[str | os.PathLike], out: str | os.PathLike | None = None
) -> list[Path]:
    """Files named, found in folders (recursively) or matched by globs, sorted, unique.

    Only files ``read_frame`` can open are taken from folders and globs; a TIA
    ``.emi`` is left out when its ``.ser`` data files are there (they hold the same
    image). A named file is always kept, so a wrong one gets its error row.

    Parameters
    ----------
    sources : iterable of path-like or str
        Files, folders and globs.
    out : path-like, optional
        The run's output folder: what it writes there (:func:`owned_paths`) is never
        an input.

    Raises
    ------
    FileNotFoundError
        For a source that is no file, folder or matching glob.
    ValueError
        For a named file or a folder inside what the run writes.
    """
    return [source.path for source in keyed_sources(sources, out)]


def keyed_sources(
    sources: Iterable[str | os.PathLike], out: str | os.PathLike | None = None
) -> list[Source]:
    """As :func:`find_sources`, each file with its key (see :func:`input_root`).

    Sorted by key; the keys are unique (POSIX separators).
    """
    sources = [os.fspath(s) for s in sources]
    excluded = owned_paths(out, sources) if out is not None else []
    found: set[Path] = set()
    roots: list[Path] = []
    records: dict[Path, bool] = {}
    for text in sources:
        path = Path(text)
        if path.is_file():
            resolved = path.resolve()
            if _inside(resolved, excluded):
                raise ValueError(f"{text}: is an output of this run ({out}); outputs are no inputs")
            found.add(resolved)
            continue
        if path.is_dir():
            folder = path.resolve()
            if _inside(folder, excluded):
                raise ValueError(f"{text}: lies in this run's output folder {out}")
            roots.append(folder)
            candidates = (p for p in folder.rglob("*") if p.is_file())
        elif glob.has_magic(text):
            roots.append(_glob_base(text).resolve())
            candidates = (Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        else:
            raise FileNotFoundError(f"{text}: no such file, folder or matching glob")
        for candidate in candidates:
            if candidate.suffix.lower() not in FRAME_SUFFIXES:
                continue
            # Excluded by where it lies, not where a link points: an output is an output.
            if _inside(candidate.absolute(), excluded) or _inside(candidate.resolve(), excluded):
                continue
            if _is_output_folder(candidate.parent, records):
                continue
            found.add(candidate.resolve())
    files = [
        p
        for p in sorted(found)
        if not (p.suffix.lower() == ".emi" and any(p.parent.glob(f"{glob.escape(p.stem)}_*.ser")))
    ]
    root = input_root(files, roots)
    return sorted((Source(p, p.relative_to(root).as_posix()) for p in files), key=_by_key)


def _by_key(source: Source) -> str:
    return source.key


def input_root(files: list[Path], folders: Iterable[Path] = ()) -> Path:
    """The deepest folder holding every file and source folder (resolved paths)."""
    places = [str(p.parent) for p in files] + [str(f) for f in folders]
    if not places:
        return Path("/")
    return Path(os.path.commonpath(places))
