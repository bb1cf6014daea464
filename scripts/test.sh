#!/usr/bin/env bash
# The README's test command: lint, then the CPU test suite (GPU tests skip themselves without CUDA) in
# DS4F_TEST_WORKERS pytest-xdist processes (default 2: CI's two cores; 1 runs in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check ds4f tests bench
w=${DS4F_TEST_WORKERS:-2}
if [ "$w" = 1 ]; then xdist=(); else xdist=(-n "$w"); fi
python3 -m pytest -q -m "not gpu" "${xdist[@]}" tests "$@"
