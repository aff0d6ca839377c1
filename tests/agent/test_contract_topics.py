"""The MQTT topic scheme: levels are validated, topics are built and parsed consistently."""

from __future__ import annotations

import json

import pytest

from edgecv.agent.contract import topics


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


def _reference(seq: int, ts: float, frame_ts: float, top: list[dict[str, object]], latency: dict[str, float],
               truth: int | None) -> dict[str, object]:
    """The prediction document as the schema in docs/MQTT.md defines it, built the slow, obvious way."""
    doc: dict[str, object] = {
        "boot": "b00t", "camera": "cam \"0\" 5%", "device": "pi-1", "frame_ts": round(frame_ts, 4), "seq": seq,
        "model": {"name": "fashion", "version": "1.0.0"}, "ts": round(ts, 4),
        "top": [{"index": t["index"], "label": t["label"], "score": round(float(t["score"]), 5)} for t in top],  # type: ignore[arg-type]
        "latency_ms": {k: round(v, 3) for k, v in latency.items()},
    }
    if truth is not None:
        doc["truth"] = truth
    return doc


def test_prediction_encoder_writes_the_documented_document() -> None:
    labels = ("T-shirt/top", "100% cotton", 'Quote"d %s', "Ünïcode")
    enc = topics.PredictionEncoder(boot="b00t", device="pi-1", camera='cam "0" 5%', model_name="fashion",
                                   model_version="1.0.0", labels=labels)
    top = [{"label": labels[2], "index": 2, "score": 0.912345678}, {"label": labels[3], "index": 3, "score": 1e-9}]
    latency = {"pre": 0.01234, "infer": 0.1, "post": 0.0049, "total": 0.11724}
    for truth in (3, None):
        raw = enc(seq=41, ts=1795524688.78321, frame_ts=1795524688.7801, top=top, latency_ms=latency, truth=truth)
        doc = json.loads(raw)
        assert doc == _reference(41, 1795524688.78321, 1795524688.7801, top, latency, truth)
        assert set(doc) >= topics.PREDICTION_KEYS and list(doc) == sorted(doc)  # keys sorted, like encode()
        assert topics.decode_predictions(raw) == [doc]
    assert json.loads(enc(seq=0, ts=1.0, frame_ts=1.0, top=[], latency_ms={}, truth=None))["top"] == []


def test_prediction_encoder_never_writes_invalid_json_for_non_finite_numbers() -> None:
    enc = topics.PredictionEncoder(boot="b", device="d", camera="c", model_name="m", model_version="1",
                                   labels=("a", "b"))
    raw = enc(seq=1, ts=2.0, frame_ts=float("nan"), top=[{"label": "a", "index": 0, "score": float("nan")}],
              latency_ms={"infer": float("inf"), "total": 1.0})
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    doc = json.loads(raw, parse_constant=refuse)  # strict: no NaN / Infinity tokens, which many parsers reject
    assert doc["frame_ts"] is None and doc["top"][0]["score"] is None and doc["latency_ms"]["infer"] is None
    assert doc == {"boot": "b", "camera": "c", "device": "d", "model": {"name": "m", "version": "1"}, "seq": 1,
                   "ts": 2.0, "frame_ts": None, "top": [{"index": 0, "label": "a", "score": None}],
                   "latency_ms": {"infer": None, "total": 1.0}}  # the rest of the document is intact


def test_decode_predictions_reads_objects_and_batches() -> None:
    one = {"seq": 1}
    assert topics.decode_predictions(json.dumps(one)) == [one]
    assert topics.decode_predictions(json.dumps([one, {"seq": 2}])) == [one, {"seq": 2}]
    assert topics.decode_predictions(b"[]") == []
    for bad in (b"[1, 2]", b'"text"', b"not json"):
        with pytest.raises(ValueError):
            topics.decode_predictions(bad)


def test_prediction_encoder_follows_changing_latency_keys_and_top_lengths() -> None:
    enc = topics.PredictionEncoder(boot="b", device="d", camera="c", model_name="m", model_version="1",
                                   labels=("a", "b", "c"))
    top3 = [{"label": "c", "index": 2, "score": 0.5}, {"label": "a", "index": 0, "score": 0.3},
            {"label": "b", "index": 1, "score": 0.2}]
    for top, latency in (
        (top3, {"pre": 1.0, "infer": 2.0}),
        (top3, {"decode": 3.0, "infer": 4.0}),  # same number of keys, other names: a new template
        (top3[:1], {"decode": 5.0, "infer": 6.0}),  # fewer entries (min_score filtered the rest)
        (top3, {"pre": 7.0, "infer": 8.0}),  # back to the first shape
    ):
        doc = json.loads(enc(3, 10.0, 9.0, top, latency, None))
        assert doc["latency_ms"] == latency
        assert doc["top"] == [{"index": t["index"], "label": t["label"], "score": t["score"]} for t in top]


