"""Two renderers of one specimen's atoms, on one pixel grid:

- ``fast`` (:func:`render_incoherent`): incoherent HAADF, every atom contributes
  ``Z ** exponent`` at its projected position, convolved with a Gaussian probe (numpy +
  scipy only; a 1024² frame in about a second);
- ``multislice`` (:func:`render_multislice`): abTEM (``Potential``, ``Probe`` or PRISM
  ``SMatrix``, ``GridScan``, ``AnnularDetector``, optional ``FrozenPhonons``): slow, for
  fidelity on small fields.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from defectscope.simulate.specimen import Specimen

# Electron wavelength in Å at an energy in eV (relativistic).
_HC_KEV_A = 12.398419843320026
_ME_C2_KEV = 510.99895


def electron_wavelength(energy_ev: float) -> float:
    """Relativistic electron wavelength in Å."""
    e_kev = energy_ev / 1e3
    return _HC_KEV_A / math.sqrt(e_kev * (2 * _ME_C2_KEV + e_kev))


def render_incoherent(
    positions: np.ndarray,
    numbers: np.ndarray,
    shape: tuple[int, int],
    pixel_size: float,
    probe_fwhm: float,
    origin: tuple[float, float] = (0.0, 0.0),
    exponent: float = 1.7,
    atom_scale: np.ndarray | None = None,
) -> np.ndarray:
    """Incoherent HAADF image: ``Z ** exponent`` per atom, blurred by a Gaussian probe.

    Pixel ``(i, j)`` samples the point ``x = origin[0] + j * pixel_size``,
    ``y = origin[1] + i * pixel_size`` (the units of ``positions``). Atoms are spread
    onto their four nearest pixels (bilinear), then convolved with the probe.
    ``atom_scale`` (one factor per atom) multiplies each atom's weight.

    Returns
    -------
    ndarray of float64, shape ``shape``

    Raises
    ------
    ValueError
        When the pixel size or probe is not positive, or the probe is wider than the
        image (its kernel would be larger than the image, and the image a blur).
    """
    from scipy.ndimage import gaussian_filter

    if not all(math.isfinite(v) and v > 0 for v in (pixel_size, probe_fwhm)):
        raise ValueError(
            f"pixel size {pixel_size} and probe FWHM {probe_fwhm} must be positive, finite"
        )
    if probe_fwhm / pixel_size > max(shape):
        raise ValueError(
            f"probe FWHM {probe_fwhm:.4g} is {probe_fwhm / pixel_size:.4g} pixels, wider than "
            f"the {shape[0]} x {shape[1]} image"
        )
    image = np.zeros(shape, dtype=np.float64)
    col = (positions[:, 0] - origin[0]) / pixel_size
    row = (positions[:, 1] - origin[1]) / pixel_size
    weight = np.asarray(numbers, dtype=np.float64) ** exponent
    if atom_scale is not None:
        atom_scale = np.asarray(atom_scale, dtype=np.float64)
        if atom_scale.shape != weight.shape:
            raise ValueError(f"atom_scale shape {atom_scale.shape}: one per atom is {weight.shape}")
        weight = weight * atom_scale
    r0, c0 = np.floor(row).astype(np.int64), np.floor(col).astype(np.int64)
    fr, fc = row - r0, col - c0
    for dr, dc, w in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        r, c = r0 + dr, c0 + dc
        ok = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
        # bincount sums repeated pixels in one pass (np.add.at is many times slower).
        flat = r[ok] * shape[1] + c[ok]
        image += np.bincount(flat, weight[ok] * w[ok], minlength=image.size).reshape(shape)
    sigma = probe_fwhm / (2 * math.sqrt(2 * math.log(2))) / pixel_size
    return gaussian_filter(image, sigma, mode="constant")


@dataclasses.dataclass(frozen=True)
class Multislice:
    """abTEM settings for the multislice renderer.

    The probe's convergence semi-angle comes from the requested FWHM
    (``0.514 λ / FWHM``, the Airy disk), so both renderers see the same probe size.
    """

    energy: float = dataclasses.field(
        default=200e3, metadata={"help": "multislice: beam energy in eV (--energy takes keV)"}
    )
    # 0.05 Å reaches 167 mrad at 200 kV; coarser grids cut the annulus to medium angles,
    # where a half-emptied Sr column of SrTiO3 showed brighter than a full one (coherent
    # scattering), not darker as in HAADF.
    potential_sampling: float = dataclasses.field(
        default=0.05, metadata={"help": "multislice: potential sampling in Å"}
    )
    slice_thickness: float = dataclasses.field(
        default=2.0, metadata={"help": "multislice: slice thickness in Å"}
    )
    detector_inner: float = dataclasses.field(
        default=4.5,
        metadata={"help": "multislice: HAADF inner angle, in convergence semi-angles (~70 mrad)"},
    )
    detector_outer: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "multislice: HAADF outer angle in mrad (default: what the sampling allows)"
        },
    )
    phonons: int = dataclasses.field(
        default=0, metadata={"help": "multislice: frozen phonon configs"}
    )
    phonon_sigma: float = dataclasses.field(
        default=0.08, metadata={"help": "multislice: frozen-phonon displacement (Å, rms)"}
    )
    prism_interpolation: int = dataclasses.field(  # n >= 1: PRISM with this factor
        default=0, metadata={"help": "multislice: PRISM interpolation (0: off)"}
    )
    scan_sampling: float | None = dataclasses.field(  # None: the pixel size
        default=None, metadata={"help": "multislice: scan step in Å, Fourier-interpolated"}
    )


def render_multislice(
    specimen: Specimen,
    shape: tuple[int, int],
    pixel_size: float,
    probe_fwhm: float,
    origin: tuple[float, float],
    settings: Multislice = Multislice(),
    seed: int = 0,
) -> np.ndarray:
    """HAADF image of ``specimen`` by abTEM multislice (or PRISM), on the same pixel grid
    as :func:`render_incoherent` (lengths in Å)."""
    try:
        import abtem
        from ase import Atoms
    except ImportError as exc:
        raise ImportError(
            "the multislice renderer needs abTEM: pip install 'defectscope[simulate]'"
        ) from exc
    abtem.config.set({"device": "cpu", "fft": "fftw" if _has_pyfftw() else "numpy"})
    atoms = Atoms(
        numbers=specimen.numbers,
        positions=specimen.positions,
        cell=[specimen.extent[0], specimen.extent[1], specimen.thickness],
        pbc=True,
    )
    if settings.phonons:
        atoms = abtem.FrozenPhonons(
            atoms, num_configs=settings.phonons, sigmas=settings.phonon_sigma, seed=seed
        )
    potential = abtem.Potential(
        atoms,
        sampling=settings.potential_sampling,
        slice_thickness=settings.slice_thickness,
        projection="infinite",
        parametrization="lobato",
    )
    semiangle = 0.514 * electron_wavelength(settings.energy) / probe_fwhm * 1e3  # mrad
    step = settings.scan_sampling or pixel_size
    end = (origin[0] + shape[1] * pixel_size, origin[1] + shape[0] * pixel_size)
    scan = abtem.GridScan(start=origin, end=end, sampling=step)
    detector = abtem.AnnularDetector(
        inner=settings.detector_inner * semiangle, outer=settings.detector_outer
    )
    if settings.prism_interpolation:
        s_matrix = abtem.SMatrix(
            potential=potential,
            energy=settings.energy,
            semiangle_cutoff=semiangle,
            interpolation=settings.prism_interpolation,
        )
        measurement = s_matrix.scan(scan=scan, detectors=detector)
    else:
        probe = abtem.Probe(energy=settings.energy, semiangle_cutoff=semiangle)
        measurement = probe.scan(potential=potential, scan=scan, detectors=detector)
    measurement = measurement.compute(progress_bar=False)
    if settings.scan_sampling and settings.scan_sampling != pixel_size:
        measurement = measurement.interpolate(pixel_size)
    image = np.asarray(measurement.array, dtype=np.float64).T  # abTEM's arrays are (x, y)
    out = np.zeros(shape)
    rows, cols = min(shape[0], image.shape[0]), min(shape[1], image.shape[1])
    out[:rows, :cols] = image[:rows, :cols]
    return out


def _has_pyfftw() -> bool:
    try:
        import pyfftw  # noqa: F401
    except ImportError:
        return False
    return True
