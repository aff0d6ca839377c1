"""The device picks the fastest correct way to run a bundle: every (artifact, runtime) pair this device can run
is loaded, self-tested and timed side by side; the fastest one that passes its self-test serves.

A workstation cannot know which artifact is fastest on a device (a Pi's int8 kernels differ from an x86's, and a
bundle may carry an fp32 artifact because no int8 variant was clearly faster where it was built), so the choice
is measured where the model runs, at load and at every swap. Timing is interleaved — one frame on each
candidate in turn, repeated — so a background load on the device slows them all alike, and each candidate's
median of the full serving path (preprocessing included) decides.

When the candidates span several runtime libraries, they are measured in a short-lived child process
(`python -m edgecv.agent.vision.selection`) and only the winner is loaded in the agent: a runtime library stays
mapped once imported, and onnxruntime + OpenVINO + LiteRT together would double the daemon's resident memory
(measured: 193 MB vs 91 MB with LiteRT alone). A child that crashes or hangs costs nothing but a log line: the
candidates are then measured in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgecv.agent.contract.bundle import Bundle, load_bundle
from edgecv.agent.errors import (
    EdgecvError,
    IncompatibleBundleError,
    InferenceError,
    RuntimeUnavailableError,
    SelfTestError,
)
from edgecv.agent.vision.classifier import Classifier, run_selftest, selftest_frames
from edgecv.agent.vision.runtimes import candidates, no_runtime_error, open_engine

log = logging.getLogger(__name__)

MEASURE_ROUNDS = 40  # frames per candidate at most; the median of these decides
MIN_ROUNDS = 5  # frames per candidate at least, even past the time budget
MEASURE_BUDGET_S = 3.0  # wall time for all timing rounds together (loading and self-tests not included)
WARMUP = 2
CHILD_TIMEOUT_S = 180.0  # loading every runtime, self-tests and timing, on a slow device

CHOSEN, PASSED, FAILED = "chosen", "passed", "failed"


@dataclass(frozen=True)
class Candidate:
    """One (artifact, runtime) pair as the selection saw it."""

    runtime: str
    format: str
    precision: str
    path: str
    status: str  # chosen | passed | failed
    median_ms: float | None = None  # preprocessing + inference, one frame, this device
    agreement: float | None = None  # self-test top-1 agreement
    detail: str = ""

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision} {self.format}"

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        if doc["median_ms"] is not None:
            doc["median_ms"] = round(doc["median_ms"], 4)
        return doc


@dataclass(frozen=True)
class SelectionReport:
    """Why this runtime serves: what was asked, what was chosen, and every candidate's outcome."""

    requested: str
    chosen: Candidate
    candidates: tuple[Candidate, ...]
    reason: str
    rounds: int

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "chosen": self.chosen.label, "reason": self.reason,
                "rounds": self.rounds, "candidates": [c.as_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SelectionReport:
        found = tuple(Candidate(**c) for c in doc["candidates"])
        chosen = next(c for c in found if c.status == CHOSEN)
        return cls(requested=str(doc["requested"]), chosen=chosen, candidates=found, reason=str(doc["reason"]),
                   rounds=int(doc["rounds"]))


def choose_classifier(bundle: Bundle, runtime: str = "auto", threads: int = 1, top_k: int = 3,
                      min_score: float = 0.0, *, rounds: int = MEASURE_ROUNDS, budget_s: float = MEASURE_BUDGET_S,
                      isolate: bool | None = None) -> tuple[Classifier, SelectionReport]:
    """Load every installed (artifact, runtime) pair of `bundle` allowed by `runtime` ('auto' = all), keep those
    that pass the bundle's self-test, time them side by side and return the fastest with a report of all.

    `isolate` measures in a child process (default: when the candidates use more than one runtime library).
    Raises RuntimeUnavailableError when no installed runtime fits the bundle, SelfTestError when every candidate
    that loaded failed its self-test, and the last load error (IncompatibleBundleError, …) when none loaded.
    """
    pairs = candidates(bundle, runtime)
    if not pairs:
        raise no_runtime_error(bundle, runtime)
    if isolate is None:
        isolate = len({rt for _, rt in pairs}) > 1
    if isolate:
        try:
            choice = _measure_in_child(bundle, runtime, threads, rounds, budget_s)
            win = choice.chosen
            engine = open_engine(bundle.path_of(win.path), win.format, threads=threads, runtime=win.runtime,
                                 precision=win.precision)
            clf = Classifier.from_engine(bundle, engine, top_k=top_k, min_score=min_score)
        except _ChildFailed as exc:
            log.warning("Measuring the runtimes in a child process failed (%s); measuring them in-process", exc)
        else:
            clf.runtime_choice = choice.as_dict()
            log.info("Runtime choice for %s %s: %s", bundle.manifest.name, bundle.manifest.version, choice.reason)
            return clf, choice
    return _choose_here(bundle, pairs, runtime, threads, top_k, min_score, rounds, budget_s)


def _choose_here(bundle: Bundle, pairs: list[Any], runtime: str, threads: int, top_k: int, min_score: float,
                 rounds: int, budget_s: float) -> tuple[Classifier, SelectionReport]:
    failed: list[Candidate] = []
    passing: list[tuple[Classifier, Candidate]] = []
    load_error: Exception | None = None
    for art, rt in pairs:
        base = Candidate(runtime=rt, format=art.format, precision=art.precision, path=art.path, status=PASSED)
        try:
            engine = open_engine(bundle.path_of(art.path), art.format, threads=threads, runtime=rt,
                                 precision=art.precision)
            clf = Classifier.from_engine(bundle, engine, top_k=top_k, min_score=min_score)
        except (RuntimeUnavailableError, IncompatibleBundleError) as exc:
            log.warning("Cannot use %s with %s: %s", art.path, rt, exc)
            failed.append(replace(base, status=FAILED, detail=f"cannot load: {exc}"))
            load_error = exc
            continue
        report = run_selftest(clf)
        if not report.passed:
            log.warning("%s with %s failed its self-test: %s", art.path, rt, report.detail)
            failed.append(replace(base, status=FAILED, agreement=report.agreement, detail=report.detail))
            continue
        passing.append((clf, replace(base, agreement=report.agreement)))
    if not passing:
        tested = [c for c in failed if not c.detail.startswith("cannot load")]
        if tested:
            raise SelfTestError("No runtime passed the bundle's self-test on this device: "
                                + "; ".join(f"{c.label}: {c.detail}" for c in tested))
        assert load_error is not None
        raise load_error

    medians, done = _time_side_by_side([clf for clf, _ in passing], _frames(bundle), rounds, budget_s)
    measured = [(clf, replace(c, median_ms=ms)) for (clf, c), ms in zip(passing, medians, strict=True)]
    best = min(range(len(measured)), key=lambda i: (measured[i][1].median_ms or 0.0, i))
    winner_clf, winner = measured[best]
    winner = replace(winner, status=CHOSEN)
    others = [c for i, (_, c) in enumerate(measured) if i != best]
    choice = SelectionReport(requested=runtime, chosen=winner, candidates=(winner, *others, *failed),
                             reason=_reason(runtime, winner, others, failed), rounds=done)
    winner_clf.runtime_choice = choice.as_dict()
    log.info("Runtime choice for %s %s: %s", bundle.manifest.name, bundle.manifest.version, choice.reason)
    return winner_clf, choice


def _reason(requested: str, winner: Candidate, others: list[Candidate], failed: list[Candidate]) -> str:
    scope = "" if requested == "auto" else f" allowed by runtime = {requested!r}"
    if others:
        rest = ", ".join(f"{c.label} {c.median_ms:.3g} ms" for c in sorted(others, key=lambda c: c.median_ms or 0))
        text = (f"{winner.label} is the fastest of {len(others) + 1} candidates{scope} that passed the self-test: "
                f"{winner.median_ms:.3g} ms per frame vs {rest}")
    else:
        text = f"{winner.label} is the only candidate{scope} that passed the self-test ({winner.median_ms:.3g} ms " \
               "per frame)"
    if failed:
        text += "; failed: " + ", ".join(f"{c.label} ({_short(c.detail)})" for c in failed)
    return text


def _short(detail: str, limit: int = 120) -> str:
    return detail if len(detail) <= limit else detail[:limit - 1] + "…"


def _time_side_by_side(classifiers: list[Classifier], frames: list[np.ndarray], rounds: int,
                       budget_s: float) -> tuple[list[float], int]:
    """Median ms of `forward` (preprocessing + inference) per classifier, timed in interleaved rounds."""
    for clf in classifiers:
        for i in range(WARMUP):
            clf.forward(frames[i % len(frames)])
    times: list[list[float]] = [[] for _ in classifiers]
    started = time.monotonic()
    done = 0
    for r in range(max(rounds, MIN_ROUNDS)):
        if r >= MIN_ROUNDS and (r >= rounds or time.monotonic() - started > budget_s):
            break
        frame = frames[r % len(frames)]
        for i, clf in enumerate(classifiers):
            t = time.perf_counter()
            try:
                clf.forward(frame)
            except InferenceError as exc:
                raise IncompatibleBundleError(f"{clf.engine.name} failed while being timed: {exc}") from exc
            times[i].append((time.perf_counter() - t) * 1e3)
        done += 1
    return [statistics.median(t) for t in times], done


def _frames(bundle: Bundle) -> list[np.ndarray]:
    """The bundle's self-test frames, or one mid-grey frame of the input size when it carries none."""
    frames = selftest_frames(bundle)
    if frames:
        return frames
    spec = bundle.manifest.input
    return [np.full((spec.height, spec.width, spec.channels), 128, dtype=np.uint8)]


# ------------------------------------------------------------------------------------------ child process

_ERRORS: dict[str, type[EdgecvError]] = {cls.__name__: cls for cls in (
    SelfTestError, IncompatibleBundleError, RuntimeUnavailableError, InferenceError)}


class _ChildFailed(Exception):
    """The measuring child crashed, hung or answered nonsense: not the bundle's fault."""


def _measure_in_child(bundle: Bundle, runtime: str, threads: int, rounds: int, budget_s: float) -> SelectionReport:
    cmd = [sys.executable, "-m", "edgecv.agent.vision.selection", str(bundle.root), "--runtime", runtime,
           "--threads", str(threads), "--rounds", str(rounds), "--budget", str(budget_s)]
    try:
        # errors="replace": a crashing runtime may print anything; only the last stdout line (JSON) is read
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=CHILD_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _ChildFailed(str(exc)) from exc
    try:
        doc = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise _ChildFailed(f"exit code {done.returncode}: {tail[0]}") from exc
    if "error" in doc:
        raise _ERRORS.get(str(doc["error"]), EdgecvError)(str(doc["message"]))
    try:
        return SelectionReport.from_dict(doc["report"])
    except (KeyError, TypeError, StopIteration) as exc:
        raise _ChildFailed(f"unreadable report: {exc}") from exc


def _child_main(argv: list[str] | None = None) -> int:
    """Measure in this process and print one JSON line: {"report": …} or {"error": class name, "message": …}."""
    parser = argparse.ArgumentParser(prog="python -m edgecv.agent.vision.selection")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=MEASURE_ROUNDS)
    parser.add_argument("--budget", type=float, default=MEASURE_BUDGET_S)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        _, choice = choose_classifier(load_bundle(args.bundle), args.runtime, args.threads, rounds=args.rounds,
                                      budget_s=args.budget, isolate=False)
        doc: dict[str, Any] = {"report": choice.as_dict()}
    except EdgecvError as exc:
        doc = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
