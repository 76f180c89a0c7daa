"""``settle_heap`` (called by the engine and every front-end once built) takes start-up's objects out of
the collector's scans and lets the young generation grow, yet cyclic garbage made later is still found,
by hand and by the collector on its own. Run in a fresh interpreter: freezing the test process's heap
would change every other test's collector."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import gc, json
from service.lifecycle.process import settle_heap

start_up = [[i] for i in range(5000)]  # long-lived state built before serving
before = len(gc.get_objects())
frozen = settle_heap(1000)
after = len(gc.get_objects())
threshold = gc.get_threshold()[0]

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a

cycle()
by_hand = gc.collect()

automatic = []
gc.callbacks.append(lambda phase, info: phase == "stop" and automatic.append(info["collected"]))
for _ in range(3000):  # 6000 objects of cyclic garbage: past the young threshold of 1000
    cycle()
gc.callbacks.clear()
print(json.dumps({
    "before": before, "frozen": frozen, "after": after, "threshold": threshold,
    "by_hand": by_hand, "automatic": automatic, "kept": len(start_up),
}))
"""


def test_settle_heap_freezes_start_up_and_still_collects_later_cycles() -> None:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True, check=True, timeout=60
    )
    r = json.loads(out.stdout)
    assert r["frozen"] >= 5000  # start-up's lists (and the interpreter's own objects) are frozen
    assert r["after"] <= r["before"] - 5000  # and no longer in any generation the collector scans
    assert r["threshold"] == 1000
    assert r["by_hand"] >= 2  # a cycle made after settling is collected
    assert len(r["automatic"]) >= 2 and sum(r["automatic"]) >= 4000  # and the collector runs on its own
    assert r["kept"] == 5000
