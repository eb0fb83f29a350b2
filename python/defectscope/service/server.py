"""A ZeroMQ service so acquisition programs in any language can ask for maps and ROIs.

Wire format (also in docs/service.md):

- request: multipart; part 1 a UTF-8 JSON header, part 2 the raw frame bytes in C
  order (absent for ops without a frame). Header:
  ``{"op": "map"|"rois"|"ping"|"info", "id": <any JSON>, "dtype": "uint16",
  "shape": [H, W], "pixel_size": 0.02, "unit": "nm", "stride": 16, "top": 5}``.
  How to map is a :class:`~defectscope.maps.options.MapOptions`: its fields may stand
  in the header itself (``"top"`` is ``top_k``; ``"stride"``, ``"unknown"``, ``"mode"``,
  ``"symmetry"`` ...) or together as ``"options": {...}`` (``MapOptions.to_json()``),
  not both for one field; :meth:`MapOptions.from_json` validates them;
- reply: one part, UTF-8 JSON: ``{"id", "ok": true, "regions", "rois", "map", "scale",
  "out_of_distribution", "unknown_share", "options", "timing_ms"}`` (``map``: how the
  map was made, :func:`~defectscope.outputs.map_files.map_summary`: ``{"mode":
  "dense"|"window", ..., "scale": {...}, "window_size", "out_of_distribution", ...}``;
  ``scale``: the scale matching, ``MapResult.info["scale"]`` (factor, source, applied,
  measured periods, warning, time_ms); ``out_of_distribution`` (None without a feature
  density) and ``unknown_share`` of the frame's windows; ``options``: the options used,
  every field; positions in the frame's own pixels whatever the scale) or ``{"id",
  "ok": false, "error": "<one line>"}``. A header may set ``"scale": "auto" | "off" |
  1.1`` and ``"ood_share"`` like any map option.

The socket is a ROUTER, so REQ clients (which add an empty delimiter frame) and
DEALER clients both work; every request gets exactly one reply. Binding to
anything but loopback requires CURVE keys.
"""

from __future__ import annotations

import collections
import dataclasses
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

from defectscope._version import __version__
from defectscope.io.frames import Calibration
from defectscope.maps.detector import Detector, MapCancelled
from defectscope.maps.options import LEGACY_NAMES, MapOptions, resolve_options
from defectscope.outputs.map_files import map_summary
from defectscope.tiling.tiler import SUPPORTED_DTYPES

log = logging.getLogger(__name__)
DEFAULT_BIND = "tcp://127.0.0.1:5555"
# 16384 x 16384: the largest frame a request may claim.
DEFAULT_MAX_PIXELS = 16384 * 16384
# The largest message part accepted (zmq.MAXMSGSIZE): 8192^2 float32 or 16384^2 uint8.
DEFAULT_MAX_BYTES = 256 * 2**20
# A map that runs longer is stopped and answered with an error.
DEFAULT_REQUEST_TIMEOUT_S = 60.0
# Map requests that may wait while one is mapped, and the bytes their frames may hold
# together (by default twice the largest frame); beyond either they are answered "busy".
DEFAULT_QUEUE = 64
# On SIGTERM the map in flight gets this long to finish before it is cancelled.
SHUTDOWN_GRACE_S = 5.0
OPS = ("map", "rois", "ping", "info")
# Header keys that are map options: every MapOptions field, and the older names.
MAP_OPTION_KEYS = frozenset(field.name for field in dataclasses.fields(MapOptions)) | frozenset(
    LEGACY_NAMES
)


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


def _finite_float(text: str) -> float:
    # 1e400 parses to inf, which could be neither used nor echoed back.
    value = float(text)
    if not np.isfinite(value):
        raise json.JSONDecodeError(f"number {text} is out of the float range", text, 0)
    return value


def _one_line(message: str) -> str:
    return " ".join(str(message).split())[:500]


def _short(value: Any) -> str:
    # A 400-digit integer is named by its size, so the reply stays one short line.
    text = repr(value)
    return text if len(text) <= 40 else f"an integer of {len(text)} digits"


