"""Camera sources and the grabber: synthetic kinds, video files (looped or not), reopen after failures and a
vanished file, newest-frame semantics, and clear errors for unusable sources."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.camera import Camera, has_gstreamer, open_source, redact
from agent.config import CameraConfig
from agent.errors import CameraError
from agent.synthetic import SourceSpecError, SyntheticSource, load_fashion_mnist, read_idx

FAST = {"backoff_min_s": 0.02, "backoff_max_s": 0.1}


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _frames(source: SyntheticSource, n: int) -> list[tuple[np.ndarray, int | None]]:
    out = []
    for _ in range(n):
        assert source.grab()
        out.append(source.retrieve())
    return out


@pytest.fixture
def video(tmp_path: Path) -> Path:
    """A 6-frame MJPG .avi whose frame i is filled with grey level 40 * i."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 25.0, (64, 48))
    assert writer.isOpened()
    for i in range(6):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    return path


def _level(frame_image: np.ndarray) -> int:
    return round(float(frame_image.mean()) / 40)


# -- synthetic sources ----------------------------------------------------------------------------------

def test_noise_frames_are_random_and_sized() -> None:
    (a, ta), (b, _) = _frames(SyntheticSource("synthetic:noise?width=80&height=60"), 2)
    assert a.shape == (60, 80, 3) and a.dtype == np.uint8 and ta is None
    assert not np.array_equal(a, b) and 100 < a.mean() < 155


def test_bars_move_and_static_does_not() -> None:
    bars = [img for img, _ in _frames(SyntheticSource("synthetic:bars", width=64, height=32), 3)]
    assert bars[0].shape == (32, 64, 3)
    assert not np.array_equal(bars[0], bars[1]) and not np.array_equal(bars[1], bars[2])
    static = [img for img, _ in _frames(SyntheticSource("synthetic:static"), 3)]
    assert np.array_equal(static[0], static[1]) and np.array_equal(static[1], static[2])
    assert static[0].std() > 10  # a pattern, not a blank frame


def test_fashion_mnist_frames_carry_their_true_label(fashion_mnist_dir: Path) -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    raw = read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert np.array_equal(raw, labels)
    frames = _frames(SyntheticSource("synthetic:fashion-mnist?scale=3"), 5)
    for i, (img, truth) in enumerate(frames):
        assert img.shape == (84, 84, 3) and truth == labels[i]
        assert np.array_equal(img[::3, ::3, 1], images[i]) and np.array_equal(img[:, :, 0], img[:, :, 2])
    shuffled = [t for _, t in _frames(SyntheticSource("synthetic:fashion-mnist?shuffle=1&seed=3"), 20)]
    assert shuffled != labels[:20].tolist()
    train = SyntheticSource("synthetic:fashion-mnist?split=train&scale=1")
    img, truth = _frames(train, 1)[0]
    assert img.shape == (28, 28, 3) and truth == int(load_fashion_mnist("train")[1][0])


def test_fashion_mnist_without_loop_ends() -> None:
    src = SyntheticSource("synthetic:fashion-mnist", loop=False)
    assert all(src.grab() for _ in range(10000))
    assert not src.grab() and "loop = false" in (src.error or "")
    looped = SyntheticSource("synthetic:fashion-mnist", loop=True)
    assert all(looped.grab() for _ in range(10001))
    assert looped.retrieve()[1] == int(load_fashion_mnist("test")[1][0])  # wrapped to the first image


def test_fail_source_fails_after_n_frames() -> None:
    src = SyntheticSource("synthetic:fail?after=3")
    assert [src.grab() for _ in range(4)] == [True, True, True, False]
    assert "after 3 frames" in (src.error or "")


@pytest.mark.parametrize(("source", "message"), [
    ("synthetic:rainbow", "kind 'rainbow' is unknown"),
    ("synthetic:fail?after=x", "after must be an integer"),
    ("synthetic:noise?colour=red", "unknown parameter(s) colour"),
    ("synthetic:fashion-mnist?split=val", "split 'val' is unknown"),
])
def test_bad_synthetic_specs_are_permanent_errors(source: str, message: str) -> None:
    with pytest.raises(SourceSpecError) as info:
        open_source(CameraConfig(source=source))
    assert message in str(info.value)
    cam = Camera(CameraConfig(source=source), **FAST).start()
    try:
        assert _wait_for(lambda: cam.status()["state"] == "failed")
        assert message in cam.status()["error"]
    finally:
        cam.stop()


# -- grabber --------------------------------------------------------------------------------------------

def test_latest_returns_each_frame_once_and_the_newest() -> None:
    cam = Camera(CameraConfig(source="synthetic:bars", fps=100), **FAST).start()
    try:
        seqs = []
        for _ in range(20):
            frame = cam.latest(timeout=2.0)
            assert frame is not None
            seqs.append(frame.seq)
        assert all(b > a for a, b in itertools.pairwise(seqs))  # never the same frame twice
        time.sleep(0.3)  # a slow consumer: ~30 frames arrive meanwhile
        before = cam.status()["frames"]
        frame = cam.latest(timeout=1.0)
        assert frame is not None and frame.seq >= before - 2  # the newest, not the oldest queued
        assert frame.camera == "cam0" and abs(frame.ts - time.time()) < 1.0
        status = cam.status()
        assert status["skipped"] >= 20 and status["state"] == "open" and status["error"] is None
        assert 20 < status["fps"] < 130 and status["width"] == 160 and status["height"] == 120
    finally:
        cam.stop()


