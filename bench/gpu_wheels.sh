#!/usr/bin/env bash
# Downloads into .whl/ the wheels bench/gpu_check.sh needs on the device machine (Python 3.12,
# x86-64), which has torch, torchvision, grpcio and protobuf but older than the stubs need.
# Run it here once, then carry ".whl" in each device call (bench/gpu_check.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl \
    protobuf==7.36.2 grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    prometheus-client==0.26.0 safetensors==0.8.0 pytest==9.2.0 pytest-timeout==2.4.0 \
    iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0 packaging==26.4
ls -la .whl
du -sh .whl
