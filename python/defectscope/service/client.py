"""Python client for the defectscope ZeroMQ service (``defectscope serve``)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np


class ServiceError(RuntimeError):
    """The service answered ok=false."""


class Client:
    """A REQ client; one request at a time, with a timeout that resets the socket.

    Examples
    --------
    >>> with Client("tcp://127.0.0.1:5555") as client:           # doctest: +SKIP
    ...     rois = client.rois(frame, top=5, pixel_size=0.02)["rois"]
    ...     reply = client.rois(frame, options=MapOptions(stride=8, top_k=3))
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        timeout_ms: int = 30_000,
        curve_server_public: bytes | None = None,
        curve_client_keys: tuple[bytes, bytes] | None = None,
    ):
        import zmq

        self.zmq = zmq
        self.address = address
        self.timeout_ms = timeout_ms
        self.curve = (curve_server_public, curve_client_keys)
        self.context = zmq.Context.instance()
        self._ids = itertools.count()
        self._connect()

    def _connect(self) -> None:
        zmq = self.zmq
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        self.socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        server_public, client_keys = self.curve
        if server_public is not None and client_keys is not None:
            self.socket.curve_serverkey = server_public
            self.socket.curve_publickey, self.socket.curve_secretkey = client_keys
        self.socket.connect(self.address)

    def request(self, header: dict[str, Any], frame: np.ndarray | None = None) -> dict[str, Any]:
        """Send one request and return the reply; raises ServiceError when ok is false."""
        header = {"id": next(self._ids), **header}
        parts = [json.dumps(header, allow_nan=False).encode()]
        if frame is not None:
            # The wire format is little-endian, C order; a big-endian or strided array is
            # converted, never sent as it lies in memory.
            frame = np.asarray(frame)
            frame = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<"))
            header.update(dtype=frame.dtype.name, shape=list(frame.shape))
            parts = [json.dumps(header, allow_nan=False).encode(), memoryview(frame).cast("B")]
        try:
            self.socket.send_multipart(parts, copy=False)
            reply = json.loads(self.socket.recv())
        except self.zmq.Again as exc:
            # A REQ socket is stuck after a lost reply: start a fresh one.
            self.socket.close()
            self._connect()
            raise TimeoutError(f"no reply from {self.address} in {self.timeout_ms} ms") from exc
        if not reply.get("ok"):
            raise ServiceError(reply.get("error", "unknown error"))
        return reply

    def ping(self) -> bool:
        return bool(self.request({"op": "ping"}).get("pong"))

    def info(self) -> dict[str, Any]:
        return self.request({"op": "info"})

    def map(
        self, frame: np.ndarray, stride: int | None = None, options: Any = None, **header: Any
    ) -> dict[str, Any]:
        """Regions of ``frame``; ``pixel_size=`` and ``unit=`` add calibrated centres.

        ``stride`` (default 16) and other header keys (``mode=``, ``unknown=`` ...) go
        in the header; ``options`` (a :class:`~defectscope.maps.options.MapOptions` or
        its JSON dict) is sent whole as ``"options"``, in place of ``stride``.
        """
        return self.request(self._header("map", options, stride=stride, **header), frame)

    def rois(
        self,
        frame: np.ndarray,
        top: int | None = None,
        stride: int | None = None,
        options: Any = None,
        **header: Any,
    ) -> dict[str, Any]:
        """Regions and the ``top`` (default 5) ROIs of ``frame``; see :meth:`map`."""
        return self.request(self._header("rois", options, stride=stride, top=top, **header), frame)

    @staticmethod
    def _header(op: str, options: Any, **given: Any) -> dict[str, Any]:
        header = {"op": op, **{key: value for key, value in given.items() if value is not None}}
        if options is not None:
            # Duck-typed: the client needs no more of the package than numpy. A field
            # also given as a keyword is refused by the service (given twice).
            header["options"] = options.to_json() if hasattr(options, "to_json") else dict(options)
        else:
            header.setdefault("stride", 16)
            if op == "rois":
                header.setdefault("top", 5)
        return header

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
