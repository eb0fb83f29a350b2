"""Reading images: TIFF (LZW included), PNG, JPEG and ``.npy`` as 2-D gray frames."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

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


def _checked_path(path: str | os.PathLike, suffixes: tuple[str, ...]) -> tuple[Path, str]:
    """The path and its lower-case suffix, if the type is known and the file exists."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise ImageReadError(
            f"{path}: unsupported file type {suffix!r}; use one of {', '.join(suffixes)}"
        )
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    return path, suffix


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
    path, suffix = _checked_path(path, IMAGE_SUFFIXES)
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


# --- Microscope files with calibration ---------------------------------------------------

RSCIIO_READERS = {
    ".dm3": "digitalmicrograph",
    ".dm4": "digitalmicrograph",
    ".emi": "tia",
    ".ser": "tia",
    ".mrc": "mrc",
    ".emd": "emd",
}
FRAME_SUFFIXES = IMAGE_SUFFIXES + tuple(RSCIIO_READERS)


def _is_number(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Physical coordinates of pixel centres: ``offset + index * scale`` per axis.

    Attributes
    ----------
    scale : (float, float)
        Pixel size along y (rows) and x (columns).
    offset : (float, float)
        Coordinate of pixel (0, 0) along y and x.
    unit : str
        Unit of ``scale`` and ``offset`` (for example ``"nm"``).
    """

    scale: tuple[float, float]
    offset: tuple[float, float] = (0.0, 0.0)
    unit: str = "px"

    def __post_init__(self) -> None:
        scale, offset = tuple(self.scale), tuple(self.offset)
        if len(scale) != 2 or not all(_is_number(v) and math.isfinite(v) and v > 0 for v in scale):
            raise ValueError(f"pixel size must be two finite numbers > 0, got {self.scale!r}")
        if len(offset) != 2 or not all(_is_number(v) and math.isfinite(v) for v in offset):
            raise ValueError(f"calibration offset must be two finite numbers, got {self.offset!r}")
        if not isinstance(self.unit, str) or not self.unit.strip() or len(self.unit) > 32:
            raise ValueError(f"unit must be a short name like 'nm', got {self.unit!r}")
        object.__setattr__(self, "scale", (float(scale[0]), float(scale[1])))
        object.__setattr__(self, "offset", (float(offset[0]), float(offset[1])))

    @classmethod
    def square(cls, pixel_size: float, unit: str = "nm") -> Calibration:
        """Square pixels of ``pixel_size`` ``unit``, origin at pixel (0, 0)."""
        return cls((pixel_size, pixel_size), (0.0, 0.0), unit)

    def check_extent(self, shape: tuple[int, ...]) -> None:
        """Raise when a frame of ``shape`` has coordinates a float cannot hold.

        ``pixel_size = 1e308`` is finite, but 512 such pixels are not: every
        calibrated position would be infinite, and JSON has no infinity.
        """
        for axis, length in enumerate(shape[:2]):
            far = self.offset[axis] + length * self.scale[axis]
            if not math.isfinite(far) or not math.isfinite(abs(self.offset[axis]) + far):
                raise ValueError(
                    f"pixel size {self.scale[axis]:g} {self.unit} with offset "
                    f"{self.offset[axis]:g} over {length} pixels gives coordinates beyond the "
                    "float range"
                )

    def to_physical(self, y: float, x: float) -> list[float]:
        """``[y, x]`` in pixels to ``[y, x]`` in ``unit``."""
        return [self.offset[0] + y * self.scale[0], self.offset[1] + x * self.scale[1]]

    def to_dict(self) -> dict:
        return {"scale": list(self.scale), "offset": list(self.offset), "unit": self.unit}


@dataclasses.dataclass
class Frame:
    """A 2-D image with where it came from and, when the file says, its calibration."""

    data: np.ndarray
    calibration: Calibration | None = None
    title: str = ""
    source: str = ""
    stack: bool = False


def _rsciio_module(suffix: str, path: Path):
    import importlib

    name = RSCIIO_READERS[suffix]
    try:
        return importlib.import_module(f"rsciio.{name}")
    except ImportError as exc:
        raise ImageReadError(
            f"{path}: reading {suffix} files needs RosettaSciIO; install the optional extra "
            "with: pip install 'defectscope[formats]'"
        ) from exc


def _signal_title(signal: dict, index: int) -> str:
    title = signal.get("metadata", {}).get("General", {}).get("title") or ""
    return str(title) or f"signal {index}"


def _describe(signals: list[dict]) -> str:
    return "; ".join(
        f"{_signal_title(s, i)!r} {tuple(np.shape(s['data']))} {np.asarray(s['data']).dtype}"
        for i, s in enumerate(signals)
    )


def _calibration(signal: dict) -> Calibration | None:
    axes = [a for a in signal.get("axes", []) if not a.get("navigate", False)]
    if len(axes) != 2:
        return None
    units = [str(a.get("units") or "") for a in axes]
    scales = [float(a.get("scale", 1.0) or 1.0) for a in axes]
    if not any(units) or units[0] != units[1] or units[0] in ("<undefined>", "px", "pixels"):
        return None
    offsets = [float(a.get("offset", 0.0) or 0.0) for a in axes]
    try:
        return Calibration((scales[0], scales[1]), (offsets[0], offsets[1]), units[0])
    except ValueError:  # a zero, negative or infinite pixel size is no calibration
        return None


def _pick_signal(signals: list[dict], path: Path, channel: str | None) -> dict:
    images = [s for s in signals if np.ndim(s["data"]) >= 2]
    if channel is not None:
        wanted = [
            s for i, s in enumerate(signals) if _signal_title(s, i).lower() == channel.lower()
        ]
        if not wanted:
            raise ImageReadError(
                f"{path}: no signal named {channel!r}; it holds {_describe(signals)}"
            )
        return wanted[0]
    if len(signals) == 1:
        return signals[0]
    for key in ("haadf", "adf", "df"):
        for i, s in enumerate(images):
            if key in _signal_title(s, i).lower().replace("-", ""):
                return s
    raise ImageReadError(
        f"{path}: holds several signals and none is HAADF/ADF; choose one with --channel "
        f"NAME: {_describe(signals)}"
    )


def _frame_from_signal(signal: dict, path: Path, frame: int | None, sum_frames: bool):
    data = signal["data"]
    axes = signal.get("axes", [])
    signal_dims = sum(1 for a in axes if not a.get("navigate", False)) or np.ndim(data)
    shape = tuple(np.shape(data))
    if signal_dims == 1 or np.ndim(data) == 1:
        kind = "a spectrum or line profile" if np.ndim(data) == 1 else "a stack of spectra"
        raise ImageReadError(f"{path}: holds {kind} {shape}, not an image")
    if np.ndim(data) == 2:
        return np.asarray(data)
    if np.ndim(data) == 3:
        if sum_frames:
            return np.asarray(data).sum(axis=0, dtype=np.float64).astype(np.float32)
        if frame is None:
            raise ImageReadError(
                f"{path}: holds a stack of {shape[0]} frames {shape}; pass --frame i or --sum"
            )
        if not 0 <= frame < shape[0]:
            raise ImageReadError(f"{path}: frame {frame} out of range 0..{shape[0] - 1}")
        return np.asarray(data[frame])
    raise ImageReadError(
        f"{path}: holds {np.ndim(data)}-D data {shape} (e.g. 4-D STEM), not an image"
    )


def _tiff_calibration(path: Path) -> tuple[Calibration | None, str]:
    """Calibration from DM/FEI/ImageJ TIFF tags through RosettaSciIO, when installed."""
    try:
        from rsciio.tiff import file_reader as tiff_reader
    except ImportError:
        return None, ""
    try:
        signal = tiff_reader(str(path), lazy=True)[0]
    except Exception:  # calibration is optional; the pixels are read by tifffile
        return None, ""
    axes = [a for a in signal.get("axes", []) if not a.get("navigate", False)]
    if len(axes) == 2 and not any(a.get("units") for a in axes):
        import tifffile

        # RosettaSciIO keeps ImageJ's scale but not its unit.
        with tifffile.TiffFile(path) as tif:
            unit = (tif.imagej_metadata or {}).get("unit")
        if unit:
            for axis in axes:
                axis["units"] = unit
    title = signal.get("metadata", {}).get("General", {}).get("title") or ""
    return _calibration({"axes": axes}), str(title)


def _read_tiff_frame(path: Path, frame: int | None, sum_frames: bool) -> Frame:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
            data = tif.series[0].asarray()
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    colour = "S" in axes or "C" in axes
    stack = data.ndim == 3 and not colour  # a stack of frames (ImageJ Z/T/I axes)
    if stack:
        data = _frame_from_signal({"data": data}, path, frame, sum_frames)
    else:
        data = read_image(path)
    calibration, title = _tiff_calibration(path)
    return Frame(data, calibration, title, str(path), stack=stack)


def _read_npy_frame(path: Path, frame: int | None, sum_frames: bool) -> Frame:
    """A 2-D ``.npy`` image, or one frame (or the sum) of a ``(n, H, W)`` stack."""
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 3 and data.shape[-1] not in (3, 4):
        if data.dtype.kind not in "uif" or data.dtype == np.bool_:
            raise ImageReadError(f"{path}: unsupported pixel dtype {data.dtype}")
        data = _frame_from_signal({"data": data}, path, frame, sum_frames)
        return Frame(data, None, "", str(path), stack=True)
    return Frame(read_image(path), None, "", str(path))


def read_frame(
    path: str | os.PathLike,
    channel: str | None = None,
    frame: int | None = None,
    sum_frames: bool = False,
) -> Frame:
    """Read a 2-D frame and its calibration from a microscope or image file.

    Parameters
    ----------
    path : path-like
        Gatan ``.dm3``/``.dm4``, Velox/Berkeley ``.emd``, TIA ``.emi``/``.ser``,
        ``.mrc`` (these through RosettaSciIO, the ``formats`` extra), calibrated
        TIFF (DigitalMicrograph, ImageJ, FEI tags, read by RosettaSciIO when
        installed), and plain TIFF/PNG/JPEG/``.npy`` (no calibration).
    channel : str, optional
        Signal title to take from a file holding several (default: the HAADF/ADF
        image, or the only one).
    frame : int, optional
        Frame of a stack.
    sum_frames : bool
        Sum a stack's frames instead.

    Returns
    -------
    Frame
    """
    path, suffix = _checked_path(path, FRAME_SUFFIXES)
    if frame is not None and sum_frames:
        raise ImageReadError(f"{path}: choose a frame of the stack or --sum, not both")
    if suffix not in RSCIIO_READERS:
        if channel is not None:
            raise ImageReadError(
                f"{path}: a {suffix} file holds one signal; --channel {channel!r} applies to "
                "files with several (.emd, .emi, .dm4)"
            )
        if suffix in (".tif", ".tiff"):
            result = _read_tiff_frame(path, frame, sum_frames)
        elif suffix == ".npy":
            result = _read_npy_frame(path, frame, sum_frames)
        else:
            result = Frame(read_image(path), None, "", str(path))
        if (frame is not None or sum_frames) and not result.stack:
            raise ImageReadError(
                f"{path}: holds a single frame {result.data.shape}; --frame and --sum apply to "
                "stacks"
            )
        return result
    reader = _rsciio_module(suffix, path)
    try:
        if suffix == ".emd":
            try:
                signals = reader.file_reader(str(path), select_type="images")
            except TypeError:
                signals = reader.file_reader(str(path))
        else:
            signals = reader.file_reader(str(path))
    except ImageReadError:
        raise
    except Exception as exc:  # each reader raises its own types
        raise ImageReadError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    if not signals:
        raise ImageReadError(f"{path}: holds no signals")
    signal = _pick_signal(signals, path, channel)
    data = _frame_from_signal(signal, path, frame, sum_frames)
    if data.dtype.kind not in "uif":
        raise ImageReadError(f"{path}: unsupported pixel dtype {data.dtype}")
    index = next(i for i, s in enumerate(signals) if s is signal)
    if (frame is not None or sum_frames) and np.ndim(signal["data"]) == 2:
        raise ImageReadError(
            f"{path}: holds a single frame {np.shape(signal['data'])}; --frame and --sum apply "
            "to stacks"
        )
    return Frame(
        np.ascontiguousarray(data),
        _calibration(signal),
        _signal_title(signal, index),
        str(path),
        stack=np.ndim(signal["data"]) == 3,
    )
