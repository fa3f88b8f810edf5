#!/usr/bin/env bash
# The GPU check on a machine with CUDA, correctness before speed. Everything it prints also
# lands under $OUT (default bench/results): machine.txt, then one file per stage.
#
# The device machine (Python 3.12) has torch, torchvision, grpcio and protobuf, older than
# the stubs need. Once, here: `bash bench/gpu_wheels.sh` (fills .whl/, about 10 MB). Then
# two device calls, both with carry [".whl"], the second at once after the first (the
# machine stays warm 30 s; a fresh start costs 1-2 minutes of the 15):
#   bash bench/gpu_check.sh tests compile                # timeout_s 300: about 240 s
#   bash bench/gpu_check.sh load cache options predict   # timeout_s 270: about 220 s
# Stage limits 75 + 185 s and 30 + 65 + 70 + 2 x 35 s, plus about 20 s of set-up each.
# With the machine's start (1-2 minutes) that is about 9 minutes of the 15 (11.5 if every
# stage ran to its limit): one rerun after a fix (a fresh start plus the stages that
# failed) still fits. Each stage has its own time limit, so a hung stage cannot take the
# other stages' time. A device call brings back at most 8 files: the script refuses a
# stage list that would write more. With no stage list it runs both calls' stages in one
# go (8 files; longer than one device call may run).
# On a machine without CUDA it is a dry run: the GPU tests skip, the benchmarks fail fast.
#   PYTHON=.venv/bin/python OUT=/tmp/gpu bash bench/gpu_check.sh tests compile
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
PY="${PYTHON:-python3}"
STAGES="${*:-tests compile load cache options predict}"
KNOWN=" tests compile load cache options predict jpeg upload "
files=1 # machine.txt
for stage in $STAGES; do
    if [[ "$KNOWN" != *" $stage "* ]]; then
        echo "unknown stage $stage (stages:$KNOWN)" >&2
        exit 2
    fi
    if [ "$stage" = predict ]; then files=$((files + 2)); else files=$((files + 1)); fi
done
if [ "$files" -gt 8 ]; then
    echo "stages '$STAGES' write $files files under \$OUT; a device call brings back 8" >&2
    exit 2
fi
want() { [[ " $STAGES " == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/client:$PWD/server:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
# run SECONDS NAME COMMAND...: one stage, bounded, its output also in $OUT/NAME.txt.
run() {
    local seconds=$1 name=$2
    shift 2
    echo "== $name: $* (at most ${seconds}s)" | tee "$OUT/$name.txt"
    timeout -k 5 "$seconds" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}

# The machine, and what the GPU paths rely on: Triton and a C compiler (torch.compile),
# nvJPEG (GPU JPEG decoding: its hardware backend may fail in a sandbox), pinned memory
# and the host allocator's statistics. Each line on its own: one failure hides no other.
{
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    timeout 30 "$PY" - <<'PROBE'
def probe(what, check):
    try:
        print(what, check(), flush=True)
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0]
        print(what, "FAILED:", type(error).__name__, first, flush=True)


def triton():
    import shutil
    import sysconfig

    import triton

    cc = shutil.which("cc") or shutil.which("gcc")
    return f"{triton.__version__} cc={cc} include={sysconfig.get_paths()['include']}"


def jpeg():
    import torch
    import torchvision.io as io

    data = io.encode_jpeg(torch.zeros(3, 64, 64, dtype=torch.uint8))
    return tuple(io.decode_jpeg([data], device="cuda")[0].shape)


def host_stats():
    import torch

    stats = torch.cuda.host_memory_stats()
    return {k: v for k, v in stats.items() if k.endswith("bytes.current")}


import torch
import torchvision

print("torch", torch.__version__, "torchvision", torchvision.__version__, flush=True)
probe("cuda", lambda: (torch.cuda.is_available(), torch.version.cuda, torch.cuda.device_count()))
probe("device", lambda: torch.cuda.get_device_name(0))
probe("triton", triton)
probe("cublas", lambda: float((torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda"))[0, 0]))
probe("cudnn", lambda: torch.backends.cudnn.version())
probe("gpu jpeg", jpeg)
probe("pinned", lambda: torch.empty(1 << 20, pin_memory=True).is_pinned())
probe("host stats", host_stats)
probe("host empty cache", lambda: callable(getattr(torch._C, "_host_emptyCache", None)))
PROBE
} 2>&1 | tee "$OUT/machine.txt"

# The image's own pytest plugins may not load with the carried pytest: none autoload.
# --durations=0 -rA: where the time went and every test's outcome, for the next session.
# pytest-timeout's signal method interrupts the main thread only; the stage's `timeout`
# ends the rest (a compile left running on a server thread included).
PYTEST=(env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest -q -p pytest_timeout
    -p no:cacheprovider -o addopts="" -m gpu --durations=0 -rA)
GPU_TESTS=(tests/test_gpu_streams.py tests/test_device_memory.py tests/test_cache_memory.py
    tests/test_gpu.py)
COMPILED="compiled or cuda_graphs" # the torch.compile tests (three; cold inductor cache)
if want tests; then
    run 75 gpu-tests "${PYTEST[@]}" --timeout 60 -k "not ($COMPILED)" "${GPU_TESTS[@]}"
fi
if want compile; then # after the others: a stage that runs out of time loses only these
    run 185 gpu-compile "${PYTEST[@]}" --timeout 180 -k "$COMPILED" "${GPU_TESTS[@]}"
fi
if want load; then
    run 30 load "$PY" bench/load.py --device cuda --repeat 2
fi
if want cache; then # prints its page-in table as soon as part 1 is done
    run 65 cache "$PY" bench/cache.py --device cuda --models 8 --seconds 8 --clients 16
fi
if want options; then # prints each option's line as it is measured
    run 70 options "$PY" bench/options.py --model resnet50 --batch 64 --compile --seconds 2
fi
if want predict; then
    run 35 predict-fp32-uint8 "$PY" bench/predict.py --model resnet50 --device cuda \
        --input uint8 --levels 1 16 64 --seconds 2 --rounds 1 --max-batch-size 64
    run 35 predict-bf16-uint8 "$PY" bench/predict.py --model resnet50 --device cuda \
        --input uint8 --dtype bfloat16 --channels-last --levels 1 16 64 --seconds 2 \
        --rounds 1 --max-batch-size 128
fi
if want jpeg; then # not in the two calls: the JPEG GPU path is in the tests stage
    run 45 predict-fp32-jpeg "$PY" bench/predict.py --model resnet50 --device cuda \
        --input jpeg --levels 1 16 64 --seconds 2 --rounds 1 --max-batch-size 64
fi
if want upload; then # CPU only: any machine can run it
    run 40 upload "$PY" bench/upload.py --mb 500 --repeat 3
fi
