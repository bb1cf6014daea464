#!/usr/bin/env bash
# The README's test command: lint, then the CPU test suite (GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check ds4f tests bench
python3 -m pytest -q -m "not gpu" tests "$@"
