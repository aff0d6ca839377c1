"""The pretrained EfficientNet-Lite0 backbone: the packaged ImageNet weights load (and recognise a cat), a new head
on an untouched body, head-first then whole-net training with BatchNorm frozen, checkpoints, and the optimize
pipeline shipping only artifacts within the bound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecv.tools.backbones import (
    LITE0,
    build_backbone_model,
    lite0_input_spec,
    lite0_weights_path,
    load_lite0_imagenet,
    train_backbone,
)
from edgecv.tools.checkpoint import load_checkpoint, save_checkpoint
from edgecv.tools.datasets import load_splits, to_model_input
from edgecv.tools.errors import TrainingError
from edgecv.tools.train import TrainConfig
from tests.tools.conftest import ImageFolder

EGYPTIAN_CAT = 285  # ImageNet class index


def test_packaged_imagenet_weights_recognise_a_cat() -> None:
    import cv2
    import skimage.data

    net = load_lite0_imagenet().eval()
    spec = lite0_input_spec((224, 224))
    img = cv2.resize(skimage.data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(to_model_input(img[None], spec))
    with torch.inference_mode():
        probs = torch.softmax(net(x), dim=1)[0]
    assert int(probs.argmax()) == EGYPTIAN_CAT and float(probs[EGYPTIAN_CAT]) > 0.5
    assert spec.mean == (127.0,) and spec.std == (128.0,) and spec.scale == 1.0


def test_new_head_on_the_imagenet_body() -> None:
    model = build_backbone_model(LITE0, lite0_input_spec((64, 64)), 4, seed=0)
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    mine = model.net.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in state.items() if not k.startswith("_fc."))
    assert model.head().out_features == 4 and model(torch.zeros(2, 3, 64, 64)).shape == (2, 4)
    assert model.arch == {"backbone": LITE0, "input": [3, 64, 64], "num_classes": 4, "dropout": 0.2}
    with pytest.raises(TrainingError, match="at least 32x32"):
        lite0_input_spec((16, 16))


def test_head_first_then_whole_net_with_batchnorm_frozen(image_folder: ImageFolder, tmp_path: Path) -> None:
    splits = load_splits(image_folder.root, size="32x32", seed=0)
    spec = lite0_input_spec((32, 32))
    model = build_backbone_model(LITE0, spec, 3, seed=0)
    body = {k: v.clone() for k, v in model.net.state_dict().items() if not k.startswith("_fc.")}
    head = model.head().weight.detach().clone()
    cfg = TrainConfig(epochs=8, batch_size=8, patience=0, progress=False, threads=1, device="cpu")
    phases: list[str] = []
    seen_bodies: list[bool] = []

    def on_epoch(row: dict) -> None:
        phases.append(row["phase"])
        if row["phase"] == "head":  # during the head phase the body must not move
            now = model.net.state_dict()
            seen_bodies.append(all(torch.equal(now[k], v) for k, v in body.items()))

    result = train_backbone(model, splits, spec, cfg, on_epoch=on_epoch)
    assert phases == ["head", "head", "whole", "whole", "whole", "whole", "whole", "whole"]
    assert seen_bodies == [True, True] and not torch.equal(model.head().weight, head)
    now = model.net.state_dict()
    assert not torch.equal(now["_conv_stem.weight"], body["_conv_stem.weight"])  # the whole net learned
    frozen = [k for k in body if "_bn" in k]
    assert frozen and all(torch.equal(now[k], body[k]) for k in frozen)  # BatchNorm untouched
    assert [r["epoch"] for r in result.history] == list(range(1, 9))
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen for the next user
    # checkpoint round trip rebuilds the same network
    path = save_checkpoint(tmp_path / "lite0.pt", model, spec, splits.classes, model.arch)
    again = load_checkpoint(path)
    x = torch.from_numpy(to_model_input(splits.test.images, spec))
    with torch.inference_mode():
        assert torch.allclose(again.model(x), model.eval()(x), atol=1e-5)


def test_optimize_with_the_backbone_ships_a_verified_bundle(image_folder: ImageFolder, tmp_path: Path) -> None:
    from edgecv.agent.contract.bundle import load_bundle
    from edgecv.agent.vision.classifier import Classifier, run_selftest
    from edgecv.tools.cli import main

    out = tmp_path / "out"
    assert main(["optimize", "--data", str(image_folder.root), "--backbone", LITE0, "--size", "32x32", "--epochs",
                 "2", "--finetune-epochs", "1", "--sparsity", "0.2", "--calib", "16", "--latency-runs", "3",
                 "--threads", "1", "--name", "lite", "--out", str(out)]) == 0
    bundle = load_bundle(out / "lite")
    spec = bundle.manifest.input
    assert (spec.width, spec.height, spec.mean, spec.std, spec.scale) == (32, 32, (127.0,), (128.0,), 1.0)
    report = json.loads((out / "lite-report" / "report.json").read_text())
    stages = {s["stage"]: s["accuracy"] for s in report["stages"]}
    fp32 = stages["pruned fp32 (20% sparse)"]
    shipped = {a.format for a in bundle.manifest.artifacts}
    assert "onnx" in shipped  # the ONNX artifact stays within the bound on this data
    for fmt, stage in (("onnx", "int8 ONNX"), ("tflite", "int8 TFLite")):
        # an artifact more than 5 points below fp32 is left out of the bundle, never shipped
        assert (fmt in shipped) == (fp32 - stages[stage] <= 0.05), (fmt, stages)
    for art in bundle.manifest.artifacts:
        runtime = "onnxruntime" if art.format == "onnx" else "litert"
        assert run_selftest(Classifier.load(bundle, runtime=runtime)).passed
    ckpt = load_checkpoint(out / "lite.pt")
    assert ckpt.arch["backbone"] == LITE0 and report["model"]["backbone"] == LITE0
    parts = [r.get("part") for r in report["history"] if r.get("phase") == "train"]
    assert parts and parts[0] == "head"
    sparsity = np.mean([float(v) for v in report["sparsity"].values()])
    assert sparsity > 0.05
