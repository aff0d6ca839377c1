"""Bring your own model: turn an existing fp32 ONNX image classifier into an int8 edgecv bundle.

The user supplies the ONNX file, a folder of calibration images (flat, or one sub-folder per class) and a
labels file; the preprocessing comes from the model's input shape plus command-line options. The model is
quantized (static QDQ int8), both precisions are run in onnxruntime on the images, and the bundle is built
with self-test vectors. An int8 TFLite is built without TensorFlow (`quantize_tflite.tflite_for_onnx`: ONNX →
PyTorch → litert-torch PT2E) and shipped when it agrees with the fp32 model within the bound.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecv.agent.contract.bundle import Bundle, InputSpec
from edgecv.tools.errors import DatasetError, ExportError

log = logging.getLogger(__name__)

TFLITE_NOT_ASKED = "int8 TFLite not built: not in --formats"


@dataclass(frozen=True)
class OnnxInputInfo:
    """What the ONNX file says about its image input and logits output (None where a dimension is dynamic)."""

    input_name: str
    elem_type: str
    dims: tuple[int | None, ...]
    output_name: str
    num_classes: int | None


@dataclass
class ByomResult:
    bundle: Bundle
    int8_path: Path
    fp32_path: Path
    metrics: dict[str, Any]
    tflite_note: str = TFLITE_NOT_ASKED
    notes: list[str] = field(default_factory=list)


def inspect_onnx(path: Path) -> OnnxInputInfo:
    """Read the single image input and the logits output of an ONNX classifier; clear errors otherwise."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model {path} does not exist; pass the path of an fp32 .onnx classifier")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends for non-ONNX files
        raise ExportError(f"{path} is not a readable ONNX model ({exc}); export your model to ONNX first") from exc
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"{path.name} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); edgecv "
                          "needs an image classifier with exactly one image input")
    tensor = inputs[0].type.tensor_type
    elem = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    if elem != "float":
        raise ExportError(f"{path.name} input '{inputs[0].name}' is {elem}; edgecv needs an fp32 model with a float "
                          "image input (export it in fp32, without baked-in quantization)")
    if len(dims) != 4:
        raise ExportError(f"{path.name} input '{inputs[0].name}' has shape {_fmt_dims(dims)}; edgecv needs an image "
                          "input of rank 4 (N, C, H, W) or (N, H, W, C)")
    if not model.graph.output:
        raise ExportError(f"{path.name} has no output; it must output class scores (N, classes)")
    out = model.graph.output[0]
    out_dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in out.type.tensor_type.shape.dim)
    classes = out_dims[-1] if out_dims and len(out_dims) >= 2 else None
    return OnnxInputInfo(inputs[0].name, elem, dims, out.name, classes)


