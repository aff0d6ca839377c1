"""A region's stable state: the label its classifications agree on, changed only after N consecutive agreeing results.

Per-frame top-1 flickers: sensor noise, a moth on the lens, a shadow, a person walking past. A state changes only
when `consecutive` results in a row (default 3) name the same new label with a top-1 score of at least `min_score`:

- a result that names the current state, names another label than the candidate, scores below `min_score` or has
  no label at all (everything under `publish.min_score`) breaks the run; the state stays;
- the state starts unknown (None): the first state also needs `consecutive` agreeing results;
- after a model swap the run in progress is dropped (its results came from the old model); the state is kept when
  the new model has that label, and becomes unknown when it does not (`model_changed`).

`pending` says a run towards another label is under way: a region triggered by motion is then classified on the
next frames too, so a change seen while something moved is confirmed or dropped without waiting for more motion.
Used by one camera loop; no locking.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

REASON_START, REASON_CONFIRMED, REASON_MODEL_CHANGED = "start", "confirmed", "model_changed"


@dataclass(frozen=True, slots=True)
class StateChange:
    """A new stable state and its evidence. `state` None = unknown. `score` is the mean top-1 score of the `count`
    agreeing results that confirmed it (None for an unknown state); `frame`/`frame_ts` the camera frame number and
    capture time of the last of them; `since` when the state changed (epoch s)."""

    state: str | None
    previous: str | None
    since: float
    reason: str
    score: float | None = None
    count: int = 0
    frame: int | None = None
    frame_ts: float | None = None


class Stabiliser:
    def __init__(self, consecutive: int = 3, min_score: float = 0.5) -> None:
        if consecutive < 1:
            raise ValueError(f"consecutive must be >= 1, got {consecutive}")
        self.consecutive = consecutive
        self.min_score = min_score
        self.state: str | None = None
        self.since: float | None = None
        self.last: StateChange | None = None  # the newest change (what the retained state topic shows)
        self._candidate: str | None = None
        self._count = 0
        self._score_sum = 0.0

    @property
    def pending(self) -> bool:
        """A run towards another label than the state is under way."""
        return self._count > 0

    @property
    def run(self) -> int:
        """How many agreeing results the run towards another label holds so far (1: this result began one)."""
        return self._count

    def start(self, ts: float) -> StateChange:
        """The initial, unknown state (published when the agent starts)."""
        self._reset_run()
        self.state, self.since = None, ts
        self.last = StateChange(None, None, ts, REASON_START)
        return self.last

    def observe(self, label: str | None, score: float, ts: float, frame: int | None = None,
                frame_ts: float | None = None) -> StateChange | None:
        """Feed one classification (top-1 label and score); returns the change when this result confirms a new
        state, else None."""
        if label is None or not score >= self.min_score:  # `not >=`: a NaN score breaks the run too
            self._reset_run()
            return None
        if label == self.state:
            self._reset_run()
            return None
        if label == self._candidate:
            self._count += 1
            self._score_sum += score
        else:
            self._candidate, self._count, self._score_sum = label, 1, score
        if self._count < self.consecutive:
            return None
        change = StateChange(label, self.state, ts, REASON_CONFIRMED, self._score_sum / self._count, self._count,
                             frame, frame_ts)
        self.state, self.since, self.last = label, ts, change
        self._reset_run()
        return change

    def model_changed(self, labels: Collection[str], ts: float) -> StateChange | None:
        """A new model classifies from now on: drop the run in progress; the state becomes unknown (returned as a
        change) when the new model cannot name it."""
        self._reset_run()
        if self.state is None or self.state in labels:
            return None
        change = StateChange(None, self.state, ts, REASON_MODEL_CHANGED)
        self.state, self.since, self.last = None, ts, change
        return change

    def _reset_run(self) -> None:
        self._candidate, self._count, self._score_sum = None, 0, 0.0
