#!/usr/bin/env bash
# The GPU check on a machine with CUDA: the GPU tests first (correctness before speed), then
# the benchmarks. Everything it prints also lands under $OUT (default bench/results).
#
# The device machine (Python 3.12) has torch, torchvision, grpcio and protobuf, older than
# the stubs need. Once, here: `bash bench/gpu_wheels.sh` (fills .whl/, about 10 MB). Then
# two device calls of about 4 minutes each, both with carry [".whl"]:
#   bash bench/gpu_check.sh tests load cache          # timeout_s 360
#   bash bench/gpu_check.sh options predict upload    # timeout_s 360
# Each stage has its own time limit, so a hung stage cannot take the other stages' time.
# On a machine without CUDA it is a dry run: the GPU tests skip, the benchmarks fail fast.
#   PYTHON=.venv/bin/python OUT=/tmp/gpu bash bench/gpu_check.sh tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/client:$PWD/server:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
STAGES="${*:-tests load cache options predict upload}"
want() { [[ " $STAGES " == *" $1 "* ]]; }
# run SECONDS NAME COMMAND...: one stage, bounded, its output also in $OUT/NAME.txt.
run() {
    local seconds=$1 name=$2
    shift 2
    echo "== $name: $* (at most ${seconds}s)" | tee "$OUT/$name.txt"
    timeout -k 5 "$seconds" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)"
    # torch.compile needs Triton and a C compiler with Python's headers
    "$PY" -c "import shutil, sysconfig, triton; print('triton', triton.__version__, shutil.which('cc') or shutil.which('gcc'), sysconfig.get_paths()['include'])"
} 2>&1 | tee "$OUT/machine.txt"
if want tests; then
    # The image's own pytest plugins may not load with the carried pytest: none autoload.
    PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 run 210 gpu-tests "$PY" -m pytest -q -p pytest_timeout \
        -p no:cacheprovider -o addopts="" -m gpu --timeout 120 \
        tests/test_gpu_streams.py tests/test_device_memory.py tests/test_cache_memory.py \
        tests/test_gpu.py  # last: its compile tests are the slowest (and end the file)
fi
if want load; then
    run 60 load "$PY" bench/load.py --device cuda --repeat 3
fi
if want cache; then
    run 75 cache "$PY" bench/cache.py --device cuda --models 12 --seconds 10 --clients 16
fi
if want options; then
    run 80 options "$PY" bench/options.py --model resnet50 --batch 64 --compile --seconds 3
fi
if want predict; then
    for input in uint8 jpeg; do
        run 70 "predict-fp32-$input" "$PY" bench/predict.py --model resnet50 --device cuda \
            --input "$input" --levels 1 16 64 --seconds 3 --rounds 1 --max-batch-size 64
    done
    run 70 predict-bf16-uint8 "$PY" bench/predict.py --model resnet50 --device cuda \
        --input uint8 --dtype bfloat16 --channels-last --levels 1 16 64 --seconds 3 \
        --rounds 1 --max-batch-size 128
fi
if want upload; then
    run 40 upload "$PY" bench/upload.py --mb 500 --repeat 3
fi
