"""HealthMonitor: counters, rates, latency percentiles, CPU share and RSS from /proc, probation statistics."""

from __future__ import annotations

import time

from edgecv.agent.contract.topics import HEALTH_KEYS
from edgecv.agent.system.health import FrameCounters, HealthMonitor, percentile, read_cpu_seconds, read_rss_mb


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _classified(counts: FrameCounters, latency_ms: dict[str, float], published: bool) -> None:
    """What Agent.process records for a classified frame (it does this inline)."""
    counts.frames += 1
    counts.inferred += 1
    counts.published += published
    counts.total_ms.append(latency_ms["total"])
    counts.infer_ms.append(latency_ms["infer"])


def test_payload_has_the_documented_keys_and_counts() -> None:
    clock = FakeClock()
    mon = HealthMonitor("pi-1", clock=clock, thermal=False)
    cam0, cam1 = mon.counters(), mon.counters()  # two camera loops: the payload sums them
    for i in range(100):
        counts = cam0 if i < 50 else cam1
        if i % 10 == 0:
            counts.skip("motion")
            continue
        _classified(counts, {"pre": 0.1, "infer": float(i), "post": 0.1, "total": float(i) + 1}, published=i % 3 > 0)
    cam1.error()
    clock.t += 10.0
    doc = mon.payload(dropped=7, queue_depth=3)
    assert set(doc) >= HEALTH_KEYS
    # every frame counted once: 10 skipped + 90 inferred (60 of them published) + 1 that raised
    assert (doc["frames"], doc["inferred"], doc["skipped"], doc["published"]) == (101, 90, 10, 60)
    assert doc["skipped_by"] == {"motion": 10, "stale": 0}
    assert (doc["dropped"], doc["queue_depth"], doc["errors"]) == (7, 3, 1)
    assert doc["fps"] == 9.0 and doc["uptime_s"] == 10.0
    assert 45 <= doc["latency_ms"]["p50"] <= 56 and 90 <= doc["latency_ms"]["p95"] <= 100
    # the next report covers only the new interval
    clock.t += 5.0
    doc2 = mon.payload(dropped=7, queue_depth=0)
    assert doc2["fps"] == 0.0 and doc2["latency_ms"]["p50"] is None and doc2["inferred"] == 90


def test_cpu_percent_reflects_work_done_between_reports() -> None:
    mon = HealthMonitor("pi-1", thermal=False)
    mon.payload(dropped=0, queue_depth=0)
    cpu0, wall0 = time.process_time(), time.monotonic()
    while time.monotonic() - wall0 < 0.6:
        sum(range(1000))
    busy = mon.payload(dropped=0, queue_depth=0)["cpu_percent"]
    expected = 100 * (time.process_time() - cpu0) / (time.monotonic() - wall0)
    # Same quantity measured independently (the machine may be loaded, so the absolute share varies).
    assert busy is not None and expected > 10 and abs(busy - expected) < 10, (busy, expected)
    time.sleep(0.5)
    idle = mon.payload(dropped=0, queue_depth=0)["cpu_percent"]
    assert idle is not None and idle < busy


def test_proc_readers_and_rss() -> None:
    cpu = read_cpu_seconds()
    rss = read_rss_mb()
    assert cpu is not None and cpu > 0
    assert rss is not None and 5 < rss < 4096
    grow = bytearray(64 * 1024 * 1024)
    grow[::4096] = b"x" * len(grow[::4096])  # touch every page so it is resident
    after = read_rss_mb()
    assert after is not None and after - rss > 50
    del grow


def test_inference_window_and_its_reset_on_a_model_swap() -> None:
    mon = HealthMonitor("pi-1", thermal=False, probation_window=5)
    counts = mon.counters()
    assert mon.payload(dropped=0, queue_depth=0)["latency_ms"]["infer_p50"] is None
    for ms in (1, 2, 3, 100, 100, 100, 100):
        _classified(counts, {"pre": 0, "infer": ms, "post": 0, "total": ms}, published=True)
    assert mon.payload(dropped=0, queue_depth=0)["latency_ms"]["infer_p50"] == 100  # only the newest 5
    mon.reset_infer_window()
    assert mon.payload(dropped=0, queue_depth=0)["latency_ms"]["infer_p50"] is None
    counts.error()
    mon.counters().error()
    assert mon.errors == 2


def test_thermal_readings_are_added_when_the_machine_has_them() -> None:
    from edgecv.agent.system import thermal

    doc = HealthMonitor("pi-1").payload(dropped=0, queue_depth=0)
    temp = thermal.read_soc_temperature()
    assert ("soc_temp_c" in doc) == (temp is not None)
    if temp is not None:
        assert -40 < doc["soc_temp_c"] < 130


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(list(range(101)), 95) == 95
