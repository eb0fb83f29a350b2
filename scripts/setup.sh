#!/usr/bin/env bash
# Create .venv (if missing) and install defectscope with its C++ extension, editable, with
# everything (training, formats, Nion, Dask, napari, simulation, tests); then
# .venv-runtime, the runtime alone (no PyTorch), which the tests use to prove an
# instrument PC needs nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Nothing to install when the dependencies and the C++ sources are what was installed last.
STAMP=.venv/.defectscope-installed
STATE=$(cat pyproject.toml CMakeLists.txt csrc/* scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$STATE" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: pip takes this exact pair from the local wheel store where one exists.
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[train,dev,formats,nion,scale,napari,simulate]"
  echo "$STATE" > "$STAMP"
else
  echo "setup: .venv is up to date (pyproject.toml and csrc/ unchanged)"
fi
.venv/bin/python -c "import defectscope._tiling, defectscope; print('defectscope', defectscope.__version__, 'ready')"
if [ ! -x .venv-runtime/bin/python ]; then
  "$PYTHON" -m venv .venv-runtime
fi
if [ "$(cat .venv-runtime/.defectscope-installed 2>/dev/null)" != "$STATE" ]; then
  .venv-runtime/bin/python -m pip install -q --upgrade pip
  .venv-runtime/bin/python -m pip install -q -e .
  echo "$STATE" > .venv-runtime/.defectscope-installed
fi
.venv-runtime/bin/python -c "
import importlib.util, defectscope._tiling
assert importlib.util.find_spec('torch') is None, 'torch found in the runtime venv'
print('runtime venv ready (no torch)')"
