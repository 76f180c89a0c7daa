#!/usr/bin/env bash
# Refreshes the pinned dependency locks from pyproject.toml (`make lock`):
#   requirements/dev.txt      runtime + dev extras: what `make setup` (tests, CI) installs
#   requirements/runtime.txt  runtime only, constrained to dev.txt's pins: what the Docker image installs
# Both are universal (every platform and Python >= 3.11, with markers) and carry sha256 hashes.
# torch/torchvision stay at the pair in requirements/torch.in: the newest these machines install from
# disk (pip's cap), and the pair the suite is tested on. Raise it there, deliberately, never by accident.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
UV_VERSION=0.13.9
TOOLS=${TOOLS_DIR:-.venv-tools}
UV_VENV=$TOOLS/uv-$UV_VERSION

if [ ! -x "$UV_VENV/bin/uv" ]; then
  mkdir -p "$TOOLS"
  [ -f "$TOOLS/.gitignore" ] || echo '*' >"$TOOLS/.gitignore"
  "$PYTHON" -m venv "$UV_VENV"
  "$UV_VENV/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi
uv=("$UV_VENV/bin/uv" pip compile --quiet --universal --python-version 3.11 --generate-hashes
    --custom-compile-command "make lock" --constraint requirements/torch.in)
"${uv[@]}" pyproject.toml --extra dev --output-file requirements/dev.txt "$@"
"${uv[@]}" pyproject.toml --constraint requirements/dev.txt --output-file requirements/runtime.txt "$@"
# The CPU image: the same pins, but torch/torchvision's CPU builds from PyTorch's CPU index instead of
# PyPI's CUDA wheels and the CUDA libraries those pull in (nvidia-*, cuda-*, triton).
"$PYTHON" - <<'PY'
import re
from pathlib import Path

CUDA_ONLY = re.compile(r"^(torch|torchvision|triton|nvidia-[\w-]+|cuda-[\w-]+)==")
# a block is one requirement (or header comment) line and its indented hash/"via" lines
blocks: list[list[str]] = []
for line in Path("requirements/runtime.txt").read_text().splitlines():
    if not blocks or (line and not line[0].isspace()):
        blocks.append([])
    blocks[-1].append(line)
header = ["# runtime.txt without the CUDA builds (make lock writes it): the CPU image's dependencies."]
kept = [b for b in blocks if not CUDA_ONLY.match(b[0])]
Path("requirements/runtime-cpu.txt").write_text("\n".join(header + [l for b in kept for l in b]) + "\n")
pins = [re.match(r"^(torch|torchvision)==([^ ;]+)", b[0]) for b in blocks]
cpu = [f"{m[1]}=={m[2]}+cpu" for m in pins if m]
Path("requirements/torch-cpu.txt").write_text(
    "# torch/torchvision at runtime.txt's versions, CPU builds from https://download.pytorch.org/whl/cpu\n"
    "# (make lock writes it; no hashes: that index is not reachable where the lock is made).\n"
    + "\n".join(cpu) + "\n"
)
PY
echo "lock: wrote requirements/{dev,runtime,runtime-cpu,torch-cpu}.txt"
