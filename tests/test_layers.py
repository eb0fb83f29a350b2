"""The package's layers: modules import only downward, and the runtime never needs torch.

Checked on the source (module-level imports, read with ``ast``), so a new upward or
circular import fails here before it fails on an instrument PC.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "defectscope"

# Lower numbers come first in the data flow; a module may import only lower ones.
LAYERS = {
    "_tiling": 0,
    "io": 0,
    "client": 0,
    "lattice": 0,
    "augment": 0,
    "evaluate": 0,
    "grouping": 0,
    "provenance": 0,
    "cluster": 0,
    "figures": 0,
    "density": 0,
    "system": 0,
    "progress": 0,
    "tiling": 1,
    "simulate": 1,
    "__init__": 2,
    "artifact": 2,
    "train_config": 2,
    "datasets": 2,
    "engines": 3,
    "maps": 3,
    "model": 3,
    "rois": 4,
    "dense": 4,
    "checkpoint": 4,
    "detector": 5,
    "outputs": 5,
    "cluster_run": 5,
    "train": 5,
    "export": 5,
    "report": 5,
    "live": 6,
    "service": 6,
    "batch": 6,
    "napari_plugin": 6,
    "_napari_widget": 7,
    "nion": 6,
    "classifier": 6,
    "study": 6,
    "dense_model": 6,
    "sim_check": 6,
    "pipeline": 7,
    "cli": 8,
}
# What an instrument PC runs: these import no training module at module level.
RUNTIME = {
    "__init__", "_tiling", "io", "tiling", "artifact", "engines", "maps", "rois", "detector",
    "density", "system", "progress",
    "figures", "outputs", "cluster", "cluster_run", "live", "service", "client", "lattice",
    "nion", "cli", "train_config", "augment", "batch", "dense", "simulate", "sim_check",
}  # fmt: skip


def module_imports(path: Path) -> set[str]:
    """defectscope modules imported by ``path`` at module level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("defectscope")
        ):
            parts = node.module.split(".")
            if len(parts) > 1:
                names.add(parts[1])
            else:
                names.update(a.name for a in node.names if a.name != "__version__")
        elif isinstance(node, ast.Import):
            names.update(
                a.name.split(".")[1] for a in node.names if a.name.startswith("defectscope.")
            )
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.stem)
def test_module_imports_only_lower_layers(path):
    module = path.stem
    assert module in LAYERS, f"{module}: give the new module a layer in tests/test_layers.py"
    for imported in module_imports(path):
        assert LAYERS[imported] < LAYERS[module], (
            f"{module} (layer {LAYERS[module]}) imports {imported} (layer {LAYERS[imported]})"
        )
        if module in RUNTIME:
            assert imported in RUNTIME, f"runtime module {module} imports {imported}"


def test_importing_the_runtime_changes_no_process_state():
    code = """
import os, sys
import matplotlib
backend = dict.__getitem__(matplotlib.rcParams, "backend")  # [] would import pyplot
mask = os.umask(0o022); os.umask(mask)
import defectscope.cli, defectscope.detector, defectscope.outputs, defectscope.figures
import defectscope.service, defectscope.live, defectscope.cluster_run, defectscope.nion
import defectscope.io
after = os.umask(0o022); os.umask(after)
assert after == mask, (mask, after)
assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
assert "matplotlib.pyplot" not in sys.modules
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx")]
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]
