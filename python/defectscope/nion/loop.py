"""Closed-loop acquisition with Nion Swift's instrumentation: survey, ROIs, probe, subscan.

Needs the optional extra ``defectscope[nion]`` (nionswift, nionswift-instrumentation,
nionswift-usim). Inside Swift, pass the scan hardware source and the STEM controller
the application already has; headless, :class:`SimulatedSTEM` starts Nion's
simulated microscope (nionswift-usim) scanning a
:class:`~defectscope.simulate.lattice.LatticeSample`.

>>> with SimulatedSTEM(LatticeSample(vacancies_nm=[(1.0, 2.2)])) as stem:  # doctest: +SKIP
...     set_survey(stem.scan_source, pixels=256, fov_nm=12.8)
...     step = visit_top_roi(Detector.load("runs/model"), stem.scan_source, stem.stem_controller)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import threading
import time
from typing import Any

import numpy as np

from defectscope.io.frames import Calibration, Frame
from defectscope.maps.detector import Detector
from defectscope.maps.options import MapOptions, resolve_options
from defectscope.simulate.lattice import LatticeSample, ScanField

log = logging.getLogger("defectscope")
_EXTRA = "pip install 'defectscope[nion]' (nionswift, nionswift-instrumentation, nionswift-usim)"

try:
    from nion.utils import Geometry, Registry
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"defectscope.nion.loop needs Nion Swift's libraries: {_EXTRA}") from error


class LatticeScanDataGenerator:
    """nionswift-usim scan data generator that renders a :class:`LatticeSample`.

    usim asks for every frame (survey or subscan) with its pixel size, field of view
    and centre; the specimen point under the field's centre is ``center_nm`` minus the
    instrument's offset (stage position - beam shift + drift), as usim's own samples
    place it. Every field rendered is kept in :attr:`fields`, so a test knows where
    the simulated beam went without trusting the code that sent it.
    """

    def __init__(self, sample: LatticeSample, seed: int = 0) -> None:
        self.sample = sample
        self.fields: list[ScanField] = []
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def generate_scan_data(self, instrument: Any, scan_frame_parameters: Any) -> np.ndarray:
        params = scan_frame_parameters
        size = Geometry.IntSize.make(params.size)
        fov = Geometry.FloatSize.make(params.fov_size_nm)
        offset_m = instrument.value_manager.actual_offset_m
        center = Geometry.FloatPoint.make(params.center_nm)
        field = ScanField(
            center_nm=(center.y - offset_m.y * 1e9, center.x - offset_m.x * 1e9),
            fov_nm=(fov.height, fov.width),
            shape=(size.height, size.width),
            rotation_rad=float(params.rotation_rad or 0.0),
        )
        with self._lock:  # usim may call from its acquisition thread
            self.fields.append(field)
            return self.sample.render(field, params.pixel_time_us, self._rng)


class SimulatedSTEM:
    """Nion's simulated STEM (nionswift-usim), headless, scanning a lattice sample.

    A context manager: entering starts Nion's instrumentation (hardware source
    manager, scan module) with a usim instrument whose scan data come from
    :class:`LatticeScanDataGenerator`; leaving stops scanning and unregisters all.
    Attributes after entering: ``scan_source`` (the scan hardware source),
    ``stem_controller`` (``Registry.get_component("stem_controller")``) and
    ``generator``.
    """

    def __init__(self, sample: LatticeSample, seed: int = 0) -> None:
        self.generator = LatticeScanDataGenerator(sample, seed)
        self._stack = contextlib.ExitStack()
        self.scan_source: Any = None
        self.stem_controller: Any = None

    def __enter__(self) -> SimulatedSTEM:
        # Imported here: a microscope PC runs Swift's instrumentation without the simulator.
        try:
            from nion.instrumentation import HardwareSource
            from nion.usim_device import InstrumentDevice, ScanDevice
            from nionswift_plugin import nion_instrumentation_ui
        except ImportError as error:
            raise ImportError(f"the simulated STEM needs nionswift-usim: {_EXTRA}") from error

        stack = self._stack
        try:
            # The instrumentation keeps scan settings under its configuration location.
            config_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ds-nion-"))
            nion_instrumentation_ui.configuration_location = config_dir
            nion_instrumentation_ui.run()
            stack.callback(nion_instrumentation_ui.stop)
            instrument = InstrumentDevice.Instrument(
                "usim_stem_controller",
                InstrumentDevice.ValueManager(),
                InstrumentDevice.AxisManager(),
                self.generator,
            )
            scan_module = ScanDevice.ScanModule(instrument)
            controller_types = {"instrument_controller", "stem_controller"}
            Registry.register_component(instrument, controller_types)
            stack.callback(Registry.unregister_component, instrument, controller_types)
            Registry.register_component(scan_module, {"scan_module"})
            stack.callback(Registry.unregister_component, scan_module, {"scan_module"})
            manager = HardwareSource.HardwareSourceManager()
            self.scan_source = manager.get_hardware_source_for_hardware_source_id(
                scan_module.device.scan_device_id
            )
            stack.callback(self.scan_source.abort_playing, sync_timeout=5.0)
            self.stem_controller = Registry.get_component("stem_controller")
        except BaseException:
            stack.close()  # leave nothing registered after a failed start
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def set_survey(
    scan_source: Any,
    pixels: int,
    fov_nm: float,
    pixel_time_us: float = 1.0,
    rotation_rad: float = 0.0,
) -> None:
    """Make the scan a ``pixels`` x ``pixels`` survey of ``fov_nm``, no subscan."""
    if pixels < 1 or not fov_nm > 0 or not pixel_time_us > 0:
        raise ValueError(
            f"survey needs pixels >= 1, fov_nm > 0, pixel_time_us > 0; got "
            f"{pixels}, {fov_nm}, {pixel_time_us}"
        )
    scan_source.subscan_enabled = False
    params = scan_source.get_current_frame_parameters()
    params.pixel_size = Geometry.IntSize(height=pixels, width=pixels)
    params.fov_nm = float(fov_nm)
    params.pixel_time_us = float(pixel_time_us)
    params.rotation_rad = float(rotation_rad)
    scan_source.set_current_frame_parameters(params)


def frame_from_xdata(xdata: Any) -> Frame:
    """A Nion ``DataAndMetadata`` image as a :class:`~defectscope.io.frames.Frame`.

    Nion calibrates pixel *edges* (``offset`` is the field's top-left corner);
    :class:`~defectscope.io.frames.Calibration` gives pixel centres, half a pixel in.
    Coordinates stay the instrument's own (for scans, relative to the field centre).
    A calibration whose pixel size or offset is not a finite number (or the size not
    > 0) is left out with one warning line: the survey is then mapped uncalibrated
    (its scale from its lattice, see :mod:`defectscope.maps.scale`).
    """
    data = np.asarray(xdata.data)
    if data.ndim != 2:
        raise ValueError(f"expected a 2-D scan image, got data of shape {data.shape}")
    cal_y, cal_x = xdata.dimensional_calibrations
    calibration = None
    numbers = [float(c.scale) for c in (cal_y, cal_x)] + [float(c.offset) for c in (cal_y, cal_x)]
    usable = all(math.isfinite(v) for v in numbers) and cal_y.scale > 0 and cal_x.scale > 0
    if cal_y.units and cal_y.units == cal_x.units and not usable:
        log.warning(
            "scan calibration refused: pixel size (%g, %g) %s, offset (%g, %g) is not finite "
            "and > 0; the frame is mapped uncalibrated",
            *numbers[:2], cal_y.units, *numbers[2:],
        )  # fmt: skip
    elif cal_y.units and cal_y.units == cal_x.units:
        calibration = Calibration(
            scale=(float(cal_y.scale), float(cal_x.scale)),
            offset=(
                float(cal_y.offset + cal_y.scale / 2),
                float(cal_x.offset + cal_x.scale / 2),
            ),
            unit=str(cal_y.units),
        )
    source = xdata.metadata.get("hardware_source", {})
    return Frame(
        data=data,
        calibration=calibration,
        title=str(source.get("channel_name", "")),
        source=str(source.get("hardware_source_id", "")),
    )


def acquire(scan_source: Any, channel: str | None = None, timeout: float = 30.0) -> Frame:
    """Scan one whole frame with the current parameters and return it.

    ``channel`` names the detector (e.g. ``"HAADF"``); default: HAADF when it is
    among the enabled channels, else the first one.
    """
    scan_source.start_playing()
    try:
        try:
            xdatas = scan_source.get_next_xdatas_to_finish(timeout)
        except Exception as error:
            raise TimeoutError(
                f"no frame from {scan_source.hardware_source_id} within {timeout} s"
            ) from error
    finally:
        scan_source.stop_playing(sync_timeout=timeout)
    frames = [frame_from_xdata(x) for x in xdatas if x is not None]
    if not frames:
        raise RuntimeError(f"{scan_source.hardware_source_id} finished a frame without data")
    names = [frame.title for frame in frames]
    wanted = channel or ("HAADF" if "HAADF" in names else names[0])
    if wanted not in names:
        raise ValueError(f"channel {wanted!r} is not among the enabled channels {names}")
    return frames[names.index(wanted)]


@dataclasses.dataclass
class ClosedLoopStep:
    """What one survey -> ROI -> probe -> subscan step saw and did.

    Attributes
    ----------
    survey : Frame
        The survey scan.
    rois : list of dict
        Its ROIs, best first (see :mod:`defectscope.maps.rois`).
    probe_position : (float, float) or None
        Normalized ``(y, x)`` given to the STEM controller (the top ROI's
        ``center_norm``); ``None`` when the survey had no ROI.
    subscan_region : (float, float, float, float) or None
        Fractional ``(top, left, height, width)`` of the subscan in the survey field.
    subscan : Frame or None
        The subscan, centred on the top ROI.
    timing_ms : dict
        Wall time of ``survey`` (scan), ``rois`` (map and rank), ``subscan`` (probe,
        subscan scan) and ``total``.
    options : MapOptions or None
        How the survey was mapped and its ROIs ranked.
    scale : dict or None
        The survey's scale matching (``MapResult.info["scale"]``: factor, source,
        applied, warning).
    out_of_distribution : bool or None
        The survey as a whole is unlike the training data (no ROI is visited then
        unless ``options.unknown`` is 'explore'); None without a feature density.
    """

    survey: Frame
    rois: list[dict]
    probe_position: tuple[float, float] | None = None
    subscan_region: tuple[float, float, float, float] | None = None
    subscan: Frame | None = None
    timing_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    options: MapOptions | None = None
    scale: dict | None = None
    out_of_distribution: bool | None = None


def visit_top_roi(
    detector: Detector,
    scan_source: Any,
    stem_controller: Any,
    *,
    stride: int | None = None,
    top: int | None = None,
    subscan_fraction: float = 0.25,
    channel: str | None = None,
    timeout: float = 30.0,
    options: MapOptions | None = None,
) -> ClosedLoopStep:
    """Survey, rank ROIs, park the probe on the best one and subscan around it.

    Parameters
    ----------
    detector : Detector
        Maps the survey (calibrated when the scan is).
    scan_source : scan hardware source
        Nion's ``ScanHardwareSource``; its current frame parameters are the survey's.
    stem_controller : STEM controller
        Takes ``probe_position`` as ``Geometry.FloatPoint(y=..., x=...)``, 0..1 of
        the survey field, origin top-left.
    stride, top : int, optional
        Window stride (default 16) and number of ROIs ranked (default 5): ``options``'
        ``stride`` and ``top_k``, which they must agree with when both are given.
    subscan_fraction : float
        Subscan side as a fraction of the survey's (same pixel size as the survey).
    channel : str, optional
        Detector channel to map (default HAADF).
    timeout : float
        Seconds to wait for each frame.
    options : MapOptions, optional
        How the survey is mapped and its ROIs ranked (:meth:`Detector.find`): stride,
        mode, unknown policy, number of ROIs, least spacing ...

    Returns
    -------
    ClosedLoopStep
        The probe stays at the ROI afterwards; the subscan state is restored.
    """
    if not 0 < subscan_fraction <= 1:
        raise ValueError(f"subscan_fraction must be in (0, 1], got {subscan_fraction}")
    options = resolve_options(options, stride=stride, top=top)
    start = time.perf_counter()
    survey = acquire(scan_source, channel, timeout)
    scanned = time.perf_counter()
    # The survey brings its calibration; it is resampled to the model's scale.
    found = detector.find(survey, options)
    rois, result = found.rois, found.result
    ranked = time.perf_counter()
    step = ClosedLoopStep(
        survey=survey,
        rois=rois,
        options=options,
        scale=result.info.get("scale"),
        out_of_distribution=(
            bool(result.out_of_distribution) if result.unknown is not None else None
        ),
    )
    step.timing_ms = {"survey": (scanned - start) * 1e3, "rois": (ranked - scanned) * 1e3}
    if not rois:
        step.timing_ms["total"] = (ranked - start) * 1e3
        return step
    y, x = rois[0]["center_norm"]
    stem_controller.probe_position = Geometry.FloatPoint(y=y, x=x)
    region = Geometry.FloatRect.from_center_and_size(
        Geometry.FloatPoint(y=y, x=x), Geometry.FloatSize(subscan_fraction, subscan_fraction)
    )
    was_enabled, old_region = scan_source.subscan_enabled, scan_source.subscan_region
    scan_source.subscan_region = region
    scan_source.subscan_enabled = True
    try:
        step.subscan = acquire(scan_source, channel, timeout)
    finally:
        scan_source.subscan_enabled = was_enabled
        if old_region is not None:
            scan_source.subscan_region = old_region
    probe = stem_controller.probe_position
    step.probe_position = (float(probe.y), float(probe.x))
    step.subscan_region = (region.top, region.left, region.height, region.width)
    done = time.perf_counter()
    step.timing_ms.update(subscan=(done - ranked) * 1e3, total=(done - start) * 1e3)
    return step
