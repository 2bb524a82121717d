#!/usr/bin/env bash
# Set up everything the tests need, then run lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
