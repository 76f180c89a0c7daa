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


@pytest.fixture(scope="module")
def runtime_stage() -> list[tuple[str, str]]:
    all_stages = stages(DOCKERFILE)
    assert list(all_stages)[-1] == "runtime", "the last stage (the default target) must be the runtime"
    return all_stages["runtime"]


def test_gpu_and_cpu_variants() -> None:
    all_stages = stages(DOCKERFILE)
    args = dict(a.split("=", 1) for k, a in instructions(DOCKERFILE) if k == "ARG" and "=" in a)
    assert args["VARIANT"] == "gpu", "GPU is the default variant"
    assert "cuda" in args["CUDA_BASE_IMAGE"] and "runtime" in args["CUDA_BASE_IMAGE"]
    assert {"base-gpu", "base-cpu"} <= set(all_stages)
    assert all_stages["runtime"][0] == ("FROM", "base-${VARIANT} AS runtime")
    cpu_runs = " ".join(a for k, a in all_stages["base-cpu"] if k == "RUN")
    assert "torch" in cpu_runs and "TORCH_INDEX_URL" in cpu_runs, "CPU variant installs CPU-only torch"
    # timm imports torchvision: from PyPI it would pull a CUDA torch back into the CPU image
    assert '"torchvision==${TORCHVISION_VERSION}"' in cpu_runs, "torchvision from the same CPU index"


def test_dependencies_layer_comes_before_the_source(runtime_stage: list[tuple[str, str]]) -> None:
    copies = [(i, a) for i, (k, a) in enumerate(runtime_stage) if k == "COPY"]
    deps_copy = next(i for i, a in copies if a.split()[0] == "pyproject.toml")
    deps_install = next(
        i for i, (k, a) in enumerate(runtime_stage) if k == "RUN" and "pip install" in a and "-r " in a
    )
    source_copies = [i for i, a in copies if a.split()[0].rstrip("/") in ("service", "models")]
    assert source_copies, "the source must be copied in"
    assert deps_copy < deps_install < min(source_copies)


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
    env = " ".join(a for k, a in runtime_stage if k == "ENV")
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
