"""`edgecv push` refuses options a device would refuse, before connecting: chunk sizes outside what devices accept
and transfer ids that are not safe names; --allow-downgrade travels in the begin message, signed per target with
--key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgecv.agent.contract.grants import GrantError, check_grant
from edgecv.agent.contract.signing import Keyring, generate_private_key, key_id
from edgecv.agent.contract.transfer import Begin
from edgecv.agent.errors import UnsafeNameError
from edgecv.tools.cli import main
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


def test_with_a_key_each_target_gets_its_own_signed_grant_and_without_downgrade_none() -> None:
    key = generate_private_key()
    ring = Keyring([key.public_key()])
    pusher = Pusher(ClientOptions(port=1), b"x" * 10, "m", "1.0", allow_downgrade=True, grant_key=key)
    for target in ("dev1", "floor"):
        begin = Begin.from_payload(pusher._begin_payload(target))
        assert check_grant(begin.downgrade_grant, begin.sha256, [target], ring) == key_id(key.public_key())
        with pytest.raises(GrantError, match="not this device"):
            check_grant(begin.downgrade_grant, begin.sha256, ["dev2"], ring)
    plain = Pusher(ClientOptions(port=1), b"x" * 10, "m", "1.0", grant_key=key)
    assert Begin.from_payload(plain._begin_payload("dev1")).downgrade_grant is None


def test_key_without_allow_downgrade_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(tmp_path / "b.edgecv"), "--device", "d", "--key", str(tmp_path / "k")]) == 2
    assert "--key signs a downgrade request" in capsys.readouterr().err


def test_unsigned_downgrade_request_is_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no default signing key there
    assert main(["push", str(tmp_path / "missing.edgecv"), "--device", "d", "--allow-downgrade"]) != 0
    assert "The downgrade request is not signed" in capsys.readouterr().err


def test_a_missing_key_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(tmp_path / "b.edgecv"), "--device", "d", "--allow-downgrade",
                 "--key", str(tmp_path / "nokey")]) != 0
    assert "nokey" in capsys.readouterr().err
