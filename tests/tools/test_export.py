"""torch → ONNX export: one self-contained file, dynamic batch, named input/output, same numbers as torch.

Also home of the tiny separable dataset and model the quantization tests share (`make_tiny`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgecv.agent.contract.bundle import InputSpec
from edgecv.tools.errors import ExportError
from edgecv.tools.export_onnx import export_onnx

TINY_SPEC = InputSpec(width=16, height=16, channels=1, color="GRAY", mean=(0.5,), std=(0.5,))


@dataclass
class Tiny:
    """A small CNN trained to ~100 % on 4 easily separable classes (a bright square in one quadrant)."""

    model: nn.Module
    spec: InputSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def tiny_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N×16×16×1 noisy images; class k has a bright 6×6 square in quadrant k."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    images = rng.integers(0, 90, size=(n, 16, 16, 1)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = (k // 2) * 8 + rng.integers(0, 3), (k % 2) * 8 + rng.integers(0, 3)
        images[i, r:r + 6, c:c + 6, 0] = rng.integers(170, 255)
    return images, labels.astype(np.int64)


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 4))


def to_input(images: np.ndarray) -> np.ndarray:
    from edgecv.tools.datasets import to_model_input

    return to_model_input(images, TINY_SPEC)


def make_tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    xi, y = tiny_images(400, seed)
    ti, ty = tiny_images(200, seed + 1)
    x, xt = to_input(xi), to_input(ti)
    model = tiny_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xb, yb = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for step in range(60):
        idx = torch.randint(0, len(xb), (64,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb[idx]), yb[idx]).backward()
        opt.step()
    model.eval()
    return Tiny(model, TINY_SPEC, x, y, xt, ty)


def torch_top1(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    return make_tiny()


def test_export_writes_one_file_with_named_dynamic_batch_io_matching_torch(tiny: Tiny, tmp_path: Path) -> None:
    out = export_onnx(tiny.model, tiny.spec, tmp_path / "m.onnx")
    assert out == tmp_path / "m.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no .onnx.data next to it
    model = onnx.load(str(out), load_external_data=False)
    assert all(not t.HasField("data_location") or t.data_location == onnx.TensorProto.DEFAULT
               for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value")  # batch is symbolic
    assert [d.dim_value for d in dims[1:]] == [1, 16, 16]
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # folded into the convs

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = tiny.x_test[:n]
        got = sess.run(["logits"], {"input": x})[0]
        with torch.no_grad():
            ref = tiny.model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)


def test_export_refuses_a_model_without_a_logits_head(tmp_path: Path) -> None:
    conv_only = nn.Sequential(nn.Conv2d(1, 4, 3)).eval()
    with pytest.raises(ExportError, match="logits of shape"):
        export_onnx(conv_only, TINY_SPEC, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