def test_latest_times_out_without_a_new_frame() -> None:
    cam = Camera(CameraConfig(source="synthetic:static", fps=2), **FAST).start()
    try:
        assert cam.latest(timeout=2.0) is not None
        t0 = time.monotonic()
        assert cam.latest(timeout=0.1) is None
        assert 0.08 < time.monotonic() - t0 < 0.4
    finally:
        cam.stop()
    assert cam.latest(timeout=0.5) is None  # stopped: returns at once


def test_fps_limit_paces_synthetic_sources() -> None:
    cam = Camera(CameraConfig(source="synthetic:noise", fps=20), **FAST).start()
    try:
        time.sleep(1.0)
        assert 10 <= cam.status()["frames"] <= 23  # paced, not thousands (loose: shared CI cores)
    finally:
        cam.stop()


def test_failing_camera_is_reopened_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    cam = Camera(CameraConfig(source="synthetic:fail?after=5", fps=200), **FAST)
    states: list[str] = []
    with caplog.at_level(logging.WARNING, logger="agent.camera"):
        cam.start()
        try:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and cam.status()["reopens"] < 3:
                state = cam.status()["state"]
                if not states or states[-1] != state:
                    states.append(state)
                time.sleep(0.002)
            assert _wait_for(lambda: cam.status()["state"] == "open")
            status = cam.status()
        finally:
            cam.stop()
    assert status["reopens"] >= 3 and status["frames"] >= 15
    assert "reopening" in states and states.index("reopening") < len(states) - 1  # reopening → open again
    # per-frame warnings are rate-limited: one log line for several failures
    assert len([r for r in caplog.records if "reopening" in r.getMessage()]) == 1


def test_video_file_loops(video: Path) -> None:
    cam = Camera(CameraConfig(source=str(video), loop=True, fps=200), **FAST).start()
    try:
        levels: list[int] = []
        shape: tuple[int, ...] = ()
        while len(levels) < 14:
            frame = cam.latest(timeout=2.0)
            assert frame is not None
            levels.append(_level(frame.image))
            shape = frame.image.shape
        status = cam.status()
    finally:
        cam.stop()
    assert status["frames"] > 6 and status["reopens"] == 0 and status["state"] == "open"
    assert levels.count(0) >= 2  # the first frame came round again
    assert shape == (48, 64, 3)


def test_video_file_without_loop_reopens_at_the_end(video: Path) -> None:
    cam = Camera(CameraConfig(source=str(video), loop=False, fps=200), **FAST).start()
    try:
        assert _wait_for(lambda: cam.status()["reopens"] >= 1)
        assert "End of video file" in (cam.status()["last_error"] or "")
        assert _wait_for(lambda: cam.status()["frames"] > 6)  # replayed after reopening
    finally:
        cam.stop()


def test_vanished_video_file_reopens_when_it_returns(video: Path, tmp_path: Path) -> None:
    cam = Camera(CameraConfig(source=str(video), loop=True, fps=100), **FAST).start()
    aside = tmp_path / "aside.avi"
    try:
        assert cam.latest(timeout=2.0) is not None
        video.rename(aside)
        assert _wait_for(lambda: cam.status()["state"] == "reopening", timeout=4.0)
        assert "vanished" in cam.status()["error"] or "does not exist" in cam.status()["error"]
        frames = cam.status()["frames"]
        time.sleep(0.2)
        assert cam.status()["frames"] == frames  # nothing delivered while it is gone
        aside.rename(video)
        assert _wait_for(lambda: cam.status()["state"] == "open", timeout=4.0)
        assert _wait_for(lambda: cam.status()["frames"] > frames)
        assert cam.status()["reopens"] >= 1
    finally:
        cam.stop()


def test_missing_device_and_unreachable_stream_keep_retrying() -> None:
    cams = [Camera(CameraConfig(name="v4l2", source="/dev/video99"), **FAST),
            Camera(CameraConfig(name="rtsp", source="rtsp://user:pw@127.0.0.1:9/x", open_timeout_s=1,
                                read_timeout_s=1), **FAST)]
    try:
        for cam in cams:
            cam.start()
        for cam in cams:
            assert _wait_for(lambda cam=cam: cam.status()["reopens"] >= 2, timeout=8.0)  # type: ignore[misc]
            status = cam.status()
            assert status["state"] == "reopening" and "Cannot open" in status["error"]
        assert cams[1].status()["source"] == "rtsp://***@127.0.0.1:9/x"
        assert "pw" not in cams[1].status()["error"]
    finally:
        for cam in cams:
            cam.stop()


def test_gstreamer_source_needs_gstreamer() -> None:
    if has_gstreamer():
        with pytest.raises(CameraError, match="Cannot open gstreamer source"):
            open_source(CameraConfig(source="gst:nosuchelement ! appsink"))
    else:
        with pytest.raises(SourceSpecError, match="no GStreamer support"):
            open_source(CameraConfig(source="gst:videotestsrc ! appsink"))


def test_redact_hides_credentials() -> None:
    assert redact("rtsp://admin:hunter2@10.0.0.5:554/s") == "rtsp://***@10.0.0.5:554/s"
    assert redact("/dev/video0") == "/dev/video0"
