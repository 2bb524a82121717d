#!/usr/bin/env bash
# Set up everything the tests need, then run lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
# Strict types over the packages, tests/ and bench/ (the list and options: pyproject.toml).
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
