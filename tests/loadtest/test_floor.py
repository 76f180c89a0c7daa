"""``python -m loadtest.floor``: DCT-scaled decoding, the minimal app, and a short real run."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from loadtest.floor import decode_costs, draft_decode, minimal_app

REPO = Path(__file__).resolve().parents[2]


def _jpeg(width: int = 500, height: int = 375) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_draft_decode_reaches_every_dct_scale_of_an_odd_sized_photo() -> None:
    data = _jpeg()
    sizes = [draft_decode(data, scale).size for scale in (1, 2, 4, 8)]
    assert sizes == [(500, 375), (250, 188), (125, 94), (63, 47)]


def test_decode_costs_cover_each_scale_and_the_services_own_preprocessing() -> None:
    config = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center"}
    costs = decode_costs(_jpeg(), config, repeats=3)
    assert [c.what for c in costs] == [
        "Pillow decode at 1/1",
        "Pillow decode at 1/2",
        "Pillow decode at 1/4",
        "Pillow decode at 1/8",
        "service preprocessing to 32x32",
    ]
    assert costs[-1].size == (125, 94), "the service drafts a 500x375 JPEG to 1/4 for a 32 px model"
    assert all(c.cpu_ms > 0 for c in costs)


def test_the_minimal_app_reads_the_whole_body() -> None:
    with TestClient(minimal_app()) as client:
        response = client.post("/classify", content=b"x" * 100_000, headers={"content-type": "image/jpeg"})
    assert response.status_code == 200
    body = response.json()
    assert body["bytes"] == 100_000 and len(body["predictions"]) == 5


def test_a_short_run_measures_both_parts(tmp_path: Path) -> None:
    if shutil.which("ab") is None:
        pytest.skip("ApacheBench (ab) is not installed: scripts/install-test-deps.sh installs apache2-utils")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_jpeg())
    out = tmp_path / "floor.json"
    cmd = [sys.executable, "-m", "loadtest.floor", "--photo", str(photo), "--duration", "1", "--warmup", "1"]
    cmd += ["--repeats", "5", "--concurrency", "4", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    http = report["http"]
    assert http["requests"] > 0 and http["cpu_ms_per_request"] > 0
    preprocessing = report["decode"][-1]["cpu_ms"]
    assert report["floor_cpu_ms_per_image"] == pytest.approx(preprocessing + http["cpu_ms_per_request"])
    assert "floor = preprocessing + HTTP" in done.stdout
