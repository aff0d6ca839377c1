"""The stabiliser's state machine: N consecutive agreeing results above a score, unknown start, model swaps."""

from __future__ import annotations

import math

import pytest

from edgecv.agent.vision.states import REASON_CONFIRMED, REASON_MODEL_CHANGED, REASON_START, Stabiliser


def feed(stab: Stabiliser, results: list[tuple[str | None, float]]) -> list[tuple[int, str | None]]:
    """(index of the result that changed the state, new state) for each change."""
    out = []
    for i, (label, score) in enumerate(results):
        change = stab.observe(label, score, ts=100.0 + i, frame=i, frame_ts=99.0 + i)
        if change is not None:
            out.append((i, change.state))
    return out


def test_the_state_starts_unknown_and_needs_n_agreeing_results() -> None:
    stab = Stabiliser(consecutive=3, min_score=0.6)
    start = stab.start(50.0)
    assert (start.state, start.previous, start.reason, start.since) == (None, None, REASON_START, 50.0)
    assert feed(stab, [("closed", 0.9), ("closed", 0.8)]) == [] and stab.state is None and stab.pending
    change = stab.observe("closed", 0.7, ts=103.0, frame=7, frame_ts=102.5)
    assert change is not None and not stab.pending
    assert (change.state, change.previous, change.reason, change.count, change.frame, change.frame_ts) == (
        "closed", None, REASON_CONFIRMED, 3, 7, 102.5)
    assert change.score == pytest.approx((0.9 + 0.8 + 0.7) / 3)  # the evidence: mean score of the agreeing run
    assert stab.state == "closed" and stab.since == 103.0 and stab.last is change


def test_flicker_shorter_than_n_never_changes_the_state() -> None:
    stab = Stabiliser(consecutive=3, min_score=0.5)
    feed(stab, [("closed", 0.9)] * 3)
    noisy = [("open", 0.9), ("open", 0.9), ("closed", 0.9), ("open", 0.95), ("open", 0.95), ("closed", 0.6)] * 20
    assert feed(stab, noisy) == [] and stab.state == "closed"
    # the real change: three in a row
    assert feed(stab, [("open", 0.8)] * 3) == [(2, "open")]
    assert stab.last is not None and stab.last.previous == "closed"


@pytest.mark.parametrize("breaker", [("open", 0.59), (None, 0.0), ("open", math.nan), ("closed", 0.99),
                                     ("ajar", 0.9)])
def test_a_low_score_no_label_the_current_state_or_another_label_breaks_the_run(
        breaker: tuple[str | None, float]) -> None:
    stab = Stabiliser(consecutive=3, min_score=0.6)
    feed(stab, [("closed", 0.9)] * 3)
    assert feed(stab, [("open", 0.9), ("open", 0.9), breaker, ("open", 0.9), ("open", 0.9)]) == []
    assert stab.state == "closed"
    assert feed(stab, [("open", 0.9)]) == [(0, "open")]  # ... and the run starts again after it


def test_one_consecutive_result_follows_every_frame() -> None:
    stab = Stabiliser(consecutive=1, min_score=0.0)
    assert feed(stab, [("a", 0.5), ("b", 0.5), ("b", 0.5), ("a", 0.5)]) == [(0, "a"), (1, "b"), (3, "a")]


def test_a_model_swap_drops_the_run_and_keeps_a_state_the_new_model_can_name() -> None:
    stab = Stabiliser(consecutive=3)
    feed(stab, [("closed", 0.9)] * 3)
    feed(stab, [("open", 0.9)] * 2)
    assert stab.pending
    assert stab.model_changed(("closed", "open"), ts=200.0) is None
    assert stab.state == "closed" and not stab.pending
    assert feed(stab, [("open", 0.9)] * 2) == []  # the old model's two results no longer count
    change = stab.model_changed(("empty", "full"), ts=300.0)
    assert change is not None and (change.state, change.previous, change.reason, change.since) == (
        None, "closed", REASON_MODEL_CHANGED, 300.0)
    assert stab.state is None and stab.model_changed(("x",), ts=301.0) is None  # unknown stays unknown


def test_consecutive_must_be_positive() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        Stabiliser(consecutive=0)
