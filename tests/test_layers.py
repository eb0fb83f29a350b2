"""The package's layers: subpackages import only downward, and the runtime never needs torch.

The declared order is each subpackage's own ``__init__`` docstring ("Layer N of the data
flow"). The import graph is read from the source with ``ast``: module-level imports and
the imports inside functions alike, so a lazy upward import fails here before it fails
on an instrument PC.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "defectscope"
# Top-level modules any layer may import: the compiled tiler and the version string.
FOUNDATION = {"_tiling", "_version"}
# What an instrument PC runs: importable with torch and onnx absent.
RUNTIME = [
    "util", "io", "tiling", "artifacts", "engines", "maps", "evaluation", "outputs",
    "simulate", "service", "nion", "cli",
]  # fmt: skip
# Modules of training-side subpackages that the runtime CLI imports for their dataclasses.
RUNTIME_MODULES = ["defectscope.training.config", "defectscope.training.augment"]


def subpackages() -> dict[str, int]:
    """Each subpackage's declared layer, read from its ``__init__`` docstring."""
    layers = {}
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        match = re.search(r"Layer (\d+) of the data flow", doc)
        assert match, f"{init.parent.name}/__init__.py: docstring must declare its layer"
        layers[init.parent.name] = int(match.group(1))
    return layers


LAYERS = subpackages()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skip


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported module, at module level)`` for every defectscope import in ``path``."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: use absolute imports"
            if node.module == "defectscope":
                targets = [f"defectscope.{a.name}" for a in node.names]
            elif node.module.startswith("defectscope."):
                targets = [node.module]
            else:
                continue
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("defectscope.")]
        else:
            continue
        found.extend((target, id(node) in top) for target in targets)
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[str, int | None]:
    """The subpackage a dotted module belongs to and its layer (None for the root)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "", None
    return parts[1], LAYERS.get(parts[1])


def test_every_subpackage_declares_a_layer_and_the_root_holds_no_modules():
    stray = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", *FOUNDATION))
    assert not stray, f"modules outside a subpackage: {stray}"
    assert set(RUNTIME) <= set(LAYERS)
    # The data flow, in order.
    order = ["util", "io", "tiling", "artifacts", "nets", "engines", "maps", "outputs", "cli"]
    assert [LAYERS[name] for name in order] == sorted(LAYERS[name] for name in order)


def test_imports_run_only_downward_inside_functions_too():
    upward = []
    for module, targets in graph().items():
        sub, layer = layer_of(module)
        for target, _ in targets:
            tsub, tlayer = layer_of(target)
            if tsub in FOUNDATION or not tsub or tsub == sub:
                continue
            if layer is None:  # the root imports nothing but the foundation at run time
                upward.append(f"{module} -> {target}")
            elif tlayer is None or tlayer >= layer:
                upward.append(f"{module} (layer {layer}) -> {target} (layer {tlayer})")
    assert not upward, "imports that do not run downward:\n" + "\n".join(upward)


def test_no_import_circles():
    edges = {m: {t for t, _ in targets} for m, targets in graph().items()}
    seen: dict[str, int] = {}  # 1 on the stack, 2 done
    circles = []

    def visit(module: str, stack: list[str]) -> None:
        seen[module] = 1
        for target in sorted(edges.get(module, ())):
            if target not in edges:
                continue
            if seen.get(target) == 1:
                circles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in seen:
                visit(target, [*stack, target])
        seen[module] = 2

    for module in sorted(edges):
        if module not in seen:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_runtime_subpackages_import_training_code_only_lazily():
    lazy_only = {name for name in LAYERS if name not in RUNTIME}
    runtime_files = {m for m in graph() if layer_of(m)[0] in RUNTIME}
    eager = [
        f"{module} -> {target}"
        for module in sorted(runtime_files)
        for target, top in graph()[module]
        if top and layer_of(target)[0] in lazy_only and target not in RUNTIME_MODULES
    ]
    assert not eager, "runtime modules importing training code at module level:\n" + "\n".join(
        eager
    )


BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "onnx"):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("subpackage", RUNTIME)
def test_runtime_subpackage_imports_with_torch_and_onnx_blocked(subpackage):
    modules = [
        module_name(path)
        for path in sorted((PACKAGE / subpackage).rglob("*.py"))
        if path.name != "__main__.py"
    ]
    code = BLOCK + "\n".join(f"import {m}" for m in [*modules, *RUNTIME_MODULES])
    code += "\nprint('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]


def test_the_public_face_is_lazy():
    code = """
import sys
import defectscope
heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime", "scipy",
         "sklearn", "matplotlib", "zmq", "dask")]
assert not heavy, heavy
assert [m for m in sys.modules if m.startswith("defectscope.")] == ["defectscope._version"], (
    sorted(m for m in sys.modules if m.startswith("defectscope")))
from defectscope import (Detector, LiveDetector, MapOptions, read_frame, tile, load_engine,
                         run_batch)
assert Detector.__module__ == "defectscope.maps.detector"
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "onnx")]
try:
    defectscope.no_such_name
except AttributeError as error:
    assert "no_such_name" in str(error)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]


def test_importing_the_runtime_changes_no_process_state():
    code = """
import os, sys
import matplotlib
backend = dict.__getitem__(matplotlib.rcParams, "backend")  # [] would import pyplot
mask = os.umask(0o022); os.umask(mask)
import defectscope.cli, defectscope.maps.detector
import defectscope.outputs.map_files, defectscope.outputs.figures
import defectscope.service.server, defectscope.service.live
import defectscope.outputs.clusters, defectscope.nion.loop
import defectscope.io.frames
after = os.umask(0o022); os.umask(after)
assert after == mask, (mask, after)
assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
assert "matplotlib.pyplot" not in sys.modules
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx")]
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]
