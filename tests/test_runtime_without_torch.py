"""The runtime on an instrument PC: ONNX artifacts map, rank ROIs and serve without PyTorch.

Run twice: in this process's interpreter with an import hook that fails any import of
``torch`` (the layers import only downward), and in ``.venv-runtime``, a virtual
environment made by ``scripts/setup.sh`` from ``pip install defectscope`` alone, where
torch is not installed at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.synthetic import lattice

RUNTIME_PYTHON = REPO / ".venv-runtime" / "bin" / "python"

SCRIPT = r"""
import importlib.abc, json, sys, time

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name in ("torchvision", "onnx"):
            raise ImportError(f"the runtime imported {name}")
        return None

sys.meta_path.insert(0, NoTorch())
started = time.perf_counter()
from defectscope.cli import main
import_s = time.perf_counter() - started
artifact, frame, out = sys.argv[1:4]
assert main(["map", artifact, frame, "--out", out + "/map", "--pixel-size", "0.05"]) == 0
assert main(["roi", artifact, frame, "--out", out + "/rois.json", "--top", "3"]) == 0
import numpy as np
from defectscope.service.client import Client
from defectscope.service.server import BackgroundService
with BackgroundService(artifact) as service, Client(service.address) as client:
    assert client.ping()
    served = client.rois(np.load(frame), top=3)["rois"]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx"))
print(json.dumps({"import_s": import_s, "heavy": heavy, "served": served}))
"""


def frame_file(tmp_path: Path) -> Path:
    frame = lattice((192, 192), vacancies=[(10, 10), (10, 11), (11, 10), (11, 11)], seed=9)
    path = tmp_path / "frame.npy"
    np.save(path, (frame * 3000).clip(0, 65535).astype(np.uint16))
    return path


def run_script(python: Path | str, onnx_artifact: Path, tmp_path: Path) -> dict:
    frame = frame_file(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [str(python), "-c", SCRIPT, str(onnx_artifact), str(frame), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    regions = json.loads((tmp_path / "map" / "regions.json").read_text())
    rois = json.loads((tmp_path / "rois.json").read_text())
    assert regions and rois and len(rois) <= 3
    assert report["served"] == rois  # the service and the CLI agree
    return report


def test_runtime_layers_never_import_torch(onnx_artifact, tmp_path):
    run_script(sys.executable, onnx_artifact, tmp_path)


@pytest.mark.skipif(
    not RUNTIME_PYTHON.exists() and not os.environ.get("CI"),
    reason=".venv-runtime missing: scripts/setup.sh makes it",
)
def test_runtime_venv_without_torch_maps_ranks_and_serves(onnx_artifact, tmp_path):
    check = subprocess.run(
        [str(RUNTIME_PYTHON), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.stdout.strip() == "None", "torch is installed in .venv-runtime"
    report = run_script(RUNTIME_PYTHON, onnx_artifact, tmp_path)
    print(f"CLI import time without torch: {report['import_s']:.3f} s")
