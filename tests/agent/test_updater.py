"""Updater in-process: push messages → verify → self-test → swap, rejections, probation rollback, commands, and
kill -9 of a child process at named points of receive/verify/self-test/activate (the store must always recover a
valid model, the expected one).

The MQTT link is the in-memory MemoryLink (a boundary); store, bundles, classifier and runtime are real.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecv.agent.commands import CommandHandler
from edgecv.agent.config import parse_config
from edgecv.agent.contract import topics as T
from edgecv.agent.contract.grants import grant_downgrade
from edgecv.agent.contract.signing import Keyring, generate_private_key, load_keyring, public_key_pem
from edgecv.agent.contract.transfer import begin_for, chunk_data, encode_chunk
from edgecv.agent.delivery.store import ModelStore
from edgecv.agent.delivery.updater import Probe, Updater, check_compatible, parse_version
from edgecv.agent.link.memory import MemoryLink
from edgecv.agent.vision.camera import Frame
from edgecv.agent.vision.classifier import Classifier
from tests.bundle_factory import make_archive, make_bundle

BRIGHT = np.full((28, 28, 3), 200, np.uint8)


class StateLink(MemoryLink):
    """The in-memory link, plus the retained model states the updater published."""

    def states(self) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.messages("+/+/model/state") if m.retain]


class FakeAgent:
    """A device for the updater and the command handler: config, topics, store, link, and the model host."""

    def __init__(self, tmp: Path, keyring_dir: Path | None, *, allow_unsigned: bool = False, **update: Any) -> None:
        doc: dict[str, Any] = {"device_id": "dev1", "groups": ["lab"], "model": {"store": str(tmp / "store")},
                               "update": {"probation_s": 2.0, **update}}
        if keyring_dir is not None:
            doc["security"] = {"keyring": str(keyring_dir)}
        if allow_unsigned:
            doc["security"] = {**doc.get("security", {}), "allow_unsigned": True}
        self.config = parse_config(doc)
        self.topics = T.DeviceTopics(self.config.prefix, self.config.device_id)
        self.store = ModelStore(tmp / "store", keep=3)
        self.link = StateLink()
        self.classifier: Classifier | None = None
        self.last_frame: Frame | None = None
        self.last_top: list[dict[str, Any]] | None = None
        self.swaps = 0

    def swap_classifier(self, new: Classifier) -> Classifier | None:
        old, self.classifier = self.classifier, new
        self.swaps += 1
        return old


@pytest.fixture(scope="module")
def key():  # type: ignore[no-untyped-def]
    return generate_private_key()


@pytest.fixture
def device(tmp_path: Path, key):  # type: ignore[no-untyped-def]
    ring = tmp_path / "keyring"
    ring.mkdir()
    (ring / "ws.pub").write_bytes(public_key_pem(key.public_key()))
    agent = FakeAgent(tmp_path, ring)
    seed = make_archive(tmp_path / "seed", "1.0", top1=1, key=key)
    bundle = agent.store.ensure_model(seed, Keyring.from_path(ring))
    agent.classifier = Classifier.load(bundle)
    updater = Updater(agent.config, agent.topics, agent.link, agent.store, load_keyring(ring), host=agent).start()
    yield agent, updater
    updater.stop()


def push(agent: FakeAgent, archive: bytes, version: str, *, group: str | None = None, chunk_size: int = 4096,
         skip: set[int] | None = None, allow_downgrade: bool = False, grant: Any = None) -> str:
    """Push `archive` over the fake link; `grant(sha256)` gives the downgrade grant its begin carries."""
    b = begin_for(archive, "tiny", version, chunk_size=chunk_size, allow_downgrade=allow_downgrade)
    if grant is not None:
        b = replace(b, downgrade_grant=grant(b.sha256))
    base = f"edgecv/groups/{group}" if group else "edgecv/dev1"
    agent.link.deliver(f"{base}/model/push/{b.transfer_id}/begin", b.to_payload())
    for i in range(b.chunks):
        if skip and i in skip:
            continue
        agent.link.deliver(f"{base}/model/push/{b.transfer_id}/chunk/{i}", encode_chunk(chunk_data(archive, b, i)))
    agent.link.deliver(f"{base}/model/push/{b.transfer_id}/end", b"{}")
    return b.transfer_id


def wait_state(agent: FakeAgent, transfer: str, states: tuple[str, ...], timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in agent.link.states():
            if s["transfer"] == transfer and s["state"] in states:
                return s
        time.sleep(0.02)
    raise AssertionError(f"no state {states} for {transfer}: {agent.link.states()}")


def acks(agent: FakeAgent, transfer: str) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p, _q, _r in agent.link.published if t == f"edgecv/dev1/model/push/{transfer}/ack"]


def test_push_activates_and_swaps(device, tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    import weakref

    agent, _ = device
    old = weakref.ref(agent.classifier)
    archive = make_archive(tmp_path / "b", "2.0", top1=2, key=key).read_bytes()
    tid = push(agent, archive, "2.0")
    state = wait_state(agent, tid, ("active", "rejected"))
    assert state["state"] == "active" and state["version"] == "2.0", state
    assert [s["state"] for s in agent.link.states() if s["transfer"] == tid][:2] == ["receiving", "verifying"]
    assert agent.classifier.version == "2.0"
    assert agent.store.current().manifest.version == "2.0"
    assert agent.store.previous().manifest.version == "1.0"
    assert acks(agent, tid)[-1]["state"] == "complete"
    assert agent.classifier.classify(BRIGHT).top[0]["index"] == 2
    assert old() is None  # the replaced runtime was released (no reference kept by the updater)


def test_group_push_and_resume_of_missing_chunks(device, tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    agent, _ = device
    archive = make_archive(tmp_path / "b", "2.1", top1=3, key=key, pad_bytes=20000).read_bytes()
    tid = push(agent, archive, "2.1", group="lab", skip={1, 2, 4})
    ack = acks(agent, tid)[-1]
    assert ack["state"] == "receiving" and ack["missing"] == [[1, 2], [4, 4]]
    b = begin_for(archive, "tiny", "2.1", chunk_size=4096)
    for i in (1, 2, 4):
        agent.link.deliver(f"edgecv/groups/lab/model/push/{tid}/chunk/{i}", encode_chunk(chunk_data(archive, b, i)))
    agent.link.deliver(f"edgecv/groups/lab/model/push/{tid}/end", b"{}")
    assert wait_state(agent, tid, ("active", "rejected"))["state"] == "active"


@pytest.mark.parametrize("case", ["unsigned", "wrong_key", "tampered", "truncated", "traversal", "oversized",
                                  "selftest_fails", "newer_agent"])
def test_bad_pushes_are_rejected_and_old_model_keeps_serving(device, tmp_path: Path, key,  # type: ignore[no-untyped-def]
                                                              case: str) -> None:
    import io
    import tarfile

    agent, _ = device
    before = agent.classifier
    if case == "unsigned":
        data = make_archive(tmp_path, "3.0").read_bytes()
    elif case == "wrong_key":
        data = make_archive(tmp_path, "3.0", key=generate_private_key()).read_bytes()
    elif case == "tampered":
        src = make_bundle(tmp_path / "t", "3.0", key=key)
        model = bytearray((src / "model.fp32.onnx").read_bytes())
        model[-10] ^= 0xFF
        (src / "model.fp32.onnx").write_bytes(bytes(model))
        from edgecv.agent.contract.bundle import pack_bundle

        data = pack_bundle(src, tmp_path / "t.edgecv").read_bytes()
    elif case == "truncated":
        data = make_archive(tmp_path, "3.0", key=key).read_bytes()[:1500]
    elif case == "traversal":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo("../../evil.txt")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        data = buf.getvalue()
    elif case == "oversized":
        data = os.urandom(agent.config.update.max_bundle_bytes + 1)
    elif case == "selftest_fails":
        src = make_bundle(tmp_path / "s", "3.0", top1=4)
        # claim the self-test frames give class 5 while the model gives 4, then sign the manifest
        manifest = json.loads((src / "manifest.json").read_text())
        manifest["selftest"]["expected_top1"] = [5, 5, 5, 5]
        from edgecv.agent.contract.bundle import Manifest, pack_bundle, sign_bundle, write_manifest

        write_manifest(src, Manifest.from_dict(manifest))
        sign_bundle(src, key)
        data = pack_bundle(src, tmp_path / "s.edgecv").read_bytes()
    else:
        data = make_archive(tmp_path, "3.0", key=key, min_agent_version="99.0").read_bytes()
    tid = push(agent, data, "3.0")
    state = wait_state(agent, tid, ("active", "rejected"))
    assert state["state"] == "rejected" and state["error"], state
    assert agent.classifier is before and agent.store.current().manifest.version == "1.0"
    assert [v.version for v in agent.store.history()] == ["1.0"]  # nothing refused is left installed
    assert agent.classifier.classify(BRIGHT).top[0]["index"] == 1
    assert not (tmp_path / "evil.txt").exists()


def test_model_failing_at_run_time_is_rolled_back(device, tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    agent, _ = device
    data = make_archive(tmp_path, "4.0", top1=6, key=key, fail_on_bright=True).read_bytes()
    tid = push(agent, data, "4.0")
    assert wait_state(agent, tid, ("active", "rejected"))["state"] == "active"  # self-test (dark frames) passed
    failures = 0
    for _ in range(5):  # the camera loop: bright frames make the new model raise
        clf = agent.classifier
        try:
            clf.classify(BRIGHT)
        except Exception:
            failures += 1
    assert failures >= 3
    state = wait_state(agent, tid, ("rolled_back",), timeout=5)
    assert state["version"] == "1.0" and "inference errors" in state["error"]
    assert agent.classifier.version == "1.0" and agent.store.current().manifest.version == "1.0"
    assert agent.classifier.classify(BRIGHT).top[0]["index"] == 1


def test_probe_latency_verdict() -> None:
    probe = Probe(baseline_ms=1.0)
    probe.infer_ms = [2.0] * 10
    assert probe.verdict() is None
    probe.infer_ms = [9.0] * 10  # > 3 * 1 + 5
    assert "exceeds" in (probe.verdict() or "")


def test_version_checks(tmp_path: Path) -> None:
    assert parse_version("1.2.3rc1") == (1, 2, 3) and parse_version("0.10") > parse_version("0.9")
    from edgecv.agent.contract.bundle import load_bundle

    check_compatible(load_bundle(make_bundle(tmp_path / "ok", "1.0")))
    with pytest.raises(Exception, match=r"needs agent 99\.0"):
        check_compatible(load_bundle(make_bundle(tmp_path / "new", "1.0", min_agent_version="99.0")))


def test_commands_ping_reload_rollback_snapshot(device, tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    agent, updater = device
    handler = CommandHandler("dev1", agent.topics, agent.link, device=agent, control=updater).start()
    try:
        tid = push(agent, make_archive(tmp_path, "5.0", top1=5, key=key).read_bytes(), "5.0")
        wait_state(agent, tid, ("active",))

        def call(name: str, **body: Any) -> dict[str, Any]:
            rid = f"r-{name}-{random.random()}"
            agent.link.deliver(f"edgecv/dev1/cmd/{name}", json.dumps({"id": rid, **body}).encode())
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                for t, p, _q, _r in list(agent.link.published):
                    if t == f"edgecv/dev1/cmd/{name}/result" and json.loads(p)["id"] == rid:
                        return json.loads(p)  # type: ignore[no-any-return]
                time.sleep(0.02)
            raise AssertionError(f"no result for {name}")

        ping = call("ping")
        assert ping["ok"] and ping["model"]["version"] == "5.0" and ping["agent_version"]
        assert call("rollback")["model"]["version"] == "1.0"
        assert agent.classifier.version == "1.0"
        assert call("rollback", to="5.0")["model"]["version"] == "5.0"
        swaps = agent.swaps
        assert call("reload")["ok"] and agent.swaps == swaps + 1
        bad = call("rollback", to="9.9")
        assert not bad["ok"] and "No installed model matches" in bad["error"]
        assert not call("snapshot")["ok"]  # no frame yet
        agent.last_frame = Frame(BRIGHT, time.time(), 0)
        snap = call("snapshot")
        assert snap["ok"] and snap["width"] == 28
        import base64

        import cv2

        img = cv2.imdecode(np.frombuffer(base64.b64decode(snap["jpeg"]), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (28, 28, 3)
    finally:
        handler.stop()


# --------------------------------------------------------------------------- kill -9 at protocol points
# Each case runs one push of version 2.0 onto a store whose active model is 1.0, in a child process, up to a named
# point of the protocol; the child says it got there (an Event) and waits, and the test SIGKILLs it at once. No
# random delays: every run kills at the same instant of the protocol, however loaded the machine is.
NEW_VERSION = "2.0"
KILL_POINTS = {  # point -> the version a restarted agent must run
    "chunk:0": "1.0",           # first chunk on disk
    "chunk:mid": "1.0",         # half the chunks on disk
    "chunk:last": "1.0",        # every chunk on disk, `end` not yet handled
    "end": "1.0",               # archive complete and its sha256 checked, nothing installed
    "verify": "1.0",            # extracted into staging/ and verified (hashes, signature), not yet renamed
    "installed": "1.0",         # renamed into versions/ (fsynced), not active
    "selftest": "1.0",          # loaded in a fresh runtime, in the middle of its self-test
    "swap": "1.0",              # `previous` rewritten, `current` not yet switched
    "activated": NEW_VERSION,   # `current` switched, old versions not yet pruned
}


def _push_until(root: str, archive: str, ring: str, point: str, reached: Any) -> None:
    """What the updater does for one push, minus MQTT, halting at `point` (see KILL_POINTS) until killed."""
    import edgecv.agent.delivery.store as store_module
    from edgecv.agent.contract.transfer import Receiver
    from edgecv.agent.vision.classifier import run_selftest

    def halt() -> None:
        reached.set()
        time.sleep(3600)

    kind, _, arg = point.partition(":")
    if kind == "verify":
        verify = store_module.verify_bundle

        def verify_then_halt(*args: Any, **kwargs: Any) -> None:
            verify(*args, **kwargs)
            halt()

        store_module.verify_bundle = verify_then_halt  # type: ignore[assignment]
    elif kind == "selftest":
        forward, calls = Classifier.forward, [0]

        def forward_then_halt(self: Classifier, image: Any) -> Any:
            calls[0] += 1
            if calls[0] == 3:  # the warm-up at load is not a forward(); frames 1 and 2 of the self-test ran
                halt()
            return forward(self, image)

        Classifier.forward = forward_then_halt  # type: ignore[method-assign]
    elif kind == "swap":
        point_to = ModelStore._point

        def point_then_halt(self: ModelStore, name: str, target: Path) -> None:
            if name == store_module.CURRENT:
                halt()
            point_to(self, name, target)

        ModelStore._point = point_then_halt  # type: ignore[method-assign]
    elif kind == "activated":
        ModelStore.prune = lambda self: halt()  # type: ignore[assignment, method-assign, misc, return-value]
    store = ModelStore(root, keep=2)
    receiver = Receiver(store.transfers_dir(), "dev")
    data = Path(archive).read_bytes()
    b = begin_for(data, "tiny", NEW_VERSION, chunk_size=16 * 1024, transfer_id=f"t-{NEW_VERSION}")
    stop_chunk = -1
    if kind == "chunk":
        stop_chunk = {"mid": b.chunks // 2, "last": b.chunks - 1}[arg] if arg in ("mid", "last") else int(arg)
    receiver.begin(b)
    for i in range(b.chunks):
        receiver.chunk(b.transfer_id, i, encode_chunk(chunk_data(data, b, i)))
        if i == stop_chunk:
            halt()
    receiver.end(b.transfer_id)
    assert receiver.completed is not None
    if kind == "end":
        halt()
    bundle = store.install(receiver.completed[1], Keyring.from_path(Path(ring)))
    if kind == "installed":
        halt()
    run_selftest(Classifier.load(bundle)).raise_for_failure()
    store.activate(bundle)
    receiver.finish(b.transfer_id)
    raise AssertionError(f"kill point {point} was never reached")


def _kill_at(ctx: Any, base: Path, work: Path, archive: str, ring: Path, point: str) -> Path:
    import shutil

    root = work / point.replace(":", "-")
    shutil.copytree(base, root, symlinks=True)
    reached = ctx.Event()
    proc = ctx.Process(target=_push_until, args=(str(root), archive, str(ring), point, reached))
    proc.start()
    try:
        assert reached.wait(120), f"the child never reached {point} (exit code {proc.exitcode})"
    finally:
        os.kill(proc.pid or 0, signal.SIGKILL)
        proc.join()
    return root


@pytest.mark.parametrize("points", [pytest.param(list(KILL_POINTS), id="protocol-points"),
                                    pytest.param("every-chunk", id="every-chunk", marks=pytest.mark.slow)])
def test_kill_during_receive_verify_activate_always_recovers(tmp_path: Path, key, points: Any) -> None:  # type: ignore[no-untyped-def]
    from edgecv.agent.contract.transfer import Receiver

    ring = tmp_path / "ring"
    ring.mkdir()
    (ring / "k.pub").write_bytes(public_key_pem(key.public_key()))
    old = make_archive(tmp_path / "a", "1.0", top1=1, key=key, pad_bytes=200_000)
    new = str(make_archive(tmp_path / "a", NEW_VERSION, top1=2, key=key, pad_bytes=200_000))
    base = tmp_path / "base"
    ModelStore(base).ensure_model(old, Keyring.from_path(ring))
    chunks = begin_for(Path(new).read_bytes(), "tiny", NEW_VERSION, chunk_size=16 * 1024).chunks
    if points == "every-chunk":
        points = [f"chunk:{i}" for i in range(chunks)]
        expected = dict.fromkeys(points, "1.0")
    else:
        expected = KILL_POINTS
    # forkserver: children fork from a clean single-threaded server, not from this (threaded) test process
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.agent.test_updater", "edgecv.agent.vision.classifier",
                                "edgecv.agent.delivery.store"])
    for point in points:
        root = _kill_at(ctx, base, tmp_path / "runs", new, ring, point)
        store = ModelStore(root, keep=2)
        bundle = store.ensure_model(old, Keyring.from_path(ring))  # what a restarted agent does first
        assert bundle.manifest.version == expected[point], point
        clf = Classifier.load(bundle)  # a valid, runnable model every time
        assert clf.classify(BRIGHT).top[0]["index"] == int(float(expected[point])), point
        assert not any((root / "staging").iterdir()), point  # scratch space cleaned
        rx = Receiver(store.transfers_dir(), "dev")
        if point.startswith("chunk:"):  # the partial transfer is resumable where it stopped
            b = begin_for(Path(new).read_bytes(), "tiny", NEW_VERSION, chunk_size=16 * 1024,
                          transfer_id=f"t-{NEW_VERSION}")
            assert rx.active is not None and rx.active.transfer_id == b.transfer_id, point
            arg = point[6:]
            done = {"mid": chunks // 2 + 1, "last": chunks}[arg] if arg in ("mid", "last") else int(arg) + 1
            assert rx.begin(b)[-1].received == done, point
        rx.close()


def test_rollout_plan_stages() -> None:
    from edgecv.tools.fleet.rollout import RolloutPlan

    devices = [f"d{i}" for i in range(10)]
    assert RolloutPlan(canary=2, batch_size=3).stages(devices) == [["d0", "d1"], ["d2", "d3", "d4"],
                                                                    ["d5", "d6", "d7"], ["d8", "d9"]]
    assert RolloutPlan().stages(devices) == [devices]
    assert RolloutPlan(canary=1).stages(devices) == [["d0"], devices[1:]]


def test_begin_for_a_finished_transfer_repeats_its_outcome(device, tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    agent, updater = device
    archive = make_archive(tmp_path, "7.0", top1=7, key=key).read_bytes()
    tid = push(agent, archive, "7.0")
    wait_state(agent, tid, ("active",))
    n = len(agent.link.published)
    b = begin_for(archive, "tiny", "7.0", chunk_size=4096)
    agent.link.deliver(f"edgecv/dev1/model/push/{tid}/begin", b.to_payload())  # a pusher that missed the result
    new = agent.link.published[n:]
    assert [json.loads(p)["state"] for t, p, _q, _r in new if t.endswith("/ack")] == ["complete"]
    repeated = [(json.loads(p), r) for t, p, _q, r in new if t.endswith("/model/state")]
    assert [(d["state"], d["transfer"], r) for d, r in repeated] == [("active", tid, False)]
    assert updater.receiver.active is None  # nothing is received again


# --------------------------------------------------------------------------- anti-rollback and final states
def _device_at(tmp_path: Path, key, version: str, **update: Any):  # type: ignore[no-untyped-def]
    ring = tmp_path / "keyring"
    ring.mkdir(exist_ok=True)
    (ring / "ws.pub").write_bytes(public_key_pem(key.public_key()))
    agent = FakeAgent(tmp_path, ring, **update)
    seed = make_archive(tmp_path / "seed", version, top1=2, key=key)
    agent.classifier = Classifier.load(agent.store.ensure_model(seed, Keyring.from_path(ring)))
    return agent, Updater(agent.config, agent.topics, agent.link, agent.store, load_keyring(ring), host=agent).start()


@pytest.mark.parametrize(("policy", "asked", "signed_for", "outcome", "reason"), [
    ("when-asked", False, None, "rejected", "push with --allow-downgrade"),
    ("when-asked", True, None, "rejected", "is not signed"),
    ("when-asked", True, "dev1", "active", None),
    ("when-asked", True, "lab", "active", None),  # a grant for the device's group
    ("when-asked", True, "other", "rejected", "not this device"),
    ("never", True, "dev1", "rejected", "forbids downgrades")])
def test_downgrade_needs_a_signed_request_and_the_device_to_allow(tmp_path: Path, key, policy: str, asked: bool,  # type: ignore[no-untyped-def]
                                                                  signed_for: str | None, outcome: str,
                                                                  reason: str | None) -> None:
    agent, updater = _device_at(tmp_path, key, "2.0.0", allow_downgrade=policy)
    try:
        old = make_archive(tmp_path / "old", "1.5.0", top1=4, key=key).read_bytes()
        grant = None if signed_for is None else (lambda sha: grant_downgrade(key, sha, signed_for))
        state = wait_state(agent, push(agent, old, "1.5.0", allow_downgrade=asked, grant=grant), ("active", "rejected"))
        assert state["state"] == outcome, state
        if outcome == "rejected":
            assert "older than the active 2.0.0" in state["error"] and reason in state["error"], state
            assert agent.classifier.version == "2.0.0" and agent.store.current().manifest.version == "2.0.0"
            assert [v.version for v in agent.store.history()] == ["2.0.0"]
        else:
            assert agent.classifier.version == "1.5.0"
    finally:
        updater.stop()


def test_a_device_that_accepts_unsigned_bundles_takes_an_unsigned_downgrade_request(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path, None, allow_unsigned=True)
    agent.classifier = Classifier.load(agent.store.ensure_model(make_archive(tmp_path / "seed", "2.0.0", top1=2),
                                                                None, allow_unsigned=True))
    updater = Updater(agent.config, agent.topics, agent.link, agent.store, None, host=agent).start()
    try:
        old = make_archive(tmp_path / "old", "1.5.0", top1=4).read_bytes()
        state = wait_state(agent, push(agent, old, "1.5.0", allow_downgrade=True), ("active", "rejected"))
        assert state["state"] == "active", state
    finally:
        updater.stop()


def test_same_version_other_content_and_replays_are_refused_the_active_archive_reloads(tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    agent, updater = _device_at(tmp_path, key, "1.0.0")
    try:
        v2 = make_archive(tmp_path / "v2", "2.0.0", top1=5, key=key).read_bytes()
        assert wait_state(agent, push(agent, v2, "2.0.0"), ("active", "rejected"))["state"] == "active"
        replay = (tmp_path / "seed" / "tiny-1.0.0.edgecv").read_bytes()  # the old signed archive, byte for byte
        state = wait_state(agent, push(agent, replay, "1.0.0"), ("active", "rejected"))
        assert state["state"] == "rejected" and "older than the active 2.0.0" in state["error"]
        other = make_archive(tmp_path / "o", "2.0.0", top1=6, key=key).read_bytes()
        state = wait_state(agent, push(agent, other, "2.0.0"), ("active", "rejected"))
        assert state["state"] == "rejected" and "other content" in state["error"]
        assert "1.0.0" in [v.version for v in agent.store.history()]  # the kept old version was not deleted
        state = wait_state(agent, push(agent, v2, "2.0.0"), ("active", "rejected"))  # the active one again
        assert state["state"] == "active" and agent.classifier.version == "2.0.0"
        assert agent.classifier.classify(BRIGHT).top[0]["index"] == 5
    finally:
        updater.stop()


def test_signed_manifest_with_wrong_types_is_rejected_naming_the_key(device, tmp_path: Path, key) -> None:  # type: ignore[no-untyped-def]
    from edgecv.agent.contract.signing import sign

    agent, _ = device
    src = make_bundle(tmp_path / "w", "3.0", key=key)
    doc = json.loads((src / "manifest.json").read_text())
    doc["artifacts"][0]["bytes"] = str(doc["artifacts"][0]["bytes"])  # "12" instead of 12, then signed
    (src / "manifest.json").write_text(json.dumps(doc))
    (src / "manifest.sig").write_bytes(sign((src / "manifest.json").read_bytes(), key).to_bytes())
    data = _pack_raw(src, tmp_path / "w.edgecv")
    state = wait_state(agent, push(agent, data, "3.0"), ("active", "rejected"))
    assert state["state"] == "rejected" and "artifacts[0].bytes" in state["error"], state
    assert agent.classifier.version == "1.0"


def _pack_raw(src: Path, out: Path) -> bytes:
    """pack_bundle without its parse check (it refuses manifests that do not parse, as it should)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(src.iterdir()):
            tar.add(p, p.name)
    out.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_unexpected_failure_while_installing_still_ends_in_rejected(device, tmp_path: Path, key,  # type: ignore[no-untyped-def]
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    agent, _ = device

    def broken(*_a: Any, **_k: Any) -> Any:
        raise TypeError("'<' not supported between instances of 'str' and 'int'")

    monkeypatch.setattr(agent.store, "install", broken)
    data = make_archive(tmp_path, "3.0", key=key).read_bytes()
    tid = push(agent, data, "3.0")
    state = wait_state(agent, tid, ("active", "rejected"))
    assert state["state"] == "rejected" and "TypeError" in state["error"] and len(state["error"]) <= 300
    assert agent.classifier.version == "1.0"
    assert not (agent.store.transfers_dir() / tid).exists()


def test_failure_while_handling_a_push_message_answers_failed(device, tmp_path: Path, key,  # type: ignore[no-untyped-def]
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    agent, updater = device

    def io_error(_tid: str) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(updater.receiver, "end", io_error)
    data = make_archive(tmp_path, "3.0", key=key).read_bytes()
    tid = push(agent, data, "3.0")
    state = wait_state(agent, tid, ("rejected",))
    assert "Input/output error" in state["error"]
    assert acks(agent, tid)[-1]["state"] == "failed"
    assert updater.receiver.active is None and not (agent.store.transfers_dir() / tid).exists()


@pytest.mark.parametrize("tid", ["..", ".", "x" * 100, "tränsfer"])
def test_begin_with_an_unsafe_transfer_id_is_rejected_without_touching_the_store(device, tid: str) -> None:  # type: ignore[no-untyped-def]
    agent, _ = device
    before = sorted(p.name for p in agent.store.root.iterdir())
    b = begin_for(os.urandom(5000), "tiny", "3.0", chunk_size=4096)
    doc = {**json.loads(b.to_payload()), "transfer_id": tid}
    agent.link.deliver(f"edgecv/dev1/model/push/{tid}/begin", json.dumps(doc).encode())
    [(topic, payload, _q, retain)] = agent.link.published[-1:]
    state = json.loads(payload)
    assert topic == "edgecv/dev1/model/state" and state["state"] == "rejected" and not retain
    assert "not a safe name" in state["error"] and state["transfer"] is None
    assert not any("/ack" in t for t, *_ in agent.link.published)
    assert sorted(p.name for p in agent.store.root.iterdir()) == before
    assert agent.store.current() is not None and (agent.store.transfers_dir()).is_dir()


def test_begin_whose_payload_names_another_transfer_is_refused(device) -> None:  # type: ignore[no-untyped-def]
    agent, updater = device
    b = begin_for(os.urandom(5000), "tiny", "3.0", chunk_size=4096, transfer_id="other")
    agent.link.deliver("edgecv/dev1/model/push/mine/begin", b.to_payload())
    assert acks(agent, "mine")[-1]["state"] == "failed" and updater.receiver.active is None


def test_commands_with_unsafe_names_or_payloads_get_exactly_one_result(device) -> None:  # type: ignore[no-untyped-def]
    agent, updater = device
    handler = CommandHandler("dev1", agent.topics, agent.link, device=agent, control=updater).start()
    try:
        cases = [("pïng", b"{}"), ("ping", b"[" * 5000), ("ping", b'{"id": {"x": 1}}'),
                 ("rollback", b'{"id": "r", "to": "../../etc"}'), ("rollback", b'{"id": "r2", "to": 5}'),
                 ("nosuch", b'{"id": "n"}'), ("ping", os.urandom(64))]
        for name, payload in cases:
            n = len(agent.link.published)
            agent.link.deliver(f"edgecv/dev1/cmd/{name}", payload)
            deadline = time.monotonic() + 10
            while len(agent.link.published) == n and time.monotonic() < deadline:
                time.sleep(0.01)
            results = [(t, json.loads(p)) for t, p, _q, _r in agent.link.published[n:] if t.endswith("/result")]
            assert len(results) == 1, (name, payload[:20], results)
            topic, doc = results[0]
            assert doc["ok"] is False and doc["error"], doc
            assert topic == ("edgecv/dev1/cmd/_invalid/result" if name == "pïng" else f"edgecv/dev1/cmd/{name}/result")
    finally:
        handler.stop()
