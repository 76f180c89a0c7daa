"""Everything one running service owns: loaded models, tiers, queues, batchers, decode pool, drain state."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .batcher import DeviceBatcher, TierQueue
from .inference import make_runner, warm_up
from .labels import class_names
from .metrics import Metrics
from .model_loading import LoadedModel, load_model, resolve_device
from .preprocess import Preprocessor
from .settings import ServiceSettings
from .tiers import Tier, max_raw_r, raw_r_tier

log = logging.getLogger(__name__)


class Runtime:
    """State of one app instance (no module-level state: several apps can live in one process)."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, LoadedModel] = {}
        self.preprocessors: dict[str, Preprocessor] = {}
        self.labels: dict[str, tuple[str, ...]] = {}
        self.speedups: dict[str, dict[str, float]] = {}
        self.batchers: dict[str, DeviceBatcher] = {}
        self.queues: dict[tuple[str, str], TierQueue] = {}
        self.raw_tiers: dict[tuple[str, int], Tier] = {}
        self.decode_pool: ThreadPoolExecutor | None = None
        self.ready = False
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- start-up -------------------------------------------------------------------------------
    def load(self) -> None:
        """Load every configured model (blocking; raises ``ModelLoadError`` with what to set)."""
        if self.models:
            return
        device = resolve_device(self.settings.device)
        for spec in self.settings.models:
            loaded = load_model(spec, device)
            self.models[spec.name] = loaded
            limits = self.settings.limits
            self.preprocessors[spec.name] = Preprocessor(
                loaded.data_config, limits.max_image_pixels, limits.jpeg_draft, fused=limits.fused_resize
            )
            self.labels[spec.name] = class_names(loaded.num_classes)
            for tier in loaded.tiers.values():
                self.metrics.tier_info.labels(
                    model=spec.name, tier=tier.name, schedule=tier.describe_schedule()
                ).set(1)
                self.metrics.tier_gflops.labels(model=spec.name, tier=tier.name).set(tier.info.gflops)

    async def start(self) -> None:
        """Load (if not yet), build the queues, warm up every tier and batch bucket, start batching."""
        await asyncio.to_thread(self.load)
        b = self.settings.batching
        self.decode_pool = ThreadPoolExecutor(
            self.settings.limits.decode_workers, thread_name_prefix="decode"
        )
        for loaded in self.models.values():
            key = str(loaded.device)
            if key not in self.batchers:
                self.batchers[key] = DeviceBatcher(
                    key, b.max_batch_size, b.max_wait_ms / 1000, b.max_queue_size, self.metrics
                )
            for tier in loaded.tiers.values():
                runner = make_runner(loaded, tier)
                self.queues[(loaded.name, tier.name)] = self.batchers[key].add_queue(
                    loaded.name, tier.name, runner
                )
        if b.warmup:
            for loaded in self.models.values():
                batcher = self.batchers[str(loaded.device)]
                start = time.perf_counter()
                speedups = await batcher.run_in_device_thread(lambda m=loaded: warm_up(m, b.max_batch_size))
                self.speedups[loaded.name] = speedups  # type: ignore[assignment]
                log.info(
                    "warmed up %s in %.1fs: speedups %s", loaded.name, time.perf_counter() - start, speedups
                )
        for batcher in self.batchers.values():
            batcher.start()
        self.ready = True

    # ---- lookups ---------------------------------------------------------------------------------
    def batcher_for(self, loaded: LoadedModel) -> DeviceBatcher:
        return self.batchers[str(loaded.device)]

    def raw_tier(self, loaded: LoadedModel, r: int) -> tuple[Tier, TierQueue]:
        """Tier and queue for a raw ``?r=``; raises ValueError out of range. At most raw_r_max+1 queues."""
        key = (loaded.name, r)
        if key not in self.raw_tiers:
            tier = raw_r_tier(loaded.model, r)
            self.raw_tiers[key] = tier
            self.queues[(loaded.name, tier.name)] = self.batcher_for(loaded).add_queue(
                loaded.name, tier.name, make_runner(loaded, tier)
            )
        tier = self.raw_tiers[key]
        return tier, self.queues[(loaded.name, tier.name)]

    def raw_r_max(self, loaded: LoadedModel) -> int:
        return max_raw_r(loaded.model)

    # ---- request accounting and drain ------------------------------------------------------------
    def request_started(self) -> None:
        self.in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.set(self.in_flight)

    def request_finished(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self._idle.set()

    def begin_drain(self) -> None:
        """From now on /readyz is 503 and new classify requests are refused."""
        self.draining = True

    async def drain(self, timeout: float | None = None) -> bool:
        """Refuse new work and wait until every accepted request is answered; False on timeout."""
        self.begin_drain()
        timeout = self.settings.limits.drain_timeout_s if timeout is None else timeout
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
        except TimeoutError:
            log.warning("drain timed out with %d requests in flight", self.in_flight)
            return False
        return True

    async def stop(self) -> None:
        """Drain, run whatever is still queued, stop the executors."""
        await self.drain()
        for batcher in self.batchers.values():
            await batcher.close()
        if self.decode_pool is not None:
            self.decode_pool.shutdown(wait=True)
        self.ready = False

    def cuda_devices(self) -> list[torch.device]:
        return sorted({m.device for m in self.models.values() if m.device.type == "cuda"}, key=str)
