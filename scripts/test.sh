#!/usr/bin/env bash
# Install ecgfm with its test extras into .venv (CPU PyTorch 2.13.0 wheel) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch is named with its exact version first so that pip takes the CPU wheel and never a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"
.venv/bin/ruff check ecgfm_cli tests benchmarks
.venv/bin/python -m pytest -q --durations=15 "$@"
