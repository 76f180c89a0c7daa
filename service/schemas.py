"""Response bodies of the HTTP API (they also document it in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. unknown_tier, bad_image, queue_full")
    message: str
    valid: list[str] | None = Field(None, description="valid values, when the error is about a name")


class ErrorResponse(BaseModel):
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
    request_id: str
    model: str
    tier: str
    schedule: str = Field(description="the tier's r schedule, e.g. r=13 or r=16,inflection=-1")
    r_per_block: list[int] = Field(description="tokens merged in each block")
    top_k: list[Prediction] | None = Field(None, description="single-image requests")
    timings: Timings | None = None
    batch_size: int | None = Field(None, description="images in the batch this one ran in")
    results: list[ImageResult] | None = Field(None, description="multi-image requests, in upload order")


class TierDescription(BaseModel):
    name: str
    schedule: str
    r_per_block: list[int]
    tokens_after_last_block: int
    gflops: float
    speedup_vs_exact: float | None = Field(None, description="measured at warm-up; null before")


class ModelTiers(BaseModel):
    default_tier: str
    raw_r_allowed: bool
    raw_r_max: int
    tiers: list[TierDescription]


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
