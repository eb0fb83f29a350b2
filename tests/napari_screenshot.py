"""Screenshot of napari with the "Find defects" result: ``python -m tests.napari_screenshot
MODEL OUT.png``. Run by tests/napari/test_plugin.py under Xvfb (a napari canvas needs OpenGL).

MODEL is an ONNX file: PyTorch's Triton bundles its own LLVM, which crashes next to
Mesa's software OpenGL (llvmpipe, the only OpenGL under Xvfb) when loaded after it."""

from __future__ import annotations

import sys
import time

# PyTorch must stay out of this process (see above): fail loudly if anything imports it.
sys.modules["torch"] = None  # type: ignore[assignment]

import imageio.v3 as iio  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

import napari  # noqa: E402
from defectscope.napari.plugin import sample_lattice_layer  # noqa: E402
from defectscope.napari.widget import find_defects_widget  # noqa: E402


def main(model: str, out: str) -> int:
    viewer = napari.Viewer(show=False)
    ((data, kwargs, kind),) = sample_lattice_layer(model)
    viewer.add_layer(napari.layers.Layer.create(data, kwargs, kind))
    widget = find_defects_widget(viewer)
    viewer.window.add_dock_widget(widget, name="Find defects")
    widget.run()
    deadline = time.monotonic() + 300
    while widget.busy and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.05)
    if widget.busy or widget.error is not None:
        print(f"widget did not finish: {widget.error}", file=sys.stderr)
        return 1
    QApplication.processEvents()
    iio.imwrite(out, viewer.screenshot(canvas_only=False, flash=False))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
