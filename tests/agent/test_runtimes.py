"""Runtime adapters against real onnxruntime and LiteRT, on the tiny model's four artifacts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import edgecv.agent.vision.runtimes as runtimes
from edgecv.agent.benchmark import benchmark_bundle, format_table
from edgecv.agent.contract.bundle import Bundle
from edgecv.agent.errors import IncompatibleBundleError, RuntimeUnavailableError
from edgecv.agent.vision.runtimes import Engine, available_runtimes, load_engine, open_engine
from edgecv.agent.vision.runtimes.litert import InputQuantizer, dequantize, quant_params, quantize
from tests.agent.conftest import TinyModel, make_bundle


def test_all_three_runtimes_are_installed_here() -> None:
    assert available_runtimes() == ["litert", "onnxruntime", "openvino"]


def test_fp32_onnx_and_tflite_agree_exactly(tiny_model: TinyModel) -> None:
    onnx = open_engine(tiny_model.fp32_onnx, "onnx")
    lite = open_engine(tiny_model.fp32_tflite, "tflite")
    assert isinstance(onnx, Engine) and isinstance(lite, Engine)
    a, b = onnx.run(tiny_model.x_test), lite.run(tiny_model.x_test)
    assert a.shape == b.shape == (len(tiny_model.x_test), 10) and a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert (a.argmax(1) == tiny_model.y_torch).all()


@pytest.mark.parametrize(("attr", "fmt"), [("int8_onnx", "onnx"), ("int8_tflite", "tflite")])
def test_int8_artifacts_keep_top1_of_fp32(tiny_model: TinyModel, attr: str, fmt: str) -> None:
    engine = open_engine(getattr(tiny_model, attr), fmt)
    top1 = engine.run(tiny_model.x_test).argmax(1)
    assert (top1 == tiny_model.y_torch).mean() >= 0.95


def test_int8_tflite_quantizes_input_and_dequantizes_output(tiny_model: TinyModel) -> None:
    engine = open_engine(tiny_model.int8_tflite, "tflite", threads=2)
    info = engine.describe()
    assert info["runtime"] == "litert" and info["threads"] == 2
    assert info["input"]["type"] == "int8" and info["input"]["scale"][0] > 0
    assert info["output"]["type"] == "int8" and info["output"]["scale"][0] > 0
    x = tiny_model.x_test[:5]
    batch = engine.run(x)  # fixed batch-1 model: looped
    single = np.concatenate([engine.run(x[i:i + 1]) for i in range(5)])
    assert batch.dtype == np.float32 and batch.shape == (5, 10)
    np.testing.assert_array_equal(batch, single)
    # dequantized logits are on the fp32 scale, not raw int8 codes
    reference = open_engine(tiny_model.fp32_onnx, "onnx").run(x)
    assert np.abs(batch - reference).max() < 1.0


def test_onnx_runs_dynamic_batches(tiny_model: TinyModel) -> None:
    engine = open_engine(tiny_model.int8_onnx, "onnx", threads=2)
    assert engine.describe()["threads"] == 2 and engine.describe()["input"]["name"] == "input"
    out7 = engine.run(tiny_model.x_test[:7])
    out1 = engine.run(tiny_model.x_test[:1])
    np.testing.assert_allclose(out7[:1], out1, atol=1e-5)


def test_quantize_helper_rounds_clips_and_round_trips() -> None:
    x = np.array([-1.0, -0.01, 0.0, 0.26, 10.0], np.float32)
    q = quantize(x, np.int8, [0.05], [3])
    assert q.dtype == np.int8
    assert q.tolist() == [-17, 3, 3, 8, 127]  # round(x/0.05)+3, clipped to int8
    assert quantize(x, np.uint8, [0.05], [128]).tolist() == [108, 128, 128, 133, 255]
    np.testing.assert_allclose(dequantize(q, [0.05], [3]), [-1.0, 0.0, 0.0, 0.25, 6.2], atol=1e-6)
    # per-channel along axis 1
    xc = np.ones((1, 2, 2), np.float32)
    assert quantize(xc, np.int8, [0.5, 0.25], [0, 1], axis=1).tolist() == [[[2, 2], [5, 5]]]
    # the precomputed per-frame quantizer gives the same codes
    rng = np.random.default_rng(1)
    xs = (rng.random((2, 3, 4, 4), dtype=np.float32) - 0.5) * 20
    fast = InputQuantizer(np.uint8, np.array([0.03, 0.1, 0.2]), np.array([1, 2, 3]), axis=1, ndim=4)
    np.testing.assert_array_equal(fast(xs), quantize(xs, np.uint8, [0.03, 0.1, 0.2], [1, 2, 3], axis=1))
    assert InputQuantizer(np.int8, np.array([0.05]), np.array([3]), 0, 1)(x).tolist() == q.tolist()
    detail = {"quantization": (0.1, -2), "quantization_parameters": {"scales": np.array([], np.float32),
                                                                     "zero_points": np.array([])}}
    scales, zeros, axis = quant_params(detail)  # type: ignore[misc]
    assert scales.tolist() == pytest.approx([0.1]) and zeros.tolist() == [-2] and axis == 0
    assert quant_params({"quantization": (0.0, 0)}) is None


def test_load_engine_prefers_int8_litert_then_int8_onnx(tiny_model: TinyModel, tmp_path: Path) -> None:
    bundle = make_bundle(tiny_model, tmp_path / "b")
    auto = load_engine(bundle)
    assert auto.name == "litert" and auto.describe()["path"].endswith("model.int8.tflite")
    assert auto.describe()["precision"] == "int8"
    ort = load_engine(bundle, runtime="onnxruntime", threads=2)
    assert ort.describe()["path"].endswith("model.int8.onnx") and ort.describe()["threads"] == 2
    fp32_only = make_bundle(tiny_model, tmp_path / "fp32", artifacts=(("onnx", "fp32"),))
    assert load_engine(fp32_only).describe()["path"].endswith("model.fp32.onnx")


def test_auto_falls_back_when_an_artifact_cannot_load(tiny_model: TinyModel, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    bundle = make_bundle(tiny_model, tmp_path / "b")
    (bundle.root / "model.int8.tflite").write_bytes(b"not a flatbuffer")
    with caplog.at_level(logging.WARNING):
        engine = load_engine(bundle)
    assert engine.name == "onnxruntime" and "model.int8.tflite" in caplog.text
    with pytest.raises(IncompatibleBundleError, match="cannot be loaded by ai-edge-litert"):
        load_engine(bundle, runtime="litert")


def test_missing_runtime_gives_an_install_hint(tiny_model: TinyModel, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_only = make_bundle(tiny_model, tmp_path / "b", artifacts=(("onnx", "int8"),))
    with pytest.raises(RuntimeUnavailableError, match=r"artifacts: onnx/int8; runtime='litert'"):
        load_engine(onnx_only, runtime="litert")
    monkeypatch.setattr(runtimes, "_has_module", lambda name: name != "onnxruntime")
    assert available_runtimes() == ["litert", "openvino"]
    assert load_engine(onnx_only).name == "openvino"  # OpenVINO runs the same ONNX file
    monkeypatch.setattr(runtimes, "_has_module", lambda name: name not in ("onnxruntime", "openvino"))
    assert available_runtimes() == ["litert"]
    with pytest.raises(RuntimeUnavailableError, match="pip install onnxruntime"):
        load_engine(onnx_only)
    with pytest.raises(RuntimeUnavailableError, match="Unknown runtime 'tensorrt'"):
        load_engine(onnx_only, runtime="tensorrt")


def test_open_engine_errors_are_clear(tmp_path: Path, tiny_model: TinyModel) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(IncompatibleBundleError, match="cannot be loaded by onnxruntime"):
        open_engine(bad, "onnx")
    with pytest.raises(IncompatibleBundleError, match="does not exist"):
        open_engine(tmp_path / "missing.tflite", "tflite")
    with pytest.raises(RuntimeUnavailableError, match="cannot run tflite models"):
        open_engine(tiny_model.int8_tflite, "tflite", runtime="onnxruntime")
    with pytest.raises(IncompatibleBundleError, match="format 'pt'"):
        open_engine(tiny_model.int8_tflite, "pt")


def test_benchmark_measures_every_artifact_side_by_side(tiny_bundle: Bundle) -> None:
    rows = benchmark_bundle(tiny_bundle, threads=(1, 2), runs=20)
    assert {(r.artifact, r.runtime) for r in rows} == {("model.int8.onnx", "onnxruntime"),
                                                      ("model.int8.tflite", "litert"),
                                                      ("model.fp32.onnx", "onnxruntime"),
                                                      ("model.int8.onnx", "openvino"),
                                                      ("model.fp32.onnx", "openvino")}
    assert sorted({r.threads for r in rows}) == [1, 2] and len(rows) == 10
    for r in rows:
        assert 0 < r.infer_ms_median <= r.infer_ms_p95 and r.pre_ms_median > 0 and r.runs == 20
        assert r.total_ms_median >= r.infer_ms_median and r.fps > 0
    base = next(r for r in rows if r.artifact == "model.fp32.onnx" and r.runtime == "onnxruntime" and r.threads == 1)
    assert base.speedup == 1.0
    table = format_table(rows)
    assert table.splitlines()[0].split()[:3] == ["runtime", "artifact", "thr"] and "model.int8.tflite" in table
    only_ort = benchmark_bundle(tiny_bundle, runtimes=["onnxruntime"], threads=(1,), runs=5)
    assert {r.runtime for r in only_ort} == {"onnxruntime"} and len(only_ort) == 2


@pytest.mark.parametrize("dtype,zero", [(np.int8, -20), (np.uint8, 128)])
def test_output_dequantizer_table_matches_the_formula_for_every_code(dtype: type, zero: int) -> None:
    from edgecv.agent.vision.runtimes.litert import OutputDequantizer, dequantize

    info = np.iinfo(dtype)
    codes = np.arange(info.min, info.max + 1).astype(dtype).reshape(1, -1)
    scales, zeros = np.asarray([0.10669], np.float32), np.asarray([zero], np.int64)
    table = OutputDequantizer(dtype, scales, zeros, 0)
    assert table.table is not None  # 8-bit per-tensor: the look-up path is taken
    np.testing.assert_array_equal(table(codes), dequantize(codes, scales, zeros))


def test_a_model_with_two_inputs_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["logits"])], "two-inputs", [a, b], [out])
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(IncompatibleBundleError, match="2 inputs and 1 outputs; edgecv needs one image input"):
        open_engine(path, "onnx")
