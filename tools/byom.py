"""Bring your own model: turn an existing fp32 ONNX image classifier into an int8 edgecv bundle.

The user supplies the ONNX file, a folder of calibration images (flat, or one sub-folder per class) and a
labels file; the preprocessing comes from the model's input shape plus command-line options (resize mode
included). Quantization goes through the one artifact chain (`edgecv.tools.artifacts`): any opset, logits or
probabilities detected, int8 recipes measured against fp32 and the fastest one meeting the agreement bound
shipped (with fp32 beside it when int8 is not clearly faster). An int8 TFLite is built without TensorFlow
(`quantize_tflite.tflite_for_onnx`: ONNX → PyTorch → litert-torch PT2E) and, on request, an NNCF int8 for OpenVINO;
each ships only when it meets the same bound. The bundle is built with self-test vectors and packed as a `.edgecv`
archive.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecv.agent.contract.bundle import BUNDLE_SUFFIX, RESIZE_MODES, Bundle, InputSpec
from edgecv.tools.artifacts import Bound
from edgecv.tools.errors import DatasetError, ExportError

if TYPE_CHECKING:
    from edgecv.tools.artifacts import ArtifactSet

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
    artifacts: ArtifactSet
    archive: Path
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
                   scale: float = 1.0 / 255.0, resize: str = "stretch",
                   shorter_side: int | None = None) -> InputSpec:
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
            raise ExportError(f"--size {size[0]}x{size[1]} contradicts the model input {_dim(height)}x{_dim(width)}; "
                              "drop --size or pass the model's size")
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
    if resize not in RESIZE_MODES:
        raise ExportError(f"--resize {resize} is not one of {', '.join(RESIZE_MODES)}")
    if resize == "shorter-side":
        # ImageNet's convention: shorter side to 256 for a 224 crop (crop = 87.5 % of the shorter side).
        shorter_side = shorter_side or round(max(int(height), int(width)) * 8 / 7)
        if shorter_side < max(int(height), int(width)):
            raise ExportError(f"--shorter-side {shorter_side} is smaller than the {height}x{width} crop; pass at "
                              f"least {max(int(height), int(width))} (ImageNet models: 256 for a 224 crop)")
    elif shorter_side is not None:
        raise ExportError(f"--shorter-side applies only to --resize shorter-side (got --resize {resize})")
    try:
        return InputSpec(width=int(width), height=int(height), channels=int(channels), color=col, layout=layout,
                         scale=float(scale), mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                         resize=resize, shorter_side=shorter_side)
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


def load_calibration_images(root: Path, spec: InputSpec, limit: int | None = None, seed: int = 0,
                            size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None,
                                                                          list[str] | None]:
    """Images from a flat folder or a class-per-sub-folder tree, resized to `size` (H, W; default the
    spec's) as uint8 N×H×W×C, RGB or gray.

    Returns (images, labels or None, class names or None); labels only when sub-folders name classes.
    """
    from edgecv.tools.datasets import IMAGE_SUFFIXES, load_image_folder, read_image, resize_image, scan_image_folder

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Calibration folder {root} does not exist or is not a folder; pass a folder of images "
                           "like the ones the camera will see (flat, or one sub-folder per class)")
    color = "gray" if spec.channels == 1 else "rgb"
    size = size or (spec.height, spec.width)
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


def frame_size_for(spec: InputSpec) -> tuple[int, int]:
    """(H, W) of the camera-like frames calibration and self-test images are brought to.

    Stretch models see frames at their own size (nothing else changes the result). The other resize modes
    need frames of another shape to mean anything, so images become 4:3 frames a little larger than the
    model input, and the device's own preprocessing (resize mode included) turns them into model input.
    """
    if spec.resize == "stretch":
        return spec.height, spec.width
    short = spec.shorter_side or round(max(spec.height, spec.width) * 8 / 7)
    short = max(short, spec.height, spec.width)
    return short, round(short * 4 / 3)


def quantize_byom(onnx_path: Path, calib_dir: Path, labels_path: Path, out_dir: Path, *,
                  size: tuple[int, int] | None = None, color: str | None = None, layout: str | None = None,
                  mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), scale: float = 1.0 / 255.0,
                  resize: str = "stretch", shorter_side: int | None = None,
                  calib: int = 200, methods: Sequence[str] | None = None, per_channel: bool | None = None,
                  name: str | None = None, version: str | None = None, private_key: Path | None = None,
                  include_fp32: bool = False, prefer: str = "auto", bound: Bound | None = None,
                  force: bool = False, max_eval: int = 2000, latency_runs: int = 200, tflite: bool = True,
                  openvino: bool = False,
                  progress: Callable[[str], None] | None = None) -> ByomResult:
    """Quantize a user's fp32 ONNX classifier and build a signed-if-keyed bundle of it at `out_dir` (and the
    `.edgecv` archive beside it). The int8 recipe, and whether fp32 ships too, are chosen by measurement
    (`edgecv.tools.artifacts`); an artifact below the agreement bound stops the build unless `force`."""
    from edgecv.agent.vision.preprocess import Preprocessor
    from edgecv.agent.vision.runtimes import open_engine
    from edgecv.tools.artifacts import build_onnx_artifacts, enforce_bound
    from edgecv.tools.bundler import build_bundle, build_version, choose_selftest_frames, pack
    from edgecv.tools.evaluate import run_logits

    say = progress or (lambda msg: log.info("%s", msg))
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    bound = bound or Bound()
    info = inspect_onnx(onnx_path)
    labels = read_labels(labels_path)
    if info.num_classes is not None and info.num_classes != len(labels):
        raise DatasetError(f"{Path(labels_path).name} has {len(labels)} labels but {onnx_path.name} outputs "
                           f"{info.num_classes} classes; give one label per output, in output order")
    spec = input_spec_for(info, size=size, color=color, layout=layout, mean=mean, std=std, scale=scale,
                          resize=resize, shorter_side=shorter_side)
    geometry = spec.resize if spec.resize != "shorter-side" else f"shorter side {spec.shorter_side}, centre crop"
    say(f"Model input '{info.input_name}' {_fmt_dims(info.dims)} → {spec.height}x{spec.width} {spec.color} "
        f"{spec.layout} ({geometry}), x = (pixel*{spec.scale:.6g} - {list(spec.mean)}) / {list(spec.std)}")
    images, img_labels, classes = load_calibration_images(calib_dir, spec, limit=calib + max_eval,
                                                          size=frame_size_for(spec))
    # Files come sorted by class; shuffle so the calibration part covers every class.
    order = np.random.default_rng(0).permutation(len(images))
    images = images[order]
    img_labels = None if img_labels is None else img_labels[order]
    pre = Preprocessor(spec)
    x = pre.batch(dataset_frames(images))  # the device's own preprocessing, resize mode included
    y = _map_labels(img_labels, classes, labels)
    calib_x, eval_x = x[:calib], x if len(x) <= calib else x[calib:]
    eval_y = None if y is None else (y if len(x) <= calib else y[calib:])
    if eval_y is None and bound.max_drop is not None:
        say(f"No class folders, so no accuracy: --max-drop {bound.max_drop} bounds disagreement with fp32 instead "
            f"(agreement ≥ {1 - bound.max_drop:.1%})")
        bound = Bound(min_agreement=1.0 - bound.max_drop, min_confident_agreement=bound.min_confident_agreement)
    held_out = "" if len(x) > calib else " (the calibration images themselves: add images for a held-out check)"
    say(f"Calibration: {len(calib_x)} images from {calib_dir}; evaluation on {len(eval_x)} images{held_out}"
        f"{' with labels from class folders' if eval_y is not None else ' (no class folders: agreement only)'}")

    probe = open_engine(onnx_path, "onnx").run(x[:1])
    if probe.shape[-1] != len(labels):
        raise DatasetError(f"{Path(labels_path).name} has {len(labels)} labels but {onnx_path.name} outputs "
                           f"{probe.shape[-1]} values per image; give one label per output, in output order")

    with tempfile.TemporaryDirectory(prefix="edgecv-byom-") as tmp:
        started = time.perf_counter()
        arts = build_onnx_artifacts(onnx_path, calib_x, eval_x, Path(tmp), eval_y=eval_y, bound=bound,
                                    prefer=prefer, methods=methods, per_channel=per_channel,
                                    latency_runs=latency_runs, progress=say)
        ship = list(arts.ship)
        if include_fp32 and not any(m.precision == "fp32" for m in ship):
            ship.append(arts.fp32)
        forced = enforce_bound([(m.name, m.agreement, m.confident_agreement, m.confident_images, m.misses)
                                for m in ship], force=force, say=say)
        metrics: dict[str, Any] = {
            "source": "byom", "calibration_images": len(calib_x), "eval_images": len(eval_x),
            "quantize_seconds": round(time.perf_counter() - started, 3), "artifacts": arts.metrics()}
        if arts.int8 is not None:
            metrics["int8_fp32_agreement"] = arts.int8.agreement
        if forced:
            metrics["below_bound"] = forced
        artifacts = [(m.path, "onnx", m.precision) for m in ship]
        engines = {m.name: open_engine(m.path, "onnx") for m in ship}
        tflite_note = TFLITE_NOT_ASKED
        if tflite:
            from edgecv.tools.quantize_tflite import tflite_for_onnx

            say("int8 TFLite: ONNX → PyTorch → litert-torch PT2E (minutes for a 224×224 model) …")
            outcome = tflite_for_onnx(arts.fp32.path, spec, calib_x, eval_x, Path(tmp) / "model.int8.tflite",
                                      min_agreement=bound.min_agreement,
                                      min_confident=bound.min_confident_agreement, force=force)
            metrics["int8_tflite"] = outcome.as_dict()
            tflite_note = outcome.note
            say(tflite_note)
            if outcome.path is not None:
                artifacts.append((outcome.path, "tflite", "int8"))
                engines["int8 tflite"] = open_engine(outcome.path, "tflite")
        if openvino:
            from edgecv.tools.quantize_openvino import openvino_for_onnx

            ov = openvino_for_onnx(arts.fp32.path, calib_x, eval_x, Path(tmp) / "model.int8.openvino.onnx",
                                   min_agreement=bound.min_agreement, min_confident=bound.min_confident_agreement,
                                   force=force)
            metrics["int8_openvino"] = ov.as_dict()
            say(ov.note)
            if ov.path is not None:
                artifacts.append((ov.path, "openvino", "int8"))
                engines["int8 openvino"] = open_engine(ov.path, "openvino", runtime="openvino")
        fp32_engine = open_engine(arts.fp32.path, "onnx")
        candidates: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            n: functools.partial(run_logits, e) for n, e in engines.items()}
        frames, expected = _selftest(images, pre.batch, functools.partial(run_logits, fp32_engine), candidates,
                                     choose_selftest_frames, arts.output)
        if version is None:
            version = build_version()
        bundle = build_bundle(out_dir, name=name or onnx_path.stem, version=version, labels=labels, spec=spec,
                              artifacts=artifacts, selftest_frames=frames, selftest_expected=expected,
                              metrics=metrics, private_key=private_key, output=arts.output,
                              description=f"Brought-your-own model from {onnx_path.name}")
        archive = pack(out_dir, out_dir.with_name(out_dir.name + BUNDLE_SUFFIX))
    return ByomResult(bundle=bundle, artifacts=arts, archive=archive, metrics=metrics, tflite_note=tflite_note,
                      notes=list(arts.notes))


def dataset_frames(images: np.ndarray) -> np.ndarray:
    """RGB (or gray) dataset images → camera-like frames (BGR), as the device receives them."""
    from edgecv.tools.bundler import dataset_to_frames

    return dataset_to_frames(images)


def _selftest(images: np.ndarray, preprocess: Callable[[np.ndarray], np.ndarray],
              reference: Callable[[np.ndarray], np.ndarray], candidates: dict[str, Callable[[np.ndarray], np.ndarray]],
              choose: Callable[..., tuple[np.ndarray, list[int]]], output: str = "logits") -> tuple[np.ndarray,
                                                                                                     list[int]]:
    """Self-test frames with a clear margin; with few or hard images, accept fewer frames and a smaller margin."""
    from edgecv.agent.errors import BundleError

    last: Exception | None = None
    for count, margin in ((8, 0.3), (4, 0.2), (2, 0.1), (1, 0.05)):
        if count > len(images):
            continue
        try:
            return choose(images, preprocess, reference, candidates, count=count, min_margin=margin, output=output)
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


def format_dims(dims: Sequence[int | None]) -> str:
    """A shape for messages, '?' for every dynamic dimension: (?, 3, 224, 224)."""
    return "(" + ", ".join(_dim(d) for d in dims) + ")"


_fmt_dims = format_dims


def _dim(d: int | None) -> str:
    return "?" if d is None or d < 0 else str(d)
