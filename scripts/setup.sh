#!/usr/bin/env bash
# Create .venv with sgdlab installed (editable) and the extras named by $1 (default: lab).
# torch is pinned to the CPU build 2.13.0 first, so no multi-GB CUDA build is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-lab}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${extras}]"
