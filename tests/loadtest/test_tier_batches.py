"""``loadtest.tier_batches``: per tier and bucket, the engine's batch time (on CPU here: eager, no graphs)."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.tier_batches import main


def test_every_tier_is_timed_at_every_bucket_against_exact(tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiers.json"
    args = ["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"img_size": 32, "depth": 2}']
    assert main([*args, "--device", "cpu", "--max-batch-size", "4", "--rounds", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["cuda_graphs"] == 0 and report["dtype"] == "float32"
    assert set(report["tiers"]) == {"exact", "balanced", "fast", "fastest"}
    for tier in report["tiers"].values():
        assert set(tier["ms_per_batch"]) == {"1", "2", "4"}  # the buckets, as JSON keys
        assert all(ms > 0 for ms in tier["ms_per_batch"].values())
    assert report["tiers"]["exact"]["speedup_vs_exact"] == {"1": 1.0, "2": 1.0, "4": 1.0}
    assert report["tiers"]["fastest"]["gflops"] < report["tiers"]["exact"]["gflops"]
    assert "exact" in capsys.readouterr().out
