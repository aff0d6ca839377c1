"""A small real model for the `synthetic:scene` door (closed/open), built in seconds for tests.

Door crops (the region DOOR_CROP of agent/vision/scene.py) are rendered from the scene source, reduced to 16x24
grey, and a ridge regression gives two logits: one fp32 ONNX Gemm, bundled with the workstation's bundler and
self-test vectors. It is weak on purpose (linear, small): per-frame results flicker under noise, occluders and
lighting drift, which is what the stabiliser is there for. The benchmark trains a CNN with `edgecv optimize`
instead (bench/scene_bench.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecv.agent.config import RegionConfig
from edgecv.agent.vision.regions import resolve_crop
from edgecv.agent.vision.scene import DOOR_CROP, SCENE_LABELS, Scene, SceneSpec

WIDTH, HEIGHT = 16, 24  # model input (the door crop is taller than wide)
DOOR_REGION = RegionConfig(name="door", crop=DOOR_CROP)


def door_crops(query: dict[str, str], frames: range) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N×H×W×3 BGR crops of the door region, truths) of scene frames."""
    scene = Scene(SceneSpec(query))
    box = resolve_crop(DOOR_REGION, scene.spec.width, scene.spec.height)
    crops, truths = [], []
    for i in frames:
        image, truth = scene.render(i)
        crops.append(image[box.y:box.y + box.h, box.x:box.x + box.w].copy())
        truths.append(truth)
    return np.stack(crops), np.asarray(truths)


def _features(crops: np.ndarray) -> np.ndarray:
    from edgecv.agent.contract.bundle import InputSpec
    from edgecv.agent.vision.preprocess import Preprocessor

    pre = Preprocessor(InputSpec(width=WIDTH, height=HEIGHT, channels=1, color="GRAY", layout="NCHW"))
    return np.concatenate([pre(c) for c in crops]).reshape(len(crops), -1)


def build_scene_bundle(out_dir: Path, seed: int = 0, frames: int = 500) -> tuple[Path, float]:
    """Write the bundle; returns (its directory, accuracy on another "day" of the same scene)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgecv.agent.contract.bundle import InputSpec
    from edgecv.tools.bundler import build_bundle

    train_query = {"seed": str(seed), "hold": "40", "objects": "40"}
    crops, truths = door_crops(train_query, range(frames))
    x = _features(crops)
    x1 = np.hstack([x, np.ones((len(x), 1), np.float32)])
    y = np.eye(2, dtype=np.float32)[truths] * 2.0 - 1.0
    wb = np.linalg.solve(x1.T @ x1 + 5.0 * np.eye(x1.shape[1], dtype=np.float32), x1.T @ y).astype(np.float32)
    weights, bias = wb[:-1] * 4.0, wb[-1] * 4.0  # sharper logits: softmax scores spread over 0..1
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "B"], ["logits"])],
        "scene-door-linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, HEIGHT, WIDTH])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    work = out_dir.parent / f"{out_dir.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "model.fp32.onnx"
    onnx.save(model, str(fp32))

    test_crops, test_truths = door_crops({"seed": str(seed), "start": "1000000", "hold": "40"}, range(200))
    logits = np.hstack([_features(test_crops), np.ones((len(test_crops), 1), np.float32)]) @ np.vstack(
        [weights, bias[None]])
    accuracy = float((logits.argmax(1) == test_truths).mean())
    expected = [int(i) for i in (_features(test_crops[:8]) @ weights + bias).argmax(1)]
    spec = InputSpec(width=WIDTH, height=HEIGHT, channels=1, color="GRAY", layout="NCHW")
    import cv2

    gray = np.stack([cv2.cvtColor(c, cv2.COLOR_BGR2GRAY)[:, :, None] for c in test_crops[:8]])  # as the model sees
    build_bundle(out_dir, name="scene-door-linear", version="1.0.0", labels=SCENE_LABELS, spec=spec,
                 artifacts=[(fp32, "onnx", "fp32")], selftest_frames=gray, selftest_expected=expected,
                 metrics={"dataset": f"synthetic:scene?seed={seed}", "accuracy_fp32": accuracy},
                 description="Linear classifier of the synthetic scene's garage door (tests)")
    return out_dir, accuracy
