"""Tiny but real model bundles for delivery tests (store, updater, push): built with onnx.helper in milliseconds.

The model takes an 8x8 gray image (NCHW float32 in [0, 1]) and returns 10 logits dominated by a bias, so its
top-1 class is `top1` on any input: tests can tell two versions apart by their predictions. With
`fail_on_bright=True` the model reshapes its output to an impossible shape whenever the brightest input pixel is
above 0.5: it passes a self-test on dark frames and then raises on real camera frames — an honest model that is
broken at run time (used to test probation rollback). With `slow=True` it also computes a large convolution stack
on an upscaled copy of the input (~10 GMAC, ~100 ms per image on one core, little memory) whose result is multiplied
by zero: correct answers, far too slow for a camera (used to test the latency budget end to end).
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgecv.agent.contract.bundle import (
    InputSpec,
    Manifest,
    SelfTest,
    artifact_for,
    file_sha256,
    pack_bundle,
    sign_bundle,
    write_manifest,
)

LABELS = tuple(f"class{i}" for i in range(10))
SPEC = InputSpec(width=8, height=8, channels=1, color="GRAY", layout="NCHW", mean=(0.0,), std=(1.0,))


def tiny_onnx(top1: int = 1, fail_on_bright: bool = False, pad_bytes: int = 0, slow: bool = False) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(top1)
    weight = (rng.standard_normal((64, 10)) * 0.01).astype(np.float32)
    bias = np.zeros(10, np.float32)
    bias[top1] = 10.0
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B"),
             numpy_helper.from_array(np.array([-1, 64], np.int64), "flat")]
    nodes = [helper.make_node("Reshape", ["input", "flat"], ["x"]),
             helper.make_node("MatMul", ["x", "W"], ["xw"])]
    if fail_on_bright:
        # shape = [-1, 10] on dark frames, [-1, 17] on bright ones: 10 values cannot be reshaped to 17 columns
        inits += [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
                  numpy_helper.from_array(np.array([7], np.int64), "seven"),
                  numpy_helper.from_array(np.array([0], np.int64), "zero1"),
                  numpy_helper.from_array(np.array([-1, 10], np.int64), "base")]
        nodes += [helper.make_node("Add", ["xw", "B"], ["raw"]),
                  helper.make_node("ReduceMax", ["input"], ["mx"], keepdims=0),
                  helper.make_node("Greater", ["mx", "half"], ["bright"]),
                  helper.make_node("Cast", ["bright"], ["b64"], to=TensorProto.INT64),
                  helper.make_node("Mul", ["b64", "seven"], ["extra"]),
                  helper.make_node("Concat", ["zero1", "extra"], ["extra2"], axis=0),
                  helper.make_node("Add", ["base", "extra2"], ["shape"]),
                  helper.make_node("Reshape", ["raw", "shape"], ["logits"])]
    elif slow:
        # 16 convolutions of 128x128x3x3 at 64x64 sharing one weight: ~10 GMAC, 2 MB activations, a 0.6 MB file, so
        # the model is slow without being large (the hostile-peer suite holds every input to +64 MB of RSS).
        side, width, layers = 64, 128, 16
        inits += [numpy_helper.from_array(np.array([1.0, 1.0, side / 8, side / 8], np.float32), "scales"),
                  numpy_helper.from_array((rng.standard_normal((width, 1, 3, 3)) * 0.1).astype(np.float32), "K0"),
                  numpy_helper.from_array((rng.standard_normal((width, width, 3, 3)) * 0.03).astype(np.float32), "K"),
                  numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                  numpy_helper.from_array(np.array([1], np.int64), "one_axis")]
        nodes += [helper.make_node("Resize", ["input", "", "scales"], ["big"], mode="nearest"),
                  helper.make_node("Conv", ["big", "K0"], ["c0"], pads=[1, 1, 1, 1])]
        for i in range(1, layers + 1):
            nodes.append(helper.make_node("Conv", [f"c{i - 1}", "K"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes += [helper.make_node("ReduceMean", [f"c{layers}"], ["m"], keepdims=0, axes=[1, 2, 3]),
                  helper.make_node("Mul", ["m", "zero"], ["nothing"]),
                  helper.make_node("Unsqueeze", ["nothing", "one_axis"], ["nothing2"]),
                  helper.make_node("Add", ["xw", "B"], ["raw"]),
                  helper.make_node("Add", ["raw", "nothing2"], ["logits"])]
    else:
        nodes.append(helper.make_node("Add", ["xw", "B"], ["logits"]))
    if pad_bytes:
        inits.append(numpy_helper.from_array(rng.integers(0, 255, pad_bytes, dtype=np.uint8), "pad"))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgecv-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def make_bundle(root: Path, version: str, *, top1: int = 1, key: Any = None, fail_on_bright: bool = False,
                name: str = "tiny", pad_bytes: int = 0, min_agent_version: str = "0.1.0", slow: bool = False) -> Path:
    """Write a bundle directory (signed when `key` is given) and return it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.fp32.onnx").write_bytes(tiny_onnx(top1, fail_on_bright, pad_bytes, slow))
    frames = np.zeros((4, 8, 8, 1), np.uint8)  # dark frames: the expected class is the bias class
    buf = io.BytesIO()
    np.savez(buf, frames=frames)
    (root / "selftest.npz").write_bytes(buf.getvalue())
    manifest = Manifest(
        name=name, version=version, created=datetime.now(UTC).isoformat(timespec="seconds"), labels=LABELS,
        input=SPEC, artifacts=(artifact_for(root, "model.fp32.onnx", "onnx", "fp32"),),
        selftest=SelfTest(path="selftest.npz", sha256=file_sha256(root / "selftest.npz"),
                          expected_top1=(top1,) * 4),
        metrics={"test": True}, min_agent_version=min_agent_version)
    write_manifest(root, manifest)
    if key is not None:
        sign_bundle(root, key)
    return root


def make_archive(workdir: Path, version: str, **kwargs: Any) -> Path:
    """A packed `.edgecv` archive of `make_bundle`."""
    workdir = Path(workdir)
    src = make_bundle(workdir / f"src-{version}", version, **kwargs)
    return pack_bundle(src, workdir / f"tiny-{version}.edgecv")
