"""The ZeroMQ service (fuzzing, load, SIGTERM, CURVE), its Python client, and LiveDetector."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defectscope.maps.detector import Detector
from defectscope.maps.options import MapOptions
from defectscope.service.client import Client, ServiceError
from defectscope.service.live import LiveDetector
from defectscope.service.server import (
    BackgroundService,
    Service,
    free_loopback_port,
    is_loopback,
    serve,
)
from tests.conftest import CENTRE_SCALE, assert_same_regions, assert_same_rois
from tests.synthetic import lattice

zmq = pytest.importorskip("zmq")


def test_frame(size=(96, 96), seed=0) -> np.ndarray:
    return (lattice(size, vacancies=[(5, 5)], seed=seed) * 3000).clip(0, 65535).astype(np.uint16)


test_frame.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def server(model_dir):
    with BackgroundService(model_dir, backend="torch") as service:
        yield service.address
    assert not service.running and service.served > 0


def test_ping_info_map_rois(server):
    with Client(server, timeout_ms=20_000) as client:
        assert client.ping()
        info = client.info()
        assert info["classes"] == ["Bulk", "Vacancy"] and info["patch_size"] == 64
        frame = test_frame()
        reply = client.rois(frame, top=2, stride=16, pixel_size=0.05, unit="nm")
        assert reply["ok"] and "timing_ms" in reply and len(reply["rois"]) <= 2
        assert reply["map"]["mode"] == "window" and "densify" in reply["map"]["reason"]
        for roi in reply["rois"]:
            y, x = roi["center"]
            assert roi["center_calibrated"] == pytest.approx([y * 0.05, x * 0.05])


def test_map_reply_matches_in_process(server, model_dir):
    frame = test_frame(seed=4)
    with Client(server) as client:
        remote = client.map(frame, stride=16)["regions"]
    with Detector.load(model_dir, backend="torch") as det:
        local = det.map(frame, stride=16).regions()
    # Two runs of one map: labels and boxes exactly, scores and centres within float32 noise.
    assert_same_regions(remote, local)


@pytest.mark.parametrize(
    ("header", "payload", "message"),
    [
        (b"not json", None, "not UTF-8 JSON"),
        (b"\xff\xfe", None, "not UTF-8 JSON"),
        (b'{"op": "map", "id": NaN}', None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"op": "explode", "id": 3}', None, "op must be"),
        (b'{"op": "map", "dtype": "uint16", "shape": [96, 96]}', b"\x00" * 10, "needs 18432"),
        (b'{"op": "map", "dtype": "complex64", "shape": [4, 4]}', b"", "dtype must be"),
        (b'{"op": "map", "dtype": "uint8", "shape": [100000, 100000]}', b"", "exceeds the limit"),
        (b'{"op": "map", "dtype": "uint8", "shape": [-4, 4]}', b"", "positive integers"),
        (b'{"op": "map", "dtype": "uint8", "shape": [10, 10]}', b"\x00" * 100, "smaller than"),
        (b'{"op": "map", "dtype": "uint8", "shape": [64, 64]}', None, "second message part"),
        (
            b'{"op": "map", "dtype": "uint8", "shape": [64, 64], "stride": 0}',
            b"\x00" * 4096,
            "stride must be",
        ),
        (
            b'{"op": "map", "dtype": "float32", "shape": [64, 64]}',
            np.full((64, 64), np.nan, np.float32).tobytes(),
            "NaN",
        ),
    ],
)
def test_bad_requests_get_error_replies(server, header, payload, message):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, 20_000)
    sock.connect(server)
    sock.send_multipart([header] if payload is None else [header, payload])
    reply = json.loads(sock.recv())
    assert reply["ok"] is False and message in reply["error"] and "\n" not in reply["error"]
    sock.send_multipart([b'{"op": "ping", "id": "after"}'])
    assert json.loads(sock.recv()) == {"id": "after", "ok": True, "pong": True}
    sock.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
headers = st.fixed_dictionaries(
    {"op": st.sampled_from(["map", "rois", "ping", "info", "other"]) | json_values},
    optional={
        "id": json_values,
        "dtype": st.sampled_from(["uint8", "uint16", "float32", "int64", "x"]) | json_values,
        "shape": st.lists(st.integers(-5, 200), max_size=3) | json_values,
        "stride": st.integers(-2, 64) | json_values,
        "top": st.integers(-2, 10) | json_values,
        "pixel_size": st.floats() | json_values,
        "unit": json_values,
        "mode": st.sampled_from(["auto", "dense", "window"]) | json_values,
        "unknown": st.sampled_from(["ignore", "explore"]) | json_values,
        "options": st.dictionaries(
            st.sampled_from(["stride", "top_k", "mode", "min_spacing", "background", "x"]),
            json_values,
            max_size=3,
        )
        | json_values,
    },
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=headers | st.binary(max_size=64),
    payload=st.none() | st.binary(max_size=300),
    extra_parts=st.integers(0, 2),
)
def test_fuzz_then_ping(server, header, payload, extra_parts):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server)
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    parts = [raw] + ([] if payload is None else [payload]) + [b"x"] * extra_parts
    sock.send_multipart(parts)
    reply = json.loads(sock.recv())
    assert isinstance(reply["ok"], bool) and set(reply) >= {"id", "ok"}
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and "\n" not in reply["error"]
    sock.send_multipart([b'{"op": "ping", "id": 1}'])
    assert json.loads(sock.recv())["pong"] is True
    sock.close()


def test_load_8_clients_50_frames_each(server):
    frames = [test_frame((64, 64 + 8 * (i % 3)), seed=i) for i in range(8)]
    replies: dict[int, list] = {}
    errors = []

    def client_loop(index: int) -> None:
        try:
            ctx = zmq.Context.instance()
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.RCVTIMEO, 120_000)
            sock.connect(server)
            got = []
            for n in range(50):
                rid = f"{index}-{n}"
                frame = frames[index]
                header = {
                    "op": "map",
                    "id": rid,
                    "dtype": "uint16",
                    "shape": list(frame.shape),
                    "stride": 32,
                }
                sock.send_multipart([json.dumps(header).encode(), frame.tobytes()])
                got.append(json.loads(sock.recv()))
            replies[index] = got
            sock.close()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors
    for index in range(8):
        ids = [r["id"] for r in replies[index]]
        assert ids == [f"{index}-{n}" for n in range(50)]  # each answered once, in order
        assert all(r["ok"] for r in replies[index])


def test_refuses_network_bind_without_curve(model_dir):
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://[::1]:1")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://*:5555")
    with pytest.raises(ValueError, match="CURVE"):
        serve(model_dir, "tcp://0.0.0.0:5599")


def test_background_service_reports_startup_failure(model_dir, tmp_path):
    # A failing start is raised at once in the caller, not waited out.
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="failed to start") as info:
        BackgroundService(model_dir, bind="tcp://0.0.0.0:5599").__enter__()
    assert isinstance(info.value.__cause__, ValueError) and "CURVE" in str(info.value.__cause__)
    with pytest.raises(RuntimeError, match="failed to start"):
        BackgroundService(tmp_path / "no-model").__enter__()
    assert time.perf_counter() - started < 30


def test_curve_keys_required_by_secure_server(model_dir, tmp_path):
    import zmq.auth

    keys, clients = tmp_path / "keys", tmp_path / "clients"
    keys.mkdir()
    clients.mkdir()
    server_public_file, server_secret_file = zmq.auth.create_certificates(str(keys), "server")
    client_public_file, client_secret_file = zmq.auth.create_certificates(str(keys), "client")
    os.replace(client_public_file, clients / "client.key")
    secure = BackgroundService(
        model_dir, backend="torch", curve_secret=server_secret_file, curve_clients=clients
    )
    with secure as service:
        server_public, _ = zmq.auth.load_certificate(server_public_file)
        client_keys = zmq.auth.load_certificate(client_secret_file)
        with Client(service.address, 20_000, server_public, client_keys) as client:
            assert client.ping()
        with Client(service.address, 1_500) as anonymous, pytest.raises(TimeoutError):
            anonymous.ping()


def test_sigterm_finishes_frame_in_flight(model_dir, tmp_path):
    address = f"tcp://127.0.0.1:{free_loopback_port()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "defectscope.cli",
            "serve",
            str(model_dir),
            "--bind",
            address,
            "--backend",
            "torch",
            # Generous: the frame must finish however slow or loaded the machine is.
            "--shutdown-grace",
            "150",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "serving" in proc.stdout.readline()
        with Client(address, timeout_ms=180_000) as client:
            assert client.ping()
            big = test_frame((256, 256))
            header = {
                "op": "map",
                "id": "last",
                "dtype": "uint16",
                "shape": [256, 256],
                "stride": 16,
            }
            client.socket.send_multipart([json.dumps(header).encode(), big.tobytes()])
            time.sleep(0.3)  # the frame (169 windows) is being mapped now
            proc.send_signal(signal.SIGTERM)
            reply = json.loads(client.socket.recv())
        assert reply["id"] == "last" and reply["ok"]
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped after 2 requests" in out
    finally:
        proc.kill()


def test_client_raises_service_errors(server):
    with Client(server) as client, pytest.raises(ServiceError, match="smaller than"):
        client.map(np.zeros((8, 8), np.uint8))


def test_service_handle_never_raises(model_dir):
    with Detector.load(model_dir, backend="torch") as det:
        service = Service(det)
        assert service.handle(b'{"op": "info", "id": [1, {"a": null}]}', None)["id"] == [
            1,
            {"a": None},
        ]


# --- LiveDetector -----------------------------------------------------------------------


class SlowEngineDetector:
    """Wraps a detector so each map takes at least `delay` seconds (a slow instrument PC)."""

    def __init__(self, detector, delay):
        self.detector, self.delay = detector, delay

    def find(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.detector.find(*args, **kwargs)


@pytest.fixture(scope="module")
def detector(model_dir):
    with Detector.load(model_dir, backend="torch") as det:
        yield det


def test_live_block_processes_every_frame(detector):
    with LiveDetector(detector, stride=32, top=2, queue_size=2, policy="block") as live:
        for i in range(6):
            live.submit(test_frame(seed=i), frame_id=i)
        results = [live.get(timeout=60) for _ in range(6)]
    assert [r.frame_id for r in results] == list(range(6))
    assert live.dropped == 0 and live.processed == 6
    stats = live.latency_percentiles()
    assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"]


@pytest.mark.parametrize("policy", ["drop_oldest", "latest_only"])
def test_live_drop_policies_count_drops(detector, policy):
    slow = SlowEngineDetector(detector, 0.2)
    with LiveDetector(slow, stride=32, queue_size=2, policy=policy) as live:
        for i in range(8):
            live.submit(test_frame(seed=i), frame_id=i)
        live.drain(timeout=60)
        done = []
        while True:
            try:
                done.append(live.get(timeout=0.1).frame_id)
            except TimeoutError:
                break
    assert live.dropped > 0 and live.dropped + len(done) == 8
    assert done[-1] == 7  # the newest frame is always processed
    assert done == sorted(done)


def test_live_subregion_reports_full_frame_positions(detector):
    frame = test_frame((160, 200), seed=9)
    with LiveDetector(detector, stride=16) as live:
        live.submit(frame, subregion=(40, 60, 140, 190))
        sub = live.get(timeout=60)
    direct = detector.map(frame[40:140, 60:190], stride=16).regions()
    assert len(sub.regions) == len(direct)
    for a, b in zip(sub.regions, direct, strict=True):
        assert a["bbox"] == [
            b["bbox"][0] + 40,
            b["bbox"][1] + 60,
            b["bbox"][2] + 40,
            b["bbox"][3] + 60,
        ]
        want = [b["centroid"][0] + 40, b["centroid"][1] + 60]
        assert a["centroid"] == pytest.approx(want, abs=1e-5 * CENTRE_SCALE)
        y, x = a["centroid"]
        assert a["centroid_norm"] == pytest.approx([(y + 0.5) / 160, (x + 0.5) / 200])
    with LiveDetector(detector) as live, pytest.raises(ValueError, match="not inside"):
        live.submit(frame, subregion=(0, 0, 500, 10))


# --- one path: the service and the live detector give what Detector.find gives ----------


def cluster_frame(seed: int = 3) -> np.ndarray:
    """A 128 x 160 uint16 lattice with two 2x2 vacancy clusters (the toy model's defect)."""
    vacancies = [(2, 2), (2, 3), (3, 2), (3, 3), (9, 12), (9, 13), (10, 12), (10, 13)]
    image = lattice((128, 160), vacancies=vacancies, seed=seed) * 3000
    return image.clip(0, 65535).astype(np.uint16)


ROI_OPTIONS = [
    MapOptions(),
    MapOptions(stride=24, top_k=2, min_spacing=40.0),
    MapOptions(stride=32, top_k=3, symmetry="d4", mode="window"),
]


def request(service: Service, header: dict, frame: np.ndarray | None = None) -> dict:
    """One request through ``Service.handle`` (as the socket loop calls it), JSON both ways."""
    payload = None
    if frame is not None:
        header = {**header, "dtype": frame.dtype.name, "shape": list(frame.shape)}
        payload = frame.tobytes()
    reply = service.handle(json.dumps(header).encode(), payload)
    return json.loads(json.dumps(reply, allow_nan=False))


@pytest.mark.parametrize("options", ROI_OPTIONS, ids=lambda o: json.dumps(o.to_json()))
def test_service_and_live_give_the_rois_of_find(detector, options):
    frame = cluster_frame(3)
    want = detector.find(frame, options, calibration=None)
    assert want.rois  # the lattice's vacancy makes at least one ROI
    service = Service(detector)
    reply = request(service, {"op": "rois", "id": 1, "options": options.to_json()}, frame)
    assert reply["ok"], reply
    assert_same_rois(reply["rois"], want.rois)
    assert_same_regions(reply["regions"], want.result.regions())
    # The reply names the options used (the background is the model's own here).
    assert reply["options"] == {**options.to_json(), "background": "Bulk"}
    with LiveDetector(detector, options=options) as live:
        live.submit(frame, frame_id="a")
        result = live.get(timeout=120)
    assert result.options == options
    assert_same_rois(result.rois, want.rois)
    assert_same_regions(result.regions, want.result.regions())


def test_service_header_keys_of_old_keep_their_meaning(detector):
    frame = cluster_frame(3)
    service = Service(detector)
    header = {"op": "rois", "stride": 24, "top": 1, "unknown": "explore", "pixel_size": 0.05}
    reply = request(service, header, frame)
    options = MapOptions(stride=24, top_k=1, unknown="explore")
    assert reply["options"] == {**options.to_json(), "background": "Bulk"}
    from defectscope.io.frames import Calibration

    want = detector.find(frame, options, calibration=Calibration.square(0.05, "nm"))
    assert_same_rois(reply["rois"], want.rois)
    # Without map options the service's defaults apply: stride 16, five ROIs.
    reply = request(service, {"op": "map"}, frame)
    assert reply["options"]["stride"] == 16 and reply["options"]["top_k"] == 5
    assert "rois" not in reply
    assert request(service, {"op": "info"})["options"] == MapOptions().to_json()
    custom = Service(detector, default_stride=32, default_top=2)
    assert request(custom, {"op": "map"}, frame)["options"]["stride"] == 32
    assert custom.options == MapOptions(stride=32, top_k=2)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        # Finding 11 (issue 25): a JSON integer beyond the float range was a raw TypeError.
        ({"pixel_size": 10**400}, "pixel_size is beyond the float range"),
        ({"pixel_size": "x"}, "pixel_size must be a positive number"),
        ({"pixel_size": -1}, "pixel_size must be a positive number"),
        ({"stride": 10**400}, "stride must be at most"),
        ({"top": -1}, "top must be a positive integer"),
        ({"top": "x"}, "top must be an integer"),
        ({"mode": None}, "mode must not be null"),
        ({"unknown": "chase"}, "unknown must be one of ignore, explore"),
        ({"options": {"min_spacing": 10**400}}, "min_spacing is beyond the float range"),
        ({"options": {"stride": -1}}, "stride must be a positive integer"),
        ({"options": {"stride": "x"}}, "stride must be an integer"),
        ({"options": {"strde": 8}}, "unknown map option(s) strde"),
        ({"options": {"keep_embeddings": None}}, "keep_embeddings must not be null"),
        ({"options": [16]}, "options must be a JSON object"),
        ({"stride": 16, "options": {"stride": 16}}, "stride is given both in the header"),
        ({"top": 2, "options": {"top_k": 2}}, "top_k is given both in the header"),
        ({"top": 2, "top_k": 2}, "top_k is given twice"),
        ({"batch_size": 3}, "batch_size is the service's own (64)"),
        ({"background": "Nope"}, "background class 'Nope' is not among"),
        ({"mode": "dense"}, "no dense map: no dense graph loaded"),
    ],
)
def test_bad_map_options_get_a_reply_naming_the_key(detector, header, message):
    reply = request(Service(detector), {"op": "rois", "id": 9, **header}, test_frame())
    assert reply["id"] == 9 and reply["ok"] is False
    assert message in reply["error"] and "\n" not in reply["error"]
    assert "Error:" not in reply["error"]  # an answer, not an exception's repr


