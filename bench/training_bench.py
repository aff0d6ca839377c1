"""Training benchmark: from scratch vs augmentation vs a pretrained EfficientNet-Lite0 backbone, at 20, 100 and
500 images per class, each through the whole `edgecv optimize` pipeline (train, prune, int8, verify, bundle).

The data is photo-like and built offline: each class is one of scikit-image's colour photos (astronaut, cat,
coffee, rocket, motorcycle), and each image a random crop of it (15-45 % of the shorter side, anywhere, rotated
up to 20°, mirrored half the time) with colour, brightness and contrast changes, blur, sensor noise and JPEG
compression, at 128×128. Training images and a separate held-out test set (100 per class, other random draws)
come from the same generator with different seeds; accuracy is measured on the held-out set with the bundle's
int8 ONNX artifact in onnxruntime (and the fp32 model for reference), so small training sets are not judged
on a handful of test images.

Methods (everything else at the optimize defaults):
  scratch      the small CNN, --no-augment
  scratch+aug  the small CNN with augmentation (the default for image folders)
  lite0        --backbone efficientnet-lite0 (ImageNet weights, augmentation on)

    python bench/training_bench.py            # 3 methods × 20/100/500 per class, ~1 h on 2 busy cores
    python bench/training_bench.py --quick    # CI-sized: 3 classes × 20 images at 32×32, 2 epochs
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.training")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")
CLASS_NAMES = {"chelsea": "cat", "stereo_motorcycle": "motorcycle"}
METHODS = ("scratch", "scratch+aug", "lite0")


@dataclass
class Cell:
    method: str
    per_class: int
    accuracy_int8: float
    accuracy_fp32: float
    train_s: float
    epochs: int
    pipeline_s: float
    latency_ms_int8: float
    int8_onnx_bytes: int
    bundle_bytes: int
    params: int
    hint: str = ""


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img
    return np.ascontiguousarray(img[..., :3])


def make_photo_crops(per_class: int, seed: int, size: int = 128, classes: int = len(PHOTOS)) -> dict[str, list]:
    """{class name: [uint8 H×W×3 RGB images]}: random, transformed crops of each class's photo."""
    import cv2

    rng = np.random.default_rng(seed)
    out: dict[str, list] = {}
    for name in PHOTOS[:classes]:
        photo = _photo(name)
        h, w = photo.shape[:2]
        images = []
        for _ in range(per_class):
            side = int(min(h, w) * rng.uniform(0.15, 0.45))
            cx, cy = rng.uniform(side / 2, w - side / 2), rng.uniform(side / 2, h - side / 2)
            angle = rng.uniform(-20, 20)
            scale = size / side
            m = cv2.getRotationMatrix2D((cx, cy), angle, scale)
            m[:, 2] += (size / 2 - cx, size / 2 - cy)
            crop = cv2.warpAffine(photo, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT_101)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            x = crop.astype(np.float32)
            x *= rng.uniform(0.8, 1.2, 3).astype(np.float32)  # white balance
            x = (x - x.mean()) * rng.uniform(0.6, 1.3) + x.mean() * rng.uniform(0.6, 1.3)  # contrast, brightness
            if rng.random() < 0.5:
                x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 1.5))
            x += rng.normal(0, rng.uniform(2, 10), x.shape).astype(np.float32)
            crop = np.clip(x, 0, 255).astype(np.uint8)
            ok, enc = cv2.imencode(".jpg", crop[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 90))])
            assert ok
            images.append(cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1])
        out[CLASS_NAMES.get(name, name)] = images
    return out


def write_folder(root: Path, data: dict[str, list]) -> Path:
    import cv2

    for cls, images in data.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            cv2.imwrite(str(root / cls / f"{i:04d}.png"), img[..., ::-1])
    return root


