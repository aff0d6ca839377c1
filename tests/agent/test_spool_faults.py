"""Disk faults on the publish spool: ENOSPC or EIO while appending, marking or compacting, a spool directory that
cannot be opened, a real full file system (a 64 KiB tmpfs). The outbox never raises to the camera loops or the
sender, keeps every message in memory within its capacity, counts what it drops, and closes cleanly."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecv.agent.link import outbox as outbox_module
from edgecv.agent.link.outbox import Outbox


def _fail(code: int) -> object:
    def raise_(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))
    return raise_


def _deliver_all(box: Outbox) -> list[bytes]:
    out = []
    while run := box.take_run({}):
        out += [m.payload for m in run]
        box.ack_all([m.id for m in run])
    return out


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EROFS])
def test_a_failing_spool_write_falls_back_to_memory_and_counts_drops(tmp_path: Path, code: int,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    box = Outbox(10, spool_dir=tmp_path)
    box.put("edgecv/d/predictions", b"before")
    assert box.spool_state == "on"
    monkeypatch.setattr(outbox_module._Spool, "append_many", _fail(code))  # the spool's write boundary
    ids = [box.put("edgecv/d/predictions", f"p{i}".encode()) for i in range(5)]  # the first one hits the error
    box.put_many("edgecv/d/predictions", [f"q{i}".encode() for i in range(10)], qos=1)
    assert box.spool_state == "failed" and box.spool_errors == 1
    assert len(box) == 10 and box.dropped == 6  # 16 put, capacity 10: the 6 oldest dropped and counted
    assert ids[0] > 0
    assert _deliver_all(box) == [f"q{i}".encode() for i in range(10)]
    assert box.delivered == 10
    failures = [r for r in caplog.records if "publish spool" in r.getMessage()]
    assert len(failures) == 1 and "memory only" in failures[0].getMessage()  # logged once, not per message
    box.close()  # nothing left to close: no exception


def test_a_failing_mark_or_compaction_falls_back_to_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = Outbox(100, spool_dir=tmp_path)
    ids = [box.put("edgecv/d/predictions", bytes([i])) for i in range(3)]
    monkeypatch.setattr(outbox_module.os, "pwrite", _fail(errno.EIO))  # the high-water mark write
    assert box.ack(ids[0]) and box.spool_state == "failed"
    assert box.ack(ids[1]) and len(box) == 1 and box.delivered == 2
    box.close()


def test_close_with_a_failing_fsync_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = Outbox(10, spool_dir=tmp_path)
    box.put("edgecv/d/predictions", b"x")
    monkeypatch.setattr(outbox_module.os, "fsync", _fail(errno.EIO))
    box.close()  # shutdown must complete: no exception
    assert box.spool_state == "failed"


def test_an_unusable_spool_dir_at_start_buffers_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    box = Outbox(5, spool_dir=blocker / "spool")  # a directory under a file: ENOTDIR
    assert box.spool_state == "failed"
    box.put("edgecv/d/predictions", b"x")
    assert _deliver_all(box) == [b"x"]


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs, filled up (needs root, which CI and this project's machines have)."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the injected-error tests above "
                    "cover the same code paths")
    try:
        (mnt / "spool").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_file_system_loses_nothing_uncounted(full_tmpfs: Path) -> None:
    box = Outbox(50, spool_dir=full_tmpfs / "spool")
    payloads = [f"prediction {i:04d}".encode() * 20 for i in range(200)]
    for i in range(0, 200, 10):
        box.put_many("edgecv/d/predictions", payloads[i:i + 10], qos=1)
    assert box.spool_state == "failed"
    delivered = _deliver_all(box)
    assert delivered == payloads[-50:]
    assert box.dropped + len(delivered) == 200
    box.close()
