#!/usr/bin/env bash
# Create .venv (if missing) and install magdiff with its test tools and the web app's Gradio.
# torch is pinned and installed first so pip takes the local CPU build instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q "torch==${MAGDIFF_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test,app]"
