"""Camera sources and both reading modes: synthetic kinds, video files (looped or not), reopen after failures
and a vanished file, newest-frame semantics of live sources, pull mode (no thread, no skipped frame, fps pacing,
timeouts honoured while backing off) for the others, and clear errors for unusable sources."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgecv.agent.config import CameraConfig
from edgecv.agent.errors import CameraError
from edgecv.agent.vision import camera as camera_module
from edgecv.agent.vision import synthetic
from edgecv.agent.vision.camera import Camera, Frame, has_gstreamer, open_source, redact, source_is_live
from edgecv.agent.vision.synthetic import SourceSpecError, SyntheticSource, load_fashion_mnist, read_idx
from tests.waiting import wait_until

FAST = {"backoff_min_s": 0.02, "backoff_max_s": 0.1}



@contextmanager
def _consumer(cam: Camera) -> Iterator[list[Frame]]:
    """A background consumer calling cam.latest() in a loop (pull-mode frames flow only when asked for)."""
    frames: list[Frame] = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set():
            frame = cam.latest(timeout=0.05)
            if frame is not None:
                frames.append(frame)
            elif done.wait(0.005):  # latest() returns None at once once the camera is stopped
                break

    thread = threading.Thread(target=consume, name="test-consumer", daemon=True)
    thread.start()
    try:
        yield frames
    finally:
        done.set()
        thread.join(5.0)
        assert not thread.is_alive()


def _camera_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"camera-{name}"]


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


def test_live_parameter_on_every_kind() -> None:
    for kind in synthetic.KINDS:
        assert SyntheticSource(f"synthetic:{kind}?live=1").live
        assert not SyntheticSource(f"synthetic:{kind}?live=0").live
    assert not SyntheticSource("synthetic:bars").live and SyntheticSource("synthetic:stall").live
    with pytest.raises(SourceSpecError, match="live must be <= 1"):
        SyntheticSource("synthetic:bars?live=2")
    for live, fps in ((1, 50.0), (0, 1.0)):  # a live source is clocked like a sensor; on demand means unclocked
        src = SyntheticSource(f"synthetic:bars?live={live}", fps=fps)
        t0 = time.monotonic()
        _frames(src, 6)
        elapsed = time.monotonic() - t0
        assert (0.09 < elapsed < 0.3) if live else elapsed < 0.05


@pytest.mark.parametrize(("source", "live"), [
    ("0", True), ("/dev/video2", True), ("rtsp://cam/stream", True), ("http://cam/mjpg", True),
    ("gst:videotestsrc ! appsink", True), ("/srv/clips/door.mp4", False), ("clip.avi", False),
    ("synthetic:bars", False), ("synthetic:bars?live=1", True), ("synthetic:fashion-mnist?shuffle=1&live=0", False),
    ("synthetic:stall", True), ("synthetic:stall?after=3&live=0", False),
    ("synthetic:rainbow", False), ("synthetic:bars?live=yes", False),  # bad specs fail on the first read
])
def test_source_is_live(source: str, live: bool) -> None:
    assert source_is_live(source) is live


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
        for _ in range(2):  # the first call fails for good; later calls wait out their timeout, no busy loop
            t0 = time.monotonic()
            assert cam.latest(timeout=0.1) is None
            assert 0.08 < time.monotonic() - t0 < 0.4
        assert cam.status()["state"] == "failed" and message in cam.status()["error"]
    finally:
        cam.stop()


# -- live sources: the grabber thread -------------------------------------------------------------------

def test_live_source_gives_the_newest_frame_and_counts_skipped() -> None:
    cam = Camera(CameraConfig(name="live", source="synthetic:bars?live=1", fps=100), **FAST).start()
    try:
        assert len(_camera_threads("live")) == 1
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
        assert frame.camera == "live" and abs(frame.ts - time.time()) < 1.0
        status = cam.status()
        assert status["skipped"] >= 20 and status["state"] == "open" and status["error"] is None
        assert 20 < status["fps"] < 130 and status["width"] == 160 and status["height"] == 120
    finally:
        cam.stop()
    assert not _camera_threads("live")


@pytest.mark.parametrize("camera_fps", [20.0, 60.0])
def test_live_fps_limit_decodes_at_fps_when_the_camera_runs_at_a_multiple(camera_fps: float) -> None:
    cam = Camera(CameraConfig(source="synthetic:bars?live=1", fps=20),
                 opener=lambda cfg: SyntheticSource(cfg.source, fps=camera_fps), **FAST).start()
    try:
        time.sleep(2.0)  # no consumer needed: a live camera is drained regardless
        frames = cam.status()["frames"]
    finally:
        cam.stop()
    assert 34 <= frames <= 45  # ~40; a minimum gap since the last decode gave 20 (20 fps) and 30 (60 fps)


def test_stall_source_is_live_and_hangs_its_grabber_not_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synthetic, "STALL_S", 1.0)  # the stuck read gives up soon after the test, ending the thread
    cam = Camera(CameraConfig(name="stall", source="synthetic:stall?after=3", fps=100), **FAST).start()
    try:
        assert cam.live and len(_camera_threads("stall")) == 1
        assert [f.seq for f in iter(lambda: cam.latest(timeout=0.3), None)] == [0, 1, 2]  # then it hangs
        assert cam.status()["state"] == "open"  # a stuck driver reports nothing; the watchdog notices
    finally:
        cam.stop(timeout=0.1)
    assert not Camera(CameraConfig(source="synthetic:stall?live=0")).live


# -- pull mode: files and synthetic sources -------------------------------------------------------------

def test_pull_mode_delivers_every_frame_to_a_slow_consumer_without_a_thread() -> None:
    cam = Camera(CameraConfig(name="pull", source="synthetic:bars", fps=100), **FAST).start()
    try:
        assert not cam.live and not _camera_threads("pull")
        assert cam.status()["frames"] == 0  # nothing read for nobody
        seqs = []
        for _ in range(4):
            frame = cam.latest(timeout=1.0)
            assert frame is not None and frame.camera == "pull" and abs(frame.ts - time.time()) < 1.0
            seqs.append(frame.seq)
            time.sleep(0.2)  # a slow consumer
        status = cam.status()
        assert not _camera_threads("pull")
    finally:
        cam.stop()
    assert seqs == [0, 1, 2, 3]
    assert status["skipped"] == 0 and status["frames"] == 4 and status["state"] == "open"
    assert status["width"] == 160 and status["height"] == 120


def test_pull_mode_paces_at_fps_and_fps_0_is_unpaced() -> None:
    def frames_in(fps: float, seconds: float) -> int:
        cam = Camera(CameraConfig(source="synthetic:noise", fps=fps), **FAST).start()
        try:
            n, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < seconds:
                n += cam.latest(timeout=0.5) is not None
            return n
        finally:
            cam.stop()

    assert 10 <= frames_in(20, 1.0) <= 23  # paced, not thousands (loose: shared CI cores)
    assert frames_in(0, 0.2) > 200


def test_latest_times_out_without_a_new_frame() -> None:
    cam = Camera(CameraConfig(source="synthetic:static", fps=2), **FAST).start()
    try:
        assert cam.latest(timeout=2.0) is not None
        t0 = time.monotonic()
        assert cam.latest(timeout=0.1) is None  # the next frame is due in 0.5 s
        assert 0.08 < time.monotonic() - t0 < 0.4
        assert cam.latest(timeout=1.0) is not None
    finally:
        cam.stop()


def test_latest_honours_its_timeout_while_the_source_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(camera_module.random, "uniform", lambda low, high: high)  # no jitter: reopen in 1.0 s
    cam = Camera(CameraConfig(source="synthetic:fail?after=2", fps=0), backoff_min_s=1.0, backoff_max_s=5.0).start()
    try:
        assert [f.seq for f in (cam.latest(timeout=1.0), cam.latest(timeout=1.0)) if f] == [0, 1]
        failed = time.monotonic()
        calls = 0
        while time.monotonic() - failed < 0.7:
            t0 = time.monotonic()
            assert cam.latest(timeout=0.1) is None  # the first call fails the read; the rest wait, within 0.1 s
            assert 0.08 < time.monotonic() - t0 < 0.4
            calls += 1
        status = cam.status()
        assert status["state"] == "reopening" and status["reopens"] == 1 and calls >= 3
        assert "Synthetic failure" in status["error"]
        frame = cam.latest(timeout=2.0)  # the reopen falls within this call
        assert frame is not None and frame.seq == 2  # seq goes on across reopens
        assert 0.9 < time.monotonic() - failed < 1.6
        assert cam.status()["state"] == "open" and cam.status()["reopens"] == 1
    finally:
        cam.stop()


class _RecordingSource:
    """A pull-mode FrameSource whose reads take 5 ms, recording closes and whether one happened mid-read."""

    live = False

    def __init__(self) -> None:
        self.error: str | None = None
        self.reading = False
        self.closes: list[bool] = []

    def grab(self) -> bool:
        self.reading = True
        time.sleep(0.005)
        self.reading = False
        return True

    def retrieve(self) -> tuple[np.ndarray, int | None]:
        return np.zeros((4, 4, 3), np.uint8), None

    def close(self) -> None:
        self.closes.append(self.reading)


class _RecordingOpener:
    def __init__(self) -> None:
        self.sources: list[_RecordingSource] = []

    def __call__(self, cfg: CameraConfig) -> _RecordingSource:
        self.sources.append(_RecordingSource())
        return self.sources[-1]


def test_stop_releases_the_source_and_latest_returns_none_at_once() -> None:
    opener = _RecordingOpener()
    cam = Camera(CameraConfig(source="clip.avi", fps=0), opener=opener, **FAST).start()
    assert cam.latest(timeout=1.0) is not None
    cam.stop()
    assert [s.closes for s in opener.sources] == [[False]]  # released by stop(): no reader held it
    t0 = time.monotonic()
    assert cam.latest(timeout=1.0) is None
    assert time.monotonic() - t0 < 0.05
    assert len(opener.sources) == 1  # not reopened


def test_stop_from_another_thread_while_the_consumer_reads() -> None:
    opener = _RecordingOpener()
    cam = Camera(CameraConfig(source="clip.avi", fps=0), opener=opener, **FAST)
    seqs: list[int] = []
    for _ in range(5):
        cam.start()
        with _consumer(cam) as frames:
            assert wait_until(lambda: len(frames) >= 10 and opener.sources[-1].reading)
            cam.stop()  # mid-read (almost surely: reads take 5 ms): the reader closes the source when it returns
            stopped = len(frames)
            time.sleep(0.05)
            assert len(frames) <= stopped + 1  # at most the read in progress completes
        assert opener.sources[-1].closes == [False]  # closed once, never under a reader
        seqs += [f.seq for f in frames]
    assert len(opener.sources) == 5 and cam.status()["reopens"] == 0
    assert seqs == list(range(len(seqs)))  # seq goes on across restarts, no frame skipped


def test_failing_camera_is_reopened_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    cam = Camera(CameraConfig(source="synthetic:fail?after=5", fps=200), **FAST)
    assert cam.status()["state"] == "opening"  # before the first open: not "reopening"
    seqs: list[int] = []
    with caplog.at_level(logging.INFO, logger="edgecv.agent.vision.camera"):
        cam.start()
        try:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and len(seqs) < 16:  # 3 failures, then the 16th frame
                frame = cam.latest(timeout=0.05)
                if frame is not None:
                    seqs.append(frame.seq)
            status = cam.status()
        finally:
            cam.stop()
    assert seqs == list(range(16))  # frames flow again after each reopen, seq goes on
    assert status["reopens"] == 3 and status["state"] == "open" and status["error"] is None
    assert "Synthetic failure after 5 frames" in (status["last_error"] or "")
    # per-frame warnings are rate-limited: one log line for several failures ...
    assert len([r for r in caplog.records if "reopening" in r.getMessage()]) == 1
    # ... and so are the INFO lines of the reopens: the first open, then one line for the three reopens
    opened = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(opened) == 2 and "opened" in opened[0] and "reopened" in opened[1], opened


def test_a_camera_that_keeps_failing_logs_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 13: a camera failing every few frames logged an INFO line at every reopen (23 lines in 15 s). Now its
    log lines are rate-limited like the per-frame problems: within one interval, however many reopens, one warning
    and two INFO lines (the first open and the first reopen); DEBUG keeps every one."""
    cam = Camera(CameraConfig(source="synthetic:fail?after=1", fps=0), **FAST)
    with caplog.at_level(logging.DEBUG, logger="edgecv.agent.vision.camera"):
        cam.start()
        try:
            assert wait_until(lambda: (cam.latest(timeout=0.02), cam.status()["reopens"])[1] >= 20, timeout=30.0)
        finally:
            cam.stop()
    info_or_worse = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(info_or_worse) == 3, [r.getMessage() for r in info_or_worse]
    assert len([r for r in caplog.records if "reopened" in r.getMessage()]) >= 19  # at DEBUG


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
    assert levels == [0, 1, 2, 3, 4, 5] * 2 + [0, 1]  # every frame in order, round again
    assert status["frames"] == 14 and status["skipped"] == 0 and status["reopens"] == 0
    assert status["state"] == "open" and shape == (48, 64, 3)


