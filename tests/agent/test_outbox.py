"""Outbox: order, bounded capacity with drop counting, ack/rewind semantics, and the disk spool."""

from __future__ import annotations

import threading
from pathlib import Path

from edgecv.agent.link.outbox import Message, Outbox


def take(box: Outbox, limit: int) -> list[Message]:
    """Up to `limit` messages not yet handed out, oldest first, one publish's worth at a time (no batching)."""
    out: list[Message] = []
    while len(out) < limit and (run := box.take_run({})):
        out += run
    return out


def test_fifo_order_and_ack_removes() -> None:
    box = Outbox(10)
    ids = [box.put("t", f"m{i}".encode()) for i in range(5)]
    taken = take(box, 3)
    assert [m.payload for m in taken] == [b"m0", b"m1", b"m2"]
    assert take(box, 10)[0].payload == b"m3"
    assert len(box) == 5  # nothing leaves before it is acknowledged
    assert box.ack(ids[0]) and box.ack(ids[1])
    assert not box.ack(ids[0])  # acking twice is harmless
    assert len(box) == 3 and box.delivered == 2


def test_rewind_resends_unacked_oldest_first() -> None:
    box = Outbox(10)
    ids = [box.put("t", bytes([i])) for i in range(4)]
    take(box, 4)
    box.ack(ids[0])
    box.rewind()
    assert [m.id for m in take(box, 10)] == ids[1:]


def test_take_run_joins_only_consecutive_compatible_messages_of_batched_topics() -> None:
    box = Outbox(100)
    for i in range(5):
        box.put("p", f"a{i}".encode(), qos=1)
    box.put("status", b"s", qos=1, retain=True)
    box.put("p", b"b0", qos=1)
    box.put("p", b"b1", qos=0)  # another qos: its own run
    box.put("p", b"b2", qos=0)
    batches = {"p": 3}
    runs = []
    while run := box.take_run(batches):
        runs.append([m.payload for m in run])
    assert runs == [[b"a0", b"a1", b"a2"], [b"a3", b"a4"], [b"s"], [b"b0"], [b"b1", b"b2"]]
    assert box.take_run(batches) == [] and box.pending() == 0
    assert [m.payload for m in Outbox(10).take_run(batches)] == []
    plain = Outbox(10)
    plain.put("p", b"x")
    plain.put("p", b"y")
    assert [m.payload for m in plain.take_run({})] == [b"x"]  # topics without a batch size go one by one


def test_ack_all_removes_a_batch_and_rewind_hands_it_out_again() -> None:
    box = Outbox(10)
    ids = [box.put("p", str(i).encode()) for i in range(6)]
    first = box.take_run({"p": 4})
    assert [m.id for m in first] == ids[:4]
    box.rewind()  # connection lost before the PUBACK: the same run is due again
    assert [m.id for m in box.take_run({"p": 4})] == ids[:4]
    assert box.ack_all(m.id for m in first) == 4
    assert box.ack_all(ids[:4]) == 0  # a late duplicate PUBACK is harmless
    assert len(box) == 2 and box.delivered == 4


def test_full_drops_oldest_and_counts() -> None:
    box = Outbox(3)
    for i in range(5):
        box.put("t", str(i).encode())
    assert box.dropped == 2
    assert [m.payload for m in take(box, 10)] == [b"2", b"3", b"4"]


def test_drop_while_handed_out_keeps_cursor_consistent() -> None:
    box = Outbox(3)
    for i in range(3):
        box.put("t", str(i).encode())
    assert [m.payload for m in take(box, 2)] == [b"0", b"1"]
    box.put("t", b"3")  # "0" and "1" are out (may arrive): the oldest never sent, "2", is dropped
    assert box.dropped == 1
    assert [m.payload for m in take(box, 10)] == [b"3"]
    box.rewind()
    assert [m.payload for m in take(box, 10)] == [b"0", b"1", b"3"]


def test_overflow_drops_never_sent_messages_before_ones_that_may_have_arrived() -> None:
    """Exact accounting: what was sent on a lost connection (PUBACK lost) may have reached the broker; dropping it
    and counting it as lost would count it twice if it did. It is kept, and sent again."""
    box = Outbox(4)
    ids = [box.put("t", str(i).encode()) for i in range(4)]
    take(box, 2)  # "0" and "1" sent ...
    box.rewind()  # ... and the connection was lost before their PUBACKs
    box.put("t", b"4")
    box.put("t", b"5")  # drops "2" then "3": never sent
    assert box.dropped == 2
    assert [m.payload for m in take(box, 10)] == [b"0", b"1", b"4", b"5"]
    box.rewind()  # lost again: all four may have arrived
    box.put("t", b"6")  # nothing held was never sent but "6" itself: it is the one dropped
    assert box.dropped == 3 and [m.id for m in (box.rewind(), take(box, 10))[1]][:2] == ids[:2]
    box.rewind()
    assert [m.payload for m in take(box, 10)] == [b"0", b"1", b"4", b"5"]


