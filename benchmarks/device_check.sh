#!/usr/bin/env bash
# Every CUDA check of kvtier in one short run, for a machine with a GPU.
#
# Runs the tests marked `cuda` (pinned memory, streams, events, the mover and
# the parts calls on a real device), then benchmarks/transfer.py (hot and
# fresh access) and benchmarks/pipeline_overhead.py on the GPU, and writes
# logs and JSON to $OUT (default ./device-check). Uses the python3 that has
# torch with CUDA; kvtier's dependencies that the image lacks are installed
# from .whl/ when it is there (made by benchmarks/device_wheels.sh).
#
#   OUT=/some/dir benchmarks/device_check.sh
#   DEVICE=cpu benchmarks/device_check.sh      # smoke run of this script, no GPU
#
# Each step has its own time limit; the whole run stays under 8 minutes. Each
# step's output is in $OUT/STEP.out (the benchmarks' JSON) and $OUT/STEP.err.
# Exit status: 0 all passed, 1 a step failed, 2 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-check}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/kvtier-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/kvtier-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$python" - "$device" > "$out/env.txt" <<'PY' || { cat "$out/env.txt"; exit 2; }
import sys

import torch

print(f"torch {torch.__version__} cuda {torch.version.cuda}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        sys.exit(2)
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.total_memory >> 30} GiB, {props.multi_processor_count} SMs")
PY
cat "$out/env.txt"
bench=(--device "$device")
overhead=(--device "$device")
if [ "$device" != cuda ]; then  # a smoke run: small and quick
    bench+=(--batches 1,16 --pool-blocks 32 --repeats 2 --warmup 1 --min-blocks 16)
    overhead+=(--batch 16 --repeat 3)
fi

status=0
step() {  # step NAME SECONDS COMMAND...: run it into $out/NAME.out and .err
    local name=$1 seconds=$2 code=0
    shift 2
    echo "== $name"
    timeout "$seconds" "$@" > "$out/$name.out" 2> "$out/$name.err" || code=$?
    if [ "$code" -ne 0 ]; then
        echo "   failed (exit $code)"
        tail -n 20 "$out/$name.err"
        status=1
    fi
    tail -n 3 "$out/$name.out"
}
mapfile -t cuda_tests < <(grep -l "mark.cuda" tests/test_*.py)
step cuda-tests 240 "$python" -m pytest -q -p no:cacheprovider -m cuda "${cuda_tests[@]}"
step transfer-hot 120 "$python" benchmarks/transfer.py "${bench[@]}" --json
step transfer-fresh 120 "$python" benchmarks/transfer.py "${bench[@]}" --access fresh --json
step pipeline-overhead 60 "$python" benchmarks/pipeline_overhead.py "${overhead[@]}" --json
exit $status
