#!/usr/bin/env bash
# GPU suite in one command: build with CUDA, pytest -m cuda, benchmarks -> benchmarks/results/gpu_suite.{md,json}.
# Uses .venv/bin/python when present (else $PYTHON or python3); arguments go to benchmarks/gpu_suite.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec timeout 600 "$PY" benchmarks/gpu_suite.py "$@"
