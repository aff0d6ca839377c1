"""softmax / top-k, the publish policy modes and the motion gate."""

from __future__ import annotations

import numpy as np
import pytest

from edgecv.agent.config import MotionConfig, PublishConfig
from edgecv.agent.vision.postprocess import SMALL_HEAD, MotionGate, PublishPolicy, softmax, top_k
from edgecv.agent.vision.synthetic import SyntheticSource

LABELS = ("a", "b", "c", "d")


def test_softmax_is_stable_and_normalised() -> None:
    p = softmax(np.array([1000.0, 1001.0, 999.0]))
    assert np.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-6
    e = np.exp(np.array([1.0, 2.0, 0.0]))
    np.testing.assert_allclose(p, e / e.sum(), rtol=1e-5)
    batch = softmax(np.array([[0.0, 0.0], [0.0, np.log(3.0)]]))
    np.testing.assert_allclose(batch, [[0.5, 0.5], [0.25, 0.75]], rtol=1e-6)


def test_top_k_orders_labels_by_score() -> None:
    logits = np.array([[0.1, 3.0, -1.0, 2.0]], np.float32)
    top = top_k(logits, LABELS, 3)
    assert [t["label"] for t in top] == ["b", "d", "a"] and [t["index"] for t in top] == [1, 3, 0]
    assert top[0]["score"] > top[1]["score"] > top[2]["score"]
    assert abs(sum(t["score"] for t in top_k(logits, LABELS, 10)) - 1) < 1e-6  # k clamps to the classes
    assert set(top[0]) == {"label", "index", "score"} and isinstance(top[0]["score"], float)


def test_top_k_min_score_filters() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.08, 0.02]))
    assert [t["label"] for t in top_k(logits, LABELS, 4, min_score=0.25)] == ["a", "b"]
    assert top_k(logits, LABELS, 4, min_score=0.7) == []


@pytest.mark.parametrize("classes", [3, 10, SMALL_HEAD, SMALL_HEAD + 1, 1000])
def test_top_k_matches_a_sorted_softmax_on_both_paths(classes: int) -> None:
    """Few classes take a plain-Python path, many take numpy: both give the reference ranking and scores."""
    rng = np.random.default_rng(classes)
    labels = tuple(f"c{i}" for i in range(classes))
    for logits in (rng.normal(size=classes).astype(np.float32), np.zeros(classes, np.float32)):  # zeros: all tie
        probs = np.exp(logits.astype(np.float64) - logits.max())
        probs /= probs.sum()
        reference = sorted(range(classes), key=lambda i: (-probs[i], i))[:5]
        top = top_k(logits[None, :], labels, 5)
        assert [t["index"] for t in top] == reference
        assert [t["label"] for t in top] == [labels[i] for i in reference]
        np.testing.assert_allclose([t["score"] for t in top], probs[reference], rtol=1e-5)
        assert all(type(t["index"]) is int and type(t["score"]) is float for t in top)  # JSON-ready


@pytest.mark.parametrize("classes", [4, SMALL_HEAD + 1])
def test_a_nan_logit_gives_no_prediction_rather_than_nan_scores(classes: int) -> None:
    labels = tuple(f"c{i}" for i in range(classes))
    for where in (0, classes - 1):
        logits = np.linspace(0.0, 1.0, classes)
        logits[where] = np.nan
        assert top_k(logits, labels, 2) == []  # an empty top list is never published (PublishPolicy)


def _top(label: str) -> list[dict[str, object]]:
    return [{"label": label, "index": LABELS.index(label), "score": 0.9}]


def test_policy_every_publishes_each_non_empty_result() -> None:
    policy = PublishPolicy(PublishConfig(mode="every"))
    assert all(policy.should_publish(_top("a"), now=t) for t in (0.0, 0.0, 0.01))
    assert not policy.should_publish([], now=1.0)


def test_policy_on_change_publishes_when_the_top_label_changes() -> None:
    policy = PublishPolicy(PublishConfig(mode="on_change"))
    decisions = [policy.should_publish(_top(label), now=i) for i, label in enumerate("aabbba")]
    assert decisions == [True, False, True, False, False, True]
    assert policy.should_publish(_top("a"), now=9, key="cam1")  # per camera
    policy.reset()
    assert policy.should_publish(_top("a"), now=10)


def test_policy_rate_limits_messages_per_second() -> None:
    policy = PublishPolicy(PublishConfig(mode="rate", max_rate=2.0))
    times = np.arange(0.0, 3.0, 0.1)  # 30 frames over 3 s at 10 fps
    published = [t for t in times if policy.should_publish(_top("a"), now=float(t))]
    assert len(published) == 6 and np.all(np.diff(published) >= 0.5 - 1e-9)
    assert policy.should_publish(_top("a"), now=float(times[-1]), key="other")


def test_motion_gate_skips_static_scenes() -> None:
    gate = MotionGate(MotionConfig(enabled=True, threshold=0.02))
    static = SyntheticSource("synthetic:static", width=320, height=240)
    frames = []
    for _ in range(3):
        static.grab()
        frames.append(static.retrieve()[0])
    assert gate.is_static(frames[0]) is False  # nothing to compare with yet
    assert gate.is_static(frames[1]) and gate.is_static(frames[2])
    assert gate.last_difference == 0.0
    bars = SyntheticSource("synthetic:bars", width=320, height=240)
    for _ in range(10):
        bars.grab()
    assert gate.is_static(bars.retrieve()[0]) is False  # bars scrolled by 36 px: the scene changed
    assert gate.is_static(frames[0], key="cam1") is False  # separate reference per camera


def test_motion_gate_threshold_and_drift() -> None:
    gate = MotionGate(MotionConfig(enabled=True, threshold=0.02))
    base = np.full((120, 160, 3), 100, np.uint8)
    assert not gate.is_static(base)
    assert gate.is_static(base + 3)  # 3/255 ≈ 0.012 < 0.02
    assert not gate.is_static(base + 8)  # 8/255 ≈ 0.031 ≥ 0.02: motion, becomes the reference
    # slow drift of 2 levels per frame: static frames do not move the reference, so it adds up
    drift = [gate.is_static(base + 8 + 2 * i) for i in range(1, 5)]
    assert drift == [True, True, False, True]
    noisy = MotionGate(MotionConfig(enabled=True, threshold=0.02))
    rng = np.random.default_rng(0)
    assert not noisy.is_static(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    assert not noisy.is_static(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))


def test_disabled_motion_gate_never_skips() -> None:
    gate = MotionGate(MotionConfig(enabled=False))
    frame = np.zeros((10, 10, 3), np.uint8)
    assert not gate.is_static(frame) and not gate.is_static(frame)
