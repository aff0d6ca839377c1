"""The device measures every installed (artifact, runtime) pair that passes the self-test and serves the fastest.

Real runtimes (LiteRT, onnxruntime, OpenVINO) on the tiny model's artifacts; faults are injected at one named
point, `open_engine` as the selection module calls it: a wrapper that permutes the logits (a wrong model) or
runs the real model several times per call (a slower one). Those tests measure in-process (isolate=False); the
child-process measurement the agent uses by default is tested on its own at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgecv.agent.vision.selection as selection
from edgecv.agent.contract.bundle import Bundle
from edgecv.agent.errors import IncompatibleBundleError, SelfTestError
from edgecv.agent.vision.runtimes import open_engine
from edgecv.agent.vision.selection import CHOSEN, FAILED, PASSED, choose_classifier
from tests.agent.conftest import TinyModel, make_bundle


class Wrapped:
    """A real engine whose output or cost is altered: `repeat` runs the model that many times per call (slower,
    same answers), `permute` rolls the logits by one class (wrong answers)."""

    def __init__(self, inner: Any, *, repeat: int = 1, permute: bool = False) -> None:
        self.inner, self.repeat, self.permute = inner, repeat, permute
        self.name = inner.name

    def run(self, batch: np.ndarray) -> np.ndarray:
        for _ in range(self.repeat):
            out = self.inner.run(batch)
        return np.roll(out, 1, axis=1) if self.permute else out

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def alter(monkeypatch: pytest.MonkeyPatch, match: Callable[[str, str], bool], **how: Any) -> None:
    """Make selection's open_engine wrap the engines for which match(runtime, precision) holds."""
    def opener(path: Path, fmt: str, threads: int = 1, runtime: str | None = None, *,
               precision: str | None = None) -> Any:
        engine = open_engine(path, fmt, threads=threads, runtime=runtime, precision=precision)
        return Wrapped(engine, **how) if match(engine.name, precision or "") else engine
    monkeypatch.setattr(selection, "open_engine", opener)


@pytest.fixture
def bundle(tiny_model: TinyModel, tmp_path: Path) -> Bundle:
    return make_bundle(tiny_model, tmp_path / "b", min_agreement=1.0)


def test_auto_measures_every_installed_pair_and_serves_the_fastest(bundle: Bundle) -> None:
    clf, report = choose_classifier(bundle, "auto", rounds=15, isolate=False)
    labels = [c.label for c in report.candidates]
    # int8 TFLite on LiteRT, int8 and fp32 ONNX on onnxruntime and on OpenVINO
    assert sorted(labels) == sorted(["litert int8 tflite", "onnxruntime int8 onnx", "openvino int8 onnx",
                                     "onnxruntime fp32 onnx", "openvino fp32 onnx"])
    assert all(c.status in (CHOSEN, PASSED) and c.agreement == 1.0 for c in report.candidates)
    assert report.chosen.median_ms == min(c.median_ms or 0.0 for c in report.candidates)
    assert [c.status for c in report.candidates].count(CHOSEN) == 1 and report.candidates[0] is report.chosen
    assert clf.engine.name == report.chosen.runtime and clf.engine.describe()["precision"] == report.chosen.precision
    assert report.rounds >= selection.MIN_ROUNDS
    assert report.reason.startswith(f"{report.chosen.label} is the fastest of 5 candidates")
    assert clf.runtime_choice == report.as_dict() and clf.describe()["runtime_choice"]["chosen"] == report.chosen.label
    # the chosen classifier serves the bundle's answers
    assert clf.classify(np.zeros((28, 28, 1), np.uint8)).top


