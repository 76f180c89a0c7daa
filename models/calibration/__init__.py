"""Measure what each ToMe schedule costs in agreement and accuracy, and what it buys in speed.

``calibrate`` runs candidate schedules (constant r, the paper's inflected ones, and per-block schedules
found by ``greedy_search``) on real images in the serving device, dtype, batch size and preprocessing,
and returns a ``Calibration`` (saved as versioned JSON). ``resolve`` picks a schedule for a budget;
``format_table`` and ``plot`` show the result. Nothing here imports ``service``.
"""

from .calibrate import calibrate
from .candidates import Candidate, constant, dedupe, default_candidates, inflected, unprotected_tokens
from .compare import SearchComparison, compare_search, format_comparison
from .defaults import Budget, default_budgets, default_tier_schedules, resolve_tiers
from .images import ImageSet, Preprocess, TimmEvalPreprocess, imagenet_class_index, parse_label
from .loading import load_patched
from .record import (
    SCHEMA_VERSION,
    Calibration,
    ImageInfo,
    ModelInfo,
    RunInfo,
    ScheduleRecord,
    Speedup,
    preprocessing_of,
    weights_sha256,
)
from .report import format_table, pareto_front, plot
from .resolve import BudgetError, agreement_loss_bound, resolve
from .search import SearchConfig, SearchStep, greedy_search
from .stats import Rate

__all__ = [
    "SCHEMA_VERSION",
    "Budget",
    "BudgetError",
    "Calibration",
    "Candidate",
    "ImageInfo",
    "ImageSet",
    "ModelInfo",
    "Preprocess",
    "Rate",
    "RunInfo",
    "ScheduleRecord",
    "SearchComparison",
    "SearchConfig",
    "SearchStep",
    "Speedup",
    "TimmEvalPreprocess",
    "agreement_loss_bound",
    "calibrate",
    "compare_search",
    "constant",
    "dedupe",
    "default_budgets",
    "default_candidates",
    "default_tier_schedules",
    "format_comparison",
    "format_table",
    "greedy_search",
    "imagenet_class_index",
    "inflected",
    "load_patched",
    "pareto_front",
    "parse_label",
    "plot",
    "preprocessing_of",
    "resolve",
    "resolve_tiers",
    "unprotected_tokens",
    "weights_sha256",
]
