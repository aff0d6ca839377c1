"""Bring your own model: `edgecv quantize --onnx` on user-made ONNX classifiers, and its clear refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgecv.agent.contract.bundle import load_bundle, verify_bundle
from edgecv.agent.vision.classifier import Classifier, run_selftest
from edgecv.tools.byom import input_spec_for, inspect_onnx
from edgecv.tools.checkpoint import Checkpoint, load_checkpoint
from edgecv.tools.cli import main
from edgecv.tools.errors import ExportError
from edgecv.tools.export_onnx import export_onnx
from tests.tools.conftest import ImageFolder


@pytest.fixture(scope="module")
def ckpt(shapes_checkpoint: Path) -> Checkpoint:
    return load_checkpoint(shapes_checkpoint)


@pytest.fixture(scope="module")
def user_onnx(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'foreign' fp32 ONNX: exported by edgecv here, but used only as a file (32x32 RGB, dynamic batch)."""
    return export_onnx(ckpt.model, ckpt.spec, tmp_path_factory.mktemp("user") / "shapes.onnx")


@pytest.fixture(scope="module")
def labels_file(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(ckpt.labels) + "\n")
    return path


def _norm_args(ckpt: Checkpoint) -> list[str]:
    return ["--mean", ",".join(map(str, ckpt.spec.mean)), "--std", ",".join(map(str, ckpt.spec.std))]


