#!/usr/bin/env bash
# Creates .venv with CPU torch and everything the example and the tests need. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch comes first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
# Where CUDA torch is wanted, install it into .venv beforehand; an installed torch>=2.4 is kept.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -r requirements-test.txt
