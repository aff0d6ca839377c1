"""Push protocol: message round trips, chunk headers, the device receiver (resume, limits, superseding)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgecv.agent.contract.transfer import (
    COMPLETE,
    FAILED,
    RECEIVING,
    SUPERSEDED,
    UNKNOWN,
    Ack,
    Begin,
    Receiver,
    TransferError,
    begin_for,
    chunk_data,
    decode_chunk,
    encode_chunk,
    expand_ranges,
    parse_push_topic,
    to_ranges,
)

CHUNK = 4096  # the smallest chunk size the device accepts
ARCHIVE = os.urandom(10 * CHUNK + 17)  # 11 chunks (the last one short)


def _send(rx: Receiver, begin: Begin, indices: list[int], data: bytes = ARCHIVE) -> list[Ack]:
    acks = []
    for i in indices:
        ack = rx.chunk(begin.transfer_id, i, encode_chunk(chunk_data(data, begin, i)))
        if ack:
            acks.append(ack)
    return acks


def test_messages_round_trip_and_topics() -> None:
    b = begin_for(ARCHIVE, "m", "1.0", chunk_size=CHUNK)
    assert b.chunks == 11 and b.transfer_id == b.sha256[:16]
    assert Begin.from_payload(b.to_payload()) == b
    ack = Ack(b.transfer_id, "dev", RECEIVING, 3, 11, [[3, 10]], None, 1.0)
    assert Ack.from_payload(ack.to_payload()) == ack
    assert ack.missing_indices() == list(range(3, 11))
    assert to_ranges([5, 1, 2, 3, 7, 8]) == [[1, 3], [5, 5], [7, 8]]
    assert expand_ranges(to_ranges([0, 4, 5, 9])) == [0, 4, 5, 9]
    assert parse_push_topic("e/d/model/push/abc/chunk/12") == ("abc", "chunk", 12)
    assert parse_push_topic("e/groups/g/model/push/abc/begin") == ("abc", "begin", None)
    assert parse_push_topic("e/d/model/push/abc/ack") == ("abc", "ack", None)
    assert parse_push_topic("e/d/model/state") is None
    with pytest.raises(TransferError):
        Begin.from_payload(b"{}")


def test_chunk_header_detects_corruption() -> None:
    payload = bytearray(encode_chunk(b"hello world"))
    assert decode_chunk(bytes(payload)) == b"hello world"
    payload[-1] ^= 1
    with pytest.raises(TransferError, match="sha256 header"):
        decode_chunk(bytes(payload))


def test_receive_out_of_order_with_duplicates_completes(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, "dev")
    b = begin_for(ARCHIVE, "m", "1.0", chunk_size=CHUNK)
    [ack] = rx.begin(b)
    assert ack.state == RECEIVING and ack.missing == [[0, 10]]
    _send(rx, b, [10, 3, 3, 0, 1, 2, 4, 5, 6, 7, 8, 9, 9])
    done = rx.end(b.transfer_id)
    assert done.state == COMPLETE and done.received == 11
    assert rx.completed is not None
    assert rx.completed[1].read_bytes() == ARCHIVE
    rx.finish(b.transfer_id)
    assert not (tmp_path / b.transfer_id).exists()


def test_end_reports_missing_ranges_then_resend_completes(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, "dev")
    b = begin_for(ARCHIVE, "m", "1.0", chunk_size=CHUNK)
    rx.begin(b)
    _send(rx, b, [0, 1, 2, 5, 6, 10])
    ack = rx.end(b.transfer_id)
    assert ack.state == RECEIVING and ack.missing == [[3, 4], [7, 9]]
    _send(rx, b, ack.missing_indices())
    assert rx.end(b.transfer_id).state == COMPLETE


def test_corrupted_chunk_is_dropped_and_requested_again(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, "dev")
    b = begin_for(ARCHIVE, "m", "1.0", chunk_size=CHUNK)
    rx.begin(b)
    bad = bytearray(encode_chunk(chunk_data(ARCHIVE, b, 4)))
    bad[40] ^= 0xFF
    rx.chunk(b.transfer_id, 4, bytes(bad))
    _send(rx, b, [i for i in range(11) if i != 4])
    assert rx.end(b.transfer_id).missing == [[4, 4]]


def test_resume_after_receiver_restart(tmp_path: Path) -> None:
    b = begin_for(ARCHIVE, "m", "1.0", chunk_size=CHUNK)
    rx = Receiver(tmp_path, "dev")
    rx.begin(b)
    _send(rx, b, [0, 1, 2, 3, 4])
    rx.close()  # agent killed
    rx2 = Receiver(tmp_path, "dev")
    assert rx2.active == b
    [ack] = rx2.begin(b)  # the pusher asks where we are
    assert ack.received == 5 and ack.missing == [[5, 10]]
    _send(rx2, b, ack.missing_indices())
    assert rx2.end(b.transfer_id).state == COMPLETE
    assert rx2.completed and rx2.completed[1].read_bytes() == ARCHIVE


def test_size_limit_checked_at_begin_and_per_chunk(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, "dev", max_bytes=5 * CHUNK)
    b = begin_for(ARCHIVE, "m", "1.0", chunk_size=CHUNK)
    [ack] = rx.begin(b)
    assert ack.state == FAILED and "exceeds" in (ack.error or "")
    assert rx.active is None
    # a pusher that lies about the size: chunks longer than announced fail the transfer
    small = os.urandom(3 * CHUNK)
    b2 = begin_for(small, "m", "1.0", chunk_size=CHUNK)
    rx.begin(b2)
    fail = rx.chunk(b2.transfer_id, 2, encode_chunk(os.urandom(CHUNK + 500)))
    assert fail is not None and fail.state == FAILED and rx.active is None
    assert not (tmp_path / b2.transfer_id).exists()


def test_whole_archive_sha256_is_checked(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, "dev")
    b = begin_for(ARCHIVE, "m", "1.0", chunk_size=CHUNK)
    rx.begin(b)
    other = bytearray(ARCHIVE)
    other[5] ^= 1  # chunk headers match the (wrong) data, only the archive digest can catch it
    _send(rx, b, list(range(11)), bytes(other))
    ack = rx.end(b.transfer_id)
    assert ack.state == FAILED and "does not match" in (ack.error or "")
    assert rx.completed is None


def test_newer_transfer_supersedes_same_id_resumes(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, "dev")
    b1 = begin_for(ARCHIVE, "m", "1.0", chunk_size=CHUNK)
    rx.begin(b1)
    _send(rx, b1, [0, 1])
    [resume] = rx.begin(b1)
    assert resume.received == 2
    other = os.urandom(2 * CHUNK + 100)
    b2 = begin_for(other, "m", "2.0", chunk_size=CHUNK)
    old, new = rx.begin(b2)
    assert old.transfer_id == b1.transfer_id and old.state == SUPERSEDED
    assert new.transfer_id == b2.transfer_id and new.state == RECEIVING
    assert not (tmp_path / b1.transfer_id).exists()
    assert rx.chunk(b1.transfer_id, 2, encode_chunk(chunk_data(ARCHIVE, b1, 2))) is None  # ignored
    assert rx.end(b1.transfer_id).state == UNKNOWN
    _send(rx, b2, [0, 1, 2], other)
    assert rx.end(b2.transfer_id).state == COMPLETE


def test_stalled_transfer_is_reported_and_kept(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, "dev")
    b = begin_for(ARCHIVE, "m", "1.0", chunk_size=CHUNK)
    rx.begin(b)
    assert rx.stalled(60.0) is None
    ack = rx.stalled(0.0)
    assert ack is not None and ack.state == "stalled" and rx.active == b


def test_repeated_end_or_begin_after_completion_answers_complete(tmp_path: Path) -> None:
    rx = Receiver(tmp_path, "dev")
    b = begin_for(ARCHIVE, "m", "1.0", chunk_size=CHUNK)
    rx.begin(b)
    _send(rx, b, list(range(11)))
    assert rx.end(b.transfer_id).state == COMPLETE
    assert rx.end(b.transfer_id).state == COMPLETE  # the first ack was lost
    assert rx.begin(b)[0].state == COMPLETE
    rx.finish(b.transfer_id)
    assert rx.begin(b)[0].state == RECEIVING  # pushed again later: received again
