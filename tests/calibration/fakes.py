"""Made-up calibration figures, for tests of the logic that reads them (never of measurements)."""

from __future__ import annotations

from models.calibration import Calibration, ImageInfo, ModelInfo, Rate, RunInfo, ScheduleRecord, Speedup


def record(name: str, r: tuple[int, ...], speed: float, agree: int, n: int = 100) -> ScheduleRecord:
    kind = "constant" if len(set(r)) == 1 else "searched"
    return ScheduleRecord(
        name=name,
        kind=kind,
        r_per_block=r,
        gflops=1.0 / speed,
        tokens_final=10,
        speedup=Speedup(speed, speed * 0.95, speed * 1.05),
        images_per_s=100.0 * speed,
        agreement=Rate.measure(agree, n),
        accuracy=Rate.measure(agree - 5, n) if agree >= 5 else None,
    )


def make_calibration(records: list[ScheduleRecord]) -> Calibration:
    """A calibration file's worth of figures, made up (for logic tests only)."""
    return Calibration(
        model=ModelInfo("vit_x", "ab" * 32, (3, 224, 224), 1000, True, True, 2, 197, 1),
        run=RunInfo(
            "cpu", "a cpu", "float32", 16, 2, "2.x", "1.x", 5, 0.95, "wilson", "2025-01-01T00:00:00+00:00"
        ),
        images=ImageInfo("/photos", 100, True, "cd" * 32, 0, 100, "ef" * 32),
        schedules=tuple(records),
        notes={"search": {"path": [{"r_per_block": [1, 2], "gflops": 0.5, "kl": 0.1, "agreement": 0.9}]}},
    )