def test_video_file_without_loop_plays_once_and_ends(video: Path) -> None:
    """loop = false: every frame once, in order; then the camera is "ended" and never reopened (it used to replay
    the file after a reopen backoff)."""
    cam = Camera(CameraConfig(source=str(video), loop=False, fps=0), **FAST).start()
    try:
        frames = []
        while (frame := cam.latest(timeout=2.0)) is not None:
            frames.append(frame)
        t0 = time.monotonic()
        assert cam.latest(timeout=0.3) is None and time.monotonic() - t0 >= 0.25  # waits its timeout, no busy loop
        status = cam.status()
    finally:
        cam.stop()
    assert [_level(f.image) for f in frames] == [0, 1, 2, 3, 4, 5]
    assert [f.seq for f in frames] == list(range(6))
    assert status["state"] == "ended" and status["reopens"] == 0 and status["frames"] == 6


def test_finite_synthetic_source_without_loop_ends_and_with_loop_repeats() -> None:
    once = Camera(CameraConfig(source="synthetic:scene?frames=4&width=64&height=48&jpeg=0", loop=False, fps=0),
                  **FAST).start()
    looped = Camera(CameraConfig(source="synthetic:scene?frames=4&width=64&height=48&jpeg=0", loop=True, fps=0),
                    **FAST).start()
    try:
        got = []
        while (frame := once.latest(timeout=2.0)) is not None:
            got.append(frame)
        again = [looped.latest(timeout=2.0) for _ in range(9)]
    finally:
        once.stop()
        looped.stop()
    assert len(got) == 4 and once.state == "ended" and once.status()["reopens"] == 0
    assert all(f is not None for f in again) and looped.state == "open"
    assert np.array_equal(again[0].image, again[4].image)  # type: ignore[union-attr]  # frame 4 is frame 0 again


def test_vanished_video_file_reopens_when_it_returns(video: Path, tmp_path: Path) -> None:
    cam = Camera(CameraConfig(source=str(video), loop=True, fps=100), **FAST).start()
    aside = tmp_path / "aside.avi"
    try:
        with _consumer(cam) as received:
            assert wait_until(lambda: len(received) > 0)
            video.rename(aside)
            assert wait_until(lambda: cam.status()["state"] == "reopening", timeout=4.0)
            assert "vanished" in cam.status()["error"] or "does not exist" in cam.status()["error"]
            frames = cam.status()["frames"]
            time.sleep(0.2)
            assert cam.status()["frames"] == frames  # nothing delivered while it is gone
            aside.rename(video)
            assert wait_until(lambda: cam.status()["state"] == "open", timeout=4.0)
            assert wait_until(lambda: cam.status()["frames"] > frames)
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
            assert wait_until(lambda cam=cam: cam.status()["reopens"] >= 2, timeout=8.0)  # type: ignore[misc]
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
