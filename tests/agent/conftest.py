"""Fixtures for agent tests: a tiny real bundle (fp32 + int8 ONNX, fp32 + int8 TFLite, self-test vectors).

The model is a two-conv CNN trained for a few seconds on 2,000 Fashion-MNIST images, so its predictions are
meaningful enough for int8 and fp32 artifacts to agree on most frames. Built once per session (~10 s).
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecv.agent.contract.bundle import (
    Bundle,
    InputSpec,
    Manifest,
    SelfTest,
    artifact_for,
    file_sha256,
    load_bundle,
    write_manifest,
)
from edgecv.agent.vision.synthetic import FASHION_MNIST_LABELS, load_fashion_mnist

TINY_SPEC = InputSpec(width=28, height=28, channels=1, color="GRAY", layout="NCHW", scale=1 / 255,
                      mean=(0.5,), std=(0.5,), resize="stretch")
SELFTEST_FRAMES = 16


@dataclass(frozen=True)
class TinyModel:
    """Artifacts of the tiny model (all four), the input spec, and held-out data to compare them on."""

    dir: Path
    spec: InputSpec
    fp32_onnx: Path
    int8_onnx: Path
    fp32_tflite: Path
    int8_tflite: Path
    x_test: np.ndarray  # float32, preprocessed (N, 1, 28, 28)
    y_torch: np.ndarray  # fp32 torch top-1 on x_test
    frames: np.ndarray  # uint8 N×112×112×3 BGR camera-like frames (Fashion-MNIST ×4)
    frames_top1: np.ndarray  # fp32 torch top-1 for `frames`
    build_seconds: float


def _build_tiny_model(out: Path) -> TinyModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter, not about our code
        return _build_tiny_model_quietly(out)


def _build_tiny_model_quietly(out: Path) -> TinyModel:
    import torch
    from torch import nn

    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, labels = load_fashion_mnist("train")
    x = ((images[:2000].astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None]
    y = labels[:2000]
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(np.array(y))
    for _ in range(3):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    model.eval()
    test_images, _ = load_fashion_mnist("test")
    x_test = ((test_images[:200].astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None]
    with torch.no_grad():
        y_torch = model(torch.from_numpy(x_test)).argmax(1).numpy()
    sample = torch.from_numpy(x_test[:1])

    fp32_onnx = out / "model.fp32.onnx"
    torch.onnx.export(model, (sample,), str(fp32_onnx), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": x_test[i:i + 1]} for i in range(100)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

    int8_onnx = out / "model.int8.onnx"
    quantize_static(str(fp32_onnx), str(int8_onnx), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)

    import litert_torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    fp32_tflite = out / "model.fp32.tflite"
    litert_torch.convert(model, (sample,)).export(str(fp32_tflite))
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    prepared = prepare_pt2e(torch.export.export(model, (sample,)).module(), quantizer)
    with torch.no_grad():
        for i in range(0, 100):
            prepared(torch.from_numpy(x_test[i:i + 1]))
    converted = convert_pt2e(prepared, fold_quantize=False)
    int8_tflite = out / "model.int8.tflite"
    litert_torch.convert(converted, (sample,),
                         quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)).export(str(int8_tflite))

    import cv2

    frames = np.stack([cv2.cvtColor(cv2.resize(img, (112, 112), interpolation=cv2.INTER_NEAREST),
                                    cv2.COLOR_GRAY2BGR) for img in test_images[:SELFTEST_FRAMES]])
    return TinyModel(dir=out, spec=TINY_SPEC, fp32_onnx=fp32_onnx, int8_onnx=int8_onnx, fp32_tflite=fp32_tflite,
                     int8_tflite=int8_tflite, x_test=x_test, y_torch=y_torch, frames=frames,
                     frames_top1=y_torch[:SELFTEST_FRAMES], build_seconds=time.perf_counter() - t0)


def make_bundle(model: TinyModel, root: Path, artifacts: Sequence[tuple[str, str]] = (("onnx", "int8"),
                ("tflite", "int8"), ("onnx", "fp32")), expected: Sequence[int] | None = None,
                min_agreement: float = 0.75, version: str = "1.0.0") -> Bundle:
    """Write a bundle directory (unsigned) with the chosen (format, precision) artifacts of the tiny model."""
    root.mkdir(parents=True, exist_ok=True)
    sources = {("onnx", "fp32"): model.fp32_onnx, ("onnx", "int8"): model.int8_onnx,
               ("tflite", "fp32"): model.fp32_tflite, ("tflite", "int8"): model.int8_tflite}
    arts = []
    for fmt, precision in artifacts:
        name = f"model.{precision}.{fmt}"
        shutil.copyfile(sources[(fmt, precision)], root / name)
        arts.append(artifact_for(root, name, fmt, precision))
    np.savez(root / "selftest.npz", frames=model.frames)
    top1 = tuple(int(i) for i in (model.frames_top1 if expected is None else expected))
    manifest = Manifest(name="tiny-fashion", version=version, created="2026-01-01T00:00:00Z",
                        labels=FASHION_MNIST_LABELS, input=model.spec, artifacts=tuple(arts),
                        selftest=SelfTest(path="selftest.npz", sha256=file_sha256(root / "selftest.npz"),
                                          expected_top1=top1, min_agreement=min_agreement))
    write_manifest(root, manifest)
    return load_bundle(root)


def with_spec(bundle: Bundle, spec: InputSpec) -> Bundle:
    """Same bundle directory, different input spec (manifest rewritten in place)."""
    manifest = replace(bundle.manifest, input=spec)
    write_manifest(bundle.root, manifest)
    return load_bundle(bundle.root)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> TinyModel:
    return _build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def tiny_bundle(tiny_model: TinyModel, tmp_path: Path) -> Bundle:
    """A fresh unsigned bundle directory with int8 ONNX, int8 TFLite and fp32 ONNX (per test, ~ms to copy)."""
    return make_bundle(tiny_model, tmp_path / "bundle")
