"""Every ``python -m loadtest.<tool>`` command in loadtest/README.md parses with that tool's options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from loadtest import floor, hostpath, openloop, run, service_bench, tier_batches

README = Path(__file__).resolve().parents[2] / "loadtest" / "README.md"
PARSERS = {
    "loadtest.run": run.parse_args,
    "loadtest.openloop": openloop.parse_args,
    "loadtest.hostpath": hostpath.parse_args,
    "loadtest.floor": floor.parse_args,
    "loadtest.service_bench": lambda argv: service_bench.parse_args(argv)[1],
    "loadtest.tier_batches": tier_batches.parse_args,
}


def readme_commands() -> list[list[str]]:
    """``python -m loadtest.X ...`` lines of the ```bash blocks, continuations joined, comments dropped."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#"):
                continue
            words = shlex.split(line.split(" #", 1)[0])
            if "-m" in words and words[words.index("-m") + 1].startswith("loadtest."):
                found.append(words[words.index("-m") + 1 :])
    return found


def test_every_tool_is_shown() -> None:
    assert {words[0] for words in readme_commands()} == set(PARSERS)


@pytest.mark.parametrize("words", readme_commands(), ids=lambda w: " ".join(w)[:60])
def test_command_parses(words: list[str]) -> None:
    PARSERS[words[0]](words[1:])  # argparse exits (SystemExit) on an unknown option or a bad value
