"""A ZeroMQ service so acquisition programs in any language can ask for maps and ROIs.

Wire format (also in the README):

- request: multipart; part 1 a UTF-8 JSON header, part 2 the raw frame bytes in C
  order (absent for ops without a frame). Header:
  ``{"op": "map"|"rois"|"ping"|"info", "id": <any JSON>, "dtype": "uint16",
  "shape": [H, W], "pixel_size": 0.02, "unit": "nm", "stride": 16, "top": 5}``;
- reply: one part, UTF-8 JSON: ``{"id", "ok": true, "regions", "rois", "timing_ms"}``
  or ``{"id", "ok": false, "error": "<one line>"}``.

The socket is a ROUTER, so REQ clients (which add an empty delimiter frame) and
DEALER clients both work; every request gets exactly one reply. Binding to
anything but loopback requires CURVE keys.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import socket as socketlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from defectscope import __version__
from defectscope.detector import Detector
from defectscope.io import Calibration
from defectscope.tiling import SUPPORTED_DTYPES

log = logging.getLogger(__name__)
DEFAULT_BIND = "tcp://127.0.0.1:5555"
# 16384 x 16384: the largest frame a request may claim.
DEFAULT_MAX_PIXELS = 16384 * 16384
OPS = ("map", "rois", "ping", "info")


class RequestError(ValueError):
    """A request the service answers with ok=false."""


def is_loopback(endpoint: str) -> bool:
    """True for tcp endpoints on 127.0.0.0/8, ::1 or localhost, and for ipc/inproc."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', interface names and host names may reach the network


def _reject_constant(name: str):
    # Python's json accepts NaN and Infinity; JSON does not, and they could not be echoed.
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())[:500]


