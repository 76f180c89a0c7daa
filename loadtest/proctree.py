"""The server as a process tree: its processes, a guess at each one's role, and CPU time per process and
per thread between two snapshots.

The service is becoming several processes (a supervisor, one engine per device, N HTTP front-ends), all
descendants of the process the CLI starts; so every CPU figure here is summed over the tree, never read
from one process or from the service's own /metrics.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


@dataclass(frozen=True)
class ProcInfo:
    """One process of the tree, as seen when it was first found."""

    pid: int
    ppid: int
    depth: int  # 0 for the root
    cmdline: str
    argv: tuple[str, ...]
    children: int  # direct children that are part of the tree
    uses_gpu: bool  # has an NVIDIA device file open
    loads_torch: bool  # has libtorch mapped


@dataclass(frozen=True)
class ProcCpu:
    """CPU seconds (user + system) of one process and of each of its live threads, at one instant."""

    pid: int
    create_time: float
    cpu_s: float
    threads: dict[int, float]  # OS thread id -> CPU seconds


@dataclass(frozen=True)
class TreeCpu:
    """CPU seconds of every process of the tree at one instant (processes that answered)."""

    procs: dict[int, ProcCpu]

    @property
    def total_s(self) -> float:
        return sum(p.cpu_s for p in self.procs.values())


@dataclass
class CpuDelta:
    """What the tree spent between two snapshots."""

    seconds: dict[int, float]  # pid -> process CPU seconds
    thread_seconds: dict[int, dict[int, float]]  # pid -> tid -> CPU seconds (threads alive at both ends)
    appeared: list[int] = field(default_factory=list)  # pids only in the later snapshot (counted whole)
    vanished: list[int] = field(default_factory=list)  # pids only in the earlier one (their end is lost)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


def tree_processes(root_pid: int) -> list[psutil.Process]:
    """The root and all its live descendants, root first."""
    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


def _has_gpu_fd(pid: int) -> bool:
    try:
        fds = Path(f"/proc/{pid}/fd")
        return any(os.readlink(fd).startswith("/dev/nvidia") for fd in fds.iterdir())
    except OSError:  # the process ended, or no permission: not known to hold the device
        return False


def _loads_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def describe_tree(root_pid: int) -> list[ProcInfo]:
    """Every process of the tree with its depth and command line, root first (parents before children)."""
    found: list[tuple[psutil.Process, int, list[str]]] = []
    for p in tree_processes(root_pid):
        try:
            found.append((p, p.ppid(), p.cmdline()))
        except psutil.Error:  # ended while being listed
            continue
    depth = {root_pid: 0}
    out = []
    for p, ppid, argv in found:
        depth.setdefault(p.pid, depth.get(ppid, 0) + 1)
        children = sum(1 for _, parent, _ in found if parent == p.pid)
        gpu, torch = _has_gpu_fd(p.pid), _loads_torch(p.pid)
        out.append(ProcInfo(p.pid, ppid, depth[p.pid], " ".join(argv), tuple(argv), children, gpu, torch))
    return out


ROLE_WORDS = (  # (substring of the command line, role), first match wins
    ("resource_tracker", "resource-tracker"),
    ("forkserver", "forkserver"),
    ("engine", "engine"),
    ("frontend", "front-end"),
    ("front_end", "front-end"),
    ("front-end", "front-end"),
    ("supervisor", "supervisor"),
)


def registered_roles(root_pid: int, run_parent: Path = Path("/dev/shm")) -> dict[int, str]:
    """pid -> role as the service registers its processes (``<run dir>/pids/<role>``), for the run
    directory whose supervisor is ``root_pid``; empty for a service that does not (older, single-process)."""
    for pids in run_parent.glob("tome-serve-*/pids"):
        try:
            if int((pids / "supervisor").read_text()) != root_pid:
                continue
            return {int(p.read_text()): p.name for p in pids.iterdir()}
        except (OSError, ValueError):
            continue
    return {}


def guess_role(info: ProcInfo, tree_size: int) -> str:
    """A readable guess from the command line and tree position; the table also shows both.

    Words are looked for in the arguments, leaving out multi-line ones (a ``-c`` program's source would
    name whatever it starts).
    """
    words = " ".join(a for a in info.argv if "\n" not in a).lower()
    for word, role in ROLE_WORDS:
        if word in words:
            return role
    if info.depth == 0:
        return "server (single process)" if tree_size == 1 else "supervisor (root)"
    if info.uses_gpu:
        return "engine (holds the GPU)"
    return f"child (depth {info.depth})"


def host_busy(before: Any, after: Any) -> tuple[float, float]:
    """(busy, total) CPU seconds of the host's cores between two ``psutil.cpu_times()``: the whole
    machine, so whatever else runs on it (a load generator) is in ``busy`` too."""
    total = sum(after) - sum(before)
    idle = (after.idle + getattr(after, "iowait", 0.0)) - (before.idle + getattr(before, "iowait", 0.0))
    return total - idle, total


class CpuWindow:
    """What a ``with`` block cost: the tree's CPU (``delta``), the host's busy and total CPU seconds
    (``host_busy``; the host's readings enclose the tree's) and the block's wall ``seconds``."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid

    def __enter__(self) -> CpuWindow:
        self._host, self._t0 = psutil.cpu_times(), time.monotonic()
        self._tree = cpu_snapshot(self.root_pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.delta = cpu_delta(self._tree, cpu_snapshot(self.root_pid))
        self.host_busy_s, self.host_total_s = host_busy(self._host, psutil.cpu_times())
        self.seconds = time.monotonic() - self._t0

    @property
    def busy_share(self) -> float:
        """The share of the host's CPU time that was busy."""
        return self.host_busy_s / self.host_total_s if self.host_total_s > 0 else 0.0


_PARTS = {  # role prefix -> (its main threads' part, its other threads' part)
    "engine": ("engine main thread", "engine other threads"),
    "frontend": ("front-end main threads", "front-end other threads"),
}


def cpu_by_part(delta: CpuDelta, roles: dict[int, str]) -> dict[str, float]:
    """The delta's CPU seconds by the work each part of the service does: the engine's main thread (IPC,
    batching, answers), its other threads (the model: launch threads and torch's own), the front-ends'
    main threads (the event loop: HTTP, admission, IPC) and their other threads (decoding), and the tree's
    ``other processes`` (supervisor, resource tracker). ``roles``: pid -> role, as ``registered_roles``."""
    out = dict.fromkeys([*(part for pair in _PARTS.values() for part in pair), "other processes"], 0.0)
    for pid, seconds in delta.seconds.items():
        role = roles.get(pid, "")
        pair = next((pair for prefix, pair in _PARTS.items() if role.startswith(prefix)), None)
        if pair is None:
            out["other processes"] += seconds
            continue
        main = delta.thread_seconds.get(pid, {}).get(pid, 0.0)  # a process's main thread has its pid
        out[pair[0]] += main
        out[pair[1]] += seconds - main
    return out


def device_owner(infos: list[ProcInfo], roles: dict[int, str]) -> int | None:
    """The pid of the process that runs the model: the one holding the GPU, else the only one named
    engine, else the only one with torch loaded, else the root of a one-process tree; None if unclear."""
    for pick in (
        [i.pid for i in infos if i.uses_gpu],
        [i.pid for i in infos if roles.get(i.pid, "").startswith("engine")],
        [i.pid for i in infos if i.loads_torch],
    ):
        if len(pick) == 1:
            return pick[0]
    if len(infos) == 1:
        return infos[0].pid
    return None


def cpu_snapshot(root_pid: int) -> TreeCpu:
    """CPU seconds of the tree's processes and threads now (children_* fields are not added: every
    descendant is counted as itself)."""
    procs: dict[int, ProcCpu] = {}
    for p in tree_processes(root_pid):
        try:
            with p.oneshot():
                t = p.cpu_times()
                threads = {th.id: th.user_time + th.system_time for th in p.threads()}
                procs[p.pid] = ProcCpu(p.pid, p.create_time(), t.user + t.system, threads)
        except psutil.Error:  # ended between listing and reading
            continue
    return TreeCpu(procs)


def cpu_delta(before: TreeCpu, after: TreeCpu) -> CpuDelta:
    """Per-process and per-thread CPU spent between two snapshots of the same tree.

    A process found only in ``after`` is counted from its start (all of it is inside the window); one
    found only in ``before`` ended inside the window and the CPU it spent there cannot be read, so it is
    listed in ``vanished`` for the report to flag.
    """
    seconds: dict[int, float] = {}
    threads: dict[int, dict[int, float]] = {}
    appeared, vanished = [], []
    for pid, a in after.procs.items():
        b = before.procs.get(pid)
        if b is None or b.create_time != a.create_time:
            seconds[pid] = a.cpu_s
            threads[pid] = dict(a.threads)
            appeared.append(pid)
            continue
        seconds[pid] = a.cpu_s - b.cpu_s
        threads[pid] = {tid: cpu - b.threads[tid] for tid, cpu in a.threads.items() if tid in b.threads}
    for pid, b in before.procs.items():
        a = after.procs.get(pid)
        if a is None or a.create_time != b.create_time:
            vanished.append(pid)
    return CpuDelta(seconds, threads, appeared, vanished)
