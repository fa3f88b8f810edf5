#!/usr/bin/env bash
# The GPU check, in one call on a machine with CUDA: GPU tests, then the benchmarks.
# Everything it prints also lands under $OUT (default bench/results).
#
# The device machine has torch, torchvision, grpcio and protobuf, but maybe not the
# versions the stubs need; carry wheels (python 3.12, manylinux x86_64) in .whl/:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     protobuf==7.36.2 grpcio==1.85.3 grpcio-health-checking==1.85.1 \
#     grpcio-reflection==1.85.1 prometheus-client==0.26.0 safetensors==0.8.0 pytest==9.2.0 \
#     pytest-timeout==2.4.0 iniconfig==2.3.0 pluggy pygments packaging
# and run it with carry [".whl"]:  bash bench/gpu_check.sh
# The whole check takes about 10 minutes on an H200; a device call may run at most 10,
# so run it in two calls, by stage:
#   bash bench/gpu_check.sh tests options load      # about 4 minutes
#   bash bench/gpu_check.sh predict upload          # about 6 minutes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/client:$PWD/server:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
run() { echo "== $*"; "$@"; }
STAGES="${*:-tests options load predict upload}"
want() { [[ " $STAGES " == *" $1 "* ]]; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
if want tests; then
    run python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu \
        tests/test_gpu.py tests/test_gpu_streams.py tests/test_device_memory.py \
        2>&1 | tee "$OUT/gpu-tests.txt"
fi
if want options; then
    run python3 bench/options.py --model resnet50 --batch 64 --compile 2>&1 | tee "$OUT/options.txt"
fi
if want load; then
    run python3 bench/load.py --device cuda --repeat 3 2>&1 | tee "$OUT/load.txt"
fi
if want predict; then
    for input in float32 uint8 jpeg; do
        run python3 bench/predict.py --model resnet50 --device cuda --input "$input" \
            --seconds 6 --rounds 2 --max-batch-size 64 2>&1 | tee "$OUT/predict-fp32-$input.txt"
    done
    run python3 bench/predict.py --model resnet50 --device cuda --input uint8 --dtype bfloat16 \
        --channels-last --seconds 6 --rounds 2 --max-batch-size 128 \
        2>&1 | tee "$OUT/predict-bf16-uint8.txt"
fi
if want upload; then
    run python3 bench/upload.py --mb 500 --repeat 3 2>&1 | tee "$OUT/upload.txt"
fi
