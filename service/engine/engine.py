"""The engine: loaded models, their tiers and runners, the batcher, and one final answer per request.

Lives in the engine process (or, in tests, a thread of the test process) and is driven by
``connections.EngineServer``. All methods run on the engine's event-loop thread except ``load``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ipc.protocol import ImageOutcome, Reject, Result, State
from ..ipc.rundir import RunDir
from ..ipc.slots import SlotLayout, create_slot_file, map_slots
from ..observability.metrics import EngineMetrics
from ..settings import ServiceSettings
from .auto import AUTO, AutoPolicy, BatchTimes, DecayedMean, faithful_order
from .batcher import Batcher, DeadlineExceeded, Draining, Job, JobResult, QueueFull, TierQueue
from .calibration import warn_if_timed_at_another_batch_size
from .device_decode import jpeg_decoder_for
from .faults import Fatal
from .labels import class_names
from .loading import LoadedModel, ModelLoadError, load_model, resolve_device
from .runner import DeviceThreads, ModelRunner
from .shadow import ShadowMonitor
from .tiers import Tier, max_raw_r, raw_r_tier
from .warmup import warm_up

log = logging.getLogger(__name__)

Reply = Callable[[Result | Reject], None]


@dataclass(eq=False)
class _Request:
    """One ``Submit`` in flight: its jobs and what has come back so far."""

    id: int
    model: str
    tier: str
    queue: TierQueue
    top_k: int
    reply: Reply
    jobs: list[Job] = field(default_factory=list)
    results: dict[int, JobResult] = field(default_factory=dict)
    error: BaseException | None = None
    cancelled: bool = False
    pending: int = 0
    reason: str | None = None  # tier=auto: why this tier

    def answer(self) -> Result | Reject:
        if self.cancelled:
            return Reject(self.id, "cancelled", "cancelled by the front-end")
        if isinstance(self.error, DeadlineExceeded):
            return Reject(self.id, "deadline", "the request's deadline passed while it was queued")
        if self.error is not None:
            return Reject(self.id, "internal", "inference failed")
        images = []
        for job in self.jobs:
            r = self.results[id(job)]
            images.append(
                ImageOutcome(
                    r.queue_s,
                    r.inference_s,
                    r.batch_size,
                    r.indices[: self.top_k],
                    r.scores[: self.top_k],
                    r.error,
                )
            )
        return Result(self.id, self.tier, self.reason, images)


def check_space(rundir: RunDir, layout: SlotLayout, model: str) -> None:
    """Refuse to start rather than die of SIGBUS later: tmpfs pages are only allocated when written, and a
    container's /dev/shm is 64 MB unless it is given more."""
    free = rundir.free_bytes()
    if layout.total_bytes > free:
        need, have = layout.total_bytes / 2**20, free / 2**20
        raise ModelLoadError(
            f"model {model!r}: its image slots need {need:.0f} MiB in {rundir.path.parent} ({layout.count} "
            f"slots = server.workers x server.max_pending_images, of {layout.image_bytes} bytes) but only "
            f"{have:.0f} MiB are free: give the container more shared memory (docker --shm-size; "
            "Kubernetes: an emptyDir with medium: Memory on /dev/shm), set server.run_dir, or lower "
            "server.workers / server.max_pending_images"
        )


def _describe_tier(tier: Tier) -> dict[str, Any]:
    record = tier.calibration
    return {
        "name": tier.name,
        "schedule": tier.describe_schedule(),
        "r_per_block": list(tier.info.r_per_block),
        "tokens_after_last_block": tier.info.tokens_after_block[-1],
        "gflops": tier.info.gflops,
        "budget": tier.budget,
        "calibrated": record is not None,
        "agreement_with_exact": None if record is None else record.agreement.__dict__,
        "top1_accuracy": None if record is None or record.accuracy is None else record.accuracy.__dict__,
        "calibrated_speedup": None if record is None else record.speedup.median,
        "calibrated_schedule": None if record is None else record.name,
    }


def _describe_calibration(loaded: LoadedModel) -> dict[str, Any] | None:
    """Where and how the model's calibration was measured (or why a configured one was ignored)."""
    if loaded.calibration is None:
        return None if loaded.calibration_ignored is None else {"ignored": loaded.calibration_ignored}
    cal = loaded.calibration
    return {
        "file": str(loaded.spec.calibration),
        "device": f"{cal.run.device_type} ({cal.run.device_name})",
        "dtype": cal.run.dtype,
        "batch_size": cal.run.batch_size,
        "images": cal.images.count,
        "labels": cal.images.labels,
        "confidence": cal.run.confidence,
        "created": cal.run.created,
    }


