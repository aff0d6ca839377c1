"""Int8 quantization: static QDQ ONNX (methods, excluded nodes, accuracy-aware fallback), int8 TFLite via
litert-torch, evaluation in the real runtimes, and the `edgecv quantize` command on a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgecv.tools.calibration import ArrayCalibrationReader
from edgecv.tools.cli import main
from edgecv.tools.errors import ExportError
from edgecv.tools.evaluate import agreement, evaluate_artifact, gzip_size, measure_latency, predict_top1
from edgecv.tools.export_onnx import export_onnx
from edgecv.tools.quantize_onnx import quantizable_nodes, quantize_onnx_int8
from edgecv.tools.quantize_tflite import export_tflite_int8
from tests.tools.conftest import ImageFolder
from tests.tools.test_export import Tiny, make_tiny, torch_top1


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    return make_tiny()


@pytest.fixture(scope="module")
def fp32(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(tiny.model, tiny.spec, tmp_path_factory.mktemp("fp32") / "model.fp32.onnx")


def _weight_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Weighted node name → the tensor name feeding its weight input."""
    return {n.name: n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_int8_onnx_is_qdq_with_per_channel_int8_weights_smaller_and_as_accurate(tiny: Tiny, fp32: Path,
                                                                                  tmp_path: Path) -> None:
    out = quantize_onnx_int8(fp32, tiny.x_train[:128], tmp_path / "int8.onnx")
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    assert "ConvInteger" not in ops and "MatMulInteger" not in ops  # never dynamic quantization
    inits = {t.name: t for t in model.graph.initializer}
    producers = _producers(model)
    for node, weight in _weight_inputs(model).items():
        dq = producers[weight]
        assert dq.op_type == "DequantizeLinear", f"{node} weight is not quantized"
        q_weight, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
        assert q_weight.data_type == onnx.TensorProto.INT8
        if node.startswith("node_conv") or "Conv" in node:
            assert scale.size == numpy_helper.to_array(q_weight).shape[0] > 1  # one scale per output channel
    assert out.stat().st_size < fp32.stat().st_size

    ref = evaluate_artifact(fp32, "onnx", tiny.x_test, tiny.y_test, latency_runs=20)
    q = evaluate_artifact(out, "onnx", tiny.x_test, tiny.y_test, latency_runs=20)
    assert ref.accuracy >= 0.95
    assert q.accuracy >= ref.accuracy - 0.03
    assert agreement(ref.top1, q.top1) >= 0.95
    assert (ref.top1 == torch_top1(tiny.model, tiny.x_test)).all()
    assert q.bytes == out.stat().st_size and 0 < q.gzip_bytes == gzip_size(out)
    assert q.latency_ms_median > 0


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_methods_give_working_models(tiny: Tiny, fp32: Path, tmp_path: Path,
                                                           method: str) -> None:
    # 70 images: batches of 32 leave a remainder, which the histogram calibrators cannot stack
    out = quantize_onnx_int8(fp32, tiny.x_train[:70], tmp_path / f"{method}.onnx", method=method)
    assert agreement(predict_top1(fp32, "onnx", tiny.x_test), predict_top1(out, "onnx", tiny.x_test)) >= 0.9


def test_excluded_node_keeps_float_weights(tiny: Tiny, fp32: Path, tmp_path: Path) -> None:
    first = quantizable_nodes(fp32)[0]
    out = quantize_onnx_int8(fp32, tiny.x_train[:64], tmp_path / "partial.onnx", exclude_nodes=[first])
    model = onnx.load(str(out))
    weights = _weight_inputs(model)
    inits = {t.name: t for t in model.graph.initializer}
    assert inits[weights[first]].data_type == onnx.TensorProto.FLOAT  # straight from a float initializer
    others = [n for n in weights if n != first]
    assert others and all(_producers(model)[weights[n]].op_type == "DequantizeLinear" for n in others)


def test_bad_inputs_are_reported_clearly(fp32: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="expects"):
        ArrayCalibrationReader(fp32, np.zeros((4, 3, 16, 16), np.float32))
    with pytest.raises(ExportError, match="Unknown calibration method"):
        quantize_onnx_int8(fp32, np.zeros((4, 1, 16, 16), np.float32), tmp_path / "x.onnx", method="mse")
    with pytest.raises(ExportError, match="not in the model"):
        quantize_onnx_int8(fp32, np.zeros((4, 1, 16, 16), np.float32), tmp_path / "x.onnx", exclude_nodes=["nope"])



def test_int8_tflite_has_int8_tensors_and_agrees_with_torch(tiny: Tiny, tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    out = export_tflite_int8(tiny.model, tiny.spec, tiny.x_train[:96], tmp_path / "model.int8.tflite")
    interp = Interpreter(model_path=str(out))
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    assert list(inp["shape"]) == [1, 1, 16, 16]  # NCHW kept, batch 1
    assert inp["dtype"] == np.int8 and outp["dtype"] == np.int8
    assert inp["quantization"][0] > 0 and outp["quantization"][0] > 0
    tensors = interp.get_tensor_details()
    # 3x3 kernels, OHWI (the 1-input-channel conv becomes a depthwise conv, 1x3x3x8)
    conv_weights = [t for t in tensors if t["dtype"] == np.int8 and len(t["shape"]) == 4
                    and tuple(t["shape"][1:3]) == (3, 3)]
    assert len(conv_weights) == 2
    for t in conv_weights:  # one scale per output channel
        q = t["quantization_parameters"]
        assert len(q["scales"]) == t["shape"][q["quantized_dimension"]] in (8, 16)
    assert not any(t["dtype"] == np.float32 for t in tensors)  # fully integer graph

    ev = evaluate_artifact(out, "tflite", tiny.x_test, tiny.y_test, latency_runs=20)
    assert agreement(ev.top1, torch_top1(tiny.model, tiny.x_test)) >= 0.95
    assert ev.accuracy >= 0.9 and ev.bytes < 20_000
    assert measure_latency(out, "tflite", tiny.x_test[:1], runs=20, warmup=2) > 0


def test_quantize_command_builds_and_verifies_every_artifact(shapes_checkpoint: Path, image_folder: ImageFolder,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "q"
    code = main(["quantize", str(shapes_checkpoint), "--data", str(image_folder.root),
                 "--calib", "16", "--latency-runs", "5", "--out", str(out)])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"model.fp32.onnx", "model.int8.onnx", "model.int8.tflite",
                                              "metrics.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    arts = metrics["artifacts"]
    assert set(arts) == {"fp32 onnx", "int8 onnx", "int8 tflite", "int8_onnx_selection"}
    assert arts["int8_onnx_selection"]["candidates"]  # the recipes the artifact chain measured
    assert arts["fp32 onnx"]["agreement_with_fp32"] == 1.0
    for name in ("int8 onnx", "int8 tflite"):
        assert arts[name]["bytes"] < arts["fp32 onnx"]["bytes"]
        assert 0.0 <= arts[name]["agreement_with_fp32"] <= 1.0 and arts[name]["latency_ms_median"] > 0
    printed = capsys.readouterr().out
    assert "artifact" in printed and "int8 tflite" in printed and "agree fp32" in printed


def test_quantize_command_accuracy_aware_names_the_layers_kept_float(shapes_checkpoint: Path, image_folder: ImageFolder,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "aa"
    code = main(["quantize", str(shapes_checkpoint), "--data", str(image_folder.root),
                 "--calib", "16", "--latency-runs", "0", "--formats", "onnx", "--max-drop", "0", "--min-agreement",
                 "1.0", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "metrics.json").read_text())["artifacts"]
    aa, selection = doc["accuracy_aware"], doc["int8_onnx_selection"]
    # the checkpoint path goes through the same chain as optimize and BYOM: recipes measured, one kept
    assert len(selection["candidates"]) >= 5 and "U8S8 QDQ per-channel minmax" in printed
    assert ("bound met" in printed) == aa["bound_met"] and "accuracy-aware (max drop 0.0" in printed
    assert all(name in printed for name in aa["kept_float"])
    assert not (out / "model.int8.tflite").exists()


def test_quantize_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["quantize", "--out", str(tmp_path / "x")]) != 0
    assert "Pass a checkpoint" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) != 0
    assert "does not exist" in capsys.readouterr().err
