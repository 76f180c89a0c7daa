#!/usr/bin/env bash
# Stage, here, what a lent GPU machine (the workplace's `device` tool) needs to run scripts/gpu-bench.sh:
# its image has torch, torchvision, timm, Pillow, prometheus-client, httpx and pytest, but not the
# FastAPI stack, and it reaches no package registry; ../shared does not travel with the repository.
# Writes .gpu-kit/ (git-ignored): cp312 wheels of the packages below at the
# versions requirements/runtime-cpu.txt pins, the real ViT-Ti weights and the ImageNet photos (~55 MB).
# Then carry it:  run(command="bash scripts/gpu-bench.sh tests", carry=[".gpu-kit"])
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-kit
SHARED=${SHARED:-../shared}
PY=${GPU_PYTHON_VERSION:-3.12}   # the device image's python3 (library/device/KINDS.md)
PACKAGES="fastapi starlette uvicorn httptools pydantic pydantic-core pydantic-settings python-dotenv
python-multipart annotated-types annotated-doc typing-inspection typing-extensions opentelemetry-api
timm msgpack"

rm -rf "$KIT"
mkdir -p "$KIT/wheels" "$KIT/shared/data" "$KIT/shared/models"
pins=()
for name in $PACKAGES; do
    pin=$(grep -m1 -E "^${name}==" requirements/runtime-cpu.txt | cut -d' ' -f1)
    [ -n "$pin" ] || { echo "gpu-kit: $name is not pinned in requirements/runtime-cpu.txt" >&2; exit 1; }
    pins+=("$pin")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$KIT/wheels" "${pins[@]}" 2>&1 | grep -v '^WARNING: Location' || true
[ "$(ls "$KIT/wheels" | wc -l)" -eq "${#pins[@]}" ] || { echo "gpu-kit: missing wheels" >&2; exit 1; }
cp -rL "$SHARED/models/." "$KIT/shared/models/"
cp -rL "$SHARED/data/imagenet-sample" "$KIT/shared/data/"
du -sh "$KIT"
