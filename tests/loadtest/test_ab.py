"""ApacheBench's report, read back: lines absent when zero count as zero, length "failures" are not."""

from __future__ import annotations

from pathlib import Path

from loadtest import ab

REPORT = """\
Concurrency Level:      32
Time taken for tests:   3.042 seconds
Complete requests:      656
Failed requests:        7
   (Connect: 1, Receive: 2, Length: 599, Exceptions: 4)
Non-2xx responses:      5
Keep-Alive requests:    0
Requests per second:    215.62 [#/sec] (mean)

Percentage of the requests served within a certain time (ms)
  50%    126
  99%    486
 100%    505 (longest request)
"""

CLEAN = """\
Time taken for tests:   2.001 seconds
Complete requests:      1200
Failed requests:        0
Keep-Alive requests:    1200
Requests per second:    599.70 [#/sec] (mean)
"""


def test_report_with_failures_and_non_2xx() -> None:
    r = ab.parse_output(REPORT, cpu_s=0.5, wall_s=3.1)
    assert (r.complete, r.failed, r.non_2xx, r.keepalive) == (656, 7, 5, 0)
    assert r.ok == 656 - 7 - 5
    assert r.seconds == 3.042 and r.rps == 215.62
    assert r.percentiles_ms == {50: 126.0, 99: 486.0, 100: 505.0}
    assert r.cpu_s == 0.5


def test_clean_report() -> None:
    r = ab.parse_output(CLEAN)
    assert (r.complete, r.failed, r.non_2xx, r.keepalive, r.ok) == (1200, 0, 0, 1200, 1200)


def test_command_lifts_the_50000_request_cap() -> None:
    cmd = ab.command("ab", "http://h:1/classify", Path("p.jpg"), "image/jpeg", 32, 10)
    assert cmd[:5] == ["ab", "-k", "-l", "-r", "-q"]
    assert cmd[cmd.index("-t") + 1] == "10" and int(cmd[cmd.index("-n") + 1]) >= 500_000
    assert cmd.index("-n") > cmd.index("-t"), "-t resets -n, so -n must come after it"
    assert cmd[-1] == "http://h:1/classify"