class Service:
    """The request handler, separate from the socket so it can be tested directly.

    Parameters
    ----------
    detector : Detector
    max_pixels : int
        Largest ``H * W`` a request may claim.
    default_stride, default_top : int
        Used when the header does not say.
    """

    def __init__(
        self,
        detector: Detector,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        default_stride: int = 16,
        default_top: int = 5,
    ):
        self.detector = detector
        self.max_pixels = max_pixels
        self.default_stride = default_stride
        self.default_top = default_top

    def info(self) -> dict[str, Any]:
        engine = self.detector.engine
        return {
            "classes": engine.classes,
            "patch_size": engine.config.patch_size,
            "backend": engine.name,
            "version": __version__,
            "background": self.detector.background,
        }

    def _frame(self, header: dict, payload: bytes | None) -> np.ndarray:
        dtype = header.get("dtype")
        if dtype not in SUPPORTED_DTYPES:
            raise RequestError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {dtype!r}")
        shape = header.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
        ):
            raise RequestError(f"shape must be [H, W] with positive integers, got {shape!r}")
        if shape[0] * shape[1] > self.max_pixels:
            raise RequestError(f"shape {shape} exceeds the limit of {self.max_pixels} pixels")
        if payload is None:
            raise RequestError("op needs the frame bytes as the second message part")
        expected = shape[0] * shape[1] * np.dtype(dtype).itemsize
        if len(payload) != expected:
            raise RequestError(
                f"frame has {len(payload)} bytes, but {dtype} x {shape} needs {expected}"
            )
        frame = np.frombuffer(payload, dtype=dtype).reshape(shape)
        if frame.dtype.kind == "f" and not np.isfinite(frame).all():
            raise RequestError("frame contains NaN or infinite values")
        return frame

    def handle(self, header_bytes: bytes, payload: bytes | None) -> dict[str, Any]:
        """Answer one request; never raises."""
        request_id = None
        try:
            try:
                header = json.loads(header_bytes.decode("utf-8"), parse_constant=_reject_constant)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise RequestError(f"header is not UTF-8 JSON ({exc})") from exc
            if not isinstance(header, dict):
                raise RequestError("header must be a JSON object")
            request_id = header.get("id")
            op = header.get("op")
            if op not in OPS:
                raise RequestError(f"op must be one of {', '.join(OPS)}, got {op!r}")
            if op == "ping":
                return {"id": request_id, "ok": True, "pong": True}
            if op == "info":
                return {"id": request_id, "ok": True, **self.info()}
            return {"id": request_id, "ok": True, **self._map(header, payload, op)}
        except RequestError as exc:
            return {"id": request_id, "ok": False, "error": _one_line(exc)}
        except Exception as exc:  # a bad frame must never stop the service
            log.exception("request failed")
            return {
                "id": request_id,
                "ok": False,
                "error": _one_line(f"{type(exc).__name__}: {exc}"),
            }

    def _map(self, header: dict, payload: bytes | None, op: str) -> dict[str, Any]:
        from defectscope.rois import select_rois

        started = time.perf_counter()
        frame = self._frame(header, payload)
        stride = header.get("stride", self.default_stride)
        top = header.get("top", self.default_top)
        for name, value in (("stride", stride), ("top", top)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RequestError(f"{name} must be a positive integer, got {value!r}")
        calibration = None
        pixel_size = header.get("pixel_size")
        if pixel_size is not None:
            if (
                not isinstance(pixel_size, int | float)
                or not np.isfinite(pixel_size)
                or pixel_size <= 0
            ):
                raise RequestError(f"pixel_size must be a positive number, got {pixel_size!r}")
            unit = header.get("unit", "nm")
            if not isinstance(unit, str):
                raise RequestError(f"unit must be a string, got {unit!r}")
            calibration = Calibration((float(pixel_size),) * 2, (0.0, 0.0), unit)
        size = self.detector.engine.config.patch_size
        if frame.shape[0] < size or frame.shape[1] < size:
            raise RequestError(f"frame {list(frame.shape)} is smaller than the {size}x{size} patch")
        result = self.detector.map(frame, stride=stride, calibration=calibration)
        reply: dict[str, Any] = {"regions": result.regions()}
        if op == "rois":
            reply["rois"] = select_rois(result, top)
        reply["timing_ms"] = {
            **{k: round(v, 3) for k, v in result.timing_ms.items()},
            "request": round((time.perf_counter() - started) * 1000, 3),
        }
        return reply


def _encode(reply: dict[str, Any]) -> bytes:
    try:
        return json.dumps(reply, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:  # e.g. an id that cannot be echoed
        return json.dumps({"id": None, "ok": False, "error": _one_line(str(exc))}).encode()


def _curve_setup(context, socket, secret_key_file: Path, clients_dir: Path):
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    if not secret_key_file.is_file():
        raise ValueError(f"{secret_key_file}: server secret key file not found")
    if not clients_dir.is_dir():
        raise ValueError(f"{clients_dir}: folder of authorized client public keys not found")
    public, secret = zmq.auth.load_certificate(str(secret_key_file))
    if secret is None:
        raise ValueError(f"{secret_key_file}: holds no secret key")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(clients_dir))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return auth


def serve(
    artifact: str | Path,
    bind: str = DEFAULT_BIND,
    backend: str = "auto",
    curve_secret: str | Path | None = None,
    curve_clients: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ready: Any = None,
    stop: Any = None,
) -> int:
    """Serve requests until SIGTERM or SIGINT; the frame in flight is finished first.

    Binding to a non-loopback address needs ``curve_secret`` (the server's secret
    key file from ``zmq.auth.create_certificates``) and ``curve_clients`` (a folder
    of authorized client public keys); without them it refuses to start.
    ``ready`` (a ``threading.Event``) is set once the socket is bound; setting
    ``stop`` (another one) ends the loop like SIGTERM, for callers in a thread.
    Returns the number of requests answered.
    """
    import zmq

    secure = curve_secret is not None or curve_clients is not None
    if not is_loopback(bind) and not secure:
        raise ValueError(
            f"refusing to bind {bind} without CURVE keys: pass --curve-secret and "
            "--curve-clients, or bind to tcp://127.0.0.1"
        )
    if secure and (curve_secret is None or curve_clients is None):
        raise ValueError("CURVE needs both --curve-secret and --curve-clients")
    detector = Detector.load(artifact, backend=backend)
    service = Service(detector, max_pixels=max_pixels)
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 1000)
    auth = None
    if secure:
        auth = _curve_setup(context, socket, Path(curve_secret), Path(curve_clients))
    socket.bind(bind)
    stopping = {"flag": False}

    def on_signal(signum, _frame):
        stopping["flag"] = True

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    except ValueError:  # not the main thread: the caller stops us some other way
        pass
    if ready is not None:
        ready.set()
    log.info("serving %s on %s", artifact, bind)
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    served = 0
    try:
        while not stopping["flag"] and not (stop is not None and stop.is_set()):
            if not poller.poll(100):
                continue
            parts = socket.recv_multipart(copy=False)
            identity, rest = parts[0], parts[1:]
            envelope = [identity]
            if rest and len(rest[0]) == 0:  # REQ clients send an empty delimiter
                envelope.append(rest[0])
                rest = rest[1:]
            if not rest:
                reply = {"id": None, "ok": False, "error": "empty request"}
            elif len(rest) > 2:
                reply = {
                    "id": None,
                    "ok": False,
                    "error": f"expected 1 or 2 parts, got {len(rest)}",
                }
            else:
                payload = rest[1].buffer if len(rest) == 2 else None
                reply = service.handle(rest[0].bytes, payload)
            socket.send_multipart([*envelope, json.dumps(reply, allow_nan=False).encode()])
            served += 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        socket.close()
        if auth is not None:
            auth.stop()
        context.term()
        detector.close()
    return served


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BackgroundService:
    """:func:`serve` in a daemon thread, for Python hosts, tests and benchmarks.

    A context manager: entering starts the service and waits until it is bound
    (re-raising a startup failure instead of waiting it out); leaving stops it
    after the request in flight. ``bind`` defaults to a free loopback port;
    ``address`` is where clients connect, ``served`` the requests answered once
    stopped. Other keywords go to :func:`serve`.

    >>> with BackgroundService("runs/cdte/model") as service:  # doctest: +SKIP
    ...     Client(service.address).ping()
    """

    def __init__(
        self,
        artifact: str | Path,
        bind: str | None = None,
        backend: str = "auto",
        startup_timeout: float = 120.0,
        **options: Any,
    ) -> None:
        self.address = bind or f"tcp://127.0.0.1:{free_loopback_port()}"
        self.served: int | None = None
        self._args = (artifact, self.address, backend)
        self._options = options
        self._startup_timeout = startup_timeout
        self._ready, self._stop = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="defectscope-serve")

    def _run(self) -> None:
        try:
            self.served = serve(*self._args, ready=self._ready, stop=self._stop, **self._options)
        except BaseException as error:  # handed to the thread that started us
            self._error = error
            self._ready.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> BackgroundService:
        self._thread.start()
        if not self._ready.wait(self._startup_timeout):
            self._stop.set()
            raise TimeoutError(f"service on {self.address} not ready in {self._startup_timeout} s")
        if self._error is not None:
            raise RuntimeError(f"service on {self.address} failed to start") from self._error
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError(f"service on {self.address} did not stop within 30 s")
        if self._error is not None and exc[0] is None:
            raise RuntimeError(f"service on {self.address} failed") from self._error
