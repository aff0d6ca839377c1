"""`edgecv push` refuses options a device would refuse, before connecting: chunk sizes outside what devices accept
and transfer ids that are not safe names; --allow-downgrade travels in the begin message."""

from __future__ import annotations

import json

import pytest

from edgecv.agent.errors import UnsafeNameError
from edgecv.tools.errors import FleetError
from edgecv.tools.fleet.mqtt_client import ClientOptions
from edgecv.tools.fleet.push import Pusher


@pytest.mark.parametrize("chunk_size", [1, 4095, 2 << 20])
def test_chunk_size_outside_the_device_range_is_refused(chunk_size: int) -> None:
    with pytest.raises(FleetError, match=r"4096\.\.1048576"):
        Pusher(ClientOptions(port=1), b"x" * 10, "m", "1.0", chunk_size=chunk_size)


@pytest.mark.parametrize("tid", ["..", "a/b", "x#", "t" * 65])
def test_unsafe_transfer_id_is_refused(tid: str) -> None:
    with pytest.raises(UnsafeNameError):
        Pusher(ClientOptions(port=1), b"x" * 10, "m", "1.0", transfer_id=tid)


def test_allow_downgrade_is_carried_in_begin() -> None:
    begin = json.loads(Pusher(ClientOptions(port=1), b"x" * 10, "m", "1.0", allow_downgrade=True).begin.to_payload())
    assert begin["allow_downgrade"] is True
    assert json.loads(Pusher(ClientOptions(port=1), b"x", "m", "1.0").begin.to_payload())["allow_downgrade"] is False
