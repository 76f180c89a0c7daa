"""Host-path benchmark: what one request costs the server's CPU and GIL when the model is nearly free.

    python -m loadtest.hostpath --duration 10 --json out/hostpath.json

Starts the real server (``python -m service.cli``) with a config it writes: timm ``vit_tiny_patch16_224``,
random weights, ``model_kwargs = {img_size = 32, depth = 1}`` on CPU, so the model costs a fraction of a
millisecond and what is left is the host path (HTTP, body, JPEG decode and resize, batching, response).
ApacheBench posts one real 500x375 JPEG as a raw ``image/jpeg`` body (``ab -k -c 32 -t S -p photo.jpg -T
image/jpeg``). After a warm-up it measures two windows:

1. CPU window: ab for ``--duration`` seconds; psutil reads the CPU time of every process of the server's
   tree (the CLI's process and all its descendants) and of each of their threads before and after. Gives
   req/s, server CPU ms per image summed over the tree, and per process its CPU and its main thread's
   CPU per request.
2. GIL windows, one per Python process of the tree, so that only one py-spy runs at a time: ab again,
   with ``py-spy record --gil`` sampling that process for ``--gil-seconds`` in the middle of the run.
   GIL-held ms per request = share of ticks at which the process's threads held the GIL x 1000 / the
   window's req/s (method and error: ``loadtest/gil.py``). py-spy is not part of the CPU window.

The server is treated as a process tree throughout, so the same run works against today's one-process
server and a supervisor + engine + front-ends one. Roles are guessed from command lines and tree position
(``loadtest/proctree.py``); the device owner is the process holding the GPU, else the one named engine,
else the only one with torch loaded, else a one-process server's only process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from PIL import Image

from loadtest import ab, gil, proctree
from loadtest.server import Server, interpreter
from loadtest.workload import DEFAULT_IMAGES_DIR

PHOTO_SIZE = (500, 375)
DEFAULT_MODEL_KWARGS = {"img_size": 32, "depth": 1}
GIL_RATE_HZ = 331  # py-spy ticks per second (at random intervals, so no aliasing with timers)
GIL_MARGIN_S = 1.0  # ab runs this long before and after py-spy's window
TARGET_CPU_MS_PER_IMAGE = 2.0
TARGET_DEVICE_GIL_MS_PER_REQUEST = 0.3


@dataclass
class ThreadFigures:
    tid: int
    name: str  # the Python thread name, or "native" for threads without a Python frame
    cpu_ms_per_request: float
    gil_ms_per_request: float | None = None


@dataclass
class GilFigures:
    ms_per_request: float  # all threads of the process
    stderr_ms: float  # one standard error of it (sampling)
    upper_ms: float  # if every unreadable tick had found a holder (see loadtest/gil.py)
    main_thread_ms_per_request: float
    ticks: int  # readable py-spy ticks
    rate_hz: int
    requests_per_s: float  # ab's rate over the GIL window
    fell_behind: bool
    errors: int


@dataclass
class ProcessFigures:
    pid: int
    ppid: int
    depth: int
    role: str
    cmdline: str
    owns_device: bool
    uses_gpu: bool
    loads_torch: bool
    cpu_ms_per_request: float
    main_thread_cpu_ms_per_request: float | None  # None if the main thread is gone
    threads: list[ThreadFigures] = field(default_factory=list)
    gil: GilFigures | None = None
    gil_skipped: str | None = None  # why there are no GIL figures


@dataclass
class HostPathReport:
    config: dict[str, Any]
    photo: dict[str, Any]
    requests_per_s: float
    requests: int  # answered 2xx inside the CPU window
    non_2xx: int
    failed: int
    keepalive_requests: int
    window_s: float
    latency_ms: dict[str, float]  # ab's percentiles
    server_cpu_ms_per_image: float
    host_cpu_busy: float  # share of all the host's cores busy during the CPU window
    host_cores: int
    ab_cpu_ms_per_request: float
    processes: list[ProcessFigures]
    tree_changed: list[str]
    device_owner_pid: int | None
    targets: dict[str, Any]
    warnings: list[str]


def toml_value(value: Any) -> str:
    """A scalar as TOML (model kwargs are ints, floats, bools and strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise ValueError(f"model kwarg value {value!r} is not a TOML scalar this writer knows")


def config_text(
    model: str, model_kwargs: dict[str, Any], device: str, workers: int | None, cpu_parallel_batches: int = 1
) -> str:
    """The server's config. ``server.workers`` (front-end processes) is written only when given: the
    service's default is one per available core. ``batching.cpu_parallel_batches`` is 1 by default: one
    launch thread, as the engine has on a GPU, the host path this bench stands in for (the service's
    CPU default, 2, runs two at once: more, smaller batches, and GIL time for each)."""
    kwargs = ", ".join(f"{k} = {toml_value(v)}" for k, v in model_kwargs.items())
    lines = [f'device = "{device}"']
    lines += [
        "",
        "[[models]]",
        'name = "hostpath"',
        f'timm_name = "{model}"',
        'weights = "random"',
        f"model_kwargs = {{ {kwargs} }}",
    ]
    if workers is not None:
        lines += ["", "[server]", f"workers = {workers}"]
    lines += ["", "[batching]", f"cpu_parallel_batches = {cpu_parallel_batches}"]
    return "\n".join(lines) + "\n"


def find_photo(directory: Path) -> Path:
    """The first JPEG of ``directory`` (by name) that is 500x375."""
    for path in sorted(directory.glob("*.JPEG")):
        with Image.open(path) as img:
            if img.size == PHOTO_SIZE:
                return path
    raise FileNotFoundError(f"no {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} *.JPEG under {directory}")


def default_py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else (shutil.which("py-spy") or "py-spy")


def _ms_per(seconds: float, requests: int) -> float:
    return 1000 * seconds / requests if requests else float("nan")


def cpu_window(
    args: argparse.Namespace, server: Server, url: str, photo: Path
) -> tuple[ab.AbResult, proctree.CpuDelta, float]:
    """ab for ``args.duration`` s with the tree's CPU read before and after; also the host's busy share."""
    with proctree.CpuWindow(server.pid) as window:
        result = ab.run(args.ab, url, photo, "image/jpeg", args.concurrency, args.duration)
    return result, window.delta, window.busy_share


def gil_window(
    args: argparse.Namespace, pid: int, url: str, photo: Path, workdir: Path
) -> tuple[GilFigures, dict[int, float]]:
    """ab for ``gil_seconds`` plus a margin either side; py-spy samples ``pid`` in the middle.

    Returns the process's figures and GIL-held ms per request of each thread that held it.
    """
    box: dict[str, ab.AbResult | BaseException] = {}

    def load() -> None:
        try:
            seconds = args.gil_seconds + 2 * GIL_MARGIN_S
            box["ab"] = ab.run(args.ab, url, photo, "image/jpeg", args.concurrency, seconds)
        except BaseException as e:  # re-raised in the caller's thread
            box["ab"] = e

    loader = threading.Thread(target=load, name="ab")
    loader.start()
    try:
        time.sleep(GIL_MARGIN_S)
        out = workdir / f"gil-{pid}.txt"
        recording = gil.start_recording(args.py_spy, pid, args.gil_rate, args.gil_seconds, out)
        samples = recording.finish(timeout=args.gil_seconds + 60)
    finally:
        loader.join()
    result = box["ab"]
    if isinstance(result, BaseException):
        raise result
    rps = result.ok / result.seconds if result.seconds else 0.0
    per_request = 1000 / rps if rps else float("nan")
    figures = GilFigures(
        ms_per_request=samples.fraction() * per_request,
        stderr_ms=samples.stderr() * per_request,
        upper_ms=samples.upper() * per_request,
        main_thread_ms_per_request=samples.fraction(pid) * per_request,
        ticks=samples.ticks,
        rate_hz=args.gil_rate,
        requests_per_s=rps,
        fell_behind=samples.fell_behind,
        errors=samples.errors,
    )
    return figures, {tid: samples.fraction(tid) * per_request for tid in samples.held}


def process_figures(
    infos: list[proctree.ProcInfo],
    delta: proctree.CpuDelta,
    requests: int,
    names: dict[int, dict[int, str]],
) -> tuple[list[ProcessFigures], int | None]:
    """Per-process CPU figures of the CPU window, roles guessed, and the device owner's pid."""
    registered = proctree.registered_roles(infos[0].pid) if infos else {}
    roles = {i.pid: registered.get(i.pid) or proctree.guess_role(i, len(infos)) for i in infos}
    owner = proctree.device_owner(infos, roles)
    out = []
    for info in infos:
        thread_cpu = delta.thread_seconds.get(info.pid, {})
        threads = [
            ThreadFigures(tid, names.get(info.pid, {}).get(tid, "native"), _ms_per(cpu, requests))
            for tid, cpu in sorted(thread_cpu.items(), key=lambda kv: -kv[1])
        ]
        main = thread_cpu.get(info.pid)
        out.append(
            ProcessFigures(
                pid=info.pid,
                ppid=info.ppid,
                depth=info.depth,
                role=roles[info.pid],
                cmdline=info.cmdline,
                owns_device=info.pid == owner,
                uses_gpu=info.uses_gpu,
                loads_torch=info.loads_torch,
                cpu_ms_per_request=_ms_per(delta.seconds.get(info.pid, 0.0), requests),
                main_thread_cpu_ms_per_request=None if main is None else _ms_per(main, requests),
                threads=threads,
            )
        )
    return out, owner


def add_gil_figures(
    args: argparse.Namespace, procs: list[ProcessFigures], url: str, photo: Path, workdir: Path
) -> None:
    """One GIL window per process py-spy can read, one process at a time."""
    for p in procs:
        if args.no_gil:
            p.gil_skipped = "--no-gil"
            continue
        reason = gil.can_profile(args.py_spy, p.pid)
        if reason:
            p.gil_skipped = reason
            continue
        print(
            f"  GIL window: pid {p.pid} ({p.role}), py-spy at {args.gil_rate} Hz for {args.gil_seconds} s",
            flush=True,
        )
        p.gil, per_thread = gil_window(args, p.pid, url, photo, workdir)
        known = {t.tid: t for t in p.threads}
        for tid, ms in per_thread.items():
            if tid in known:
                known[tid].gil_ms_per_request = ms
            else:  # a thread born after the CPU window
                p.threads.append(ThreadFigures(tid, "(new thread)", float("nan"), ms))


def measure(args: argparse.Namespace, workdir: Path) -> HostPathReport:
    photo = args.photo or find_photo(args.images)
    with Image.open(photo) as img:
        photo_info = {"path": str(photo), "size": list(img.size), "bytes": photo.stat().st_size}
    config = config_text(args.model, args.model_kwargs, args.device, args.workers, args.cpu_parallel_batches)
    with Server(config, workdir) as server:
        server.wait_ready(args.start_timeout)
        url = f"{server.url}/classify" + (f"?tier={args.tier}" if args.tier else "")
        print(f"server pid {server.pid} ready on {server.url}; warm-up {args.warmup} s", flush=True)
        ab.run(args.ab, url, photo, "image/jpeg", args.concurrency, args.warmup)
        infos = proctree.describe_tree(server.pid)
        names = {} if args.no_gil else {i.pid: gil.thread_names(args.py_spy, i.pid) for i in infos}
        print(
            f"CPU window: ab -c {args.concurrency} for {args.duration} s, {len(infos)} process(es)",
            flush=True,
        )
        result, delta, busy = cpu_window(args, server, url, photo)
        procs, owner = process_figures(infos, delta, result.ok, names)
        add_gil_figures(args, procs, url, photo, workdir)
    cpu_ms = _ms_per(delta.total_s, result.ok)
    owner_gil = next((p.gil.ms_per_request for p in procs if p.pid == owner and p.gil), None)
    return HostPathReport(
        config=run_config(args, config),
        photo=photo_info,
        requests_per_s=result.ok / result.seconds if result.seconds else 0.0,
        requests=result.ok,
        non_2xx=result.non_2xx,
        failed=result.failed,
        keepalive_requests=result.keepalive,
        window_s=result.seconds,
        latency_ms={f"p{k}": v for k, v in result.percentiles_ms.items()},
        server_cpu_ms_per_image=cpu_ms,
        host_cpu_busy=busy,
        host_cores=psutil.cpu_count() or 0,
        ab_cpu_ms_per_request=_ms_per(result.cpu_s, result.complete),
        processes=procs,
        tree_changed=[
            f"pid {pid} started during the CPU window (counted from its start)" for pid in delta.appeared
        ]
        + [f"pid {pid} ended during the CPU window (its CPU there is lost)" for pid in delta.vanished],
        device_owner_pid=owner,
        targets={
            "server_cpu_ms_per_image": target(TARGET_CPU_MS_PER_IMAGE, cpu_ms),
            "device_owner_gil_ms_per_request": target(TARGET_DEVICE_GIL_MS_PER_REQUEST, owner_gil),
        },
        warnings=run_warnings(result, busy, procs),
    )


def run_config(args: argparse.Namespace, config: str) -> dict[str, Any]:
    keys = (
        "model",
        "model_kwargs",
        "device",
        "workers",
        "cpu_parallel_batches",
        "tier",
        "concurrency",
        "duration",
        "warmup",
    )
    return {
        **{k: getattr(args, k) for k in keys},
        "gil_seconds": args.gil_seconds,
        "gil_rate_hz": args.gil_rate,
        "python": interpreter(),
        "config_toml": config,
    }


def target(limit: float, measured: float | None) -> dict[str, Any]:
    met = None if measured is None or measured != measured else measured <= limit
    return {"max": limit, "measured": measured, "met": met}


def run_warnings(result: ab.AbResult, busy: float, procs: list[ProcessFigures]) -> list[str]:
    out = []
    if result.keepalive == 0:
        out.append(
            "no keep-alive: the server closed every connection (uvicorn does for ab's HTTP/1.0), "
            "so each request's CPU includes a TCP connect/accept/close"
        )
    if result.non_2xx or result.failed:
        out.append(f"{result.non_2xx} non-2xx, {result.failed} failed requests (not counted as images)")
    if busy > 0.9:
        out.append(f"the host was {100 * busy:.0f}% busy: req/s is bounded by the machine, not the server")
    for p in procs:
        if p.gil and (p.gil.fell_behind or p.gil.errors):
            out.append(f"py-spy on pid {p.pid}: fell behind={p.gil.fell_behind}, errors={p.gil.errors}")
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def format_report(r: HostPathReport) -> str:
    c = r.config
    kwargs = ", ".join(f"{k}={v}" for k, v in c["model_kwargs"].items())
    lines = [
        f"host path: {c['model']} ({kwargs}) on {c['device']}, workers={c['workers'] or 'default'}, "
        f"cpu_parallel_batches={c.get('cpu_parallel_batches', 1)}; "
        f"{Path(r.photo['path']).name} {r.photo['size'][0]}x{r.photo['size'][1]} ({r.photo['bytes']} B) "
        f"as image/jpeg; ab -k -c {c['concurrency']} for {r.window_s:.1f} s; {c.get('python', 'Python ?')}",
        f"req/s {r.requests_per_s:.1f}   requests {r.requests} (non-2xx {r.non_2xx}, failed {r.failed}, "
        f"keep-alive {r.keepalive_requests})   latency p50/p90/p99 {r.latency_ms.get('p50', 0):.0f}/"
        f"{r.latency_ms.get('p90', 0):.0f}/{r.latency_ms.get('p99', 0):.0f} ms",
        f"server CPU per image, summed over {len(r.processes)} process(es): "
        f"{r.server_cpu_ms_per_image:.2f} ms   (host {100 * r.host_cpu_busy:.0f}% busy of {r.host_cores} "
        f"cores; ab {r.ab_cpu_ms_per_request:.2f} ms CPU/request)",
        "",
        f"{'pid':>7} {'role':<26} {'CPU ms/req':>10} {'main thr CPU':>12} {'GIL ms/req':>14} "
        f"{'main thr GIL':>12}",
    ]
    for p in r.processes:
        gil_text = "-" if p.gil is None else f"{p.gil.ms_per_request:.3f}±{p.gil.stderr_ms:.3f}"
        main_gil = None if p.gil is None else p.gil.main_thread_ms_per_request
        role = p.role + (" *device" if p.owns_device else "")
        lines.append(
            f"{p.pid:>7} {role:<26} {_fmt(p.cpu_ms_per_request):>10} "
            f"{_fmt(p.main_thread_cpu_ms_per_request):>12} {gil_text:>14} {_fmt(main_gil, 3):>12}"
        )
    for p in r.processes:
        shown = [t for t in p.threads if t.name != "native" or t.gil_ms_per_request is not None]
        native = [t for t in p.threads if t not in shown]
        parts = [
            f"{t.name if t.name != 'native' else f'tid {t.tid}'} "
            f"{_fmt(t.cpu_ms_per_request)}/{_fmt(t.gil_ms_per_request, 3)}"
            for t in shown
        ]
        if native:
            parts.append(f"{len(native)} other threads {sum(t.cpu_ms_per_request for t in native):.2f}/-")
        lines.append(f"  pid {p.pid} threads (CPU/GIL ms per request): " + "; ".join(parts))
        if p.gil:
            lines.append(
                f"  pid {p.pid} GIL: {p.gil.ticks} py-spy ticks ({p.gil.errors} unreadable: upper bound "
                f"{p.gil.upper_ms:.3f} ms/request) at {p.gil.requests_per_s:.1f} req/s"
            )
        if p.gil_skipped:
            lines.append(f"  pid {p.pid}: no GIL figures: {p.gil_skipped}")
    lines.append("")
    for name, t in r.targets.items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"target {name} <= {t['max']}: {_fmt(t['measured'], 3)} ({verdict})")
    lines += [f"note: {w}" for w in r.tree_changed + r.warnings]
    return "\n".join(lines)