class Service:
    """The request handler, separate from the socket so it can be tested directly.

    Parameters
    ----------
    detector : Detector
    max_pixels : int
        Largest ``H * W`` a request may claim.
    default_stride, default_top : int, optional
        Stride and number of ROIs when the header does not say (16 and 5); the same
        as ``options``' ``stride`` and ``top_k``.
    max_bytes : int
        Largest frame a request may send, in bytes.
    request_timeout_s : float
        A map running longer is stopped and answered with an error.
    options : MapOptions, optional
        What a request's map options apply over (default :class:`MapOptions` ());
        its ``batch_size`` becomes the detector's (the one its buffers hold), and a
        request that names another batch size is refused.
    """

    def __init__(
        self,
        detector: Detector,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        default_stride: int | None = None,
        default_top: int | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        options: MapOptions | None = None,
    ):
        for name, value in (("max_pixels", max_pixels), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(request_timeout_s, int | float) and request_timeout_s > 0):
            raise ValueError(f"request time limit must be > 0 s, got {request_timeout_s!r}")
        self.detector = detector
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.request_timeout_s = float(request_timeout_s)
        options = resolve_options(options, stride=default_stride, top=default_top)
        # The batch size is the loaded detector's: a request cannot change it.
        self.options = options.replace(batch_size=detector.batch_size)
        self.default_stride = self.options.stride
        self.default_top = self.options.top_k
        # Set from another thread to stop the map in flight (service shutdown).
        self.cancel = threading.Event()

    def info(self) -> dict[str, Any]:
        engine = self.detector.engine
        return {
            "classes": engine.classes,
            "patch_size": engine.config.patch_size,
            "backend": engine.name,
            "version": __version__,
            "background": self.detector.background,
            "options": self.options.to_json(),
        }

    def _frame(self, header: dict, payload: bytes | None, nan_policy: str = "raise") -> np.ndarray:
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
        expected = shape[0] * shape[1] * np.dtype(dtype).itemsize
        if expected > self.max_bytes:
            raise RequestError(
                f"{dtype} x {shape} is {expected} bytes, over the limit of {self.max_bytes}"
            )
        if payload is None:
            raise RequestError("op needs the frame bytes as the second message part")
        if len(payload) != expected:
            raise RequestError(
                f"frame has {len(payload)} bytes, but {dtype} x {shape} needs {expected}"
            )
        frame = np.frombuffer(payload, dtype=dtype).reshape(shape)
        if nan_policy == "raise" and frame.dtype.kind == "f" and not np.isfinite(frame).all():
            raise RequestError(
                'frame contains NaN or infinite values (map options "nan_policy": "zero" or '
                '"propagate" map it)'
            )
        return frame

    def _parse_header(self, header_bytes: bytes) -> dict:
        try:
            header = json.loads(
                header_bytes.decode("utf-8"),
                parse_constant=_reject_constant,
                parse_float=_finite_float,
            )
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise RequestError(f"header is not UTF-8 JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise RequestError("header must be a JSON object")
        return header

    def refusal(self, header_bytes: bytes, message: str) -> dict[str, Any]:
        """An ok=false reply to a request that is not run, with its id when readable."""
        try:
            request_id = self._parse_header(header_bytes).get("id")
        except RequestError:
            request_id = None
        return {"id": request_id, "ok": False, "error": message}

    def handle(self, header_bytes: bytes, payload: bytes | None) -> dict[str, Any]:
        """Answer one request; never raises."""
        request_id = None
        try:
            header = self._parse_header(header_bytes)
            request_id = header.get("id")
            op = header.get("op")
            if op not in OPS:
                raise RequestError(f"op must be one of {', '.join(OPS)}, got {op!r}")
            if op == "ping":
                return {"id": request_id, "ok": True, "pong": True}
            if op == "info":
                return {"id": request_id, "ok": True, **self.info()}
            return {"id": request_id, "ok": True, **self._map(header, payload, op)}
        except (RequestError, MapCancelled) as exc:
            return {"id": request_id, "ok": False, "error": _one_line(exc)}
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a bad frame (or an engine's SystemExit) never stops it
            log.exception("request failed")
            return {
                "id": request_id,
                "ok": False,
                "error": _one_line(f"{type(exc).__name__}: {exc}"),
            }

    def map_options(self, header: dict) -> MapOptions:
        """The request's map options over the service's, validated in one place.

        Raises
        ------
        RequestError
            Naming the key, for a bad value, an unknown key under ``"options"``, a
            field given twice, or a ``batch_size`` other than the service's.
        """
        given = {key: value for key, value in header.items() if key in MAP_OPTION_KEYS}
        if "options" in header:
            nested = header["options"]
            if not isinstance(nested, dict):
                raise RequestError(f"options must be a JSON object, got {_short(nested)}")
            fields = {LEGACY_NAMES.get(key, key): key for key in given}
            twice = [key for key in nested if LEGACY_NAMES.get(key, key) in fields]
            if twice:
                raise RequestError(
                    f"map option {twice[0]} is given both in the header and in options"
                )
            given.update(nested)
        try:
            options = MapOptions.from_json(given, base=self.options, aliases=LEGACY_NAMES)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if options.batch_size != self.options.batch_size:
            raise RequestError(
                f"batch_size is the service's own ({self.options.batch_size}), set when it "
                f"starts; got {options.batch_size}"
            )
        return options

    def _calibration(self, header: dict, shape: tuple[int, int]) -> Calibration | None:
        pixel_size = header.get("pixel_size")
        if pixel_size is None:
            return None
        if isinstance(pixel_size, bool) or not isinstance(pixel_size, int | float):
            raise RequestError(f"pixel_size must be a positive number, got {_short(pixel_size)}")
        try:
            size = float(pixel_size)
        except OverflowError:  # a JSON integer has no size limit; a float has
            raise RequestError(
                f"pixel_size is beyond the float range: {_short(pixel_size)}"
            ) from None
        if not np.isfinite(size) or size <= 0:
            raise RequestError(f"pixel_size must be a positive number, got {_short(pixel_size)}")
        unit = header.get("unit", "nm")
        if not isinstance(unit, str):
            raise RequestError(f"unit must be a string, got {_short(unit)}")
        try:
            calibration = Calibration.square(size, unit)
            calibration.check_extent(shape)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        return calibration

    def _map(self, header: dict, payload: bytes | None, op: str) -> dict[str, Any]:
        started = time.perf_counter()
        options = self.map_options(header)
        frame = self._frame(header, payload, options.nan_policy)
        calibration = self._calibration(header, frame.shape)
        size = self.detector.engine.config.patch_size
        if frame.shape[0] < size or frame.shape[1] < size:
            raise RequestError(f"frame {list(frame.shape)} is smaller than the {size}x{size} patch")
        try:
            found = self.detector.find(
                frame,
                options,
                calibration=calibration,
                timeout_s=self.request_timeout_s,
                cancel=self.cancel.is_set,
            )
        except ValueError as exc:  # what the options ask cannot be done (no dense graph, ...)
            raise RequestError(str(exc)) from exc
        result = found.result
        # How the map was made: dense or window by window (and why not dense), the scale
        # matching, and whether the frame is out of distribution.
        summary = map_summary(result)
        reply: dict[str, Any] = {
            "regions": result.regions(),
            "map": summary,
            "scale": summary["scale"],
            "out_of_distribution": summary["out_of_distribution"],
            "unknown_share": summary["unknown_share"],
        }
        if op == "rois":
            reply["rois"] = found.rois
        # The options used, the background the model chose included.
        reply["options"] = options.replace(background=result.background).to_json()
        reply["timing_ms"] = {
            **{k: round(v, 3) for k, v in result.timing_ms.items()},
            "request": round((time.perf_counter() - started) * 1000, 3),
        }
        return reply


def encode_reply(reply: dict[str, Any]) -> bytes:
    """The reply as UTF-8 JSON; one that cannot be encoded becomes an error reply."""
    try:
        return json.dumps(reply, allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # e.g. an id that cannot be echoed
        message = _one_line(f"reply could not be encoded as JSON: {exc}")
        return json.dumps({"id": None, "ok": False, "error": message}).encode()


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


def _split_envelope(parts: list) -> tuple[list, list]:
    """ROUTER parts to (envelope, request parts): REQ clients add an empty delimiter."""
    identity, rest = parts[0], parts[1:]
    envelope = [identity]
    if rest and len(rest[0]) == 0:
        envelope.append(rest[0])
        rest = rest[1:]
    return envelope, rest


class _MapWorker:
    """Runs map requests one at a time beside the socket loop.

    The loop keeps answering ``ping`` and ``info`` and keeps watching for signals
    while a frame is mapped; finished replies are collected with :meth:`done`.
    """

    def __init__(self, service: Service, queue_size: int, queue_bytes: int):
        self.service = service
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self._waiting_bytes = 0
        self._jobs: collections.deque = collections.deque()
        self._done: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="defectscope-map", daemon=True)
        self._thread.start()

    def submit(self, envelope: list, header: bytes, payload) -> bool:
        """Queue a request; False when the queue is full."""
        size = len(header) + (payload.nbytes if hasattr(payload, "nbytes") else len(payload))
        with self._cond:
            if len(self._jobs) >= self.queue_size or (
                self._jobs and self._waiting_bytes + size > self.queue_bytes
            ):
                return False
            self._waiting_bytes += size
            self._jobs.append((envelope, header, payload, size))
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    return
                envelope, header, payload, size = self._jobs.popleft()
                self._waiting_bytes -= size
                self._busy = True
            reply = self.service.handle(header, payload)  # never raises
            with self._cond:
                self._done.append((envelope, reply))
                self._busy = False
                self._cond.notify_all()

    def done(self) -> list:
        with self._cond:
            finished = list(self._done)
            self._done.clear()
        return finished

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._jobs and not self._busy

    def drop_waiting(self) -> list:
        """Take the requests that have not started (answered 'shutting down')."""
        with self._cond:
            waiting = [(envelope, header) for envelope, header, _, _ in self._jobs]
            self._jobs.clear()
            self._waiting_bytes = 0
            return waiting

    def close(self, timeout: float) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)


def serve(
    artifact: str | Path,
    bind: str = DEFAULT_BIND,
    backend: str = "auto",
    curve_secret: str | Path | None = None,
    curve_clients: str | Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ready: Any = None,
    stop: Any = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    queue_size: int = DEFAULT_QUEUE,
    shutdown_grace_s: float = SHUTDOWN_GRACE_S,
    options: MapOptions | None = None,
) -> int:
    """Serve requests until SIGTERM or SIGINT.

    ``options`` (:class:`MapOptions`) are what each request's map options apply over;
    their ``batch_size`` and ``background`` are the loaded detector's.

    Binding to a non-loopback address needs ``curve_secret`` (the server's secret
    key file from ``zmq.auth.create_certificates``) and ``curve_clients`` (a folder
    of authorized client public keys); without them it refuses to start.
    ``ready`` (a ``threading.Event``) is set once the socket is bound; setting
    ``stop`` (another one) ends the loop like SIGTERM, for callers in a thread.

    Limits: a message part over ``max_bytes`` is dropped by ZeroMQ before it is
    read (``zmq.MAXMSGSIZE``; the sender's connection is closed and it gets no
    reply); a header claiming more than ``max_pixels`` pixels or ``max_bytes``
    bytes, and a map running past ``request_timeout_s``, are answered with an
    error. Maps run in a worker thread, so ``ping`` and ``info`` are answered while
    a frame is mapped; up to ``queue_size`` map requests holding at most twice
    ``max_bytes`` wait, more are answered "busy". On SIGTERM/SIGINT the map in
    flight has ``shutdown_grace_s`` to finish, then it is cancelled; every request
    received gets its reply before exit.
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
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(f"queue size must be a positive integer, got {queue_size!r}")
    if not (isinstance(shutdown_grace_s, int | float) and 0 <= shutdown_grace_s < float("inf")):
        raise ValueError(f"shutdown grace must be finite seconds >= 0, got {shutdown_grace_s!r}")
    if options is not None and not isinstance(options, MapOptions):
        raise TypeError(f"options must be MapOptions, got {type(options).__name__}")
    detector = Detector.load(artifact, backend=backend, options=options)
    service = Service(
        detector,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        request_timeout_s=request_timeout_s,
        options=options,
    )
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 1000)
    # The header is small; the frame part is at most max_bytes (+ slack for the header).
    socket.setsockopt(zmq.MAXMSGSIZE, max_bytes + 65536)
    socket.setsockopt(zmq.RCVHWM, 8)
    auth = None
    if secure:
        auth = _curve_setup(context, socket, Path(curve_secret), Path(curve_clients))
    socket.bind(bind)
    worker = _MapWorker(service, queue_size, queue_bytes=2 * max_bytes)
    stopping = {"since": None}

    def on_signal(signum, _frame):
        if stopping["since"] is None:
            stopping["since"] = time.monotonic()

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

    def send(envelope: list, reply: dict) -> None:
        nonlocal served
        socket.send_multipart([*envelope, encode_reply(reply)])
        served += 1

    try:
        while True:
            if stopping["since"] is None and stop is not None and stop.is_set():
                stopping["since"] = time.monotonic()
            if stopping["since"] is not None:
                for envelope, header in worker.drop_waiting():
                    send(envelope, service.refusal(header, "service is shutting down"))
                if time.monotonic() - stopping["since"] > shutdown_grace_s:
                    service.cancel.set()
                if worker.idle:
                    for envelope, reply in worker.done():
                        send(envelope, reply)
                    break
            for envelope, reply in worker.done():
                send(envelope, reply)
            if not poller.poll(20):
                continue
            envelope, rest = _split_envelope(socket.recv_multipart(copy=False))
            if not rest:
                send(envelope, {"id": None, "ok": False, "error": "empty request"})
            elif len(rest) > 2:
                send(
                    envelope,
                    {"id": None, "ok": False, "error": f"expected 1 or 2 parts, got {len(rest)}"},
                )
            elif len(rest) == 1 or stopping["since"] is not None:
                # ping, info and malformed requests are answered at once, maps never wait here
                header = rest[0].bytes
                if stopping["since"] is not None and len(rest) == 2:
                    send(envelope, service.refusal(header, "service is shutting down"))
                else:
                    send(envelope, service.handle(header, None))
            elif not worker.submit(envelope, rest[0].bytes, rest[1].buffer):
                message = "busy: the queue of map requests is full; retry later"
                send(envelope, service.refusal(rest[0].bytes, message))
    finally:
        service.cancel.set()
        worker.close(timeout=30)
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
