"""Reading images: TIFF (LZW included), PNG, JPEG and ``.npy`` as 2-D gray frames."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")


class ImageReadError(ValueError):
    """An image file could not be read or is not a usable 2-D image."""


def to_gray(image: np.ndarray, source: str = "image") -> np.ndarray:
    """Reduce an image to a 2-D gray array.

    Parameters
    ----------
    image : ndarray
        ``(H, W)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA (alpha is ignored).
    source : str
        Name used in error messages.

    Returns
    -------
    gray : ndarray, shape (H, W)
        The input's dtype when it is already gray or R = G = B (the common case for
        microscope exports); otherwise the float32 mean of R, G and B.
    """
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        rgb = image[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])
        return rgb.astype(np.float32).mean(axis=-1)
    if image.ndim == 3 and image.shape[-1] == 1:
        return image[..., 0]
    raise ImageReadError(f"{source}: expected a gray, RGB or RGBA image, got shape {image.shape}")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a 2-D gray array.

    Parameters
    ----------
    path : path-like
        ``.tif``/``.tiff`` (through tifffile, so LZW and other codecs work),
        ``.png``/``.jpg``/``.jpeg`` (Pillow) or ``.npy``.

    Returns
    -------
    gray : ndarray, shape (H, W)

    Raises
    ------
    ImageReadError
        Naming the file, when it is missing, unreadable or not a 2-D image.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(
            f"{path}: unsupported file type {suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}"
        )
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            image = tifffile.imread(path)
        elif suffix == ".npy":
            image = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as handle:
                image = np.asarray(handle)
    except Exception as exc:  # every reader has its own exception types
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    image = np.asarray(image) if suffix != ".npy" else image
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[-1] not in (3, 4):
        image = np.moveaxis(image, 0, -1)  # planar TIFF
    if image.dtype == np.bool_ or image.dtype.kind not in "uif":
        raise ImageReadError(f"{path}: unsupported pixel dtype {image.dtype}")
    return to_gray(image, source=str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from other users
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
