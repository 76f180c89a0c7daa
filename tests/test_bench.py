"""The benchmark CLI runs end to end and reports consistent figures."""

from __future__ import annotations

import json

import pytest

from models import bench


def test_parse_schedule_forms() -> None:
    assert bench.parse_schedule("13") == 13
    assert bench.parse_schedule("16:-1") == (16, -1.0)
    assert bench.parse_schedule("4/4/2") == [4, 4, 2]
    # the calibration's candidate names (``r16:-1``, ``r8``, ``r4/4/2``) name the same schedules
    assert bench.parse_schedule("r16:-1") == (16, -1.0)
    assert bench.parse_schedule("r8") == 8
    assert bench.parse_schedule("r4/4/2") == [4, 4, 2]


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(
        [
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "64",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--schedules",
            "0,2,3:-1",
            "--warmup",
            "1",
            "--runs",
            "2",
            "--json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert [(row["variant"], row["r"]) for row in rows] == [
        ("timm", "-"),
        ("tome", "0"),
        ("tome", "2"),
        ("tome", "(3, -1.0)"),
    ]
    stock = rows[0]
    assert stock["speedup"] == 1.0 and stock["flop_reduction"] == 1.0
    for row in rows[1:]:
        assert row["images_per_s"] > 0
        assert row["speedup"] == pytest.approx(stock["median_batch_s"] / row["median_batch_s"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["flop_reduction"])
    assert rows[2]["gflops"] < rows[1]["gflops"] and rows[2]["tokens_final"] < rows[1]["tokens_final"]


def test_bench_table(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(
        [
            "--model",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--batch-size",
            "1",
            "--device",
            "cpu",
            "--schedules",
            "1",
            "--warmup",
            "0",
            "--runs",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "speedup" in out and "FLOP red." in out and out.count("\n") >= 4
