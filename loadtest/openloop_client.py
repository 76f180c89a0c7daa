"""One open-loop generator process: gevent greenlets spawned at their arrival times, each posting one
request through a geventhttpclient connection pool (the HTTP client under locust's FastHttpUser).

Run by ``loadtest.openloop`` as ``python -m loadtest.openloop_client PLAN.json OUT_PREFIX``: it loads its
images and prints ``ready``, reads the common start time (``time.monotonic()``, which is system-wide on
Linux) from stdin, follows its share of the schedule, then writes ``OUT_PREFIX.json`` (meta) and
``OUT_PREFIX.bin`` (the records).

A request's greenlet is spawned when its arrival time comes, whatever the earlier requests are doing;
nothing waits for an answer before sending the next one. It records the lag between the intended time
and the moment it ran (the generator falling behind: CPU-starved, or too many greenlets ready at once)
and whether all ``max_connections`` were busy, so that a throttled generator is reported, not hidden.
Timeouts are per socket operation (connect, send, each read) at ``timeout`` seconds, so an answer that
never comes is a timeout after ``timeout`` s.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import gevent
from gevent.pool import Group
from geventhttpclient import HTTPClient
from geventhttpclient.response import HTTPConnectionClosed, HTTPParseError
from urllib3 import encode_multipart_formdata

from loadtest.arrivals import arrival_offsets
from loadtest.openloop_stats import BAD_BODY, CONNECTION_ERROR, OTHER_ERROR, TIMEOUT, Records
from loadtest.validate import check_classify_response
from loadtest.workload import ImageFile, Workload, load_images

MAX_ERROR_KINDS = 20
Request = tuple[str, bytes, dict[str, str]]  # path with query, body, headers


@dataclass
class Plan:
    """What one generator process does (written as JSON by the parent)."""

    host: str
    rate: float  # of the whole run (all parts)
    seconds: float  # schedule length: warm-up + measured window
    arrivals: str
    part: int
    parts: int
    tiers: dict[str, float]
    images_dir: str | None
    images_per_request: int = 1
    multipart: bool = False
    top_k: int = 5
    model: str | None = None
    timeout: float = 30.0
    max_connections: int = 0  # 0: as many as the open-file limit allows
    validate: bool = True
    seed: int = 0


@dataclass
class Meta:
    """A generator process's own account of its run."""

    count: int = 0
    max_connections: int = 0  # the pool size used
    cpu_s: float = 0.0
    wall_s: float = 0.0
    waited_for_connection: int = 0  # requests that found every connection busy when they ran
    max_in_flight: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # "Kind: message" -> occurrences (first kinds)


