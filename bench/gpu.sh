#!/usr/bin/env bash
# One command for a session with a GPU: the benchmark table (bench/gpu_bench.py), then the CUDA tests.
#   bench/gpu.sh             on a CUDA machine
#   bench/gpu.sh --dry-run   anywhere: the same code path at toy sizes on the CPU (no figures, no CUDA tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || make venv
"$PY" bench/gpu_bench.py "$@"
case " $* " in
  *" --dry-run "*) ;;
  *) "$PY" -m pytest -q -m cuda tests/test_cuda.py ;;
esac
