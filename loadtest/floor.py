"""The host path's floor here: CPU per image no FastAPI service that decodes on the CPU goes under.

    python -m loadtest.floor --duration 10 --json out/floor.json

Two parts, each measured on the host-path bench's photo and model (``loadtest.hostpath``):

1. Decode, one thread: CPU ms per image for Pillow to decode the JPEG at each DCT scale libjpeg offers
   (1, 1/2, 1/4, 1/8: entropy decoding does not shrink with the scale), and for the service's own
   ``Preprocessor`` (header, draft decode, resize and crop into a uint8 slot) with the model's data config.
2. HTTP: a minimal FastAPI app in one uvicorn process (the service's event loop and HTTP parser) that reads
   the same raw JPEG body and answers a small JSON object, under ApacheBench at the bench's concurrency:
   CPU ms per request of that process.

Preprocessing + HTTP is what any design pays per image before admission, IPC, batching, the model, metrics
and its response schema; ``loadtest.hostpath`` measures what the service pays in all.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import timm
from fastapi import FastAPI, Request
from PIL import Image

from loadtest import ab
from loadtest.hostpath import DEFAULT_MODEL_KWARGS, TARGET_CPU_MS_PER_IMAGE, find_photo
from loadtest.server import free_port
from loadtest.workload import DEFAULT_IMAGES_DIR
from models.timm_data import model_data_config
from service.ingest.preprocess import Preprocessor

DCT_SCALES = (1, 2, 4, 8)
MAX_PIXELS = 40_000_000


def minimal_app() -> FastAPI:
    """POST /classify: read the whole body, answer a JSON object of the service's size and shape."""
    app = FastAPI()

    @app.post("/classify")
    async def classify(request: Request) -> dict[str, Any]:
        body = await request.body()
        return {
            "model": "floor",
            "tier": "exact",
            "predictions": [{"index": i, "label": f"class {i}", "score": 0.2} for i in range(5)],
            "bytes": len(body),
        }

    return app


def _cpu_ms_per_call(fn: Any, repeats: int) -> float:
    for _ in range(max(1, repeats // 20)):
        fn()
    start = time.thread_time()
    for _ in range(repeats):
        fn()
    return 1000 * (time.thread_time() - start) / repeats


def draft_decode(data: bytes, scale: int) -> Image.Image:
    """``data`` decoded by Pillow at 1/``scale`` in the DCT domain."""
    img = Image.open(io.BytesIO(data))
    if scale > 1:
        width, height = img.size
        img.draft("RGB", (width // scale, height // scale))  # Pillow picks the scale by floor division
    img.load()
    return img


@dataclass(frozen=True)
class DecodeCost:
    what: str
    size: tuple[int, int]  # the decoded image's size
    cpu_ms: float


def decode_costs(data: bytes, data_config: dict[str, Any], repeats: int) -> list[DecodeCost]:
    """One thread's CPU per image for each DCT scale, then for the service's preprocessing."""
    costs = []
    for scale in DCT_SCALES:
        size = draft_decode(data, scale).size
        ms = _cpu_ms_per_call(lambda s=scale: draft_decode(data, s), repeats)
        costs.append(DecodeCost(f"Pillow decode at 1/{scale}", size, ms))
    pre = Preprocessor(data_config, MAX_PIXELS)
    _, height, width = data_config["input_size"]
    slot = np.empty((height, width, 3), np.uint8)
    drafted = pre.open(data).size
    ms = _cpu_ms_per_call(lambda: pre.into(pre.open(data), slot), repeats)
    costs.append(DecodeCost(f"service preprocessing to {width}x{height}", drafted, ms))
    return costs


@dataclass(frozen=True)
class HttpFloor:
    requests: int
    requests_per_s: float
    cpu_ms_per_request: float
    keepalive_requests: int


def http_floor(ab_bin: str, photo: Path, concurrency: int, seconds: float, warmup: float) -> HttpFloor:
    """The minimal app under ab: its process's CPU per answered request."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "loadtest.floor:minimal_app", "--port", str(port)]
    cmd += ["--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
    try:
        url = f"http://127.0.0.1:{port}/classify"
        _wait_listening(port, proc)
        ab.run(ab_bin, url, photo, "image/jpeg", concurrency, warmup)
        server = psutil.Process(proc.pid)
        before = server.cpu_times()
        result = ab.run(ab_bin, url, photo, "image/jpeg", concurrency, seconds)
        after = server.cpu_times()
    finally:
        proc.terminate()
        proc.wait(10)
    cpu_s = after.user + after.system - before.user - before.system
    return HttpFloor(
        requests=result.ok,
        requests_per_s=result.ok / result.seconds,
        cpu_ms_per_request=1000 * cpu_s / result.ok,
        keepalive_requests=result.keepalive,
    )


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"uvicorn did not listen on {port} within {timeout} s")


def format_report(report: dict[str, Any]) -> str:
    lines = [f"photo {report['photo']} ({report['photo_bytes']} bytes); one thread:"]
    for c in report["decode"]:
        lines.append(f"  {c['what']:<38} {c['size'][0]}x{c['size'][1]:<5} {c['cpu_ms']:6.2f} ms CPU/image")
    h = report["http"]
    lines.append(
        f"minimal FastAPI app, ab -c {report['concurrency']}: {h['requests_per_s']:.0f} req/s, "
        f"{h['cpu_ms_per_request']:.2f} ms CPU/request (keep-alive requests: {h['keepalive_requests']})"
    )
    lines.append(
        f"floor = preprocessing + HTTP = {report['floor_cpu_ms_per_image']:.2f} ms CPU/image "
        f"(host-path target {TARGET_CPU_MS_PER_IMAGE})"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", "-c", type=int, default=32)
    p.add_argument("--duration", "-t", type=int, default=10, help="seconds of ab on the minimal app")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1000, help="decodes per measurement")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="its data config sets the preprocessing")
    p.add_argument("--model-kwargs", type=json.loads, default=DEFAULT_MODEL_KWARGS)
    p.add_argument("--photo", type=Path, default=None)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES_DIR)
    p.add_argument("--ab", default=shutil.which("ab") or "ab")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    photo = args.photo or find_photo(args.images)
    data = photo.read_bytes()
    vit = timm.create_model(args.model, pretrained=False, **args.model_kwargs)
    decode = decode_costs(data, model_data_config(vit), args.repeats)
    http = http_floor(args.ab, photo, args.concurrency, args.duration, args.warmup)
    report = {
        "photo": str(photo),
        "photo_bytes": len(data),
        "model": args.model,
        "model_kwargs": args.model_kwargs,
        "concurrency": args.concurrency,
        "decode": [asdict(c) for c in decode],
        "http": asdict(http),
        "floor_cpu_ms_per_image": decode[-1].cpu_ms + http.cpu_ms_per_request,
    }
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
