"""Locust users that POST real images to tome-serve's /classify with a weighted tier mix.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --processes 4 \
        --tiers fast=3,exact=1 --images-per-request 1 --images-dir ../shared/data/imagenet-sample

The users are ``FastHttpUser`` (geventhttpclient: several times less CPU per request than requests'
HttpUser), and ``--processes N`` forks N load-generating workers, so one machine can saturate a GPU host.
Each tier's requests are reported as ``/classify [<tier>]``. A non-2xx status (other than 503), a body
that is not JSON, or a response of the wrong shape is a failure. A 503 (queue full, warming up,
draining: the service's backpressure) is reported apart, as request type ``REJECTED``.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

# `locust -f loadtest/locustfile.py` puts only loadtest/ on sys.path; the package needs the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtest.report import REJECTED, final_stats
from loadtest.validate import check_classify_response
from loadtest.workload import DEFAULT_IMAGES_DIR, Workload, load_images, parse_tier_mix

log = logging.getLogger("loadtest")
WORKLOAD_ATTR = "tome_workload"  # the run's Workload lives on locust's Environment, not in a global


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    parser.add_argument("--tiers", default="balanced=1", help="tier mix, name=weight,... e.g. fast=3,exact=1")
    parser.add_argument(
        "--images-dir",
        default=str(DEFAULT_IMAGES_DIR),
        help="directory of images to send (generated images if missing or empty)",
    )
    parser.add_argument("--images-per-request", type=int, default=1, help="images per /classify call")
    parser.add_argument("--top-k", type=int, default=5, help="top_k query parameter")
    parser.add_argument("--model", default="", help="model query parameter (default: the service's)")
    parser.add_argument(
        "--summary-json",
        default="",
        help="write the final per-request-name stats here at exit (locust's CSV can lag the end by ~1 s)",
    )


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:  # locust used as a library without command-line options
        return
    images_dir = Path(opts.images_dir) if opts.images_dir else None
    images = load_images(images_dir)
    source = images_dir if images and not images[0].name.startswith("generated-") else "generated"
    workload = Workload(
        tiers=parse_tier_mix(opts.tiers),
        images=images,
        images_per_request=opts.images_per_request,
        top_k=opts.top_k,
        model=opts.model or None,
    )
    setattr(environment, WORKLOAD_ATTR, workload)
    log.info("load test: tiers %s, %d images from %s", workload.tiers, len(images), source)
    if opts.summary_json and not isinstance(environment.runner, WorkerRunner):

        @events.quit.add_listener
        def _write_summary(**_: Any) -> None:
            """At exit, when the stats are final (locust's CSV can lag the end by ~1 s). Only the master
            (or a lone process) writes: with --processes a worker's stats are its unsent remainder."""
            Path(opts.summary_json).write_text(json.dumps(final_stats(environment.stats), indent=2))


class ClassifyUser(FastHttpUser):
    """A closed-loop client: sends the next request as soon as the previous one is answered."""

    wait_time = constant(0)
    network_timeout = 60.0  # an answer slower than this is a failure (status 0), not a hang
    connection_timeout = 60.0

    def on_start(self) -> None:
        workload = getattr(self.environment, WORKLOAD_ATTR, None)
        if workload is None:
            raise RuntimeError("the workload was not set up (run through locust's command line)")
        self.workload = workload
        self.rng = random.Random()

    @task
    def classify(self) -> None:
        w = self.workload
        tier = w.pick_tier(self.rng)
        images = w.pick_images(self.rng)
        params: dict[str, str | int] = {"tier": tier, "top_k": w.top_k}
        if w.model:
            params["model"] = w.model
        files = [("file", (img.name, img.data, img.content_type)) for img in images]
        with self.client.post(
            "/classify", params=params, files=files, name=f"/classify [{tier}]", catch_response=True
        ) as resp:
            if resp.status_code == 503:
                resp.request_meta["request_type"] = REJECTED
                resp.success()
                return
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                body = resp.json()
            except ValueError:
                resp.failure("response is not JSON")
                return
            problem = check_classify_response(body, tier, len(images), w.top_k)
            if problem:
                resp.failure(problem)
            else:
                resp.success()
