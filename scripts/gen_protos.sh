#!/usr/bin/env bash
# Regenerates the committed Python stubs from protos/. Usage: scripts/gen_protos.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-client}"
python="${PYTHON:-python}"
protos=$(cd protos && find modelhost -name '*.proto' | sort)
(cd protos && "$python" -m grpc_tools.protoc -I. \
    --python_out="../$out" --mypy_out="../$out" \
    --grpc_python_out="../$out" --mypy_grpc_out="../$out" $protos)
