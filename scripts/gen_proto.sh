#!/usr/bin/env bash
# Regenerate the checked-in gRPC stubs from proto/specorch.proto (tests/test_grpc.py checks they match).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. proto/specorch.proto
