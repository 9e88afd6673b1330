#!/usr/bin/env bash
# Set up the test environment (test extras, Debian's chromium for the report's browser test),
# run the gates (ruff lint and format check, mypy on the typed modules) and the whole test suite, docstring
# examples included, on two workers. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is needed by tests/lab/test_report_browser.py: sudo apt-get install chromium" >&2
    exit 1
  fi
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy
# property tests draw the same examples on every run (tests/conftest.py)
export SGDLAB_DERANDOMIZE=1
exec .venv/bin/python -m pytest -n 2 -q "$@"