def input_spec_for(info: OnnxInputInfo, *, size: tuple[int, int] | None = None, color: str | None = None,
                   layout: str | None = None, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                   scale: float = 1.0 / 255.0) -> InputSpec:
    """The InputSpec for a model: layout/size/channels from its input shape, the rest from the options.

    A static shape wins over nothing, options fill dynamic dimensions; an option that contradicts a
    static dimension is an error.
    """
    d1, d2, d3 = info.dims[1:]
    if layout is None:
        if d1 in (1, 3):
            layout = "NCHW"
        elif d3 in (1, 3):
            layout = "NHWC"
        else:
            raise ExportError(f"Cannot tell the layout of input shape {_fmt_dims(info.dims)} (no dimension of 1 or 3 "
                              "channels); pass --layout NCHW or NHWC")
    layout = layout.upper()
    if layout not in ("NCHW", "NHWC"):
        raise ExportError(f"Layout {layout!r} is not supported; use NCHW or NHWC")
    channels, height, width = (d1, d2, d3) if layout == "NCHW" else (d3, d1, d2)
    if channels not in (None, 1, 3):
        raise ExportError(f"Input shape {_fmt_dims(info.dims)} has {channels} channels in {layout}; edgecv handles 1 "
                          "(gray) or 3 (colour) channel images — check --layout")
    if size is not None:
        if (height, width) != (None, None) and (height, width) != tuple(size):
            raise ExportError(f"--size {size[0]}x{size[1]} contradicts the model input {height}x{width}; drop --size "
                              "or pass the model's size")
        height, width = size
    if height is None or width is None:
        raise ExportError(f"The model input {_fmt_dims(info.dims)} has a dynamic height/width; pass --size HxW")
    col = (color or "").upper()
    if channels is None:
        channels = 1 if col == "GRAY" else 3
    if not col:
        col = "GRAY" if channels == 1 else "RGB"
    if col not in ("RGB", "BGR", "GRAY") or (col == "GRAY") != (channels == 1):
        raise ExportError(f"--color {color} does not fit a {channels}-channel input; use gray for 1 channel, rgb or "
                          "bgr for 3")
    try:
        return InputSpec(width=int(width), height=int(height), channels=int(channels), color=col, layout=layout,
                         scale=float(scale), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
    except Exception as exc:  # BundleFormatError from the spec's own validation
        raise ExportError(f"Invalid preprocessing options: {exc}") from exc


def read_labels(path: Path) -> list[str]:
    """One label per line; blank lines ignored; at least 2."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Labels file {path} does not exist; write one class name per line, in output order")
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) < 2:
        raise DatasetError(f"Labels file {path} has {len(labels)} label(s); a classifier needs at least 2, one per "
                           "line in the model's output order")
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise DatasetError(f"Labels file {path} repeats {', '.join(dup)}; each class must appear once")
    return labels


def load_calibration_images(root: Path, spec: InputSpec, limit: int | None = None,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Images from a flat folder or a class-per-sub-folder tree, resized to the spec (uint8 N×H×W×C, RGB/gray).

    Returns (images, labels or None, class names or None); labels only when sub-folders name classes.
    """
    from edgecv.tools.datasets import IMAGE_SUFFIXES, load_image_folder, read_image, resize_image, scan_image_folder

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Calibration folder {root} does not exist or is not a folder; pass a folder of images "
                           "like the ones the camera will see (flat, or one sub-folder per class)")
    color = "gray" if spec.channels == 1 else "rgb"
    size = (spec.height, spec.width)
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) >= 2:
        _, per_class = scan_image_folder(root)
        pairs = [(p, ci) for ci, paths in enumerate(per_class) for p in paths]
        if limit is not None and len(pairs) > limit:
            pick = np.sort(np.random.default_rng(seed).permutation(len(pairs))[:limit])
            pairs = [pairs[i] for i in pick]
        ds = load_image_folder(root, size, color, files=pairs)
        return ds.images, ds.labels, ds.classes
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None and len(files) > limit:
        pick = np.sort(np.random.default_rng(seed).permutation(len(files))[:limit])
        files = [files[i] for i in pick]
    images = []
    for path in files:
        img = read_image(path, color == "gray")
        if img is None:
            log.warning("Skipping unreadable image %s", path)
            continue
        images.append(resize_image(img, size))
    if not images:
        raise DatasetError(f"Calibration folder {root} holds no readable images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return np.stack(images), None, None


def quantize_byom(onnx_path: Path, calib_dir: Path, labels_path: Path, out_dir: Path, *,
                  size: tuple[int, int] | None = None, color: str | None = None, layout: str | None = None,
                  mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), scale: float = 1.0 / 255.0,
                  calib: int = 200, method: str = "minmax", per_channel: bool = True, name: str | None = None,
                  version: str = "1", private_key: Path | None = None, include_fp32: bool = False,
                  max_eval: int = 2000, latency_runs: int = 200, tflite: bool = True, openvino: bool = False,
                  force: bool = False,
                  progress: Callable[[str], None] | None = None) -> ByomResult:
    """Quantize a user's fp32 ONNX classifier and build an edgecv bundle of it at `out_dir`."""
    from edgecv.agent.vision.preprocess import Preprocessor
    from edgecv.tools.bundler import build_bundle, choose_selftest_frames
    from edgecv.tools.datasets import to_model_input
    from edgecv.tools.evaluate import agreement, evaluate_artifact, run_logits
    from edgecv.tools.quantize_onnx import quantize_onnx_int8

    say = progress or (lambda msg: log.info("%s", msg))
    onnx_path = Path(onnx_path)
    info = inspect_onnx(onnx_path)
    labels = read_labels(labels_path)
    if info.num_classes is not None and info.num_classes != len(labels):
        raise DatasetError(f"{Path(labels_path).name} has {len(labels)} labels but {onnx_path.name} outputs "
                           f"{info.num_classes} classes; give one label per output, in output order")
    spec = input_spec_for(info, size=size, color=color, layout=layout, mean=mean, std=std, scale=scale)
    say(f"Model input '{info.input_name}' {_fmt_dims(info.dims)} → {spec.height}x{spec.width} {spec.color} "
        f"{spec.layout}, x = (pixel*{spec.scale:.6g} - {list(spec.mean)}) / {list(spec.std)}")
    images, img_labels, classes = load_calibration_images(calib_dir, spec, limit=calib + max_eval)
    # Files come sorted by class; shuffle so the calibration part covers every class.
    order = np.random.default_rng(0).permutation(len(images))
    images = images[order]
    img_labels = None if img_labels is None else img_labels[order]
    x = to_model_input(images, spec)
    y = _map_labels(img_labels, classes, labels)
    calib_x, eval_x = x[:calib], x if len(x) <= calib else x[calib:]
    eval_y = None if y is None else (y if len(x) <= calib else y[calib:])
    held_out = "" if len(x) > calib else " (the calibration images themselves: add images for a held-out check)"
    say(f"Calibration: {len(calib_x)} images from {calib_dir}; evaluation on {len(eval_x)} images{held_out}"
        f"{' with labels from class folders' if eval_y is not None else ' (no class folders: agreement only)'}")

    from edgecv.agent.vision.runtimes import open_engine

    fp32_engine = open_engine(onnx_path, "onnx")
    probe = fp32_engine.run(x[:1])
    if probe.shape[-1] != len(labels):
        raise DatasetError(f"{Path(labels_path).name} has {len(labels)} labels but {onnx_path.name} outputs "
                           f"{probe.shape[-1]} values per image; give one label per output, in output order")

    with tempfile.TemporaryDirectory(prefix="edgecv-byom-") as tmp:
        int8_path = Path(tmp) / "model.int8.onnx"
        started = time.perf_counter()
        quantize_onnx_int8(onnx_path, calib_x, int8_path, method=method, per_channel=per_channel)
        quant_s = time.perf_counter() - started
        ref = evaluate_artifact(onnx_path, "onnx", eval_x, eval_y if eval_y is not None else np.zeros(len(eval_x)),
                                latency_runs=latency_runs)
        q = evaluate_artifact(int8_path, "onnx", eval_x, eval_y if eval_y is not None else np.zeros(len(eval_x)),
                              latency_runs=latency_runs)
        agree = agreement(ref.top1, q.top1)
        metrics: dict[str, Any] = {
            "source": "byom", "calibration_images": len(calib_x), "calibration_method": method,
            "eval_images": len(eval_x), "quantize_seconds": round(quant_s, 3),
            "int8_fp32_agreement": agree,
            "fp32_onnx": _eval_metrics(ref, eval_y is not None),
            "int8_onnx": _eval_metrics(q, eval_y is not None),
        }
        tflite_note = TFLITE_NOT_ASKED
        tflite_path: Path | None = None
        if tflite:
            from edgecv.tools.quantize_tflite import tflite_for_onnx

            say("int8 TFLite: ONNX → PyTorch → litert-torch PT2E (minutes for a 224×224 model) …")
            outcome = tflite_for_onnx(onnx_path, spec, calib_x, eval_x, Path(tmp) / "model.int8.tflite", force=force)
            metrics["int8_tflite"] = outcome.as_dict()
            tflite_note, tflite_path = outcome.note, outcome.path
            say(tflite_note)

        ov_path: Path | None = None
        if openvino:
            from edgecv.tools.quantize_openvino import openvino_for_onnx

            ov = openvino_for_onnx(onnx_path, calib_x, eval_x, Path(tmp) / "model.int8.openvino.onnx", force=force)
            metrics["int8_openvino"] = ov.as_dict()
            ov_path = ov.path
            say(ov.note)

        int8_engine = open_engine(int8_path, "onnx")
        pre = Preprocessor(spec)
        checks = {"int8 onnx": lambda b: run_logits(int8_engine, b)}
        if tflite_path is not None:
            tflite_engine = open_engine(tflite_path, "tflite")
            checks["int8 tflite"] = lambda b: run_logits(tflite_engine, b)
        if ov_path is not None:
            ov_engine = open_engine(ov_path, "openvino", runtime="openvino")
            checks["int8 openvino"] = lambda b: run_logits(ov_engine, b)
        frames, expected = _selftest(images, pre.batch, lambda b: run_logits(fp32_engine, b), checks,
                                     choose_selftest_frames)
        artifacts: list[tuple[Path, str, str]] = [(int8_path, "onnx", "int8")]
        if tflite_path is not None:
            artifacts.append((tflite_path, "tflite", "int8"))
        if ov_path is not None:
            artifacts.append((ov_path, "openvino", "int8"))
        if include_fp32:
            artifacts.append((onnx_path, "onnx", "fp32"))
        bundle = build_bundle(Path(out_dir), name=name or onnx_path.stem, version=version, labels=labels, spec=spec,
                              artifacts=artifacts, selftest_frames=frames, selftest_expected=expected,
                              metrics=metrics, private_key=private_key,
                              description=f"Brought-your-own model from {onnx_path.name}")
    return ByomResult(bundle=bundle, int8_path=Path(out_dir) / "model.int8.onnx", fp32_path=onnx_path,
                      metrics=metrics, tflite_note=tflite_note)


