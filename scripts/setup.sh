#!/usr/bin/env bash
# Create .venv (if missing) and install defectscope with its C++ extension, editable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: pip takes this exact pair from the local wheel store where one exists.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,formats,nion]"
.venv/bin/python -c "import defectscope._tiling, defectscope; print('defectscope', defectscope.__version__, 'ready')"
