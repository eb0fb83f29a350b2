"""Files: hashes, atomic writes and staging folders, all with the umask's modes."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with mode 0o666 so the kernel applies the process umask, as for any new
    # file (mkstemp's 0600 would hide results from other users); reading the umask
    # instead would mean changing it, process-wide.
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    import json

    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def staging_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, empty folder ``parent/<prefix><pid>-<random>`` with the umask's mode.

    :func:`tempfile.mkdtemp` makes its folder 0700, and a staging folder renamed into
    place would keep that mode: a derived artifact other users cannot read. ``mkdir``
    with 0o777 lets the kernel apply the umask (0755 by default).

    Parameters
    ----------
    parent : path-like
        Where the folder goes (created if missing); the same file system as the folder
        it will replace, so that the final rename is atomic.
    prefix : str
        Start of its name; begin it with ``.`` so listings and loaders pass it by.

    Returns
    -------
    Path
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def remove_stale_staging(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Remove ``parent/<prefix><pid>-*`` folders whose process is gone (a killed run).

    Returns the folders removed. Folders of live processes (another run making the same
    artifact right now) are left alone.
    """
    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for path in parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if not path.is_dir() or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False  # a number no process can have
    except PermissionError:
        return True  # another user's process
    return True


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the finished folder ``staging`` in place of ``target`` (same file system).

    A reader sees the old folder, then (for the instant between two renames) none, then
    the new one: never a half-written one. The old folder is removed afterwards.
    """
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(6)}")
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the previous artifact back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return target