def _selftest(images: np.ndarray, preprocess: Callable[[np.ndarray], np.ndarray],
              reference: Callable[[np.ndarray], np.ndarray], candidates: dict[str, Callable[[np.ndarray], np.ndarray]],
              choose: Callable[..., tuple[np.ndarray, list[int]]]) -> tuple[np.ndarray, list[int]]:
    """Self-test frames with a clear margin; with few or hard images, accept fewer frames and a smaller margin."""
    from edgecv.agent.errors import BundleError

    last: Exception | None = None
    for count, margin in ((8, 0.3), (4, 0.2), (2, 0.1), (1, 0.05)):
        if count > len(images):
            continue
        try:
            return choose(images, preprocess, reference, candidates, count=count, min_margin=margin)
        except BundleError as exc:
            last = exc
    raise ExportError(f"Cannot pick self-test frames: {last}. Give more calibration images, or check that int8 "
                      "and fp32 agree (quantization may have failed)")


def _map_labels(img_labels: np.ndarray | None, classes: list[str] | None, labels: list[str]) -> np.ndarray | None:
    """Class-folder indices → output indices when every folder name is a label; else None (no accuracy)."""
    if img_labels is None or classes is None:
        return None
    missing = [c for c in classes if c not in labels]
    if missing:
        log.warning("Class folders %s are not in the labels file; reporting agreement only, not accuracy",
                    ", ".join(missing[:5]))
        return None
    index = np.asarray([labels.index(c) for c in classes], dtype=np.int64)
    return index[img_labels]


def _eval_metrics(ev: Any, with_accuracy: bool) -> dict[str, Any]:
    doc = ev.as_dict()
    if not with_accuracy:
        doc.pop("accuracy")
    return doc


def _fmt_dims(dims: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
