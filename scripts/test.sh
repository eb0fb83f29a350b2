#!/usr/bin/env bash
# Set up (if needed), lint, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check python tests benchmarks export
.venv/bin/ruff format --check python tests benchmarks export
# One worker per core (PYTEST_WORKERS=0 runs in one process); a file's tests stay in one
# worker, so its module fixtures (trained toy models) are built once.
.venv/bin/python -m pytest tests -n "${PYTEST_WORKERS:-auto}" --dist loadfile "$@"
