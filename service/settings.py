"""Service configuration: a TOML or YAML file, overridden by ``TOME_*`` environment variables.

Precedence (highest first): keyword arguments, environment (``TOME_BATCHING__MAX_BATCH_SIZE=8``),
the config file (``config_file=`` or ``TOME_CONFIG_FILE``), then the defaults below.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

CONFIG_FILE_ENV = "TOME_CONFIG_FILE"
RESERVED_TIER_NAME = re.compile(r"^(r\d+|auto)$")
"""``r<k>`` names the raw ``?r=k`` tiers; ``auto`` is chosen per request: no configured tier may take them."""
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a config file must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class TierSpec(_Strict):
    """One named tier: an explicit ToMe schedule, or a budget resolved from the model's calibration file.

    Explicit: ``r`` (int or per-block list), optionally with an inflection: ``{r = 13}`` is constant,
    ``{r = 16, inflection = -1}`` the paper's decreasing schedule. By budget (needs ``calibration`` on the
    model): ``{max_agreement_loss = 0.03}`` is the fastest calibrated schedule whose top-1 agrees with
    r=0 on at least 97% of images (the lower end of its 95% interval); ``{min_speedup = 1.5}`` the most
    faithful one measured at least 1.5x faster than r=0.
    """

    r: int | list[int] = 0
    inflection: float | None = None
    max_agreement_loss: float | None = Field(None, ge=0, le=1)
    min_speedup: float | None = Field(None, gt=0)

    @property
    def by_budget(self) -> bool:
        return self.max_agreement_loss is not None or self.min_speedup is not None

    @model_validator(mode="after")
    def _check(self) -> TierSpec:
        if self.max_agreement_loss is not None and self.min_speedup is not None:
            raise ValueError("a tier has one budget: max_agreement_loss or min_speedup, not both")
        if self.by_budget and {"r", "inflection"} & self.model_fields_set:
            raise ValueError("a tier is either an explicit r schedule or a budget, not both")
        if self.inflection is not None and not isinstance(self.r, int):
            raise ValueError("inflection needs an int r, not a per-block list")
        values = [self.r] if isinstance(self.r, int) else self.r
        if any(v < 0 for v in values):
            raise ValueError(f"r must be non-negative, got {self.r}")
        return self

    def schedule(self) -> int | list[int] | tuple[int, float]:
        """The r spec in the form ``models.tome`` takes."""
        if self.inflection is not None:
            return (int(self.r), float(self.inflection))
        return self.r


class AutoSpec(_Strict):
    """``tier=auto`` (service/engine/auto.py): degrade before shedding."""

    floor: str | None = Field(None, description="fastest tier auto may use; default: the fastest tier")
    latency_objective_ms: float = Field(
        1000.0, gt=0, description="auto's deadline when the request sends no X-Deadline-Ms"
    )
    hold_s: float = Field(
        2.0, ge=0, description="least time between auto moving back to a more faithful tier"
    )
    upgrade_margin: float = Field(
        0.7,
        gt=0,
        le=1,
        description="a more faithful tier is taken back only if it fits in this share of the budget",
    )
    target_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="a tier fits when predicted to answer within this share of the budget (the rest is "
        "slack); the floor may use all of it",
    )
    safety_factor: float = Field(
        1.2,
        ge=1,
        description="predicted waits are stretched by this before they are compared with the deadline",
    )
    max_queue_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="auto admits images to a tier's queue only while its live images (any request's) "
        "stay within this share of batching.max_queue_size, and holds at most this share of a front-end's "
        "server.max_pending_images slots: the rest is kept for requests that name their tier; an auto "
        "request with more images than either share is a 400",
    )


class ModelSpec(_Strict):
    """A model to serve."""

    name: str = Field(description="Name clients use in ?model=")
    timm_name: str | None = Field(None, description="timm architecture; defaults to name")
    weights: str = Field(
        "hub",
        description='"hub" (pretrained from the Hugging Face hub), "random" (demos/tests only), '
        "or a local .safetensors / .pth file path",
    )
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model kwargs")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="dtype on CUDA; CPU always runs float32"
    )
    prop_attn: bool = True
    tiers: dict[str, TierSpec] | None = Field(None, description="None: exact/balanced/fast/fastest defaults")
    default_tier: str = "balanced"
    allow_raw_r: bool = Field(False, description="accept ?r=<int> within the model's valid range")
    auto: AutoSpec = Field(default_factory=AutoSpec)
    calibration: Path | None = Field(
        None,
        description="calibration file from `tome-serve calibrate`: tiers by budget resolve against it, and "
        "every tier it measured reports its agreement with r=0. Default tiers then are budgets",
    )
    on_calibration_mismatch: Literal["refuse", "ignore"] = Field(
        "refuse",
        description="a calibration file made for other weights, image size, dtype or device: refuse to "
        "start (one line saying what differs), or start without it (logged; /tiers marks every tier "
        "uncalibrated and budget tiers fall back to the uncalibrated defaults of the same name)",
    )

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, tiers: dict[str, TierSpec] | None) -> dict[str, TierSpec] | None:
        for name in tiers or {}:
            if RESERVED_TIER_NAME.match(name):
                raise ValueError(
                    f"tier name {name!r} is reserved (r<k> is the raw ?r=k tier, auto is chosen per request)"
                )
        return tiers

    @property
    def architecture(self) -> str:
        return self.timm_name or self.name


class BatchingSettings(_Strict):
    max_batch_size: int = Field(32, ge=1, le=256)
    max_wait_ms: float = Field(5.0, ge=0)
    max_queue_size: int = Field(256, ge=1, description="live images per (model, tier) queue; full -> 503")
    warmup: bool = True
    cuda_graphs: bool = Field(
        True, description="CUDA only: replay one captured graph per (tier, batch bucket) instead of eager"
    )
    pipeline_depth: int = Field(
        2,
        ge=1,
        le=4,
        description="CUDA only: batches in flight on the device (the next is staged while one runs)",
    )
    cpu_parallel_batches: int = Field(
        2,
        ge=1,
        le=64,
        description="CPU only: batches run at once, each on an equal share of torch's threads (at most one "
        "batch per thread); one batch whose threads wait for each other at every op loses more to a "
        "preempted thread than several smaller-threaded batches do. A batch that starts while no other "
        "runs takes every thread (low-load latency)",
    )
    cpu_batch_niceness: int = Field(
        5,
        ge=0,
        le=19,
        description="CPU only: how much lower (Linux nice) the batch threads run than the rest of the "
        "service, so that accepting, refusing, health checks and decoding come first under overload",
    )
    batch_timeout_s: float = Field(
        120.0,
        gt=0,
        description="a batch running longer ends the engine (the service restarts): a hung device",
    )


class LimitsSettings(_Strict):
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="whole request body")
    max_files: int = Field(16, ge=1, description="image parts per multipart request")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width*height, checked from the header")
    deadline_ms: float = Field(10_000, gt=0, description="default per-request deadline")
    decode_workers: int = Field(2, ge=1, description="threads decoding and resizing images, per front-end")
    heavy_image_pixels: int = Field(
        4_000_000,
        ge=1,
        description="images decoding to more pixels than this (after JPEG draft scaling) are decoded in a "
        "lane of their own at the lowest CPU priority",
    )
    max_jpeg_scans: int = Field(
        256,
        ge=1,
        description="JPEG scans (SOS markers) an image may have; more -> 422 before decoding (progressive "
        "JPEGs have ~10; each scan is another pass over the image, as libjpeg-turbo's scan limit guards)",
    )
    max_heavy_images: int = Field(
        2, ge=1, description="per front-end: heavy images decoding or waiting; more -> 503"
    )
    max_top_k: int = Field(
        20, ge=1, description="largest top_k a request may ask for (capped at num_classes)"
    )
    jpeg_draft: bool = Field(True, description="DCT-domain downscaling of large JPEGs while decoding")
    fused_resize: bool = Field(
        True,
        description="one boxed Pillow resize instead of timm's resize + center crop (~30% faster "
        "preprocessing, within the tolerance tests/service/test_preprocess.py states); "
        "false for timm's exact pipeline",
    )
    device_jpeg_decode: Literal["off", "auto", "on"] = Field(
        "auto",
        description="JPEGs that fit a slot are decoded, resized and cropped by the engine on its device "
        "(batched torchvision decode_jpeg, nvjpeg on CUDA) instead of by the front-ends: auto = on CUDA, "
        "on = on any device (CPU: tests, tolerance), off = never. Other formats, CMYK and EXIF-rotated "
        "JPEGs keep the CPU path; tolerance in tests/service/test_device_decode.py",
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="longest wait for queued requests at shutdown")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must arrive within this (408 and closed otherwise)"
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request's whole body must arrive within this once admitted (408 otherwise); an answer "
        "whose write stalls (the client reads nothing) this long has its connection aborted",
    )
    max_header_bytes: int = Field(16384, ge=1024, description="request line + headers; more is a 431")


class FidelitySettings(_Strict):
    """The production fidelity monitor (service/engine/shadow.py)."""

    sample_rate: float = Field(
        0.02, ge=0, le=1, description="fraction of images served at a merging tier re-run at r=0 when idle"
    )
    queue_size: int = Field(
        64, ge=1, description="shadow images waiting per model; more are dropped (counted)"
    )
    batch_size: int = Field(
        4, ge=1, description="shadow images per idle-time batch (bounds the delay it adds)"
    )


class ServerSettings(_Strict):
    """The processes: front-ends (HTTP, body, decode) in front of one engine process (models, device)."""

    workers: int = Field(0, ge=0, description="front-end processes; 0 = one per available CPU core")
    max_requests: int = Field(
        64,
        ge=1,
        description="per front-end: classify requests admitted at once; more get 503 before the body is read",
    )
    max_pending_images: int = Field(
        64,
        ge=1,
        description="per front-end: images decoding, queued or running (its shared-memory slots); "
        "more get 503 before decoding",
    )
    max_scrapes_per_s: float = Field(
        20.0,
        ge=0,
        description="per front-end: /metrics answers per second (each reads every process's metric files, "
        "~5 ms of its event loop, so a scrape flood would starve classify); more get 429 + Retry-After. "
        "0 = no limit",
    )
    probe_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="a second listening port serving the same app, for health probes and scrapes: its "
        "own accept queue, so a flood of client connections cannot delay /healthz and /readyz",
    )
    graceful_shutdown_s: float = Field(
        5.0, ge=0, description="after the drain, longest wait for open connections before the front-end exits"
    )
    run_dir: Path | None = Field(
        None,
        description="where the processes share their socket and image slots; default /dev/shm (tmpfs) when "
        "writable, else the temp dir. Needs workers x max_pending_images x 3HW bytes per model",
    )


class ServiceSettings(BaseSettings):
    """Everything the service reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="TOME_", env_nested_delimiter="__", extra="forbid")

    config_file: Path | None = Field(None, description="TOML or YAML file with these settings")
    models: list[ModelSpec] = Field(default_factory=list)
    default_model: str | None = Field(None, description="defaults to the first model")
    device: str = Field("auto", description='"auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...')
    server: ServerSettings = Field(default_factory=ServerSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    fidelity: FidelitySettings = Field(default_factory=FidelitySettings)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not DEVICE_PATTERN.match(device):
            raise ValueError(f'device must be "auto", "cpu", "cuda" or "cuda:<index>", got {device!r}')
        return device

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return models

    @model_validator(mode="after")
    def _check_admission(self) -> ServiceSettings:
        """A request with max_files images must be admissible at all."""
        files = self.limits.max_files
        for name, bound in (
            ("server.max_pending_images", self.server.max_pending_images),
            ("batching.max_queue_size", self.batching.max_queue_size),
        ):
            if files > bound:
                raise ValueError(
                    f"limits.max_files ({files}) is over {name} ({bound}): such a request could never run"
                )
        return self

    @model_validator(mode="after")
    def _check_default(self) -> ServiceSettings:
        if not self.models:
            raise ValueError("no models configured: list at least one under [[models]]")
        if self.default_model is None:
            self.default_model = self.models[0].name
        elif self.default_model not in {m.name for m in self.models}:
            raise ValueError(f"default_model {self.default_model!r} is not among the configured models")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        assert isinstance(init_settings, InitSettingsSource)
        path = init_settings.init_kwargs.get("config_file") or os.environ.get(CONFIG_FILE_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(_file_source(settings_cls, Path(path)))
        return tuple(sources)


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    raise ValueError(f"config file {path} must end in .toml, .yaml or .yml")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServiceSettings:
    """Read settings from ``config_file`` (or ``$TOME_CONFIG_FILE``) and the environment."""
    if config_file is not None:
        overrides["config_file"] = Path(config_file)
    return ServiceSettings(**overrides)
