"""Classifier (bundle + runtime + pre/post) and the self-test, with the real runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgecv.agent.contract.bundle import MANIFEST_NAME, Bundle, load_bundle
from edgecv.agent.errors import IncompatibleBundleError, InferenceError, RuntimeUnavailableError, SelfTestError
from edgecv.agent.vision.classifier import Classifier, run_selftest
from edgecv.agent.vision.synthetic import FASHION_MNIST_LABELS, SyntheticSource
from tests.agent.conftest import TinyModel, make_bundle


def test_classify_returns_top_k_and_stage_latencies(tiny_bundle: Bundle) -> None:
    clf = Classifier.load(tiny_bundle)
    assert clf.engine.name == "litert" and clf.labels == FASHION_MNIST_LABELS and clf.bundle is tiny_bundle
    frame = np.load(tiny_bundle.root / "selftest.npz")["frames"][0]
    result = clf.classify(frame)
    assert len(result.top) == 3 and result.top[0]["score"] >= result.top[1]["score"] >= result.top[2]["score"]
    assert result.top[0]["index"] == int(np.argmax(result.logits))
    assert result.top[0]["label"] == FASHION_MNIST_LABELS[result.top[0]["index"]]
    assert result.logits.shape == (10,)
    assert set(result.latency_ms) == {"pre", "infer", "post", "total"}
    assert all(v >= 0 for v in result.latency_ms.values())
    assert result.latency_ms["total"] >= result.latency_ms["infer"]
    assert len(clf.classify(frame, top_k=1).top) == 1
    assert Classifier.load(tiny_bundle.root, top_k=5).classify(frame).top[:1] == result.top[:1]  # path works


@pytest.mark.parametrize("runtime", ["litert", "onnxruntime"])
def test_full_path_on_camera_frames_matches_the_float_model(tiny_model: TinyModel, tiny_bundle: Bundle,
                                                            runtime: str) -> None:
    """Fashion-MNIST frames rendered like a camera (BGR, 4× upscaled) go through preprocess + engine."""
    clf = Classifier.load(tiny_bundle, runtime=runtime, threads=1)
    source = SyntheticSource("synthetic:fashion-mnist?scale=4", loop=False)
    agree, truth_hits = 0, 0
    for i in range(100):
        assert source.grab()
        image, truth = source.retrieve()
        top1 = clf.classify(image).top[0]["index"]
        agree += top1 == tiny_model.y_torch[i]
        truth_hits += top1 == truth
    assert agree >= 95  # int8 on-device path ≈ fp32 torch on the preprocessed input
    assert truth_hits >= 55  # the tiny model really classifies (chance would be ~10)


def test_output_that_does_not_match_labels_is_refused(tiny_bundle: Bundle) -> None:
    doc = json.loads((tiny_bundle.root / MANIFEST_NAME).read_text())
    doc["labels"] = ["a", "b", "c"]
    doc["selftest"] = None
    (tiny_bundle.root / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(IncompatibleBundleError, match=r"outputs shape \(1, 10\) but the manifest has 3 labels"):
        Classifier.load(load_bundle(tiny_bundle.root))


def test_wrong_input_spec_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    bundle = make_bundle(tiny_model, tmp_path / "b", artifacts=(("onnx", "int8"),))
    doc = json.loads((bundle.root / MANIFEST_NAME).read_text())
    doc["input"]["width"] = 32
    (bundle.root / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(IncompatibleBundleError, match="does not run on input shape"):
        Classifier.load(load_bundle(bundle.root))


def test_no_runtime_for_bundle(tiny_model: TinyModel, tmp_path: Path) -> None:
    bundle = make_bundle(tiny_model, tmp_path / "b", artifacts=(("tflite", "int8"),))
    with pytest.raises(RuntimeUnavailableError):
        Classifier.load(bundle, runtime="onnxruntime")


@pytest.mark.parametrize("runtime", ["auto", "litert", "onnxruntime"])
def test_selftest_passes_on_every_runtime(tiny_bundle: Bundle, runtime: str) -> None:
    report = run_selftest(Classifier.load(tiny_bundle, runtime=runtime))
    assert report.passed and report.agreement >= 0.75 and report.frames == 16
    assert report.median_infer_ms > 0 and "Self-test passed" in report.detail
    report.raise_for_failure()  # no exception


def test_selftest_fails_on_tampered_expectations(tiny_model: TinyModel, tmp_path: Path) -> None:
    wrong = [(int(i) + 1) % 10 for i in tiny_model.frames_top1]
    bundle = make_bundle(tiny_model, tmp_path / "b", expected=wrong)
    report = run_selftest(Classifier.load(bundle))
    assert not report.passed and report.agreement < 0.2 and len(report.mismatches) >= 13
    assert report.detail.startswith("Self-test failed on litert") and "expected" in report.detail
    with pytest.raises(SelfTestError, match="Self-test failed"):
        report.raise_for_failure()


def test_selftest_fails_cleanly_on_unreadable_vectors(tiny_bundle: Bundle) -> None:
    (tiny_bundle.root / "selftest.npz").write_bytes(b"not a zip")
    report = run_selftest(Classifier.load(tiny_bundle))
    assert not report.passed and "unreadable" in report.detail
    np.savez(tiny_bundle.root / "selftest.npz", frames=np.zeros((3, 28, 28, 1), np.uint8))
    report = run_selftest(Classifier.load(tiny_bundle))
    assert not report.passed and "hold 3 frames" in report.detail


def test_int8_input_model_is_fed_through_the_code_table_with_identical_logits(tiny_model: TinyModel,
                                                                             tmp_path: Path) -> None:
    bundle = make_bundle(tiny_model, tmp_path / "b", artifacts=(("tflite", "int8"),))
    clf = Classifier.load(bundle, runtime="litert")
    assert clf._codes is not None  # int8 input tensor: normalise + quantise folded into one look-up
    for frame in tiny_model.frames[:20]:
        served = clf.classify(frame).logits
        unfused = clf.engine.run(clf.preprocessor(frame))[0]  # float input, quantized inside the adapter
        np.testing.assert_array_equal(served, unfused)
    report = run_selftest(clf)
    assert report.passed and report.frames == len(tiny_model.frames)
    with pytest.raises(InferenceError, match="codes"):
        clf.engine.run_codes(clf.preprocessor(tiny_model.frames[0]))  # type: ignore[attr-defined]  # float, not codes


def test_float_input_models_keep_the_float_path(tiny_bundle: Bundle) -> None:
    assert Classifier.load(tiny_bundle, runtime="onnxruntime")._codes is None
