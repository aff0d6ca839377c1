"""The MQTT topic scheme: levels are validated, topics are built and parsed consistently."""

from __future__ import annotations

import pytest

from agent.contract import topics


def test_device_topics_build_the_documented_scheme() -> None:
    t = topics.DeviceTopics("edgecv", "pi-1")
    assert t.status == "edgecv/pi-1/status"
    assert t.predictions == "edgecv/pi-1/predictions"
    assert t.health == "edgecv/pi-1/health"
    assert t.model_state == "edgecv/pi-1/model/state"
    assert t.push("tx1", "begin") == "edgecv/pi-1/model/push/tx1/begin"
    assert t.push_filter == "edgecv/pi-1/model/push/#"
    assert t.cmd("ping") == "edgecv/pi-1/cmd/ping"
    assert t.cmd_result("ping") == "edgecv/pi-1/cmd/ping/result"
    assert topics.group_push("edgecv", "lab", "tx1", "end") == "edgecv/groups/lab/model/push/tx1/end"


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "with space"])
def test_device_ids_that_would_break_topics_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="topic level"):
        topics.DeviceTopics("edgecv", bad)


def test_multi_level_prefix_is_allowed_and_parsed_back() -> None:
    t = topics.DeviceTopics("site/a", "cam-7")
    assert topics.parse_device_topic("site/a", t.model_state) == ("cam-7", "model/state")
    assert topics.parse_device_topic("site/a", "site/a/groups/g/model/push/x/begin") is None
    assert topics.parse_device_topic("site/a", "other/cam-7/status") is None


def test_payload_encoding_round_trips_and_model_states_are_checked() -> None:
    payload = topics.model_state_payload("pi-1", "rejected", version="2", error="bad signature")
    assert set(payload) == topics.MODEL_STATE_KEYS
    assert topics.decode(topics.encode(payload)) == payload
    with pytest.raises(ValueError):
        topics.model_state_payload("pi-1", "exploded")
    with pytest.raises(ValueError):
        topics.decode(b"[1, 2]")
