"""Sample collection on the device: the bounded store, the rules that decide what is kept, the `[samples]` config
and the sample commands (agent/samples/, agent/contract/samples.py, agent/commands.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgecv.agent.commands import CommandHandler
from edgecv.agent.config import parse_config
from edgecv.agent.contract import samples as S
from edgecv.agent.contract import topics as T
from edgecv.agent.contract.commands import parse_request
from edgecv.agent.errors import ConfigError, SampleRequestError, SampleStoreError
from edgecv.agent.link.memory import MemoryLink
from edgecv.agent.samples.collector import PendingSample, SampleCollector
from edgecv.agent.samples.store import SampleStore

META = {"predicted": "open", "score": 0.4, "camera": "garage", "region": "door", "ts": 1.5, "reason": "pending",
        "device": "pi-1", "model": {"name": "m", "version": "1", "sha": "ab" * 32}, "truth": 1}


def store_at(path: Path, max_bytes: int = 1 << 20, device: str = "pi-1") -> SampleStore:
    return SampleStore(path, max_bytes=max_bytes, device_id=device).open()


# ------------------------------------------------------------------------------------------------- store
def test_a_sample_is_an_image_and_its_metadata_written_atomically(tmp_path: Path) -> None:
    store = store_at(tmp_path / "s")
    image = b"\xff\xd8" + bytes(range(256)) * 10
    sample = store.add(image, META, ts=1764497700.0)
    assert sample.id == "pi-1-20251130T101500-000001"
    assert (tmp_path / "s" / f"{sample.id}.jpg").read_bytes() == image
    meta = json.loads((tmp_path / "s" / f"{sample.id}.json").read_text())
    assert meta["sha256"] == hashlib.sha256(image).hexdigest() and meta["bytes"] == len(image)
    assert meta["predicted"] == "open" and meta["truth"] == 1
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]  # no temporaries left
    assert store.stats()["stored"] == 1 and store.stats()["by_reason"]["pending"] == 1


def test_the_cap_evicts_the_oldest_first(tmp_path: Path) -> None:
    store = store_at(tmp_path, max_bytes=5000)
    ids = [store.add(bytes([i]) * 1000, META).id for i in range(8)]
    stats = store.stats()
    assert stats["bytes"] <= 5000 and stats["evicted"] == 8 - stats["stored"] and stats["evicted"] >= 4
    kept = [s.id for s in store.page(None, 200, S.PAGE_BUDGET_BYTES)[0]]
    assert kept == ids[-len(kept):]  # the newest survive
    assert sorted(p.stem for p in tmp_path.glob("*.jpg")) == kept


def test_restart_drops_leftovers_rebuilds_the_index_and_continues_the_sequence(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    a = store.add(b"a" * 100, META)
    b = store.add(b"b" * 100, META)
    c = store.add(b"c" * 100, META)
    (tmp_path / f".{a.id}.jpg.tmp").write_bytes(b"half")  # an interrupted write
    (tmp_path / "pi-1-20250101T000000-000099.jpg").write_bytes(b"orphan")  # image without metadata
    (tmp_path / "pi-1-20250101T000000-000098.json").write_text("{}")  # metadata without image
    (tmp_path / f"{b.id}.json").write_text("{not json")  # corrupt metadata
    (tmp_path / f"{c.id}.jpg").write_bytes(b"c" * 99)  # the image does not match its metadata
    (tmp_path / "notes.txt").write_text("not ours")
    again = store_at(tmp_path)
    assert [s.id for s in again.page(None, 10, S.PAGE_BUDGET_BYTES)[0]] == [a.id]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{a.id}.jpg", f"{a.id}.json", "notes.txt"])
    assert again.removed_at_start == 7
    d = again.add(b"d" * 10, META)
    assert d.id.endswith("-000100")  # the sequence continues after the highest one on disk (even a dropped one)
    assert again.stats()["bytes"] == a.disk_bytes + d.disk_bytes


def test_the_scan_also_evicts_down_to_a_smaller_cap(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    for i in range(5):
        store.add(bytes([i]) * 1000, META)
    smaller = store_at(tmp_path, max_bytes=2500)
    assert smaller.stats()["stored"] == 1 and smaller.stats()["bytes"] <= 2500


def test_device_ids_that_are_no_sample_id_start_are_made_one(tmp_path: Path) -> None:
    store = store_at(tmp_path, device="_a..b")
    sample_id = store.add(b"x", META).id
    assert S.is_sample_id(sample_id) and sample_id.startswith("a.b-")


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "a\x00b", ".hidden", "x" * 129, "", "a..b", 5, None, True,
                                 "-rf", "a\\b", "ü"])
def test_hostile_ids_never_reach_the_file_system(tmp_path: Path, bad: Any) -> None:
    store = store_at(tmp_path / "s")
    (tmp_path / "secret.jpg").write_bytes(b"secret")
    with pytest.raises(SampleRequestError):
        store.get(bad)
    with pytest.raises(SampleRequestError):
        store.delete([bad])
    assert (tmp_path / "secret.jpg").exists()


def test_reading_chunks_and_deleting(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    image = bytes(range(256)) * 4
    sample = store.add(image, META)
    assert store.read(sample.id, 0, 100)[1] == image[:100]
    assert store.read(sample.id, 1000, 100)[1] == image[1000:]
    assert store.read(sample.id, len(image), 100)[1] == b""
    with pytest.raises(SampleStoreError, match="beyond the end"):
        store.read(sample.id, len(image) + 1, 10)
    assert store.delete([sample.id, "pi-1-20250101T000000-000007"]) == (1, ["pi-1-20250101T000000-000007"])
    with pytest.raises(SampleStoreError, match="No sample"):
        store.read(sample.id, 0, 10)
    assert not list(tmp_path.glob("*.jpg"))


def test_pages_follow_id_order_and_stop_within_the_budget(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    ids = [store.add(b"x" * 10, META).id for _ in range(7)]
    first, more = store.page(None, 3, S.PAGE_BUDGET_BYTES)
    assert [s.id for s in first] == ids[:3] and more
    rest, more = store.page(first[-1].id, 200, S.PAGE_BUDGET_BYTES)
    assert [s.id for s in rest] == ids[3:] and not more
    small, more = store.page(None, 200, 600)  # each listing is ~300 bytes of JSON
    assert 1 <= len(small) < 7 and more


# ---------------------------------------------------------------------------------------------- collector
def fake_clf(labels: tuple[str, ...] = ("closed", "open")) -> Any:
    return SimpleNamespace(name="door", version="1.0", labels=labels,
                           bundle=SimpleNamespace(manifest_sha256="cd" * 32))


def collector(tmp_path: Path, **cfg: Any) -> SampleCollector:
    config = parse_config({"device_id": "pi-1", "samples": {"enabled": True, "min_interval_s": 0.0, **cfg}})
    return SampleCollector(config.samples, store_at(tmp_path), "pi-1")


def top(score: float, label: str = "open") -> list[dict[str, Any]]:
    return [{"label": label, "score": score, "index": 1}]


def test_the_rules_in_order_of_precedence(tmp_path: Path) -> None:
    c = collector(tmp_path, every_s=10.0)
    assert c.reason("cam", top(0.9), 100.0, state_change=True, pending=True) == "state_change"
    assert c.reason("cam", top(0.3), 100.0, pending=True) == "pending"
    assert c.reason("cam", top(0.3), 100.0) == "low_confidence"
    assert c.reason("cam", top(0.9), 105.0) is None  # confident, and a sample was kept 5 s ago
    assert c.reason("cam", top(0.9), 110.5) == "periodic"
    assert c.reason("other", top(0.9), 110.5) == "periodic"  # per camera/region
    off = collector(tmp_path / "off", low_confidence=0.0, state_changes=False, pending=False)
    assert off.reason("cam", top(0.01), 1.0, state_change=True, pending=True) is None


def test_min_interval_limits_each_reason_of_each_region(tmp_path: Path) -> None:
    c = collector(tmp_path, min_interval_s=2.0)
    assert c.reason("cam/door", top(0.3), 10.0) == "low_confidence"
    assert c.reason("cam/door", top(0.3), 11.0) is None  # a flickering scene: limited
    assert c.reason("cam/door", top(0.9), 11.0, pending=True) == "pending"  # another reason is not hidden by it
    assert c.reason("cam/door", top(0.9), 11.2, state_change=True) == "state_change"
    assert c.reason("cam/gate", top(0.3), 11.0) == "low_confidence"
    assert c.reason("cam/door", top(0.3), 12.0) == "low_confidence"
    assert c.limited == 1


def test_offer_queues_a_copy_with_the_sidecar_fields_and_the_writer_stores_it(tmp_path: Path) -> None:
    c = collector(tmp_path)
    frame = np.full((48, 64, 3), 200, np.uint8)
    crop = frame[10:30, 20:40]
    assert c.offer(camera="garage", region="door", crop=crop, frame=frame, top=top(0.42), clf=fake_clf(),
                   frame_ts=1764497700.25, truth=1) == "low_confidence"
    frame[:] = 0  # the camera reuses its buffer: the queued copy must not change
    c.start()
    c.stop()
    [sample] = c.store.page(None, 10, S.PAGE_BUDGET_BYTES)[0]
    assert sample.meta == {"predicted": "open", "score": 0.42, "camera": "garage", "region": "door",
                           "ts": 1764497700.25, "reason": "low_confidence", "device": "pi-1", "truth": 1,
                           "model": {"name": "door", "version": "1.0", "sha": "cd" * 32, "labels": ["closed", "open"]}}
    import cv2

    image = cv2.imdecode(np.frombuffer(c.store.read(sample.id, 0, 1 << 20)[1], np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (20, 20, 3) and image.mean() > 150  # the crop, taken before the buffer changed
    assert c.health()["stored"] == 1 and c.health()["dropped"] == 0


def test_frame_mode_keeps_the_whole_frame_and_long_label_lists_stay_home(tmp_path: Path) -> None:
    c = collector(tmp_path, what="frame")
    frame = np.zeros((48, 64, 3), np.uint8)
    many = tuple(f"class-{i:05d}-" + "x" * 40 for i in range(1000))
    c.offer(camera="cam", region="r", crop=frame[:8, :8], frame=frame, top=top(0.1), clf=fake_clf(many),
            frame_ts=1.0, truth=None)
    item = c._queue.get_nowait()
    assert item is not None and item.image.shape == (48, 64, 3) and "labels" not in item.meta["model"]


def test_a_full_queue_drops_and_never_blocks_the_camera_loop(tmp_path: Path) -> None:
    c = collector(tmp_path, queue=2)  # the writer is not started: nothing drains the queue
    frame = np.zeros((8, 8, 3), np.uint8)
    done = threading.Event()

    def loop() -> None:
        for i in range(10):
            c.offer(camera=f"cam{i}", region=None, crop=None, frame=frame, top=top(0.1), clf=fake_clf(),
                    frame_ts=1.0, truth=None)
        done.set()

    threading.Thread(target=loop, daemon=True).start()
    assert done.wait(30), "offer() blocked on a full queue"
    assert c.dropped == 8 and c.health()["queued"] == 2


def test_a_failing_write_is_counted_and_the_writer_goes_on(tmp_path: Path) -> None:
    c = collector(tmp_path)
    c.write(PendingSample(np.zeros((0, 0, 3), np.uint8), dict(META), 1.0))  # cannot be encoded
    c.write(PendingSample(np.zeros((8, 8, 3), np.uint8), dict(META), 1.0))
    assert c.errors == 1 and c.store.stats()["stored"] == 1


# ------------------------------------------------------------------------------------------------- config
def test_samples_config_defaults_and_errors(tmp_path: Path) -> None:
    cfg = parse_config({"device_id": "d", "model": {"store": str(tmp_path / "models")}})
    assert cfg.samples.enabled is False and cfg.samples.what == "crop" and cfg.samples.max_mb == 200.0
    assert cfg.samples_dir() == tmp_path / "samples"
    with pytest.raises(ConfigError) as err:
        parse_config({"device_id": "d", "samples": {"enabled": "yes", "what": "frames", "max_mb": 0,
                                                      "low_confidence": 1.5, "jpeg_qualty": 90}})
    text = str(err.value)
    for needle in ("samples.enabled: expected true or false", "samples.what: expected one of 'crop' or 'frame'",
                   "did you mean 'frame'", "samples.max_mb", "samples.low_confidence", "samples.jpeg_qualty: unknown "
                   "key; did you mean 'jpeg_quality'"):
        assert needle in text, text


# ------------------------------------------------------------------------------------------------ commands
class Device:
    classifier = None
    last_frame = None
    last_top = None


def handler(tmp_path: Path, store: SampleStore | None) -> tuple[CommandHandler, MemoryLink]:
    link = MemoryLink()
    return CommandHandler("pi-1", T.DeviceTopics("edgecv", "pi-1"), link, Device(), samples=store), link


def run(h: CommandHandler, link: MemoryLink, name: str, body: dict[str, Any] | bytes) -> dict[str, Any]:
    payload = body if isinstance(body, bytes) else json.dumps({"id": "r", **body}).encode()
    before = len(link.published)
    request = parse_request(name, payload)
    h._execute(request.name, request.body)
    [result] = link.published[before:]
    assert result.topic == f"edgecv/pi-1/cmd/{name}/result"
    return json.loads(result.payload)  # type: ignore[no-any-return]


def test_list_fetch_and_delete_through_the_commands(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    images = [bytes([i]) * (60_000 + i) for i in range(3)]
    ids = [store.add(image, META).id for image in images]
    h, link = handler(tmp_path, store)
    page = run(h, link, "samples", {"after": None, "limit": 2})
    assert page["ok"] and page["more"] and [s["id"] for s in page["samples"]] == ids[:2]
    assert page["samples"][0]["sha256"] == hashlib.sha256(images[0]).hexdigest()
    assert page["samples"][0]["bytes"] == 60_000
    rest = run(h, link, "samples", {"after": ids[1], "limit": 10_000})  # a huge limit is lowered to the cap
    assert [s["id"] for s in rest["samples"]] == ids[2:] and rest["more"] is False
    got, offset = b"", 0
    while offset < len(images[1]):
        chunk = run(h, link, "sample", {"sample": ids[1], "offset": offset, "length": 10 << 20})
        data = base64.b64decode(chunk["data"])
        assert len(data) <= S.MAX_CHUNK and chunk["bytes"] == len(images[1])  # capped, whatever was asked
        got += data
        offset += len(data)
    assert got == images[1]
    deleted = run(h, link, "samples.delete", {"samples": [ids[0], ids[0]]})
    assert deleted["deleted"] == 1 and deleted["missing"] == [ids[0]]
    missing = run(h, link, "sample", {"sample": ids[0]})
    assert not missing["ok"] and "No sample" in missing["error"]


@pytest.mark.parametrize(("name", "body", "needle"), [
    ("sample", {"sample": ".."}, "'sample' must be a sample id"),
    ("sample", {"sample": "../x"}, "'sample' must be a sample id"),
    ("sample", {"sample": "a/b"}, "'sample' must be a sample id"),
    ("sample", {"sample": "a\x00b"}, "'sample' must be a sample id"),
    ("sample", {"sample": "x" * 1000}, "'sample' must be a sample id"),
    ("sample", {"sample": ["a"]}, "'sample' must be a sample id"),
    ("sample", {}, "'sample' must be a sample id"),
    ("sample", {"sample": "a", "offset": -1}, "'offset' must be an integer"),
    ("sample", {"sample": "a", "offset": 1 << 40}, "'offset' must be an integer"),
    ("sample", {"sample": "a", "offset": True}, "'offset' must be an integer"),
    ("sample", {"sample": "a", "offset": 1.5}, "'offset' must be an integer"),
    ("sample", {"sample": "a", "length": 0}, "'length' must be an integer"),
    ("sample", {"sample": "a", "length": "all"}, "'length' must be an integer"),
    ("samples", {"after": "../../etc"}, "'after' must be a sample id"),
    ("samples", {"after": 7}, "'after' must be a sample id"),
    ("samples", {"limit": 0}, "'limit' must be an integer"),
    ("samples", {"limit": False}, "'limit' must be an integer"),
    ("samples.delete", {"samples": []}, "'samples' must be a list"),
    ("samples.delete", {"samples": "a"}, "'samples' must be a list"),
    ("samples.delete", {"samples": ["a"] * 201}, "'samples' must be a list"),
    ("samples.delete", {"samples": ["ok", "../x"]}, "'samples'[1] must be a sample id"),
])
def test_hostile_requests_get_one_clear_error(tmp_path: Path, name: str, body: dict[str, Any], needle: str) -> None:
    store = store_at(tmp_path / "s")
    store.add(b"keep", META)
    h, link = handler(tmp_path, store)
    doc = run(h, link, name, body)
    assert doc["ok"] is False and needle in doc["error"], doc
    assert store.stats()["stored"] == 1


def test_the_commands_say_when_collection_is_off(tmp_path: Path) -> None:
    h, link = handler(tmp_path, None)
    doc = run(h, link, "samples", {})
    assert doc["ok"] is False and "Sample collection is off" in doc["error"]
    assert {"samples", "sample", "samples.delete"} <= set(T.COMMANDS)


# --------------------------------------------------------------------------------------------- retention
def test_samples_older_than_the_age_limit_are_deleted_at_start_on_write_and_when_idle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`samples.max_age_h`: a device forgets camera frames after a while, also when nothing new is written."""
    import time as _time

    from edgecv.agent.samples import collector as collector_module
    from tests.waiting import wait_until

    now = _time.time()
    store = SampleStore(tmp_path / "s", max_bytes=1 << 20, device_id="pi-1", max_age_s=3600.0).open()
    old = store.add(b"\xff\xd8old", {**META, "ts": now - 7200.0}, ts=now - 7200.0)
    kept = store.add(b"\xff\xd8new", {**META, "ts": now - 60.0}, ts=now - 60.0)  # this write expired `old`
    assert [s.id for s in store.page(None, 10, 1 << 20)[0]] == [kept.id]
    assert store.stats()["expired"] == 1 and not (tmp_path / "s" / f"{old.id}.jpg").exists()
    # a restart with a shorter limit expires at the scan
    again = SampleStore(tmp_path / "s", max_bytes=1 << 20, device_id="pi-1", max_age_s=30.0).open()
    assert again.stats()["stored"] == 0 and again.stats()["expired"] == 1
    # an idle writer applies the limit on its own
    monkeypatch.setattr(collector_module, "EXPIRE_EVERY_S", 0.05)
    idle_store = SampleStore(tmp_path / "idle", max_bytes=1 << 20, device_id="pi-1", max_age_s=3600.0).open()
    idle_store.add(b"\xff\xd8x", {**META, "ts": now - 60.0}, ts=now - 60.0)
    config = parse_config({"device_id": "pi-1", "samples": {"enabled": True, "max_age_h": 1.0}})
    assert config.samples.max_age_h == 1.0
    writer = SampleCollector(config.samples, idle_store, "pi-1").start()
    try:
        idle_store.max_age_s = 30.0  # the frame is now too old: nothing is written, the writer still expires it
        assert wait_until(lambda: idle_store.stats()["stored"] == 0, 10)
        assert writer.health()["expired"] == 1
    finally:
        writer.stop()


def test_the_age_limit_is_a_non_negative_number_of_hours() -> None:
    with pytest.raises(ConfigError, match=r"samples\.max_age_h"):
        parse_config({"device_id": "pi-1", "samples": {"max_age_h": -1}})
    assert parse_config({"device_id": "pi-1"}).samples.max_age_h == 0.0  # off by default: the size cap rules
