"""PredictionStream: staged records become Outbox messages in order, with consecutive seqs, bounded, never lost."""

from __future__ import annotations

import json
import threading
from typing import Any

from edgecv.agent.contract.topics import PredictionEncoder, decode_predictions
from edgecv.agent.link.outbox import Outbox
from edgecv.agent.link.predictions import STAGE_MAX, PredictionStream

TOPIC = "edgecv/pi-1/predictions"
LATENCY = {"pre": 0.01, "infer": 0.05, "post": 0.002, "total": 0.062}


def _encoder(camera: str = "cam0") -> PredictionEncoder:
    return PredictionEncoder(boot="b00t", device="pi-1", camera=camera, model_name="m", model_version="1",
                             labels=("a", "b", "c"))


def _top(i: int) -> list[dict[str, Any]]:
    return [{"label": "abc"[i % 3], "index": i % 3, "score": 0.9}]


def _drain_all(box: Outbox) -> list[dict[str, Any]]:
    docs = []
    while run := box.take_run({}):
        docs += [d for m in run for d in decode_predictions(m.payload)]
        box.ack_all(m.id for m in run)
    return docs


def test_staged_predictions_reach_the_outbox_in_order_with_consecutive_seqs() -> None:
    box = Outbox(1000)
    stream = PredictionStream(box, TOPIC, qos=1, expiry_s=30)
    cams = {"cam0": _encoder("cam0"), "cam1": _encoder("cam1")}
    for i in range(10):
        stream.stage(cams[f"cam{i % 2}"], 100.0 + i, 99.0 + i, _top(i), LATENCY, i % 3)
    assert len(stream) == 10 and len(box) == 0  # nothing is encoded on the camera loop's path
    assert stream.drain() == 10 and len(stream) == 0
    msgs = box.take_run({TOPIC: 100})
    assert all((m.topic, m.qos, m.retain, m.expiry_s) == (TOPIC, 1, False, 30) for m in msgs)
    docs = [json.loads(m.payload) for m in msgs]
    assert [d["seq"] for d in docs] == list(range(10))  # given at drain time, in outbox order
    assert [d["camera"] for d in docs] == ["cam0", "cam1"] * 5
    assert [d["ts"] for d in docs] == [100.0 + i for i in range(10)]
    assert [d["top"][0]["index"] for d in docs] == [i % 3 for i in range(10)]
    assert [d["truth"] for d in docs] == [i % 3 for i in range(10)]
    stream.stage(cams["cam0"], 200.0, 199.0, _top(0), LATENCY, None)
    stream.drain()
    assert json.loads(box.take_run({})[0].payload)["seq"] == 10  # seq continues across drains
    assert stream.drain() == 0  # nothing staged: nothing happens


def test_the_first_record_after_a_drain_wakes_the_sender_and_the_rest_do_not_need_to() -> None:
    box = Outbox(100)
    wake = threading.Event()
    box.add_listener(wake)
    stream = PredictionStream(box, TOPIC, qos=1)
    stream.stage(_encoder(), 1.0, 1.0, _top(0), LATENCY, None)
    assert wake.is_set()
    wake.clear()
    stream.stage(_encoder(), 2.0, 2.0, _top(1), LATENCY, None)
    assert not wake.is_set()  # the sender is already due: no second wake-up per round
    stream.drain()  # the sender's round
    wake.clear()
    stream.stage(_encoder(), 3.0, 3.0, _top(2), LATENCY, None)
    assert wake.is_set()  # a record staged after the drain wakes it again


def test_the_stage_is_bounded_when_nobody_drains_it() -> None:
    box = Outbox(100)  # smaller than what is staged: the outbox drops the oldest and counts them
    stream = PredictionStream(box, TOPIC, qos=1)
    for i in range(3 * STAGE_MAX):
        stream.stage(_encoder(), float(i), float(i), _top(i), LATENCY, None)
    assert len(stream) < STAGE_MAX  # the staging loop drained it itself
    stream.drain()
    assert box.dropped == 3 * STAGE_MAX - 100 and len(box) == 100
    seqs = [d["seq"] for d in _drain_all(box)]
    assert seqs == list(range(3 * STAGE_MAX - 100, 3 * STAGE_MAX))  # the newest, in order; drops are counted


def test_concurrent_camera_loops_lose_nothing() -> None:
    box = Outbox(100_000)
    stream = PredictionStream(box, TOPIC, qos=1)
    stop = threading.Event()

    def sender() -> None:
        while not stop.is_set():
            stream.drain()

    def loop(cam: int) -> None:
        enc = _encoder(f"cam{cam}")
        for i in range(3000):
            stream.stage(enc, float(i), float(i), _top(i), LATENCY, cam)

    drainer = threading.Thread(target=sender)
    drainer.start()
    loops = [threading.Thread(target=loop, args=(c,)) for c in range(3)]
    for t in loops:
        t.start()
    for t in loops:
        t.join()
    stop.set()
    drainer.join()
    stream.drain()
    docs = _drain_all(box)
    assert [d["seq"] for d in docs] == list(range(9000))
    for cam in range(3):  # each camera's predictions keep their own order
        assert [d["ts"] for d in docs if d["truth"] == cam] == [float(i) for i in range(3000)]


def test_a_record_that_cannot_be_encoded_is_counted_and_the_others_go_out() -> None:
    box = Outbox(100)
    stream = PredictionStream(box, TOPIC, qos=1)
    enc = _encoder()
    stream.stage(enc, 1.0, 1.0, _top(0), LATENCY, None)
    stream.stage(enc, 2.0, 2.0, [{"label": "?", "index": 7, "score": 0.5}], LATENCY, None)  # no label 7: a bug
    stream.stage(enc, 3.0, 3.0, _top(2), LATENCY, None)
    assert stream.drain() == 3
    assert stream.failed == 1 and box.undeliverable == 1  # in the loss accounting too
    docs = _drain_all(box)
    assert [(d["seq"], d["ts"]) for d in docs] == [(0, 1.0), (1, 3.0)]
