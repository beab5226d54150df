#!/usr/bin/env bash
# Fetch, into .whl/, the wheels of kvtier's dependencies that a GPU machine's
# image lacks (it has torch, numpy, anyio, attrs, xxhash, rich and hypothesis,
# but no package index), for benchmarks/device_check.sh there; pytest comes
# too, at the version pytest-asyncio needs.
#
#   benchmarks/device_wheels.sh            # here, where PyPI is reachable
#
# Then pass `.whl` in the device tool's `carry` (.whl/ is git-ignored).
# PYTHON_VERSION picks the wheels' CPython (default 3.12, the GPU image's).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
version=${PYTHON_VERSION:-3.12}
rm -rf .whl
mkdir -p .whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$python" -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$version" --implementation cp "${platforms[@]}" -d .whl \
    "structlog==26.1.0" "cbor2==6.3.0" "pytest-asyncio==1.5.0" \
    "pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1"
ls .whl