def finite(obj: Any) -> Any:
    """``obj`` with NaN (a figure with nothing to divide by) as None, so the JSON is standard."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtest.hostpath", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", "-c", type=int, default=32, help="ab's concurrent requests")
    p.add_argument("--duration", "-t", type=int, default=10, help="seconds of the CPU window")
    p.add_argument("--warmup", type=int, default=3, help="seconds of ab before measuring")
    p.add_argument("--gil-seconds", type=int, default=None, help="py-spy window per process (default: -t)")
    p.add_argument("--gil-rate", type=int, default=GIL_RATE_HZ, help="py-spy samples per second")
    p.add_argument("--no-gil", action="store_true", help="skip the py-spy windows")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm architecture (random weights)")
    p.add_argument(
        "--model-kwargs",
        type=json.loads,
        default=DEFAULT_MODEL_KWARGS,
        help='JSON object of timm.create_model kwargs (default: \'{"img_size": 32, "depth": 1}\')',
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="front-end worker processes; written to the config as `workers` only when given",
    )
    p.add_argument(
        "--cpu-parallel-batches",
        type=int,
        default=1,
        help="batching.cpu_parallel_batches (default 1: one launch thread, as on a GPU)",
    )
    p.add_argument("--tier", default=None, help="?tier= of every request (default: the model's)")
    p.add_argument("--photo", type=Path, default=None, help="JPEG to post (default: the first 500x375 one)")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES_DIR, help="where to look for that photo")
    p.add_argument("--ab", default=shutil.which("ab") or "ab", help="ApacheBench binary")
    p.add_argument("--py-spy", default=default_py_spy(), help="py-spy binary")
    p.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for /readyz")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.gil_seconds is None:
        args.gil_seconds = args.duration
    if not isinstance(args.model_kwargs, dict):
        p.error("--model-kwargs must be a JSON object")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which(args.ab) is None:
        print(
            f"loadtest.hostpath: ApacheBench not found ({args.ab}); apt-get install apache2-utils",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="hostpath-") as tmp:
        try:
            report = measure(args, Path(tmp))
        except (RuntimeError, TimeoutError) as e:  # the server did not start, or a tool failed
            print(f"loadtest.hostpath: {e}", file=sys.stderr)
            return 1
    print()
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(finite(asdict(report)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
