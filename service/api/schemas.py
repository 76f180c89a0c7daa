"""Response bodies of the HTTP API (they also document it in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. unknown_tier, bad_image, queue_full")
    message: str
    valid: list[str] | None = Field(None, description="valid values, when the error is about a name")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "unknown_tier",
                        "message": "unknown tier 'turbo' for model 'vit-base'",
                        "valid": ["exact", "balanced", "fast", "fastest"],
                    },
                    "request_id": "3aff34bb16bc40cfa4d1b78397e1efe0",
                }
            ]
        }
    )

    error: ErrorDetail
    request_id: str | None = None


class Prediction(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability")


class Timings(BaseModel):
    queue_ms: float = Field(description="time in the batch queue")
    inference_ms: float = Field(description="compute time of the batch the image ran in")
    total_ms: float = Field(description="whole request, from arrival to response")


class ImageResult(BaseModel):
    """One image of a multi-image request: predictions, or the error for that image only."""

    filename: str | None = None
    top_k: list[Prediction] | None = None
    timings: Timings | None = None
    batch_size: int | None = None
    error: ErrorDetail | None = None


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "17141e78454840639f25e5a37e917e68",
                    "model": "vit-base",
                    "tier": "fast",
                    "schedule": "r=13",
                    "r_per_block": [13] * 12,
                    "top_k": [
                        {"label": "tench, Tinca tinca", "index": 0, "score": 0.91},
                        {"label": "goldfish, Carassius auratus", "index": 1, "score": 0.02},
                    ],
                    "timings": {"queue_ms": 3.1, "inference_ms": 41.7, "total_ms": 52.4},
                    "batch_size": 24,
                },
                {
                    "request_id": "3e37eb90b2234aac8646b72409647397",
                    "model": "vit-base",
                    "tier": "fast",
                    "schedule": "r=13",
                    "r_per_block": [13] * 12,
                    "results": [
                        {
                            "filename": "tench.jpg",
                            "top_k": [{"label": "tench, Tinca tinca", "index": 0, "score": 0.91}],
                            "timings": {"queue_ms": 3.0, "inference_ms": 41.7, "total_ms": 60.2},
                            "batch_size": 24,
                        },
                        {
                            "filename": "notes.txt",
                            "error": {
                                "code": "bad_image",
                                "message": "not a supported image (accepted: BMP, GIF, JPEG, PNG, WEBP)",
                            },
                        },
                    ],
                },
            ]
        }
    )

    request_id: str
    model: str
    tier: str
    schedule: str = Field(description="the tier's r schedule, e.g. r=13 or r=16,inflection=-1")
    r_per_block: list[int] = Field(description="tokens merged in each block")
    auto_reason: str | None = Field(
        None,
        description="tier=auto only, why it chose this tier: fits (the most faithful tier meets the "
        "deadline), deadline (a faster tier, to meet it), hold (a more faithful tier fits again, but "
        "without room to spare or before auto.hold_s: the choice does not flap), queue_share (auto's "
        "share of the more faithful tiers' queues was full)",
    )
    top_k: list[Prediction] | None = Field(None, description="single-image requests")
    timings: Timings | None = None
    batch_size: int | None = Field(None, description="images in the batch this one ran in")
    results: list[ImageResult] | None = Field(None, description="multi-image requests, in upload order")


class MeasuredRate(BaseModel):
    """``count`` of ``n`` calibration images, the rate and its two-sided 95% Wilson interval."""

    rate: float
    ci_low: float
    ci_high: float
    count: int
    n: int


class CalibrationInfo(BaseModel):
    """Where and how a model's tiers were calibrated (``tome-serve calibrate``)."""

    file: str | None = None
    device: str | None = None
    dtype: str | None = None
    batch_size: int | None = None
    images: int | None = None
    labels: bool | None = None
    confidence: float | None = None
    created: str | None = None
    ignored: str | None = Field(None, description="why a configured calibration file was not used")


class TierDescription(BaseModel):
    name: str
    schedule: str
    r_per_block: list[int]
    tokens_after_last_block: int
    gflops: float
    speedup_vs_exact: float | None = Field(None, description="measured at warm-up; null before")
    batch_ms: dict[int, float] | None = Field(
        None, description="ms per batch on this device, by batch size, measured at warm-up; null before"
    )
    calibrated: bool = Field(False, description="the model's calibration measured this tier's schedule")
    budget: dict[str, float] | None = Field(
        None, description="the declared budget, for a tier declared by one"
    )
    agreement_with_exact: MeasuredRate | None = Field(
        None, description="calibrated share of images whose top-1 equals r=0's (the tier's promise)"
    )
    top1_accuracy: MeasuredRate | None = Field(
        None, description="calibrated top-1, when the images had labels"
    )
    calibrated_speedup: float | None = Field(
        None, description="median speedup over r=0 measured by the calibration (its device and batch size)"
    )
    calibrated_schedule: str | None = Field(None, description="the calibration's name for this schedule")


class AutoDescription(BaseModel):
    tiers: list[str] = Field(
        description="what tier=auto may choose, most faithful first; the last is its floor"
    )
    latency_objective_ms: float = Field(description="auto's deadline when a request sends no X-Deadline-Ms")
    max_queue_share: float = Field(
        description="share of each tier's queue (and of a front-end's slots) auto may fill"
    )


class ModelTiers(BaseModel):
    calibration: CalibrationInfo | None = Field(None, description="null: uncalibrated (no file configured)")
    default_tier: str
    raw_r_allowed: bool
    raw_r_max: int
    tiers: list[TierDescription]
    auto: AutoDescription | None = Field(None, description="tier=auto; null where the model has none")


class ModelDescription(BaseModel):
    name: str
    architecture: str
    weights_source: str
    random_weights: bool
    device: str
    dtype: str
    num_classes: int
    input_size: list[int]
    default: bool
