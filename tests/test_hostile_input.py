"""Inputs an attacker or an unlucky user sends: each gets an error, and nothing else breaks.

One test per reproduced failure of the runtime: the service, the client, the live
detector, the detector shared between threads, model metadata, and the CLI's files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from defectscope.artifacts.metadata import MetadataError
from defectscope.cli import main
from defectscope.engines.loader import load_engine
from defectscope.maps.detector import Detector, MapCancelled
from defectscope.outputs.map_files import remove_stale_staging
from defectscope.service.client import Client
from defectscope.service.live import LiveDetector
from defectscope.service.server import BackgroundService, Service
from tests.synthetic import lattice

zmq = pytest.importorskip("zmq")


def uint16_frame(shape=(96, 96), seed=0, vacancies=((5, 5),)) -> np.ndarray:
    image = lattice(shape, vacancies=list(vacancies), seed=seed) * 3000
    return image.clip(0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def detector(onnx_artifact):
    with Detector.load(onnx_artifact) as detector:
        yield detector


@pytest.fixture(scope="module")
def server(onnx_artifact):
    with BackgroundService(onnx_artifact, request_timeout_s=20.0) as service:
        yield service.address


def send_raw(address: str, parts: list[bytes], timeout_ms: int = 20_000) -> dict:
    context = zmq.Context.instance()
    socket = context.socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, timeout_ms)
    socket.connect(address)
    try:
        socket.send_multipart(parts)
        return json.loads(socket.recv())
    finally:
        socket.close()


# --- the service ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b'{"op": "ping", "id": 1e400}',
        b'{"op": "ping", "id": [1, -1e999]}',
        b'{"op": "info", "id": {"a": 1E+309}}',
    ],
)
def test_out_of_range_json_numbers_get_an_error_and_the_service_goes_on(server, header):
    reply = send_raw(server, [header])
    assert reply["ok"] is False and "float range" in reply["error"]
    with Client(server) as client:
        assert client.ping()


def test_huge_pixel_size_is_refused_not_written_as_infinity(server):
    frame = uint16_frame()
    header = {"op": "map", "id": 7, "dtype": "uint16", "shape": [96, 96], "pixel_size": 1e308}
    reply = send_raw(server, [json.dumps(header).encode(), frame.tobytes()])
    assert reply == {"id": 7, "ok": False, "error": reply["error"]}
    assert "float range" in reply["error"]
    with Client(server) as client:
        assert client.ping()


def test_float64_frame_of_huge_finite_values_maps_like_its_scaled_copy(server):
    frame = lattice((96, 96), vacancies=[(5, 5)], seed=2).astype(np.float64)
    with Client(server) as client:
        huge = client.map(frame * 1e305, stride=16)["regions"]
        plain = client.map(frame, stride=16)["regions"]
    assert len(huge) == len(plain)
    for a, b in zip(huge, plain, strict=True):
        assert a["bbox"] == b["bbox"] and a["label"] == b["label"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_big_endian_frame_from_the_client_maps_like_native(server):
    frame = uint16_frame(seed=5)
    with Client(server) as client:
        native = client.map(frame, stride=16)["regions"]
        swapped = client.map(frame.astype(">u2"), stride=16)["regions"]
        strided = client.map(np.asfortranarray(frame.astype(">u2")), stride=16)["regions"]
    assert swapped == native and strided == native


def test_byte_cap_refuses_frames_by_size_in_bytes(onnx_artifact):
    # 128 x 128 float64 = 131072 bytes: fewer pixels than the cap's worth of uint8 frames.
    with BackgroundService(onnx_artifact, max_bytes=100_000) as service:
        frame = np.zeros((128, 128))
        header = {"op": "map", "id": 1, "dtype": "float64", "shape": [128, 128]}
        reply = send_raw(service.address, [json.dumps(header).encode(), b""])
        assert not reply["ok"] and "over the limit of 100000" in reply["error"]
        # A part larger than MAXMSGSIZE is dropped by ZeroMQ unread: no reply, no memory.
        with pytest.raises(zmq.Again):
            send_raw(
                service.address,
                [json.dumps(header).encode(), frame.tobytes() + b"\0" * 70_000],
                timeout_ms=1500,
            )
        with Client(service.address) as client:
            assert client.ping()
            assert client.map(uint16_frame(), stride=32)["ok"]


def test_slow_map_hits_the_time_limit_and_ping_is_answered_meanwhile(onnx_artifact):
    with BackgroundService(onnx_artifact, request_timeout_s=1.0) as service:
        frame = uint16_frame((512, 512), vacancies=())
        header = {"op": "map", "id": "slow", "dtype": "uint16", "shape": [512, 512], "stride": 2}
        context = zmq.Context.instance()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVTIMEO, 30_000)
        dealer.connect(service.address)
        try:
            dealer.send_multipart([b"", json.dumps(header).encode(), frame.tobytes()])
            time.sleep(0.2)
            started = time.perf_counter()
            with Client(service.address, timeout_ms=5_000) as client:
                assert client.ping()  # while the 50625-window map runs
            assert time.perf_counter() - started < 1.0
            reply = json.loads(dealer.recv_multipart()[-1])
        finally:
            dealer.close()
        assert reply["id"] == "slow" and not reply["ok"]
        assert "time limit of 1 s" in reply["error"]


def test_sigterm_cancels_a_long_map_after_the_grace_period(onnx_artifact):
    from defectscope.service.server import free_loopback_port

    address = f"tcp://127.0.0.1:{free_loopback_port()}"
    code = (
        "import sys; from defectscope.service.server import serve; "
        f"print('serving', flush=True); serve({str(onnx_artifact)!r}, {address!r}, "
        "shutdown_grace_s=0.5, request_timeout_s=600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert "serving" in proc.stdout.readline()
        with Client(address, timeout_ms=30_000) as client:
            assert client.ping()
            frame = uint16_frame((1024, 1024), vacancies=())
            header = {"op": "map", "id": "long", "dtype": "uint16", "shape": [1024, 1024]}
            header["stride"] = 4
            client.socket.send_multipart([json.dumps(header).encode(), frame.tobytes()])
            time.sleep(0.5)
            sent = time.perf_counter()
            proc.send_signal(15)
            reply = json.loads(client.socket.recv())
        proc.communicate(timeout=30)
        assert time.perf_counter() - sent < 10  # the map alone would take minutes
        assert reply["id"] == "long" and not reply["ok"] and "cancelled" in reply["error"]
        assert proc.returncode == 0
    finally:
        proc.kill()


def test_service_handle_reports_a_cancelled_map(detector):
    service = Service(detector)
    service.cancel.set()
    frame = uint16_frame()
    header = {"op": "map", "id": 3, "dtype": "uint16", "shape": [96, 96]}
    reply = service.handle(json.dumps(header).encode(), frame.tobytes())
    assert reply["id"] == 3 and not reply["ok"] and "cancelled" in reply["error"]


# --- the detector, shared and hostile ---------------------------------------------------


def test_one_detector_shared_by_threads_gives_each_its_own_map(detector):
    frames = [uint16_frame((160, 160), seed=s, vacancies=[(s + 2, 8)]) for s in range(4)]
    want = [detector.map(f, stride=16).probabilities for f in frames]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = detector.map(frames[i], stride=16).probabilities

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_allclose(got[i], want[i], atol=1e-6)


def test_map_limits_and_bad_arguments(detector):
    frame = uint16_frame()
    with pytest.raises(MapCancelled, match="cancelled"):
        detector.map(frame, cancel=lambda: True)
    with pytest.raises(MapCancelled, match="time limit"):
        detector.map(uint16_frame((256, 256)), stride=4, timeout_s=1e-6)
    for stride in (0, -16, 1.5, True):
        with pytest.raises(ValueError, match="stride"):
            detector.map(frame, stride=stride)
    with pytest.raises(ValueError, match="number of ROIs"):
        detector.rois(frame, k=0)
    with pytest.raises(ValueError, match="batch size"):
        Detector(detector.engine, batch_size=0)
    # The detector still maps after all of that.
    assert detector.map(frame, stride=32).probabilities.shape == (2, 2, 2)


def test_non_finite_engine_output_is_an_error(detector):
    class Broken:
        config = detector.engine.config
        classes = detector.engine.classes
        input_shape = detector.engine.input_shape
        density = None

        def run(self, inputs):
            n = len(inputs)
            return np.full((n, 2), np.nan, np.float32), np.zeros((n, 256), np.float32)

    with pytest.raises(ValueError, match="non-finite probabilities"):
        Detector(Broken()).map(uint16_frame())


# --- the live detector ------------------------------------------------------------------


def test_live_callback_that_raises_does_not_stop_the_worker(detector):
    calls = []

    def callback(result):
        calls.append(result.frame_id)
        raise RuntimeError("acquisition software bug")

    with LiveDetector(detector, stride=32, on_result=callback, policy="block") as live:
        for i in range(3):
            live.submit(uint16_frame(seed=i), frame_id=i)
        assert [live.get(timeout=60).frame_id for _ in range(3)] == [0, 1, 2]
        assert live.drain(timeout=60)
        assert len(live.callback_errors) == 3 and calls == [0, 1, 2]


def test_live_engine_raising_system_exit_is_reported_not_fatal(detector):
    class Exiting:
        config = detector.engine.config
        classes = detector.engine.classes
        input_shape = detector.engine.input_shape

        def run(self, inputs):
            raise SystemExit(3)

    live = LiveDetector(Detector(Exiting()), stride=32, queue_size=1, policy="block")
    live.submit(uint16_frame(), frame_id="a")
    with pytest.raises(SystemExit):
        live.get(timeout=30)
    live.submit(uint16_frame(), frame_id="b")  # the worker still takes frames
    live.submit(uint16_frame(), frame_id="c")  # blocks until b is taken, then returns
    assert live.drain(timeout=30)
    live.close()
    for _ in "bc":  # each frame's failure is reported once
        with pytest.raises(SystemExit):
            live.get(timeout=30)
    with pytest.raises(RuntimeError, match="closed"):
        live.get(timeout=30)  # before: waited forever


def test_live_get_after_close_returns_what_is_left_then_raises(detector):
    live = LiveDetector(detector, stride=32)
    live.submit(uint16_frame(), frame_id=1)
    live.close()
    assert live.get(timeout=30).frame_id == 1
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="closed"):
        live.get()
    assert time.perf_counter() - started < 5
    with pytest.raises(RuntimeError, match="closed"):
        live.submit(uint16_frame())


def test_live_rejects_calibration_that_overflows(detector):
    with LiveDetector(detector, stride=32) as live, pytest.raises(ValueError, match="float"):
        live.submit(uint16_frame(), pixel_size=1e308)


# --- model metadata ----------------------------------------------------------------------


def copy_model(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("*.onnx"))
    return target


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.__setitem__("calibration", {"temperature": 0}), "temperature"),
        (lambda r: r.__setitem__("calibration", {"temperature": -1.0}), "temperature"),
        (lambda r: r.__setitem__("calibration", {"temperature": "hot"}), "temperature"),
        (lambda r: r.__setitem__("calibration", []), "calibration"),
        (lambda r: r["model"].__setitem__("classes", "Bulk"), "classes"),
        (lambda r: r["model"].__setitem__("classes", ["Bulk", "Bulk"]), "unique"),
        (lambda r: r["model"].__setitem__("patch_size", 0), "patch_size"),
        (lambda r: r["model"].__setitem__("patch_size", 2**40), "patch_size"),
        (lambda r: r["model"].__setitem__("patch_size", "64"), "patch_size"),
        (lambda r: r["model"].__setitem__("embedding_dim", -3), "embedding_dim"),
        (lambda r: r["model"].__setitem__("normalization", {"mode": "log"}), "mode"),
        (lambda r: r["model"].__setitem__("normalization", {"channels": 2}), "channels"),
        (lambda r: r["model"].__setitem__("background_class", "Void"), "background_class"),
        (lambda r: r.__setitem__("model", None), "model config"),
        (lambda r: r.pop("model"), "'model' entry"),
    ],
)
def test_malformed_model_json_is_one_error_line(model_dir, tmp_path, edit, message, capsys):
    target = copy_model(model_dir, tmp_path)
    record = json.loads((target / "model.json").read_text())
    edit(record)
    (target / "model.json").write_text(json.dumps(record))
    with pytest.raises(MetadataError, match=message):
        load_engine(target, backend="torch")
    frame = tmp_path / "frame.npy"
    np.save(frame, uint16_frame())
    code = main(["map", str(target), str(frame), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_malformed_onnx_metadata_is_an_error(onnx_artifact, tmp_path):
    import onnx

    proto = onnx.load(str(onnx_artifact))
    entry = next(e for e in proto.metadata_props if e.key == "defectscope")
    record = json.loads(entry.value)
    record["temperature"] = 0.0
    entry.value = json.dumps(record)
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(MetadataError, match="temperature"):
        load_engine(bad)
    entry.value = "{not json"
    onnx.save(proto, str(bad))
    with pytest.raises(MetadataError, match="invalid model metadata"):
        load_engine(bad)
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        load_engine(tmp_path / "garbage.onnx")


# --- the command line's files ------------------------------------------------------------


def test_outputs_never_overwrite_inputs(model_dir, onnx_artifact, tmp_path, capsys):
    frame_path = tmp_path / "frame.npy"
    np.save(frame_path, uint16_frame())
    before = frame_path.read_bytes()
    weights = (model_dir / "weights.pt").read_bytes()
    patch = tmp_path / "patch.npy"
    np.save(patch, uint16_frame((64, 64)))
    attempts = [
        ["roi", str(onnx_artifact), str(frame_path), "--out", str(frame_path)],
        ["roi", str(onnx_artifact), str(frame_path), "--out", str(onnx_artifact)],
        ["predict", str(model_dir), str(patch), "--json", str(model_dir / "weights.pt")],
        ["predict", str(model_dir), str(patch), "--json", str(patch)],
        ["map", str(onnx_artifact), str(frame_path), "--out", str(tmp_path / "frame.npy")],
    ]
    link = tmp_path / "link.npy"
    os.symlink(frame_path, link)
    attempts.append(["roi", str(onnx_artifact), str(frame_path), "--out", str(link)])
    for args in attempts:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert frame_path.read_bytes() == before
    assert (model_dir / "weights.pt").read_bytes() == weights
    # A map whose output folder holds the frame under one of the output names.
    overlay = tmp_path / "out" / "overlay.png"
    overlay.parent.mkdir()
    shutil.copy(frame_path, overlay.with_suffix(".npy"))
    assert (
        main(
            [
                "map",
                str(onnx_artifact),
                str(overlay.with_suffix(".npy")),
                "--out",
                str(overlay.parent),
            ]
        )
        == 0
    )


def test_stale_staging_folders_of_killed_runs_are_removed(onnx_artifact, tmp_path):
    frame_path = tmp_path / "frame.npy"
    np.save(frame_path, uint16_frame((256, 256)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "defectscope.cli", "map", str(onnx_artifact)]
    proc = subprocess.Popen([*command, str(frame_path), "--out", str(out), "--stride", "8"])
    pattern = f".{out.name}.staging-{proc.pid}-"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(pattern) for p in tmp_path.iterdir()):
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(pattern)]
    if not leftovers:  # the run finished before it could be killed mid-write
        (tmp_path / f"{pattern}fake").mkdir()
    alive = tmp_path / f".{out.name}.staging-{os.getpid()}-mine"
    alive.mkdir()
    removed = remove_stale_staging(out)
    assert removed and all(pattern in p.name for p in removed)
    assert alive.is_dir()  # a live process's staging folder is left alone
    assert main(["map", str(onnx_artifact), str(frame_path), "--out", str(out)]) == 0
    assert not any(p.name.startswith(pattern) for p in tmp_path.iterdir())


def test_frame_options_on_files_without_stacks_are_errors(onnx_artifact, tmp_path, capsys):
    single = tmp_path / "single.npy"
    np.save(single, uint16_frame())
    stack = tmp_path / "stack.npy"
    np.save(stack, np.stack([uint16_frame(seed=s) for s in range(3)]))
    out = tmp_path / "r.json"
    for extra, message in (
        (["--frame", "1"], "single frame"),
        (["--sum"], "single frame"),
        (["--channel", "HAADF"], "one signal"),
    ):
        assert main(["roi", str(onnx_artifact), str(single), "--out", str(out), *extra]) == 1
        assert message in capsys.readouterr().err
    assert main(["roi", str(onnx_artifact), str(stack), "--out", str(out)]) == 1
    assert "--frame i or --sum" in capsys.readouterr().err
    assert main(["roi", str(onnx_artifact), str(stack), "--out", str(out), "--frame", "2"]) == 0
    with Detector.load(onnx_artifact) as det:
        want = det.rois(uint16_frame(seed=2), 5, 16)
    assert json.loads(out.read_text()) == json.loads(json.dumps(want))


@pytest.mark.parametrize(
    "args",
    [
        ["map", "{a}", "{f}", "--out", "{o}", "--batch-size", "0"],
        ["map", "{a}", "{f}", "--out", "{o}", "--stride", "0"],
        ["map", "{a}", "{f}", "--out", "{o}", "--pixel-size", "1e308"],
        ["map", "{a}", "{f}", "--out", "{o}", "--pixel-size", "nan"],
        ["map", "{a}", "{f}", "--out", "{o}", "--pixel-size", "-1"],
        ["map", "{a}", "{f}", "--out", "{o}", "--stride", "sixteen"],
        ["map", "{a}"],
        ["roi", "{a}", "{f}", "--out", "{o}", "--top", "0"],
        ["frobnicate"],
    ],
)
def test_argument_errors_are_one_error_line(onnx_artifact, tmp_path, args, capsys):
    frame = tmp_path / "f.npy"
    np.save(frame, uint16_frame())
    filled = [a.format(a=onnx_artifact, f=frame, o=tmp_path / "o") for a in args]
    assert main(filled) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_class_names_with_mathtext_characters_draw(detector, tmp_path):
    from defectscope.outputs import figures

    result = detector.map(uint16_frame(), stride=16)
    result.classes = ["$Bulk", "Vac$_{Cd}$ ^ \\frac"]
    result.background = "$Bulk"
    figures.map_overlay(uint16_frame(), result, tmp_path / "overlay.png")
    figures.confusion([[1, 0], [0, 1]], result.classes, tmp_path / "c.png", "a $ title")
    assert (tmp_path / "overlay.png").stat().st_size > 0


@pytest.mark.parametrize("grace", [float("nan"), float("inf"), -1.0, "5"])
def test_serve_refuses_a_shutdown_grace_that_is_not_finite_seconds(onnx_artifact, grace):
    from defectscope.service.server import serve

    with pytest.raises(ValueError, match="shutdown grace"):
        serve(onnx_artifact, "tcp://127.0.0.1:5999", shutdown_grace_s=grace)
