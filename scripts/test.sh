#!/usr/bin/env bash
# Set up (if needed), lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check python tests benchmarks export
.venv/bin/ruff format --check python tests benchmarks export
.venv/bin/python -m pytest tests "$@"
