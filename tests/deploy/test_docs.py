"""Commands in the deploy and load-test docs name files, options and settings that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from loadtest.run import parse_args as loadtest_args
from service.settings import load_settings

from .conftest import REPO_ROOT

DOCS = [
    p
    for p in (
        REPO_ROOT / "README.md",
        REPO_ROOT / "deploy" / "README.md",
        REPO_ROOT / "loadtest" / "README.md",
    )
    if p.is_file()
]


def shell_lines(doc: Path) -> list[str]:
    """Commands in ```bash blocks, continuation lines joined, comments and env assignments dropped."""
    lines: list[str] = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", doc.read_text(), re.DOTALL):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def commands(prefix: str) -> list[list[str]]:
    found = []
    for doc in DOCS:
        for line in shell_lines(doc):
            words = [w for w in shlex.split(line) if not re.fullmatch(r"[A-Z_]+=\S*", w)]
            if " ".join(words).startswith(prefix):
                found.append(words)
    return found


def option_values(words: list[str], option: str) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == option]


def test_docs_exist() -> None:
    assert {REPO_ROOT / "deploy" / "README.md", REPO_ROOT / "loadtest" / "README.md"} <= set(DOCS)


def test_compose_commands_name_real_files() -> None:
    found = commands("docker compose")
    assert found, "the docs show no docker compose command"
    for words in found:
        for path in option_values(words, "-f"):
            assert (REPO_ROOT / path).is_file(), f"{' '.join(words)}: no {path}"


def test_loadtest_commands_parse() -> None:
    found = commands(".venv/bin/python -m loadtest.run") + commands("python -m loadtest.run")
    assert found, "the docs show no load-test command"
    for words in found:
        args = loadtest_args(words[3:])  # raises SystemExit on an unknown option or a bad tier mix
        assert args.users >= 1


def test_serve_commands_name_loadable_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOME_CONFIG_FILE", raising=False)
    for words in commands(".venv/bin/tome-serve") + commands("tome-serve"):
        for path in option_values(words, "--config"):
            assert load_settings(REPO_ROOT / path).models, path


def test_docker_build_commands_use_real_build_args() -> None:
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    for doc in DOCS:
        for match in re.finditer(r"docker build -f (\S+)((?: --build-arg \w+=\w+)*)", doc.read_text()):
            assert (REPO_ROOT / match[1]).is_file()
            for name, value in re.findall(r"--build-arg (\w+)=(\w+)", match[2]):
                assert re.search(rf"^ARG {name}=", dockerfile, re.MULTILINE), name
                if name == "VARIANT":
                    assert f"AS deps-{value}" in dockerfile
