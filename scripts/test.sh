#!/usr/bin/env bash
# The README's test command: set up (idempotent), check the import layers, then run the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lint-imports   # the floors import only downwards (pyproject.toml, [tool.importlinter])
exec .venv/bin/python -m pytest -q "$@"
