#!/usr/bin/env bash
# Regenerates the committed Python stubs (and their .pyi types) from protos/.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: client/, where they are committed)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/client}" && cd "${1:-$root/client}" && pwd)"
python="$(command -v "${PYTHON:-python}")"
case "$python" in /*) ;; *) python="$PWD/$python" ;; esac
bin="$(dirname "$python")"
cd "$root/protos"
protos=$(find modelhost -name '*.proto' | sort)
"$python" -m grpc_tools.protoc -I. \
    --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" \
    --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
    --python_out="$out" --mypy_out=quiet:"$out" \
    --grpc_python_out="$out" --mypy_grpc_out=quiet:"$out" $protos
