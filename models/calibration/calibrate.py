"""Measure every candidate schedule on calibration images and write down what was measured."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import timm
import torch
from tqdm import tqdm

from models import tome
from models.timm_data import model_data_config

from .candidates import Candidate, dedupe, default_candidates
from .images import ImageSet, Preprocess, TimmEvalPreprocess, imagenet_class_index
from .measure import device_and_dtype, predict, time_schedules, timing_batch
from .record import Calibration, ImageInfo, ModelInfo, RunInfo, ScheduleRecord, Speedup, preprocessing_of
from .search import SearchConfig, better_than, greedy_search
from .stats import CONFIDENCE, Rate


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def searched_candidates(
    model: tome.ToMeVisionTransformer,
    pixels: torch.Tensor,
    config: SearchConfig,
    targets: Sequence[Candidate],
    progress: bool,
) -> tuple[list[Candidate], list[dict]]:
    """Search on ``pixels``; for every target, the least-merging path step at most as costly, kept if it
    diverges less from r=0 than the target on ``pixels`` (``search@<target name>``). Also returns the
    whole path, for the record."""
    path = greedy_search(model, pixels, config, progress=progress)
    steps = better_than(model, pixels, path, [t.r_per_block for t in targets], config)
    found = [
        Candidate(f"search@{target.name}", "searched", step.r_per_block)
        for target, step in zip(targets, steps, strict=True)
        if step is not None
    ]
    return found, [asdict(step) for step in path]


def calibrate(
    model: tome.ToMeVisionTransformer,
    images: ImageSet,
    *,
    architecture: str,
    weights_sha256: str | None,
    preprocess: Preprocess | None = None,
    preprocessing: dict[str, Any] | None = None,
    batch_size: int = 16,
    candidates: Sequence[Candidate] | None = None,
    search: SearchConfig | None = None,
    search_count: int | None = None,
    seed: int = 0,
    timing_rounds: int = 5,
    warmup: int = 1,
    confidence: float = CONFIDENCE,
    progress: bool = True,
) -> Calibration:
    """Measure agreement with r=0, accuracy (with labels), speed and GFLOPs of every candidate.

    ``model`` runs on its own device and dtype (the serving ones); ``preprocess`` should be the serving
    preprocessing (default: timm's eval transform) and ``preprocessing`` says in the file what it is
    (``preprocessing_of`` its data config; with the default transform, timm's). Without ``candidates``:
    ``default_candidates``. With ``search``, ``search_count`` images (default half) drawn by ``seed``
    are set aside for the schedule search, and every figure is measured on the others, so searched
    schedules are not judged on the images they were chosen on. Speed is measured on the first
    ``batch_size`` measured images.
    """
    model.eval()
    device, dtype = device_and_dtype(model)
    if preprocess is None:
        preprocess = TimmEvalPreprocess(model.vit)
        preprocessing = preprocessing or preprocessing_of(model_data_config(model.vit))
    candidates = list(candidates) if candidates is not None else default_candidates(model)
    num_classes = int(model.vit.num_classes)
    if images.synset_labels and num_classes != len(imagenet_class_index()):
        raise ValueError(
            f"labels from synsets are ImageNet-1k class indices, but the model has {num_classes} classes: "
            "give a labels CSV with the model's own class indices, or calibrate without labels "
            "(agreement with r=0 needs none)"
        )
    zero = tuple([0] * model.depth)
    if zero not in {c.r_per_block for c in candidates}:
        candidates.insert(0, Candidate("r0", "constant", zero))
    if all(c.is_exact for c in candidates):
        raise ValueError("no schedule to calibrate besides r=0: give constant r above 0 or inflections")
    measured, search_set, path = images, None, None
    if search is not None:
        search_set, measured = images.split(search_count or len(images) // 2, seed)
        search_pixels = search_set.load(preprocess, progress)
        targets = [c for c in candidates if c.kind == "constant" and not c.is_exact]
        found, path = searched_candidates(model, search_pixels, search, targets, progress)
        candidates = dedupe([*candidates, *found])
    pixels = measured.load(preprocess, progress)
    labels = measured.label_tensor()
    if labels is not None and int(labels.max()) >= num_classes:
        raise ValueError(f"a label is {int(labels.max())} but the model has {num_classes} classes")

    rates = _rates(model, pixels, batch_size, candidates, labels, confidence, progress)
    timed = [c for c in candidates if not c.is_exact]
    batch = timing_batch(pixels, batch_size)
    schedules = [c.r_per_block for c in timed]
    baseline, timings = time_schedules(model, batch, schedules, timing_rounds, warmup, progress)
    speed = {c.r_per_block: (t.speedup, t.images_per_s) for c, t in zip(timed, timings, strict=True)}
    speed[zero] = (Speedup(1.0, 1.0, 1.0), baseline)
    records = []
    for c in candidates:
        info = model.schedule_info(list(c.r_per_block))
        agreement, accuracy = rates[c.r_per_block]
        speedup, images_per_s = speed[c.r_per_block]
        records.append(
            ScheduleRecord(
                name=c.name,
                kind=c.kind,
                r_per_block=c.r_per_block,
                gflops=info.gflops,
                tokens_final=info.tokens_after_block[-1],
                speedup=speedup,
                images_per_s=images_per_s,
                agreement=agreement,
                accuracy=accuracy,
            )
        )
    notes = {} if search is None else {"search": {"config": asdict(search), "path": path}}
    return Calibration(
        model=_model_info(model, architecture, weights_sha256, tuple(pixels.shape[1:]), preprocessing),
        run=_run_info(device, dtype, batch_size, timing_rounds, confidence),
        images=ImageInfo(
            source=str(images.root),
            count=len(measured),
            labels=labels is not None,
            sha256=measured.sha256(),
            seed=seed,
            search_count=0 if search_set is None else len(search_set),
            search_sha256=None if search_set is None else search_set.sha256(),
        ),
        schedules=tuple(records),
        notes=notes,
    )


def _model_info(
    model: tome.ToMeVisionTransformer,
    architecture: str,
    weights_sha256: str | None,
    input_size: tuple,
    preprocessing: dict[str, Any] | None,
) -> ModelInfo:
    return ModelInfo(
        architecture=architecture,
        weights_sha256=weights_sha256,
        input_size=input_size,
        num_classes=int(model.vit.num_classes),
        prop_attn=model.prop_attn,
        float32_merge=model.merge_dtype is not None,
        depth=model.depth,
        tokens_in=model.schedule_info(0).tokens_in,
        protected_tokens=model.num_prefix_tokens,
        preprocessing=preprocessing,
    )


def _run_info(
    device: torch.device, dtype: torch.dtype, batch_size: int, timing_rounds: int, confidence: float
) -> RunInfo:
    return RunInfo(
        device_type=device.type,
        device_name=device_name(device),
        dtype=str(dtype).removeprefix("torch."),
        batch_size=batch_size,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        timm_version=timm.__version__,
        timing_rounds=timing_rounds,
        confidence=confidence,
        interval="wilson",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _rates(
    model: tome.ToMeVisionTransformer,
    pixels: torch.Tensor,
    batch_size: int,
    candidates: Sequence[Candidate],
    labels: torch.Tensor | None,
    confidence: float,
    progress: bool,
) -> dict[tuple[int, ...], tuple[Rate, Rate | None]]:
    """Agreement with r=0 and accuracy (None without labels) of every candidate."""
    reference = predict(model, pixels, (0,) * model.depth, batch_size).argmax(dim=-1)
    rates = {}
    for c in tqdm(candidates, desc="schedules", disable=not progress, leave=False):
        top1 = reference if c.is_exact else predict(model, pixels, c.r_per_block, batch_size).argmax(dim=-1)
        n = len(top1)
        agreement = (  # r=0 is the reference: it agrees by definition, not by sample
            Rate(n, n, 1.0, 1.0, 1.0)
            if c.is_exact
            else Rate.measure(int((top1 == reference).sum()), n, confidence)
        )
        accuracy = None if labels is None else Rate.measure(int((top1 == labels).sum()), n, confidence)
        rates[c.r_per_block] = (agreement, accuracy)
    return rates
