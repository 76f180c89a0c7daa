"""What one front-end process holds: its engine connection, its view of the served models, its slots,
its decode threads, admission counts and drain state. Stored on ``app.state.frontend``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from ..errors import ServiceError, unavailable
from ..ingest.lanes import DecodeLanes
from ..ingest.preprocess import Preprocessor
from ..ipc.client import EngineClient
from ..ipc.rundir import RunDir
from ..ipc.slots import SlotLayout, SlotRange, map_slots
from ..observability.metrics import FrontendMetrics, multiprocess
from ..settings import ServiceSettings
from .rate_limit import TokenBucket
from .request_ids import RequestIds

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5


def _auto_slots(entry: dict[str, Any], per_frontend: int) -> int:
    """How many of a front-end's slots tier=auto requests may hold at once: the share of the engine's
    queues auto may fill (``auto.max_queue_share``) applies to the front-end's slots too."""
    auto = entry.get("auto")
    return per_frontend if auto is None else max(1, int(auto["max_queue_share"] * per_frontend))


@dataclass
class ServedModel:
    """A front-end's view of one model the engine serves (from the engine's welcome)."""

    name: str
    info: dict[str, Any]
    preprocessor: Preprocessor
    slots: np.ndarray  # uint8 [count, H, W, 3], shared with the engine
    free: SlotRange  # this front-end's own slots
    device_jpeg: bool = False  # the engine decodes JPEGs on its device: pass them (ingest.passthrough)
    tiers: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw_tiers: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return self.info["labels"]

    @property
    def max_top_k(self) -> int:
        return self.info["max_top_k"]

    @property
    def default_top_k(self) -> int:
        return min(DEFAULT_TOP_K, self.max_top_k)


class Frontend:
    def __init__(
        self,
        settings: ServiceSettings,
        rundir: RunDir,
        frontend_id: int,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.rundir = rundir
        self.id = frontend_id
        self.registry = registry or CollectorRegistry()
        self.metrics = FrontendMetrics(None if multiprocess() else self.registry)
        self.engine = EngineClient(rundir.socket, frontend_id)
        self.models: dict[str, ServedModel] = {}
        self.default_model = ""
        self.decode: DecodeLanes | None = None
        self.new_request_id = RequestIds()
        rate = settings.server.max_scrapes_per_s
        self.scrapes = TokenBucket(rate) if rate > 0 else None  # /metrics renders
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, timeout: float) -> None:
        """Connect to the engine (it may still be loading) and map the shared slots of every model."""
        await self.engine.connect(timeout)
        description = self.engine.description
        self.default_model = description["default_model"]
        per_frontend = self.settings.server.max_pending_images
        limits = self.settings.limits
        for entry in description["models"]:
            slots = entry["slots"]
            layout = SlotLayout(slots["count"], slots["height"], slots["width"])
            model = ServedModel(
                name=entry["name"],
                info=entry,
                preprocessor=Preprocessor.for_limits(entry["data_config"], limits),
                slots=map_slots(Path(slots["path"]), layout),
                free=SlotRange(self.id * per_frontend, per_frontend, _auto_slots(entry, per_frontend)),
                device_jpeg=bool(entry.get("device_jpeg_decode", False)),
                tiers={t["name"]: t for t in entry["tiers"]},
                raw_tiers={t["r"]: t for t in entry.get("raw_tiers", [])},
            )
            self.models[model.name] = model
            for tier in model.tiers:
                self.metrics.init_tier(model.name, tier)
        self.decode = DecodeLanes(limits.decode_workers, limits.heavy_image_pixels, limits.max_heavy_images)

    async def stop(self) -> None:
        await self.engine.close()
        if self.decode is not None:
            self.decode.shutdown()

    # ---- admission and drain ----------------------------------------------------------------------
    def check_serving(self) -> None:
        """Raise the 503 that applies before any work is done for a request."""
        if self.draining:
            raise ServiceError(
                503,
                "draining",
                "the service is shutting down",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        if not self.engine.connected:
            raise unavailable("engine_down", "the inference engine is not running")
        if not self.engine.state.ready:
            raise unavailable("warming_up", "the service is warming up")

    def early_refusal(self) -> ServiceError | None:
        """The 503 a classify request would get before any of its work is done, if any: what
        ``api.shedding`` answers without running FastAPI (``check_serving`` and ``admitted`` decide again
        when the route admits it)."""
        try:
            self.check_serving()
        except ServiceError as e:
            return e
        return self._overloaded() if self.in_flight >= self.settings.server.max_requests else None

    @staticmethod
    def _overloaded() -> ServiceError:
        return unavailable("overloaded", "too many requests in progress on this worker; retry later")

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count a classify request in flight, refusing it (503) past ``server.max_requests``."""
        if self.in_flight >= self.settings.server.max_requests:
            raise self._overloaded()
        self.in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait until every admitted one is answered; False on timeout."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("drain timed out with %d requests in flight", self.in_flight)
            return False
        return True

    @property
    def ready(self) -> bool:
        return not self.draining and self.engine.connected and self.engine.state.ready

    def process_roles(self) -> dict[str, int]:
        """role -> pid of every process of this service (each registers itself in the run directory)."""
        roles = {}
        for path in self.rundir.pids.glob("*"):
            with contextlib.suppress(OSError, ValueError):
                roles[path.name] = int(path.read_text())
        return roles