def test_byom_class_folders_give_a_bundle_that_passes_its_selftest_on_the_device_side(
        user_onnx: Path, image_folder: ImageFolder, labels_file: Path, ckpt: Checkpoint, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bundle"
    code = main(["quantize", "--onnx", str(user_onnx), "--calib-images", str(image_folder.root), "--labels",
                 str(labels_file), "--calib", "16", "--latency-runs", "5", "--out", str(out), *_norm_args(ckpt)])
    assert code == 0
    captured = capsys.readouterr()
    bundle = load_bundle(out)
    verify_bundle(bundle, None, allow_unsigned=True)
    m = bundle.manifest
    arts = m.metrics["artifacts"]
    shipped = {a.precision for a in m.artifacts}
    assert "int8" in shipped  # --prefer auto always ships the int8 that meets the bound
    # fp32 rides along exactly when the chosen int8 was not clearly faster than fp32 on this machine
    chosen = next(c for c in arts["candidates"] if c["name"] in arts["shipped"])
    clearly_faster = chosen["latency_ms"] <= 0.9 * arts["fp32"]["latency_ms"]
    assert ("fp32" in shipped) == (not clearly_faster), arts
    # an int8 TFLite is built without TensorFlow (ONNX → PyTorch → PT2E) and ships within the agreement bound
    tfl = m.metrics["int8_tflite"]
    assert tfl["shipped"] and tfl["agreement"] >= 0.97, tfl
    assert tfl["note"] in captured.out and tfl["note"].endswith(": shipped")
    assert ("model.int8.tflite", "tflite", "int8") in [(a.path, a.format, a.precision) for a in m.artifacts]
    assert run_selftest(Classifier.load(out, runtime="litert")).passed
    assert list(m.labels) == ckpt.labels
    assert (m.input.width, m.input.height, m.input.channels, m.input.color, m.input.layout) == (32, 32, 3, "RGB",
                                                                                                "NCHW")
    assert m.input.mean == ckpt.spec.mean and m.input.std == ckpt.spec.std
    assert m.output == "logits"  # edgecv's own export ends in a Linear layer
    assert chosen["bytes"] < arts["fp32"]["bytes"]
    assert "accuracy" in chosen  # class folders named like the labels → accuracy, not only agreement
    assert chosen["agreement"] >= 0.97 and chosen["meets_bound"]
    assert len(arts["candidates"]) >= 5  # activation types, formats, per-channel/tensor, calibrations measured
    model = onnx.load(str(out / "model.int8.onnx"))
    assert "QuantizeLinear" in {n.op_type for n in model.graph.node} or "QLinearConv" in {
        n.op_type for n in model.graph.node}
    report = run_selftest(Classifier.load(out, runtime="onnxruntime"))
    assert report.passed, report.detail
    # the printed table names every candidate with its latency ratio, and the verdict says what shipped
    assert "vs fp32" in captured.out and chosen["name"] in captured.out and arts["verdict"] in captured.out
    # a .edgecv archive beside the directory, and a version that differs per build
    assert (tmp_path / "bundle.edgecv").is_file()
    assert m.version.startswith("1.0.0.post") and m.version[len("1.0.0.post"):].isdigit()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, used on purpose
def test_byom_flat_folder_fixed_batch_nhwc_model(ckpt: Checkpoint, image_folder: ImageFolder, labels_file: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    class Nhwc(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.permute(0, 3, 1, 2))

    path = tmp_path / "nhwc.onnx"
    torch.onnx.export(Nhwc(ckpt.model).eval(), (torch.zeros(1, 32, 32, 3),), str(path), dynamo=False,
                      input_names=["image"], output_names=["scores"])  # static batch 1, NHWC
    info = inspect_onnx(path)
    assert info.dims == (1, 32, 32, 3) and info.num_classes == len(ckpt.labels)
    flat = tmp_path / "flat"
    flat.mkdir()
    images = sorted(p for p in image_folder.root.rglob("*") if p.suffix in (".png", ".bmp", ".ppm"))
    for i, img in enumerate(images):
        shutil.copy(img, flat / f"{i}{img.suffix}")
    out = tmp_path / "bundle"
    code = main(["quantize", "--onnx", str(path), "--calib-images", str(flat), "--labels", str(labels_file),
                 "--calib", "8", "--latency-runs", "0", "--formats", "onnx", "--out", str(out), *_norm_args(ckpt)])
    assert code == 0, capsys.readouterr().err
    m = load_bundle(out).manifest
    assert {a.format for a in m.artifacts} == {"onnx"} and "int8_tflite" not in m.metrics  # --formats onnx
    assert m.input.layout == "NHWC" and (m.input.height, m.input.width) == (32, 32)
    assert "accuracy" not in m.metrics["artifacts"]["fp32"]  # no class folders: agreement only
    assert run_selftest(Classifier.load(out, runtime="onnxruntime")).passed


def test_byom_label_count_mismatch_is_refused(user_onnx: Path, image_folder: ImageFolder, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    code = main(["quantize", "--onnx", str(user_onnx), "--calib-images", str(image_folder.root), "--labels",
                 str(labels), "--out", str(tmp_path / "b")])
    assert code != 0
    err = capsys.readouterr().err
    assert "has 2 labels but shapes.onnx outputs 3 classes" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_byom_missing_calibration_folder_is_refused(user_onnx: Path, labels_file: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    code = main(["quantize", "--onnx", str(user_onnx), "--calib-images", str(tmp_path / "nope"), "--labels",
                 str(labels_file), "--out", str(tmp_path / "b")])
    assert code != 0
    assert "Calibration folder" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_byom_non_image_model_is_refused(labels_file: Path, image_folder: ImageFolder, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "tabular.onnx"
    torch.onnx.export(nn.Linear(8, 3).eval(), (torch.zeros(1, 8),), str(path), dynamo=False,
                      input_names=["features"], output_names=["scores"])
    code = main(["quantize", "--onnx", str(path), "--calib-images", str(image_folder.root), "--labels",
                 str(labels_file), "--out", str(tmp_path / "b")])
    assert code != 0
    err = capsys.readouterr().err
    assert "rank 4" in err and "(1, 8)" in err


def test_input_spec_rules() -> None:
    from edgecv.tools.byom import OnnxInputInfo

    dyn = OnnxInputInfo("x", "float", (None, 3, None, None), "y", 5)
    with pytest.raises(ExportError, match="--size") as refused:
        input_spec_for(dyn)
    # One spelling of a dynamic dimension in every message: '?' (never -1, None or a symbolic name).
    assert "(?, 3, ?, ?)" in str(refused.value)
    mixed = OnnxInputInfo("x", "float", (-1, 7, 7, 5), "y", 5)
    with pytest.raises(ExportError) as refused:
        input_spec_for(mixed)
    assert "(?, 7, 7, 5)" in str(refused.value) and "-1" not in str(refused.value)
    spec = input_spec_for(dyn, size=(64, 48), color="bgr")
    assert (spec.height, spec.width, spec.color, spec.layout) == (64, 48, "BGR", "NCHW")
    gray = OnnxInputInfo("x", "float", (1, 28, 28, 1), "y", 10)
    assert input_spec_for(gray).layout == "NHWC" and input_spec_for(gray).color == "GRAY"
    with pytest.raises(ExportError, match="contradicts"):
        input_spec_for(gray, size=(32, 32))
    with pytest.raises(ExportError, match="does not fit"):
        input_spec_for(gray, color="rgb")
    assert np.isclose(input_spec_for(gray, scale=1.0).scale, 1.0)


def test_byom_max_drop_bounds_accuracy_with_class_folders_and_agreement_without(
        user_onnx: Path, image_folder: ImageFolder, labels_file: Path, ckpt: Checkpoint, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """`--max-drop` works with `--onnx` (issue 12 item 4). With class folders it bounds the accuracy lost against
    fp32: at 0 and an exact agreement bound, either an int8 that loses nothing ships (and its recorded accuracy
    equals fp32's), or nothing is signed and the refusal says by how much, and `--force` then ships it with the
    miss recorded. Without class folders there is no accuracy, so it becomes an agreement bound, and says so."""
    common = ["--labels", str(labels_file), "--calib", "16", "--latency-runs", "0", "--formats", "onnx",
              *_norm_args(ckpt)]
    out = tmp_path / "exact"
    code = main(["quantize", "--onnx", str(user_onnx), "--calib-images", str(image_folder.root), "--max-drop", "0",
                 "--min-agreement", "1.0", "--out", str(out), *common])
    captured = capsys.readouterr()
    if code == 0:
        arts = load_bundle(out).manifest.metrics["artifacts"]
        assert arts["bound"]["max_drop"] == 0.0
        chosen = next(c for c in arts["candidates"] if c["name"] in arts["shipped"])
        assert chosen["meets_bound"] and chosen["accuracy"] >= arts["fp32"]["accuracy"] and chosen["agreement"] == 1.0
    else:
        assert code == 1 and "Refusing to sign" in captured.err and "missed by" in captured.err, captured.err
        forced = tmp_path / "forced"
        assert main(["quantize", "--onnx", str(user_onnx), "--calib-images", str(image_folder.root), "--max-drop",
                     "0", "--min-agreement", "1.0", "--force", "--out", str(forced), *common]) == 0
        assert "shipping below the agreement bound because of --force" in capsys.readouterr().out
        assert load_bundle(forced).manifest.metrics["artifacts"]["bound"]["max_drop"] == 0.0

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, img in enumerate(sorted(p for p in image_folder.root.rglob("*") if p.suffix in (".png", ".bmp", ".ppm"))):
        shutil.copy(img, flat / f"{i}{img.suffix}")
    out = tmp_path / "agreement"
    assert main(["quantize", "--onnx", str(user_onnx), "--calib-images", str(flat), "--max-drop", "0.05",
                 "--out", str(out), *common]) == 0
    printed = capsys.readouterr()
    assert "--max-drop 0.05 bounds disagreement with fp32 instead (agreement ≥ 95.0%)" in printed.out + printed.err
    bound = load_bundle(out).manifest.metrics["artifacts"]["bound"]
    assert bound["min_agreement"] == pytest.approx(0.95) and bound["max_drop"] is None