def test_a_slower_runtime_loses_and_the_choice_follows_the_measurement(bundle: Bundle,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    _, first = choose_classifier(bundle, "auto", rounds=10, isolate=False)
    winner = (first.chosen.runtime, first.chosen.precision)
    # the same pair made 30x as costly (same answers): it must lose, and something else serves
    alter(monkeypatch, lambda rt, prec: (rt, prec) == winner, repeat=30)
    clf, second = choose_classifier(bundle, "auto", rounds=10, isolate=False)
    slowed = next(c for c in second.candidates if (c.runtime, c.precision) == winner)
    assert slowed.status == PASSED and (clf.engine.name, second.chosen.precision) != winner
    assert (slowed.median_ms or 0) > (second.chosen.median_ms or 0)
    assert slowed.label in second.reason


def test_a_fast_runtime_that_fails_the_selftest_is_never_chosen(bundle: Bundle,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    alter(monkeypatch, lambda rt, prec: rt == "litert", permute=True)
    clf, report = choose_classifier(bundle, "auto", rounds=5, isolate=False)
    lite = next(c for c in report.candidates if c.runtime == "litert")
    assert lite.status == FAILED and (lite.agreement or 0) < 1.0 and "Self-test failed" in lite.detail
    assert clf.engine.name != "litert"
    assert "failed: litert int8 tflite (Self-test failed" in report.reason


def test_an_explicit_runtime_restricts_the_candidates(bundle: Bundle) -> None:
    clf, report = choose_classifier(bundle, "openvino", rounds=5)
    assert {c.runtime for c in report.candidates} == {"openvino"} and len(report.candidates) == 2
    assert clf.engine.name == "openvino" and "allowed by runtime = 'openvino'" in report.reason
    _, lite = choose_classifier(bundle, "litert", rounds=5)
    assert [c.label for c in lite.candidates] == ["litert int8 tflite"]
    assert lite.reason.startswith("litert int8 tflite is the only candidate")


def test_no_passing_candidate_is_an_error_that_names_each(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    alter(monkeypatch, lambda rt, prec: True, permute=True)
    with pytest.raises(SelfTestError, match=r"No runtime passed.*litert int8 tflite: Self-test failed.*openvino"):
        choose_classifier(bundle, "auto", rounds=5, isolate=False)


def test_unloadable_artifacts_are_reported_and_skipped(tiny_model: TinyModel, tmp_path: Path) -> None:
    bundle = make_bundle(tiny_model, tmp_path / "b", artifacts=(("tflite", "int8"), ("onnx", "int8")))
    (bundle.root / "model.int8.tflite").write_bytes(b"not a flatbuffer")
    clf, report = choose_classifier(bundle, "auto", rounds=5, isolate=False)
    lite = next(c for c in report.candidates if c.runtime == "litert")
    assert lite.status == FAILED and lite.detail.startswith("cannot load:") and clf.engine.name != "litert"
    (bundle.root / "model.int8.onnx").write_bytes(b"garbage")
    with pytest.raises(IncompatibleBundleError):
        choose_classifier(bundle, "auto", rounds=5, isolate=False)


def test_status_and_health_say_which_runtime_serves_and_why(bundle: Bundle, tmp_path: Path) -> None:
    from edgecv.agent.config import parse_config
    from edgecv.agent.contract.topics import DeviceTopics
    from edgecv.agent.link.memory import MemoryLink
    from edgecv.agent.link.outbox import Outbox
    from edgecv.agent.link.predictions import PredictionStream
    from edgecv.agent.service import Agent

    cfg = parse_config({"device_id": "pi-1", "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist"}],
                        "model": {"store": str(tmp_path / "store")}, "homeassistant": {"enabled": False}})
    clf, report = choose_classifier(bundle, "auto", rounds=5, isolate=False)
    outbox = Outbox(100)
    topics = DeviceTopics(cfg.prefix, cfg.device_id)
    agent = Agent(cfg, topics, link=MemoryLink(), outbox=outbox,
                  predictions=PredictionStream(outbox, topics.predictions, 1), classifier=clf)
    for doc in (agent.status_payload("online")["model"], agent.health_payload()["model"]):
        assert doc["runtime"] == report.chosen.runtime and doc["artifact"] == report.chosen.label
        assert doc["runtime_reason"] == report.reason and "fastest" in doc["runtime_reason"]


def test_measuring_in_a_child_keeps_only_the_winners_runtime_in_the_agent(bundle: Bundle) -> None:
    """In a fresh interpreter (nothing imported yet): choose with every runtime installed, then check which runtime
    libraries the serving process has imported — the winner's only."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from edgecv.agent.contract.bundle import load_bundle\n"
        "from edgecv.agent.vision.selection import choose_classifier\n"
        f"clf, report = choose_classifier(load_bundle({str(bundle.root)!r}), 'auto', rounds=5)\n"
        "mods = {m: m in sys.modules for m in ('ai_edge_litert', 'onnxruntime', 'openvino')}\n"
        "print(json.dumps({'report': report.as_dict(), 'engine': clf.engine.name, 'mods': mods}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    chosen = next(c for c in doc["report"]["candidates"] if c["status"] == CHOSEN)
    assert doc["engine"] == chosen["runtime"] and len(doc["report"]["candidates"]) == 5
    module = {"litert": "ai_edge_litert", "onnxruntime": "onnxruntime", "openvino": "openvino"}[chosen["runtime"]]
    assert doc["mods"] == {m: m == module for m in doc["mods"]}, doc["mods"]


def test_a_failing_child_falls_back_to_measuring_in_process(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection.sys, "executable", "/nonexistent/python")
    clf, report = choose_classifier(bundle, "auto", rounds=5)
    assert len(report.candidates) == 5 and clf.engine.name == report.chosen.runtime


def test_the_childs_errors_come_back_as_the_same_errors(tiny_model: TinyModel, tmp_path: Path) -> None:
    bundle = make_bundle(tiny_model, tmp_path / "b", expected=[9] * 8, min_agreement=1.0)  # nothing can pass
    with pytest.raises(SelfTestError, match="No runtime passed the bundle's self-test"):
        choose_classifier(bundle, "auto", rounds=5, isolate=True)