def test_a_message_dropped_from_the_middle_is_not_restored_from_the_spool(tmp_path: Path) -> None:
    box = Outbox(3, spool_dir=tmp_path)
    for i in range(3):
        box.put("edgecv/d/predictions", str(i).encode())
    take(box, 1)
    box.rewind()  # "0" may have arrived
    box.put("edgecv/d/predictions", b"3")  # drops "1" from the middle
    del box  # a crash
    again = Outbox(10, spool_dir=tmp_path)
    assert [m.payload for m in take(again, 10)] == [b"0", b"2", b"3"]
    again.close()


def test_put_never_blocks_and_wakes_listener() -> None:
    box = Outbox(2)
    event = threading.Event()
    box.add_listener(event)
    for _ in range(1000):
        box.put("t", b"x")
    assert event.is_set() and len(box) == 2 and box.dropped == 998


def test_spool_survives_restart_and_skips_acked(tmp_path: Path) -> None:
    box = Outbox(100, spool_dir=tmp_path)
    ids = [box.put("edgecv/d/predictions", f"p{i}".encode(), qos=1) for i in range(6)]
    box.put("edgecv/d/health", b"h", qos=0)  # QoS 0 is not spooled
    box.put("edgecv/d/status", b"s", qos=1, retain=True)  # retained state is not replayed later
    for msg_id in ids[:2]:
        box.ack(msg_id)
    del box  # a crash: no close()

    again = Outbox(100, spool_dir=tmp_path)
    assert again.restored == 4
    restored = take(again, 100)
    assert [m.payload for m in restored] == [b"p2", b"p3", b"p4", b"p5"]
    assert all(m.topic == "edgecv/d/predictions" and m.qos == 1 for m in restored)
    new_id = again.put("edgecv/d/predictions", b"new")
    assert new_id > ids[-1]  # ids keep increasing across restarts
    for m in restored:
        again.ack(m.id)
    again.close()

    third = Outbox(100, spool_dir=tmp_path)
    assert [m.payload for m in take(third, 100)] == [b"new"]
    third.close()


def test_spool_ignores_torn_tail(tmp_path: Path) -> None:
    box = Outbox(10, spool_dir=tmp_path)
    box.put("t", b"complete")
    box.close()
    with open(tmp_path / "outbox.log", "ab") as fh:
        fh.write(b"\x07\x00\x00")  # a record cut short by a crash
    again = Outbox(10, spool_dir=tmp_path)
    assert [m.payload for m in take(again, 10)] == [b"complete"]
    again.close()


def test_spool_respects_capacity_on_restore(tmp_path: Path) -> None:
    box = Outbox(10, spool_dir=tmp_path)
    for i in range(10):
        box.put("t", str(i).encode())
    box.close()
    small = Outbox(4, spool_dir=tmp_path)
    assert small.dropped == 6
    assert [m.payload for m in take(small, 10)] == [b"6", b"7", b"8", b"9"]
    small.close()


def test_put_many_keeps_order_drops_the_oldest_never_sent_and_keeps_the_cursor_consistent() -> None:
    box = Outbox(5)
    box.put("t", b"a")
    assert [m.payload for m in take(box, 1)] == [b"a"]  # handed out, not yet acknowledged
    box.put_many("p", [b"0", b"1", b"2", b"3", b"4", b"5"], qos=1, expiry_s=7)
    assert box.dropped == 2 and len(box) == 5  # "a" is out (it may arrive): "0" and "1", never sent, made room
    rest = take(box, 10)
    assert [m.payload for m in rest] == [b"2", b"3", b"4", b"5"]
    assert all((m.topic, m.qos, m.retain, m.expiry_s) == ("p", 1, False, 7) for m in rest)
    assert [m.id for m in rest] == list(range(rest[0].id, rest[0].id + 4))
    box.put_many("p", [])  # nothing to do
    assert len(box) == 5


def test_put_many_is_spooled_in_one_write_and_restored(tmp_path: Path) -> None:
    box = Outbox(100, spool_dir=tmp_path)
    box.put_many("edgecv/d/predictions", [f"p{i}".encode() for i in range(5)], qos=1)
    box.put_many("edgecv/d/predictions", [b"q0"], qos=0)  # QoS 0 is not spooled
    box.ack_all([m.id for m in box.take_run({"edgecv/d/predictions": 2})])
    del box  # a crash
    again = Outbox(100, spool_dir=tmp_path)
    assert [m.payload for m in take(again, 100)] == [b"p2", b"p3", b"p4"]
    again.close()


def test_ack_all_out_of_order_and_unknown_ids() -> None:
    box = Outbox(10)
    ids = [box.put("t", bytes([i])) for i in range(6)]
    take(box, 6)
    assert box.ack_all([ids[2], ids[0], 999]) == 2  # not the in-order fast path: still exact
    assert box.ack_all([ids[1], ids[3]]) == 2
    assert [m.id for m in (box.rewind(), take(box, 10))[1]] == ids[4:]
    assert box.delivered == 4
