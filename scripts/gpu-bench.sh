#!/usr/bin/env bash
# Run, on a lent GPU machine, the GPU checks and benchmarks issue 13 names, in its order; every figure
# and log goes to $OUT (the device tool brings it back). Stage the kit first, here: scripts/gpu-kit.sh.
#   scripts/gpu-bench.sh STEP...   STEP: tests | core | graphs | service | calibrate | all
# Each step fits one device call (10 minutes); `all` does not. DRY_RUN=1 prints the commands only.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

DRY_RUN=${DRY_RUN:-0}
if [ "$DRY_RUN" = 1 ]; then
    :
elif ! $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu-bench: $PY sees no CUDA device; these are GPU benchmarks" >&2
    exit 2
else
    if [ -d .gpu-kit/wheels ] && [ ! -d /tmp/gpu-kit-site ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-kit-site \
            .gpu-kit/wheels/*.whl
    fi
    if [ -d /tmp/gpu-kit-site ]; then export PYTHONPATH=/tmp/gpu-kit-site${PYTHONPATH:+:$PYTHONPATH}; fi
    [ -e ../shared ] || ln -s "$PWD/.gpu-kit/shared" ../shared # where tests and benches look for it
    $PY -c 'import torch, timm, fastapi; print(torch.__version__, timm.__version__, fastapi.__version__,
torch.cuda.get_device_name())' | tee "$OUT/device.txt"
fi

failed=()
run() {  # name, command...: its output to $OUT/<name>.log, and on the console; a failure does not stop the rest
    local name=$1
    shift
    echo "== $name: $*"
    if [ "$DRY_RUN" = 1 ]; then return; fi
    "$@" 2>&1 | tee "$OUT/$name.log" || failed+=("$name")
}

step() {
    case $1 in
    tests)  # graph replay = eager in bf16/fp16, the async CUDA path, nvjpeg vs the CPU decoder
        run cuda-tests $PY -m pytest -q -rs tests/service/test_runner.py tests/service/test_device_decode.py ;;
    core)  # r13 >= 1.6x stock SDPA at b256 bf16; eager at batch 1 and 8
        run core-b256 $PY -m models.bench --model vit_base_patch16_224 --batch-size 256 --device cuda --dtype bf16
        run core-b1 $PY -m models.bench --model vit_base_patch16_224 --batch-size 1 --device cuda --dtype bf16 \
            --schedules 0,13
        run core-b8 $PY -m models.bench --model vit_base_patch16_224 --batch-size 8 --device cuda --dtype bf16 \
            --schedules 0,13 ;;
    graphs)  # with CUDA graphs, fast not slower than exact at batch 1 and 8 (and every other bucket)
        run tier-batches $PY -m loadtest.tier_batches --model vit_base_patch16_224 --device cuda \
            --dtype bfloat16 --max-batch-size 64 --json "$OUT/tier-batches.json" ;;
    service)  # service >= 0.85 of bare at the same tier; fast >= 1.6x exact end to end
        run service-bench $PY -m loadtest.service_bench --model vit_base_patch16_224 --device cuda \
            --dtype bfloat16 --tiers exact,fast --max-batch-size 64 --concurrency 256 --rounds 2 \
            --json "$OUT/service-bench.json" ;;
    calibrate)  # the real ViT-Ti's tiers on the GPU, bf16 (speedups and agreement)
        run calibrate $PY -m service.cli calibrate --config loadtest/configs/cpu-vit-ti.toml --device cuda \
            --dtype bfloat16 --images ../shared/data/imagenet-sample --batch-size 64 --rounds 9 --no-progress \
            --out "$OUT/calibration-vit-ti-cuda-bf16.json" ;;
    all) for s in tests core graphs service calibrate; do step $s; done ;;
    *) echo "gpu-bench: unknown step $1 (tests, core, graphs, service, calibrate, all)" >&2; exit 2 ;;
    esac
}

[ $# -gt 0 ] || set -- all
for s in "$@"; do step "$s"; done
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu-bench: failed: ${failed[*]} (logs in $OUT)" >&2
    exit 1
fi