def test_prediction_encoder_carries_the_short_model_sha() -> None:
    sha = "f07c2a9be81d" + "0" * 52
    enc = topics.PredictionEncoder(boot="b", device="pi-1", camera="cam0", model_name="m", model_version="1.0.0",
                                   labels=("a", "b"), model_sha=sha)
    top = [{"label": "a", "index": 0, "score": 0.9}]
    doc = json.loads(enc(seq=1, ts=2.0, frame_ts=1.0, top=top, latency_ms={"total": 1.0}))
    assert doc["model"] == {"name": "m", "sha": "f07c2a9be81d", "version": "1.0.0"}
    assert list(doc) == sorted(doc)
    # the NaN fallback writes the same identity
    nan = json.loads(enc(seq=2, ts=2.0, frame_ts=1.0, top=[{"label": "a", "index": 0, "score": float("nan")}],
                         latency_ms={"total": 1.0}))
    assert nan["model"] == doc["model"] and nan["top"][0]["score"] is None


def test_region_topics_and_payloads() -> None:
    t = topics.DeviceTopics("site/a", "pi-1")
    assert t.state("garage", "door") == "site/a/pi-1/state/garage/door"
    assert t.state_filter == "site/a/pi-1/state/#"
    assert t.latest == "site/a/pi-1/latest" and t.latest_region("garage", "door") == "site/a/pi-1/latest/garage/door"
    assert topics.parse_device_topic("site/a", t.state("garage", "door")) == ("pi-1", "state/garage/door")
    state = topics.state_payload("pi-1", "b00t", "garage", "door", state="open", previous="closed", since=12.345678,
                                 reason="confirmed", score=0.9123456, count=3, frame=41, frame_ts=12.3,
                                 model={"name": "m", "version": "1"})
    assert set(state) == topics.STATE_KEYS and state["score"] == 0.91235 and state["since"] == 12.3457
    unknown = topics.state_payload("pi-1", "b00t", "garage", "door", state=None, previous=None, since=1.0,
                                   reason="start")
    assert set(unknown) == topics.STATE_KEYS and unknown["state"] is None and unknown["score"] is None
    assert topics.decode(topics.encode(unknown)) == unknown
    top = [{"label": "open", "index": 1, "score": 0.97}, {"label": "closed", "index": 0, "score": 0.03}]
    latest = topics.latest_payload("pi-1", "garage", 5.0, top, {"name": "m", "version": "1"}, region="door")
    assert set(latest) == topics.LATEST_KEYS | {"region"} and (latest["label"], latest["score"]) == ("open", 0.97)
    assert topics.latest_payload("pi-1", "cam0", 5.0, [], {"name": "m", "version": "1"})["label"] is None


def test_region_predictions_carry_the_region_and_stay_sorted() -> None:
    labels = ("closed", "open")
    enc = topics.PredictionEncoder(boot="b00t", device="pi-1", camera="garage", model_name="door",
                                   model_version="1.0.0", labels=labels, region='door "1"')
    top = [{"label": "open", "index": 1, "score": 0.75}]
    for truth in (1, None):
        raw = enc(seq=7, ts=2.0, frame_ts=1.5, top=top, latency_ms={"infer": 0.1, "total": 0.2}, truth=truth)
        doc = json.loads(raw)
        assert doc["region"] == 'door "1"' and list(doc) == sorted(doc)
        assert set(doc) == topics.PREDICTION_KEYS | {"region"} | ({"truth"} if truth is not None else set())
    nan = json.loads(enc(seq=8, ts=2.0, frame_ts=1.5, top=[{"label": "open", "index": 1, "score": float("nan")}],
                         latency_ms={"infer": 0.1}))
    assert nan["region"] == 'door "1"' and nan["top"][0]["score"] is None  # the slow path keeps it too


def test_a_state_is_never_published_before_it_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ts` has 3 decimals and `since` 4: a state published in the same millisecond as its change once read
    ts 1795991301.067 < since 1795991301.0671 (a flaky e2e assertion found it)."""
    monkeypatch.setattr(topics.time, "time", lambda: 1795991301.06712)
    doc = topics.state_payload("pi-1", "b", "garage", "door", state="open", previous="closed", since=1795991301.06712,
                               reason="confirmed", frame_ts=1795991301.0)
    assert doc["frame_ts"] <= doc["since"] <= doc["ts"]
