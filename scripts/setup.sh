#!/usr/bin/env bash
# Creates .venv with torch and everything the example and the tests need. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch comes first and pinned, from the index pip is configured with. From public PyPI on Linux that
# is the CUDA build (several GB); a CPU-only machine installs the CPU build into .venv beforehand
# (README: --index-url https://download.pytorch.org/whl/cpu), and an installed torch is kept.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -r requirements-test.txt
