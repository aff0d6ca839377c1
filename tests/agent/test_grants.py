"""Signed downgrade grants (agent/contract/grants.py): what a device accepts as "install this older archive"."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, replace

import pytest

from edgecv.agent.contract.grants import MAX_GRANT_S, DowngradeGrant, GrantError, check_grant, grant_downgrade
from edgecv.agent.contract.signing import Keyring, generate_private_key
from edgecv.agent.contract.transfer import Begin, TransferError, begin_for

KEY = generate_private_key()
RING = Keyring([KEY.public_key()])
SHA = "ab" * 32
NOW = 1_800_000_000.0
NAMES = ["dev1", "lab"]


def test_a_grant_for_this_archive_and_device_or_group_verifies() -> None:
    for target in NAMES:
        grant = grant_downgrade(KEY, SHA, target, now=NOW)
        assert check_grant(grant, SHA, NAMES, RING, now=NOW + 10) == grant.key_id
        assert grant.expires == int(NOW) + 3600


@pytest.mark.parametrize(("make", "needle"), [
    (lambda: None, "not signed"),
    (lambda: grant_downgrade(generate_private_key(), SHA, "dev1", now=NOW), "not in the device keyring"),
    (lambda: grant_downgrade(KEY, "cd" * 32, "dev1", now=NOW), "does not match"),
    (lambda: grant_downgrade(KEY, SHA, "dev2", now=NOW), "not this device"),
    (lambda: replace(grant_downgrade(KEY, SHA, "dev2", now=NOW), target="dev1"), "does not match"),
    (lambda: replace(grant_downgrade(KEY, SHA, "dev1", now=NOW), expires=int(NOW) + 7200), "does not match"),
    (lambda: replace(grant_downgrade(KEY, SHA, "dev1", now=NOW), sig="*" * 88), "not base64"),
    (lambda: replace(grant_downgrade(KEY, SHA, "dev1", now=NOW), sig=base64.b64encode(b"\0" * 64).decode()),
     "does not match"),
    (lambda: grant_downgrade(KEY, SHA, "dev1", now=NOW - 4000), "expired"),
    (lambda: grant_downgrade(KEY, SHA, "dev1", now=NOW, valid_s=MAX_GRANT_S + 60), "more than the 24 h"),
])
def test_a_grant_that_does_not_authorise_this_archive_here_is_refused_with_the_reason(make, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GrantError, match=needle):
        check_grant(make(), SHA, NAMES, RING, now=NOW)


def test_no_keyring_means_no_signed_request_can_be_checked() -> None:
    with pytest.raises(GrantError, match="no keyring"):
        check_grant(grant_downgrade(KEY, SHA, "dev1", now=NOW), SHA, NAMES, None, now=NOW)


def test_the_grant_travels_in_begin_and_parses_back_strictly() -> None:
    begin = begin_for(b"x" * 5000, "m", "1.0", chunk_size=4096, allow_downgrade=True)
    begin = replace(begin, downgrade_grant=grant_downgrade(KEY, begin.sha256, "dev1", now=NOW))
    payload = begin.to_payload()
    assert len(payload) < 1024  # far inside MAX_BEGIN_BYTES
    back = Begin.from_payload(payload)
    assert back == begin and back.downgrade_grant is not None
    assert check_grant(back.downgrade_grant, back.sha256, NAMES, RING, now=NOW) == back.downgrade_grant.key_id
    assert Begin.from_payload(begin_for(b"x", "m", "1.0").to_payload()).downgrade_grant is None  # older pushers


@pytest.mark.parametrize(("grant", "needle"), [
    ("yes", "must be a JSON object"), ([], "must be a JSON object"),
    ({"target": "../x", "expires": 1, "key_id": "ab", "sig": "AA=="}, "not a safe name"),
    ({"target": "d", "expires": -1, "key_id": "ab", "sig": "AA=="}, "expires must be an integer"),
    ({"target": "d", "expires": 1.5, "key_id": "ab", "sig": "AA=="}, "expires must be an integer"),
    ({"target": "d", "expires": 1, "key_id": "AB", "sig": "AA=="}, "lowercase hex"),
    ({"target": "d", "expires": 1, "key_id": "ab", "sig": "A" * 129}, "at most 128"),
    ({"target": "d", "expires": 1, "key_id": "ab"}, "downgrade_grant.sig is missing"),
])
def test_a_malformed_grant_makes_the_begin_malformed(grant: object, needle: str) -> None:
    doc = json.loads(begin_for(b"x" * 10, "m", "1.0").to_payload())
    doc["downgrade_grant"] = grant
    with pytest.raises(TransferError, match=needle):
        Begin.from_payload(json.dumps(doc).encode())


def test_from_doc_round_trip() -> None:
    grant = grant_downgrade(KEY, SHA, "lab", now=NOW)
    assert DowngradeGrant.from_doc(asdict(grant)) == grant  # the shape Begin.to_payload writes
