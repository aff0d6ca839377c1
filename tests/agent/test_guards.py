"""Guards that once could be removed without any test failing (issue 11): the systemd watchdog stays fed while
the motion gate skips a static scene, and the input-size guard (MAX_INPUT_PIXELS) refuses a bundle whose input
would make every frame's preprocessing allocate a huge tensor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edgecv.agent.contract.bundle import (
    load_bundle,
    pack_bundle,
    sign_bundle,
    write_manifest,
)
from edgecv.agent.delivery.updater import MAX_INPUT_PIXELS, check_compatible
from edgecv.agent.errors import IncompatibleBundleError
from edgecv.agent.system.sdnotify import SystemdNotifier
from tests.agent.test_sdnotify import FakeClock, NotifySocket, notify_socket  # noqa: F401 (fixture)
from tests.agent.test_service_process import _agent, _frames
from tests.agent.test_updater import device, key, push, wait_state  # noqa: F401 (fixtures)
from tests.bundle_factory import make_bundle


def test_a_static_scene_keeps_feeding_the_watchdog(tmp_path: Path, notify_socket: NotifySocket) -> None:  # noqa: F811
    """A camera on an empty hallway: after the first frame every frame is skipped by the motion gate. Frames still
    flow and the loop is alive, so systemd must keep getting WATCHDOG=1 (WatchdogSec=1 here: at most one ping per
    0.5 s), or it would restart a healthy agent every WatchdogSec."""
    agent, loop = _agent(tmp_path, motion=True)
    clock = FakeClock()
    agent.notifier = SystemdNotifier(notify_socket.address, watchdog_usec=1_000_000, clock=clock)
    frame, = _frames(1)
    assert agent.process(loop, frame)  # the first frame is classified: READY=1 (with the first ping)
    assert notify_socket.drain()[0].startswith("READY=1")
    for _ in range(50):  # 5 s of the same picture at 10 fps
        clock.t += 0.1
        assert not agent.process(loop, frame)
    assert loop.counts.skipped == {"motion": 50} and loop.counts.inferred == 1
    pings = [m for m in notify_socket.drain() if m == "WATCHDOG=1"]
    assert len(pings) == 10, pings  # every 0.5 s of the 5 s


def _with_input(root: Path, width: int, height: int, signer: object = None) -> Path:
    manifest = load_bundle(root).manifest
    spec = dataclasses.replace(manifest.input, width=width, height=height)
    write_manifest(root, dataclasses.replace(manifest, input=spec))
    if signer is not None:
        sign_bundle(root, signer)
    return root


def test_check_compatible_refuses_inputs_above_max_input_pixels(tmp_path: Path) -> None:
    side = int(MAX_INPUT_PIXELS ** 0.5)
    ok = load_bundle(_with_input(make_bundle(tmp_path / "ok", "1.0"), side, side))
    check_compatible(ok)  # exactly at the limit: accepted
    big = load_bundle(_with_input(make_bundle(tmp_path / "big", "1.0"), side + 1, side))
    with pytest.raises(IncompatibleBundleError, match=rf"{side + 1}x{side} is larger than this agent supports"):
        check_compatible(big)


def test_a_pushed_bundle_with_a_huge_input_is_rejected_before_it_is_loaded(  # type: ignore[no-untyped-def]
        device, tmp_path: Path, key) -> None:  # noqa: F811
    agent, _ = device
    before = agent.classifier
    # 8192 x 8192: a valid manifest (each side within the contract's limit) but more pixels than the agent allows
    src = _with_input(make_bundle(tmp_path / "huge", "2.0"), 8192, 8192, signer=key)
    assert json.loads((src / "manifest.json").read_text())["input"]["width"] == 8192
    data = pack_bundle(src, tmp_path / "huge.edgecv").read_bytes()
    state = wait_state(agent, push(agent, data, "2.0"), ("active", "rejected"))
    assert state["state"] == "rejected" and "larger than this agent supports" in state["error"], state
    assert agent.classifier is before and agent.store.current().manifest.version == "1.0"
