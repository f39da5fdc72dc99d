#!/usr/bin/env bash
# Idempotent setup on a fresh machine: a venv in .venv with the CPU build of torch and the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The pinned CPU build (an unpinned torch would pull a multi-GB CUDA build).
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
# The llama.cpp drafter backend (DuoDecoding) is an optional extra built from source (cmake, g++;
# ~10-15 min on 2 cores the first time, then pip's wheel cache). CI builds and tests it.
if [ "${CI:-}" = "true" ] || [ "${SPECORCH_LLAMA:-}" = "1" ]; then
  .venv/bin/python -c "import llama_cpp" 2>/dev/null || \
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" .venv/bin/python -m pip install -q -e ".[test,llama]"
fi
