"""Wilson intervals, the calibration file's round trip and schema check, the weights digest."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from models.calibration import SCHEMA_VERSION, Calibration, Rate, weights_sha256
from tests.calibration.fakes import make_calibration, record


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The textbook formula, only to check scipy's figures against."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(8, 10), (94, 100), (100, 100), (0, 7), (163, 200)])
def test_rate_is_wilson(k: int, n: int) -> None:
    rate = Rate.measure(k, n)
    low, high = _wilson(k, n)
    assert rate.rate == k / n
    assert rate.ci_low == pytest.approx(low, abs=1e-9) and rate.ci_high == pytest.approx(high, abs=1e-9)
    assert 0 <= rate.ci_low <= rate.rate <= rate.ci_high <= 1


def test_rate_rejects_impossible_counts() -> None:
    for k, n in [(3, 2), (-1, 5), (0, 0)]:
        with pytest.raises(ValueError):
            Rate.measure(k, n)


def test_calibration_file_round_trip(tmp_path: Path) -> None:
    cal = make_calibration([record("r0", (0, 0), 1.0, 100), record("s", (3, 1), 1.4, 97)])
    path = tmp_path / "cal.json"
    cal.save(path)
    data = json.loads(path.read_text())
    assert data["schema"] == "tome-serve/calibration" and data["version"] == SCHEMA_VERSION
    assert data["schedules"][1]["agreement"]["ci_low"] == cal.schedules[1].agreement.ci_low
    assert Calibration.load(path) == cal
    assert cal.get("s").r_per_block == (3, 1)
    with pytest.raises(KeyError):
        cal.get("missing")


@pytest.mark.parametrize("change", [{"version": SCHEMA_VERSION + 1}, {"schema": "something/else"}])
def test_calibration_file_refuses_other_schemas(tmp_path: Path, change: dict) -> None:
    data = {**make_calibration([record("r0", (0, 0), 1.0, 100)]).to_json(), **change}
    with pytest.raises(ValueError, match="not a version"):
        Calibration.from_json(data)


def test_weights_sha256(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    payload = bytes(range(256)) * 9000  # more than one read chunk
    path.write_bytes(payload)
    assert weights_sha256(path) == hashlib.sha256(payload).hexdigest()


def test_the_table_marks_every_tier_of_a_schedule() -> None:
    from models.calibration import format_table

    cal = make_calibration([record("r0", (0, 0), 1.0, 100), record("s", (3, 1), 1.4, 97)])
    table = format_table(cal, {"exact": "r0", "balanced": "r0", "fast": "s"})
    assert "<- exact, balanced" in table and "<- fast" in table


def test_a_candidate_list_of_r0_alone_is_refused_in_words() -> None:
    import timm

    from models import tome
    from models.calibration import Candidate, ImageSet, calibrate

    vit = tome.patch(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1))
    images = ImageSet(Path("/nowhere"), ("a.jpg",), None)
    with pytest.raises(ValueError, match="besides r=0"):
        calibrate(
            vit, images, architecture="x", weights_sha256=None, candidates=[Candidate("r0", "constant", (0,))]
        )


@pytest.mark.parametrize(
    "change",
    [
        lambda d: [d],  # JSON, but not an object
        lambda d: {k: v for k, v in d.items() if k != "run"},  # a field missing
        lambda d: {**d, "model": {**d["model"], "added_later": 1}},  # a field this reader does not know
        lambda d: {**d, "schedules": [{**d["schedules"][0], "speedup": 1.0}]},  # a field malformed
    ],
)
def test_a_file_that_is_not_a_calibration_is_a_value_error_naming_it(tmp_path: Path, change) -> None:
    """The service reports a ValueError in one line; these were KeyError / TypeError / AttributeError
    tracebacks at start-up that named no file."""
    data = make_calibration([record("r0", (0, 0), 1.0, 100)]).to_json()
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(change(data)))
    with pytest.raises(ValueError, match=r"odd\.json: (not a version|a tome-serve/calibration file with)"):
        Calibration.load(path)


@pytest.mark.parametrize("content", [None, "[]"])
def test_the_report_command_refuses_a_missing_or_odd_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    """``python -m models.calibration report`` on no file or a file that is no calibration: exit 2 and
    one line (were FileNotFoundError / ValueError tracebacks)."""
    from models.calibration.__main__ import main

    path = tmp_path / "calibration.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["report", str(path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "calibration.json" in err, err