class Sender:
    """Posts the plan's requests and records each one."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        url = urlsplit(plan.host)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"--host must be http://HOST[:PORT], got {plan.host!r}")
        self.client = HTTPClient(
            url.hostname,
            port=url.port or 80,
            concurrency=plan.max_connections,
            connection_timeout=plan.timeout,
            network_timeout=plan.timeout,
        )
        self.workload = Workload(
            tiers=plan.tiers,
            images=load_images(Path(plan.images_dir) if plan.images_dir else None),
            images_per_request=plan.images_per_request,
            top_k=plan.top_k,
            model=plan.model,
        )
        self.tier_names = list(plan.tiers)
        self.rng = random.Random(f"{plan.seed}/{plan.part}/requests")
        self.records = Records()
        self.meta = Meta()
        self.in_flight = 0
        self.pending: dict[int, tuple[float, int]] = {}  # sequence number -> (offset, tier index)

    def request_for(self, tier: str, images: list[ImageFile]) -> Request:
        query: dict[str, str | int] = {"tier": tier, "top_k": self.workload.top_k}
        if self.workload.model:
            query["model"] = self.workload.model
        path = "/classify?" + urlencode(query)
        if self.plan.multipart:
            body, content_type = encode_multipart_formdata(
                [("file", (img.name, img.data, img.content_type)) for img in images]
            )
            return path, body, {"Content-Type": content_type}
        return path, images[0].data, {"Content-Type": images[0].content_type}

    def run(self, start: float) -> None:
        """Follow the schedule from ``start`` (time.monotonic()), then wait for the last answers."""
        cpu0, plan = time.process_time(), self.plan
        group = Group()  # holds only running greenlets
        arrivals = arrival_offsets(plan.rate, plan.seconds, plan.arrivals, plan.seed, plan.part, plan.parts)
        for seq, offset in enumerate(arrivals):
            tier = self.workload.pick_tier(self.rng)
            request = self.request_for(tier, self.workload.pick_images(self.rng))
            delay = start + offset - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            self.pending[seq] = (offset, self.tier_names.index(tier))
            group.spawn(self.one, start, seq, tier, request)
        # Every socket operation times out after plan.timeout; a request can only outlive that by
        # waiting for a connection. Whatever is left after the grace period is recorded as a timeout.
        group.join(timeout=2 * plan.timeout + 5)
        group.kill(block=False)
        now = time.monotonic()
        for offset, tier_index in self.pending.values():
            self.records.add(offset, float("nan"), now - start - offset, float("nan"), TIMEOUT, tier_index)
        self.meta.count = len(self.records)
        self.meta.cpu_s = time.process_time() - cpu0
        self.meta.wall_s = time.monotonic() - start
        self.client.close()

    def one(self, start: float, seq: int, tier: str, request: Request) -> None:
        path, body, headers = request
        sent = time.monotonic()
        if self.in_flight >= self.plan.max_connections:
            self.meta.waited_for_connection += 1
        self.in_flight += 1
        self.meta.max_in_flight = max(self.meta.max_in_flight, self.in_flight)
        try:
            status = self.post(path, body, headers, tier)
        finally:
            self.in_flight -= 1
        done = time.monotonic()
        offset, tier_index = self.pending.pop(seq)
        intended = start + offset
        self.records.add(offset, sent - intended, done - intended, done - sent, status, tier_index)

    def post(self, path: str, body: bytes, headers: dict[str, str], tier: str) -> int:
        try:
            with self.client.request("POST", path, body=body, headers=headers) as resp:
                data = resp.read()
                status = resp.status_code
        except TimeoutError:
            return TIMEOUT
        except (OSError, HTTPConnectionClosed, HTTPParseError) as e:
            self.note_error(e)
            return CONNECTION_ERROR
        except Exception as e:  # anything else is counted and named, never allowed to stop the run
            self.note_error(e)
            return OTHER_ERROR
        if status == 200 and self.plan.validate and self.bad_body(data, tier):
            return BAD_BODY
        return status

    def bad_body(self, data: bytes, tier: str) -> bool:
        try:
            body = json.loads(data)
        except ValueError:
            self.note_error(ValueError("200 with a body that is not JSON"))
            return True
        problem = check_classify_response(body, tier, self.workload.images_per_request, self.workload.top_k)
        if problem:
            self.note_error(ValueError(problem))
        return problem is not None

    def note_error(self, e: BaseException) -> None:
        key = f"{type(e).__name__}: {str(e)[:160]}"
        if key in self.meta.errors or len(self.meta.errors) < MAX_ERROR_KINDS:
            self.meta.errors[key] = self.meta.errors.get(key, 0) + 1


FD_RESERVE = 256  # open files kept for everything but the pool's sockets
FD_CEILING = 65_536  # when the hard limit is unlimited


def connection_budget(wanted: int) -> int:
    """Raise the open-file limit as far as allowed and return the pool size it leaves room for:
    ``wanted``, or (0) as many as fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = FD_CEILING if hard == resource.RLIM_INFINITY else hard
    target = ceiling if wanted <= 0 else min(wanted + FD_RESERVE, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    room = (ceiling if soft == resource.RLIM_INFINITY else soft) - FD_RESERVE
    return max(1, room if wanted <= 0 else min(wanted, room))


def main(argv: list[str]) -> int:
    plan_path, out_prefix = Path(argv[0]), Path(argv[1])
    plan = Plan(**json.loads(plan_path.read_text()))
    plan.max_connections = connection_budget(plan.max_connections)
    sender = Sender(plan)
    sender.meta.max_connections = plan.max_connections
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    sender.run(start)
    sender.records.save(out_prefix.with_suffix(".bin"))
    meta: dict[str, Any] = asdict(sender.meta)
    out_prefix.with_suffix(".json").write_text(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