def run_cell(method: str, folder: Path, test: dict[str, list], out: Path, args: argparse.Namespace) -> Cell:
    from edgecv.agent.contract.bundle import load_bundle
    from edgecv.tools.datasets import to_model_input
    from edgecv.tools.evaluate import evaluate_artifact
    from edgecv.tools.pipeline import OptimizeConfig, run_pipeline

    kwargs: dict[str, Any] = {"augment": method != "scratch", "flip": True}
    if method == "lite0":
        kwargs["backbone"] = "efficientnet-lite0"
        kwargs["size"] = f"{args.size}x{args.size}"
    cfg = OptimizeConfig(data=str(folder), out=out, name="bench", epochs=args.epochs, calib=args.calib,
                         latency_runs=args.latency_runs, seed=args.seed, threads=args.threads, progress=False,
                         device="cpu", sparsity=args.sparsity, **kwargs)
    started = time.perf_counter()
    result = run_pipeline(cfg, say=lambda msg: log.info("%s", msg))
    pipeline_s = time.perf_counter() - started
    bundle = load_bundle(result.bundle_dir)
    spec = bundle.manifest.input
    labels = list(bundle.manifest.labels)
    import cv2

    images = np.stack([cv2.resize(img, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
                       for cls in labels for img in test[cls]])
    y = np.concatenate([np.full(len(test[cls]), i) for i, cls in enumerate(labels)])
    x = to_model_input(images, spec)
    int8 = evaluate_artifact(result.artifacts["int8_onnx"], "onnx", x, y, threads=1, latency_runs=args.latency_runs)
    fp32 = evaluate_artifact(result.artifacts["fp32"], "onnx", x, y, threads=1, latency_runs=0)
    rec = result.record
    return Cell(method=method, per_class=0, accuracy_int8=round(int8.accuracy, 4),
                accuracy_fp32=round(fp32.accuracy, 4), train_s=round(rec.timings_s.get("train", 0.0), 1),
                epochs=sum(1 for r in rec.history if r.get("phase") == "train"), pipeline_s=round(pipeline_s, 1),
                latency_ms_int8=round(int8.latency_ms_median, 3),
                int8_onnx_bytes=result.artifacts["int8_onnx"].stat().st_size,
                bundle_bytes=result.archive.stat().st_size, params=int(rec.model.get("params", 0)),
                hint=str(rec.model.get("hint", "")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized: 3 classes × 20 images at 32×32, 2 epochs")
    parser.add_argument("--per-class", default="20,100,500", help="training images per class (comma-separated)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {', '.join(METHODS)}")
    parser.add_argument("--test-per-class", type=int, default=100, help="held-out images per class (default 100)")
    parser.add_argument("--size", type=int, default=128, help="image side (default 128)")
    parser.add_argument("--epochs", type=int, help="epoch limit (default: optimize's recipe)")
    parser.add_argument("--sparsity", type=float,
                        help="magnitude pruning (default: optimize's, 0.5 for the CNN and 0 for the backbone)")
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the pipeline's stage lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(message)s")
    classes = len(PHOTOS)
    if args.quick:
        args.per_class, args.test_per_class, args.size, classes = "20", 8, 32, 3
        args.epochs, args.calib, args.latency_runs, args.sparsity = args.epochs or 2, 40, 10, 0.0
    sizes = [int(v) for v in args.per_class.split(",") if v]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}: use {', '.join(METHODS)}")
    test = make_photo_crops(args.test_per_class, seed=args.seed + 1000, size=args.size, classes=classes)
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="edgecv-trainbench-") as tmp:
        for n in sizes:
            folder = write_folder(Path(tmp) / f"photos-{n}",
                                  make_photo_crops(n, seed=args.seed + n, size=args.size, classes=classes))
            for method in methods:
                print(f"[{method} @ {n}/class] …", file=sys.stderr, flush=True)
                cell = run_cell(method, folder, test, Path(tmp) / f"out-{n}-{method}", args)
                cell.per_class = n
                cells.append(cell)
                print(f"[{method} @ {n}/class] int8 {cell.accuracy_int8:.4f} in {cell.pipeline_s:.0f} s",
                      file=sys.stderr, flush=True)
    from edgecv.tools.pipeline import machine_info

    machine = machine_info()
    print(f"edgecv training benchmark — {classes} photo classes, {args.size}×{args.size}, held-out test set "
          f"{args.test_per_class}/class; int8 latency single thread, batch 1, onnxruntime")
    print(f"machine: {machine.get('cpu')}, {machine.get('cores')} cores; torch {machine.get('torch')}, "
          f"onnxruntime {machine.get('onnxruntime')}; training on {args.threads} torch threads")
    print()
    print("| images/class | method      | int8 acc | fp32 acc | epochs | train s | pipeline s | int8 ms | "
          "int8 ONNX KiB | bundle KiB | params    |")
    print("|-------------:|-------------|---------:|---------:|-------:|--------:|-----------:|--------:|"
          "--------------:|-----------:|----------:|")
    for c in cells:
        print(f"| {c.per_class:>12} | {c.method:<11} | {c.accuracy_int8:>8.4f} | {c.accuracy_fp32:>8.4f} | "
              f"{c.epochs:>6} | {c.train_s:>7.1f} | {c.pipeline_s:>10.1f} | {c.latency_ms_int8:>7.3f} | "
              f"{c.int8_onnx_bytes / 1024:>13.1f} | {c.bundle_bytes / 1024:>10.1f} | {c.params:>9,} |")
    hints = [c for c in cells if c.hint]
    for c in hints:
        print(f"hint ({c.method} @ {c.per_class}/class): {c.hint}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "cells": [asdict(c) for c in cells]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
