"""The suite runs on the lock, the lock covers pyproject.toml, and the image's files agree with it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .conftest import REPO_ROOT

REQUIREMENTS = REPO_ROOT / "requirements"
CUDA_ONLY = re.compile(r"^(torch|torchvision|triton|nvidia-.+|cuda-.+)$")


def locked(path: Path) -> dict[str, list[Requirement]]:
    """Pinned requirements of a lock file by canonical name (a universal lock may pin a name twice,
    under exclusive markers)."""
    text = path.read_text().replace("\\\n", " ")
    out: dict[str, list[Requirement]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line.split(" --hash")[0].strip())
            out.setdefault(canonicalize_name(req.name), []).append(req)
    return out


def applicable_pin(reqs: list[Requirement]) -> str | None:
    """The version this interpreter/platform installs, or None where no marker applies."""
    pins = [str(r.specifier).removeprefix("==") for r in reqs if r.marker is None or r.marker.evaluate()]
    assert len(pins) <= 1, f"overlapping pins {pins}"
    return pins[0] if pins else None


@pytest.fixture(scope="module")
def dev_lock() -> dict[str, list[Requirement]]:
    return locked(REQUIREMENTS / "dev.txt")


def test_every_locked_package_is_installed_at_its_pin(dev_lock: dict[str, list[Requirement]]) -> None:
    """What this suite runs on is exactly the lock (a fresh clone's `make setup` installs it)."""
    wrong = {}
    for name, reqs in dev_lock.items():
        pin = applicable_pin(reqs)
        if pin is None:
            continue
        try:
            installed = Version(metadata.version(name)).public
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != Version(pin).public:
            wrong[name] = (installed, pin)
    assert not wrong, f"installed vs locked: {wrong}"


def test_lock_covers_every_declared_dependency(dev_lock: dict[str, list[Requirement]]) -> None:
    """A dependency added to pyproject.toml without `make lock` fails here, not on a fresh machine."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for spec in map(Requirement, declared):
        name = canonicalize_name(spec.name)
        assert name in dev_lock, f"{spec} is declared but not locked: run `make lock`"
        for pinned in dev_lock[name]:
            version = str(pinned.specifier).removeprefix("==")
            ok = spec.specifier.contains(version, prereleases=True)
            assert ok, f"lock pins {name}=={version}, not {spec}"


def test_runtime_locks_agree_with_the_dev_lock(dev_lock: dict[str, list[Requirement]]) -> None:
    runtime = locked(REQUIREMENTS / "runtime.txt")
    cpu = locked(REQUIREMENTS / "runtime-cpu.txt")
    assert runtime.keys() <= dev_lock.keys()
    for name, reqs in runtime.items():
        assert {str(r) for r in reqs} <= {str(r) for r in dev_lock[name]}, f"{name} differs from dev.txt"
    assert cpu.keys() == {n for n in runtime if not CUDA_ONLY.match(n)}
    torch_cpu = locked(REQUIREMENTS / "torch-cpu.txt")
    for name in ("torch", "torchvision"):
        (cpu_pin,) = torch_cpu[name]
        assert str(cpu_pin.specifier) == f"{runtime[name][0].specifier}+cpu"


def test_torch_pair_is_the_one_the_suite_runs() -> None:
    """requirements/torch.in holds the pair; the suite must be running it (not whatever pip found)."""
    import torch
    import torchvision

    pins = {name: applicable_pin(reqs) for name, reqs in locked(REQUIREMENTS / "torch.in").items()}
    assert Version(torch.__version__).public == pins["torch"]
    assert Version(torchvision.__version__).public == pins["torchvision"]
