"""docker/Dockerfile has what the deployment relies on (it cannot be built here: hadolint lints it)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, keyed by stage name."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in instructions(path):
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            assert match, f"every stage needs a name: FROM {args}"
            current = result.setdefault(match[1], [])
            current.append((keyword, args))
        elif current is not None:
            current.append((keyword, args))
    return result


def _runs(stage: list[tuple[str, str]]) -> str:
    return " ".join(a for k, a in stage if k == "RUN")


def test_gpu_and_cpu_variants_install_from_the_lock() -> None:
    """Both images install the hash-checked lock the test suite runs on (requirements/), not a base
    image's torch or a fresh resolution: the image is the tested code."""
    all_stages = stages(DOCKERFILE)
    args = dict(a.split("=", 1) for k, a in instructions(DOCKERFILE) if k == "ARG" and "=" in a)
    assert args["VARIANT"] == "gpu", "GPU is the default variant"
    assert args["PYTHON_IMAGE"].startswith("python:3.11"), "the Python the lock is made for"
    assert all_stages["runtime"][0] == ("FROM", "deps-${VARIANT} AS runtime")
    gpu, cpu = _runs(all_stages["deps-gpu"]), _runs(all_stages["deps-cpu"])
    assert "--require-hashes --no-deps -r requirements/runtime.txt" in gpu
    assert "--require-hashes --no-deps -r requirements/runtime-cpu.txt" in cpu
    assert '--index-url "${TORCH_INDEX_URL}" -r requirements/torch-cpu.txt' in cpu
    assert "requirements/" in " ".join(a for k, a in all_stages["base"] if k == "COPY")
    runtime = _runs(all_stages["runtime"])
    assert "--no-deps --no-build-isolation ." in runtime and "pip check" in runtime, "nothing resolved anew"


def test_dependencies_layer_comes_before_the_source() -> None:
    all_stages = stages(DOCKERFILE)
    names = list(all_stages)
    assert names.index("deps-gpu") < names.index("runtime") > names.index("deps-cpu")

    def copied(stage: str) -> set[str]:
        return {a.split()[0].rstrip("/") for k, a in all_stages[stage] if k == "COPY"}

    assert {"service", "models"} <= copied("runtime"), "the source is copied in the last stage only"
    for deps in ("base", "deps-gpu", "deps-cpu"):
        assert not {"service", "models"} & copied(deps)


@pytest.fixture(scope="module")
def runtime_stage() -> list[tuple[str, str]]:
    all_stages = stages(DOCKERFILE)
    assert list(all_stages)[-1] == "runtime", "the last stage (the default target) must be the runtime"
    return all_stages["runtime"]


def test_non_root_user_and_healthcheck(runtime_stage: list[tuple[str, str]]) -> None:
    users = [a for k, a in runtime_stage if k == "USER"]
    assert users, "the runtime stage must drop root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    health = [a for k, a in runtime_stage if k == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]
    cmd = [a for k, a in runtime_stage if k == "CMD"]
    assert cmd and cmd[-1].startswith('["tome-serve"'), "exec form, so SIGTERM reaches the service"
    assert "8000" in cmd[-1] and ("EXPOSE", "8000") in runtime_stage


def test_volumes_for_weights_and_hf_cache(runtime_stage: list[tuple[str, str]]) -> None:
    volumes = " ".join(a for k, a in runtime_stage if k == "VOLUME")
    assert "/models" in volumes and "/cache/huggingface" in volumes
    env = " ".join(a for k, a in instructions(DOCKERFILE) if k == "ENV")
    assert "HF_HOME=/cache/huggingface" in env


def test_bundled_configs_exist() -> None:
    for keyword, args in instructions(DOCKERFILE):
        if keyword == "ENV" and args.startswith("TOME_CONFIG_FILE="):
            name = Path(args.split("=", 1)[1]).name
            assert (REPO_ROOT / "deploy" / "config" / name).is_file(), f"{name} is not in deploy/config"


def dockerignore_allows(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    rules = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for keyword, args in instructions(DOCKERFILE):
        if keyword == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert dockerignore_allows(src.rstrip("/"), rules), f".dockerignore drops {src}"
    for private in (".venv", ".git", "tests", "out", "weights", ".venv-tools"):
        assert not dockerignore_allows(private, rules), f".dockerignore lets {private} into the build"