class Engine:
    """What one engine owns. ``workers`` front-ends each get ``max_pending_images`` slots per model."""

    def __init__(
        self, settings: ServiceSettings, rundir: RunDir, metrics: EngineMetrics, workers: int, fatal: Fatal
    ) -> None:
        self.settings = settings
        self.fatal = fatal
        self.rundir = rundir
        self.metrics = metrics
        self.workers = workers
        self.models: dict[str, LoadedModel] = {}
        self.runners: dict[str, ModelRunner] = {}
        self.labels: dict[str, list[str]] = {}
        self.layouts: dict[str, SlotLayout] = {}
        self.queues: dict[tuple[str, str | int], TierQueue] = {}
        self.speedups: dict[str, dict[str, float]] = {}
        self.agreements: dict[str, dict[str, float]] = {}  # calibrated agreement with r=0, per tier
        self.auto: dict[str, AutoPolicy] = {}
        self.auto_agreement: dict[str, DecayedMean] = {}
        self.batch_seconds: dict[str, dict[str, dict[int, float]]] = {}
        self.threads: DeviceThreads | None = None
        self.batcher: Batcher | None = None
        self.requests: dict[tuple[int, int], _Request] = {}  # (connection id, request id)
        self.ready = False
        self.draining = False
        self._state_listeners: list[Callable[[State], None]] = []
        self._idle = asyncio.Event()

    # ---- start-up -------------------------------------------------------------------------------
    def load(self) -> None:
        """Load every model and create its shared slots (blocking; raises ``ModelLoadError``)."""
        device = resolve_device(self.settings.device)
        b = self.settings.batching
        self.threads = DeviceThreads(device, b.cpu_parallel_batches, b.cpu_batch_niceness)
        limits = self.settings.limits
        slot_count = self.workers * self.settings.server.max_pending_images
        for index, spec in enumerate(self.settings.models):
            loaded = load_model(spec, device)
            warn_if_timed_at_another_batch_size(spec.name, loaded.calibration, b.max_batch_size)
            _, h, w = loaded.input_size
            layout = SlotLayout(slot_count, h, w)
            check_space(self.rundir, layout, spec.name)
            create_slot_file(self.rundir.slots(index), layout)
            slots = torch.from_numpy(map_slots(self.rundir.slots(index), layout))
            top_k = min(limits.max_top_k, loaded.num_classes)
            decoder = jpeg_decoder_for(limits.device_jpeg_decode, device, loaded.data_config, spec.name)
            self.runners[spec.name] = ModelRunner(
                loaded, slots, self.threads, b.max_batch_size, top_k, b.cuda_graphs, b.pipeline_depth,
                decoder=decoder,
            )  # fmt: skip
            if decoder is not None:
                self.metrics.init_device_decode(spec.name)
            self.models[spec.name] = loaded
            self.agreements[spec.name] = {
                t.name: t.calibration.agreement.rate
                for t in loaded.tiers.values()
                if t.calibration is not None
            }
            self._set_up_auto(spec.name, loaded)
            self.layouts[spec.name] = layout
            self.labels[spec.name] = list(class_names(loaded.num_classes))
            for tier in loaded.tiers.values():
                self._export_calibration(spec.name, tier)
                self._export_tier(spec.name, tier)

    def _export_tier(self, model: str, tier: Tier) -> None:
        """A tier's ``tome_tier_info`` and ``tome_tier_gflops`` (a raw ``?r=`` tier: at its first use)."""
        self.metrics.tier_info.labels(model=model, tier=tier.name, schedule=tier.describe_schedule()).set(1)
        self.metrics.tier_gflops.labels(model=model, tier=tier.name).set(tier.info.gflops)

    async def start(self) -> None:
        """Build the batcher and queues, warm up every tier and bucket (on the device thread), then serve."""
        b = self.settings.batching
        assert self.threads is not None
        cuda = self.threads.device.type == "cuda"
        self.batcher = Batcher(
            b.max_batch_size,
            b.max_wait_ms / 1000,
            b.max_queue_size,
            b.pipeline_depth if cuda else self.threads.lanes,
            self.metrics,
            self.fatal,
            b.batch_timeout_s,
            lanes=self.threads.lanes,
        )
        self.metrics.parallel_batches.set(self.threads.lanes)
        if not cuda:
            lanes, per_lane = self.threads.lanes, self.threads.threads_per_lane
            log.info("CPU: %d batch(es) at once, %d thread(s) each", lanes, per_lane)
        fidelity = self.settings.fidelity
        for name, loaded in self.models.items():
            runner = self.runners[name]
            shadow = None
            if fidelity.sample_rate > 0:
                shadow = ShadowMonitor(
                    name, runner.slots, runner.run_exact, self.metrics,
                    fidelity.sample_rate, fidelity.queue_size, fidelity.batch_size,
                )  # fmt: skip
            for tier in loaded.tiers.values():
                merging = any(tier.info.r_per_block)
                self._add_queue(name, tier.name, tier, shadow if merging else None)
                if merging and shadow is not None:
                    self.metrics.init_shadow(name, tier.name)
        if b.warmup:
            for name, loaded in self.models.items():
                start = time.perf_counter()
                runner = self.runners[name]
                report = await self._device_call(lambda r=runner, t=loaded.tiers: warm_up(r, t))
                self.speedups[name] = report.speedups
                self.batch_seconds[name] = report.batch_seconds
                for tier, speedup in report.speedups.items():
                    self.metrics.tier_speedup.labels(model=name, tier=tier).set(speedup)
                log.info(
                    "warmed up %s in %.1fs (%d CUDA graphs): speedups %s",
                    name, time.perf_counter() - start, report.graphs, report.speedups,
                )  # fmt: skip
        for name, runner in self.runners.items():
            self.batcher.batch_times[name] = BatchTimes(
                runner.buckets, self.batch_seconds.get(name, {}), padded=runner.pad_to_bucket
            )
        self.batcher.start()
        self.ready = True
        self.metrics.engine_ready.set(1)
        self._publish()

    def _export_calibration(self, model: str, tier: Tier) -> None:
        record = tier.calibration
        if record is None:
            return
        labels = {"model": model, "tier": tier.name}
        m = self.metrics
        m.tier_agreement.labels(**labels).set(record.agreement.rate)
        m.tier_agreement_low.labels(**labels).set(record.agreement.ci_low)
        m.tier_agreement_high.labels(**labels).set(record.agreement.ci_high)
        m.tier_calibrated_speedup.labels(**labels).set(record.speedup.median)
        if record.accuracy is not None:
            m.tier_accuracy.labels(**labels).set(record.accuracy.rate)

    def _set_up_auto(self, name: str, loaded: LoadedModel) -> None:
        """tier=auto's order of tiers, most faithful first down to the floor (at load: front-ends see it)."""
        order = faithful_order(
            {t.name: t.info.gflops for t in loaded.tiers.values()}, self.agreements.get(name, {})
        )
        floor = loaded.spec.auto.floor or order[-1]
        if floor not in order:
            raise ModelLoadError(f"model {name!r}: auto.floor {floor!r} is not one of its tiers {order}")
        spec = loaded.spec.auto
        self.auto[name] = AutoPolicy(
            order[: order.index(floor) + 1], spec.upgrade_margin, spec.hold_s, spec.target_share
        )
        self.auto_agreement[name] = DecayedMean()
        self.metrics.init_auto(name, self.auto[name].tiers)

    async def _device_call(self, fn: Callable[[], Any]) -> Any:
        assert self.threads is not None
        return await self.threads.call(fn)

    def _add_queue(
        self, model: str, key: str | int, tier: Tier, shadow: ShadowMonitor | None = None
    ) -> TierQueue:
        assert self.batcher is not None
        queue = self.batcher.add_queue(model, tier.name, self.runners[model].runner_for(tier), shadow)
        self.queues[(model, key)] = queue
        return queue

    # ---- what front-ends see ----------------------------------------------------------------------
    def description(self) -> dict[str, Any]:
        """Everything a front-end needs to validate, preprocess and describe (sent once, at hello)."""
        models = []
        for index, (name, m) in enumerate(self.models.items()):
            layout = self.layouts[name]
            models.append(
                {
                    "name": name,
                    "architecture": m.spec.architecture,
                    "weights_source": m.weights_source,
                    "random_weights": m.spec.weights == "random",
                    "device": str(m.device),
                    "dtype": str(m.dtype).removeprefix("torch."),
                    "num_classes": m.num_classes,
                    "input_size": list(m.input_size),
                    "data_config": {
                        k: list(v) if isinstance(v, tuple) else v for k, v in m.data_config.items()
                    },
                    "labels": self.labels[name],
                    # front-ends pass JPEGs through their slots, for the engine to decode on its device
                    "device_jpeg_decode": self.runners[name].decoder is not None,
                    "max_top_k": self.runners[name].top_k,
                    "default_tier": m.spec.default_tier,
                    "allow_raw_r": m.spec.allow_raw_r,
                    "auto": {
                        "latency_objective_ms": m.spec.auto.latency_objective_ms,
                        "max_queue_share": m.spec.auto.max_queue_share,
                        "tiers": self.auto[name].tiers,
                    }
                    if name in self.auto
                    else None,
                    "raw_r_max": max_raw_r(m.model),
                    "tiers": [_describe_tier(t) for t in m.tiers.values()],
                    "calibration": _describe_calibration(m),
                    "raw_tiers": [
                        {"r": r, **_describe_tier(raw_r_tier(m.model, r))}
                        for r in (range(max_raw_r(m.model) + 1) if m.spec.allow_raw_r else [])
                    ],
                    "slots": {
                        "path": str(self.rundir.slots(index)),
                        "count": layout.count,
                        "height": layout.height,
                        "width": layout.width,
                    },
                }
            )
        return {"default_model": self.settings.default_model, "models": models}

    def state(self) -> State:
        batch_ms = {
            model: {tier: {b: s * 1000 for b, s in buckets.items()} for tier, buckets in tiers.items()}
            for model, tiers in self.batch_seconds.items()
        }
        return State(self.ready, self.draining, self.speedups, batch_ms)

    def on_state(self, listener: Callable[[State], None]) -> None:
        self._state_listeners.append(listener)

    def _publish(self) -> None:
        state = self.state()
        for listener in list(self._state_listeners):
            listener(state)

    # ---- requests -------------------------------------------------------------------------------
    def submit(
        self,
        conn: int,
        request_id: int,
        model: str,
        tier: str | int,
        deadline: float,
        top_k: int,
        slots: list[int],
        reply: Reply,
        jpeg: list[bool] | None = None,
    ) -> None:
        """Queue a request's images; ``reply`` is called exactly once with its final answer. ``jpeg``: per
        slot, whether it holds a JPEG's bytes for the device to decode (default: pixels)."""
        if not self.ready:
            reply(Reject(request_id, "warming_up", "the service is warming up"))
            return
        if self.draining:  # before auto counts a decision for a request that will not run
            reply(Reject(request_id, "draining", "the service is shutting down"))
            return
        reason = None
        if tier == AUTO and model in self.auto:
            picked = self._choose_auto(model, deadline, len(slots))
            if isinstance(picked, Reject):
                reply(Reject(request_id, picked.code, picked.message))
                return
            tier, reason = picked
        queue = self._queue_for(model, tier)
        if isinstance(queue, Reject):
            reply(Reject(request_id, queue.code, queue.message))
            return
        request = _Request(
            request_id, model, queue.tier, queue, top_k, reply, pending=len(slots), reason=reason
        )
        assert self.batcher is not None
        try:
            request.jobs = self.batcher.submit(
                queue, slots, deadline, lambda job, res: self._job_done(conn, request, job, res), jpeg
            )
        except Draining:
            reply(Reject(request_id, "draining", "the service is shutting down"))
            return
        except QueueFull:
            reply(
                Reject(request_id, "queue_full", f"the queue for {model}/{queue.tier} is full; retry later")
            )
            return
        self.requests[(conn, request_id)] = request
        self._idle.clear()
        if reason is not None:
            self._count_auto(model, queue.tier, reason)

    def _choose_auto(self, model: str, deadline: float, images: int) -> tuple[str, str] | Reject:
        """tier=auto: the most faithful tier predicted to answer by ``deadline`` (engine/auto.py)."""
        assert self.batcher is not None
        policy, spec = self.auto[model], self.models[model].spec.auto
        cap = spec.max_queue_share * self.batcher.max_queue_size
        if images > cap:  # would never fit, even in empty queues: not worth a retry
            return Reject(
                0,
                "bad_request",
                f"tier=auto takes at most {math.floor(cap)} images per request here (auto.max_queue_share x "
                "batching.max_queue_size); send fewer, or name a tier",
            )
        now = time.monotonic()

        def finish_at(tier: str) -> float:
            # everything else queued or running first, then this tier's queue with the request at its end
            batcher = self.batcher
            assert batcher is not None
            wait = batcher.max_wait_s + batcher.finish_s(self.queues[(model, tier)], images, now)
            return now + spec.safety_factor * wait

        finish = {t: finish_at(t) for t in policy.tiers}
        choice = policy.choose(finish, deadline, now)
        if choice.tier is None:
            self.metrics.auto_decisions.labels(model=model, tier="none", reason=choice.reason).inc()
            return Reject(0, "overloaded", "even the fastest tier auto may use cannot answer by the deadline")
        tier, reason = choice.tier, choice.reason
        if self.queues[(model, tier)].live + images > cap:  # fairness: leave room for named tiers
            faster = policy.tiers[policy.tiers.index(tier) + 1 :]
            roomy = [t for t in faster if self.queues[(model, t)].live + images <= cap]
            if not roomy or finish[roomy[0]] > deadline:
                self.metrics.auto_decisions.labels(model=model, tier="none", reason="queue_share").inc()
                return Reject(0, "overloaded", "auto's share of every tier's queue is full; retry later")
            tier, reason = roomy[0], "queue_share"
        return tier, reason

    def _count_auto(self, model: str, tier: str, reason: str) -> None:
        """An auto request queued at ``tier``: its decision and its share of auto's effective agreement."""
        self.metrics.auto_decisions.labels(model=model, tier=tier, reason=reason).inc()
        agreement = self.agreements.get(model, {}).get(tier)
        if agreement is not None:
            self.auto_agreement[model].add(agreement, time.monotonic())
            self.metrics.auto_agreement.labels(model=model).set(self.auto_agreement[model].mean)

    def _queue_for(self, model: str, tier: str | int) -> TierQueue | Reject:
        loaded = self.models.get(model)
        if loaded is None:
            return Reject(0, "bad_request", f"unknown model {model!r}")
        queue = self.queues.get((model, tier))
        if queue is not None:
            return queue
        if isinstance(tier, int) and loaded.spec.allow_raw_r:
            try:
                raw = raw_r_tier(loaded.model, tier)
            except ValueError as e:
                return Reject(0, "bad_request", str(e))
            self._export_tier(model, raw)
            return self._add_queue(model, tier, raw)
        return Reject(0, "bad_request", f"unknown tier {tier!r} for model {model!r}")

    def cancel(self, conn: int, request_id: int) -> None:
        """Skip the request's images that have not started; it is answered ``cancelled`` once none runs."""
        request = self.requests.get((conn, request_id))
        if request is None or request.cancelled:
            return
        request.cancelled = True
        assert self.batcher is not None
        request.pending -= self.batcher.abandon(request.queue, request.jobs)
        if request.pending == 0:
            self._finish(conn, request)

    def cancel_connection(self, conn: int) -> None:
        """A front-end went away: nobody will read its answers, so skip whatever has not started."""
        for c, request_id in [key for key in self.requests if key[0] == conn]:
            self.cancel(c, request_id)

    def _job_done(self, conn: int, request: _Request, job: Job, result: JobResult | BaseException) -> None:
        if isinstance(result, BaseException):
            request.error = request.error or result
        else:
            request.results[id(job)] = result
        request.pending -= 1
        if request.pending == 0:
            self._finish(conn, request)

    def _finish(self, conn: int, request: _Request) -> None:
        del self.requests[(conn, request.id)]
        request.reply(request.answer())
        request.jobs = []  # each job's callback holds the request: so refcounting, not the GC, frees both
        if not self.requests:
            self._idle.set()

    # ---- shutdown -------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self._publish()

    async def stop(self) -> None:
        """Refuse new work, run everything queued, answer every request, stop the device threads."""
        self.begin_drain()
        if self.batcher is not None:
            await self.batcher.close()
        if self.requests:
            await self._idle.wait()
        if self.threads is not None:
            await asyncio.to_thread(self.threads.shutdown)

    def update_device_memory(self) -> None:
        for device in {m.device for m in self.models.values() if m.device.type == "cuda"}:
            self.metrics.device_memory.labels(device=str(device)).set(torch.cuda.memory_allocated(device))
