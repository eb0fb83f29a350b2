"""The C++ client in examples/ builds with CMake against libzmq and talks to the service."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from defectscope.service.server import BackgroundService
from tests.conftest import REPO


def _have_libzmq() -> bool:
    if shutil.which("cmake") is None or shutil.which("pkg-config") is None:
        return False
    return subprocess.run(["pkg-config", "--exists", "libzmq"]).returncode == 0


@pytest.fixture(scope="module")
def client_binary(tmp_path_factory):
    if not _have_libzmq():
        pytest.skip("cmake, pkg-config or libzmq missing (Debian: libzmq3-dev cppzmq-dev)")
    build = tmp_path_factory.mktemp("cpp_client")
    configure = subprocess.run(
        [
            "cmake",
            "-S",
            str(REPO / "examples" / "cpp_client"),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        capture_output=True,
        text=True,
    )
    if configure.returncode != 0 and "nlohmann_json" in configure.stderr + configure.stdout:
        pytest.skip("nlohmann-json3-dev missing")
    assert configure.returncode == 0, configure.stderr
    built = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr + built.stdout
    return build / "defectscope_client"


def test_cpp_client_round_trip(client_binary, model_dir):
    with BackgroundService(model_dir, backend="torch") as service:
        run = subprocess.run(
            [str(client_binary), service.address], capture_output=True, text=True, timeout=300
        )
    assert run.returncode == 0, run.stderr
    assert 'classes: ["Bulk","Vacancy"]' in run.stdout
    assert "rois:" in run.stdout and "round trip" in run.stdout
