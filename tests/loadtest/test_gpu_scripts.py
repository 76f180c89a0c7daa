"""scripts/gpu-bench.sh and scripts/gpu-kit.sh: the GPU session's commands, checked where there is no GPU.

A GPU is rarely lent (and never to CI), so a typo there would cost device minutes: every command the
bench would run must parse with its tool's own options, and every test file it names must exist.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from loadtest import service_bench, tier_batches
from models import bench
from service import calibrate

REPO = Path(__file__).resolve().parents[2]
PARSERS = {
    "models.bench": lambda argv: bench.build_parser().parse_args(argv),
    "loadtest.tier_batches": tier_batches.parse_args,
    "loadtest.service_bench": lambda argv: service_bench.parse_args(argv)[1],
    "service.cli": lambda argv: calibrate.parse_args(argv[1:]) if argv[:1] == ["calibrate"] else None,
}


def _dry_run(*steps: str, tmp: Path) -> list[list[str]]:
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp)}
    done = subprocess.run(
        ["bash", "scripts/gpu-bench.sh", *steps],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [
        shlex.split(line.split(": ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("== ")
    ]


def test_every_gpu_bench_command_parses(tmp_path: Path) -> None:
    commands = _dry_run("all", tmp=tmp_path)
    modules = [words[words.index("-m") + 1] for words in commands]
    assert set(modules) == {"pytest", *PARSERS}
    for words, module in zip(commands, modules, strict=True):
        args = words[words.index("-m") + 2 :]
        if module == "pytest":
            files = [a for a in args if not a.startswith("-")]
            assert files and all((REPO / f).is_file() for f in files), files
            continue
        assert PARSERS[module](args) is not None, words  # argparse exits on an unknown option


def test_an_unknown_step_and_a_machine_without_cuda_are_refused(tmp_path: Path) -> None:
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path)}
    bad = subprocess.run(
        ["bash", "scripts/gpu-bench.sh", "bogus"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown step bogus" in bad.stderr
    if torch.cuda.is_available():  # the step would run for real: not in a test
        return
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    cpu = subprocess.run(
        ["bash", "scripts/gpu-bench.sh", "core"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert cpu.returncode == 2 and "sees no CUDA device" in cpu.stderr


def test_the_kit_pins_what_the_lock_pins() -> None:
    """gpu-kit.sh downloads exactly the versions requirements/runtime-cpu.txt pins (checked, not run:
    it downloads ~7 MB of wheels and copies ~45 MB of ../shared)."""
    text = (REPO / "scripts" / "gpu-kit.sh").read_text()
    packages = text.split('PACKAGES="', 1)[1].split('"', 1)[0].split()
    lock = (REPO / "requirements" / "runtime-cpu.txt").read_text()
    assert {"fastapi", "uvicorn", "pydantic-settings", "python-multipart", "timm"} <= set(packages)
    assert all(f"\n{name}==" in lock for name in packages), packages
