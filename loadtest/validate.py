"""Checks that a /classify 200 response is what was asked for (a wrong shape is a load-test failure)."""

from __future__ import annotations

from typing import Any


def _check_predictions(preds: Any, top_k: int, where: str) -> str | None:
    if not isinstance(preds, list) or len(preds) != top_k:
        return f"{where}: expected {top_k} predictions, got {preds!r:.80}"
    for p in preds:
        if not (
            isinstance(p, dict)
            and isinstance(p.get("label"), str)
            and isinstance(p.get("index"), int)
            and isinstance(p.get("score"), int | float)
            and 0.0 <= p["score"] <= 1.0
        ):
            return f"{where}: malformed prediction {p!r:.80}"
    return None


def check_classify_response(body: Any, tier: str, n_images: int, top_k: int) -> str | None:
    """None when ``body`` answers a request for ``n_images`` images at ``tier``, else what is wrong."""
    if not isinstance(body, dict):
        return f"response is not a JSON object: {body!r:.80}"
    if tier == "auto":  # the response names the tier auto chose, and why
        if not isinstance(body.get("tier"), str) or not isinstance(body.get("auto_reason"), str):
            return f"tier=auto answered without the chosen tier and its reason: {body!r:.80}"
    elif body.get("tier") != tier:
        return f"asked for tier {tier!r}, response says {body.get('tier')!r}"
    if not isinstance(body.get("request_id"), str):
        return "response has no request_id"
    if n_images == 1:
        if not isinstance(body.get("batch_size"), int) or body["batch_size"] < 1:
            return f"bad batch_size {body.get('batch_size')!r}"
        return _check_predictions(body.get("top_k"), top_k, "top_k")
    results = body.get("results")
    if not isinstance(results, list) or len(results) != n_images:
        return f"expected {n_images} results, got {results!r:.80}"
    for i, result in enumerate(results):
        if not isinstance(result, dict):
            return f"results[{i}] is not an object"
        if result.get("error") is not None:
            return f"results[{i}] failed: {result['error']!r:.120}"
        problem = _check_predictions(result.get("top_k"), top_k, f"results[{i}].top_k")
        if problem:
            return problem
    return None
