"""``python -m loadtest.service_bench`` end to end, in miniature: two real servers, interleaved rounds,
JSON out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.shared_data import sample_folder

REPO = Path(__file__).resolve().parents[2]


def test_service_bench_runs_rounds_against_batched_and_batch1_servers(tmp_path: Path) -> None:
    images = sample_folder(tmp_path / "images", 6)
    out = tmp_path / "bench.json"
    cmd = [
        *(sys.executable, "-m", "loadtest.service_bench"),
        *("--model", "vit_tiny_patch16_224", "--device", "cpu"),
        *("--tiers", "fast", "--rounds", "2", "--duration", "1.5", "--warmup", "0.5"),
        *("--bare-seconds", "0.3"),
        *("--max-batch-size", "4", "--concurrency", "8", "--compare-batch1"),
        *("--images", str(images), "--json", str(out)),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "service/bare" in result.stdout and "batching gain" in result.stdout, result.stdout

    (tier,) = json.loads(out.read_text())["tiers"]
    assert tier["tier"] == "fast" and len(tier["rounds"]) == 2
    for r in tier["rounds"]:
        assert r["bare"] > 0 and r["bare_cpu_ms"] > 0
        batched, single = r["loads"]["4"], r["loads"]["1"]
        for load in (batched, single):
            assert load["requests"] > 0 and load["errors"] == 0 and load["throughput"] > 0
            assert load["client_cpu_s"] > 0 and load["server_cpu_s"] > 0
        assert single["mean_batch"] == 1.0
        assert batched["mean_batch"] > 1.0  # 8 clients against max_batch_size 4: real batches formed