def test_nan_policy_lets_the_service_map_nan_frames(detector):
    frame = test_frame().astype(np.float32)
    frame[40, 50] = np.nan
    service = Service(detector)
    refused = request(service, {"op": "map"}, frame)
    assert not refused["ok"] and "NaN" in refused["error"] and "nan_policy" in refused["error"]
    reply = request(service, {"op": "rois", "options": {"nan_policy": "zero"}}, frame)
    assert reply["ok"], reply
    zeroed = np.nan_to_num(frame, nan=0.0)
    want = detector.find(zeroed, MapOptions())
    assert_same_rois(reply["rois"], want.rois)


def test_client_sends_options_whole(server, detector):
    frame = cluster_frame(5)
    options = MapOptions(stride=24, top_k=2)
    with Client(server, timeout_ms=60_000) as client:
        reply = client.rois(frame, options=options)
        assert reply["options"]["stride"] == 24 and reply["options"]["top_k"] == 2
        assert client.rois(frame, options=options.to_json())["options"] == reply["options"]
        with pytest.raises(ServiceError, match="stride is given both"):
            client.rois(frame, stride=16, options=options)
    assert_same_rois(reply["rois"], detector.find(frame, options).rois)


def test_live_detector_options_and_old_keywords(detector):
    with LiveDetector(detector, stride=24, top=2, unknown="explore") as live:
        assert live.options == MapOptions(stride=24, top_k=2, unknown="explore")
        assert (live.stride, live.top, live.unknown) == (24, 2, "explore")
        live.top = 3
        assert live.options.top_k == 3
    with pytest.raises(ValueError, match=r"stride=8 differs from options.stride=16"):
        LiveDetector(detector, stride=8, options=MapOptions())
    with pytest.raises(ValueError, match=r"^top must be a positive integer"):
        LiveDetector(detector, top=0)


def test_service_handle_answers_an_engine_that_exits(detector):
    class Exiting:
        config = detector.engine.config
        classes = detector.engine.classes
        input_shape = detector.engine.input_shape
        name = "exiting"

        def run(self, inputs):
            raise SystemExit(3)

    service = Service(Detector(Exiting()))
    reply = request(service, {"op": "rois", "id": "x"}, test_frame())
    assert reply == {"id": "x", "ok": False, "error": "SystemExit: 3"}
    assert request(service, {"op": "ping", "id": 2}) == {"id": 2, "ok": True, "pong": True}
