"""Benchmark of the optimization pipeline on Fashion-MNIST: every model variant measured side by side in one run.

Variants: fp32 (E epochs, and E+F epochs = the same training budget as the pruned models), magnitude-pruned
fp32 at 30/50/70 % (pruned after E epochs, fine-tuned F epochs), structured (channel) pruned, structured then
50 % magnitude-pruned, and int8 ONNX + int8 TFLite of the unpruned, 50 %/70 %-pruned and structured models.
For each artifact: test accuracy in its runtime, size raw and gzip, single-thread batch-1 median latency
(onnxruntime for .onnx, LiteRT for .tflite; rounds interleaved so machine noise hits every model alike).
Then the targets, pass/miss and by how much.

    python bench/pipeline_bench.py            # full test set (10,000 images), ~10 min on 2 cores
    python bench/pipeline_bench.py --quick    # CI-sized: 2,000 images, 1 epoch
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.pipeline")


@dataclass
class Row:
    variant: str
    fmt: str  # onnx | tflite
    precision: str
    path: str
    accuracy: float = 0.0
    bytes: int = 0
    gzip_bytes: int = 0
    latency_us: float = float("nan")
    runtime: str = ""
    invoke_us: float = float("nan")  # LiteRT rows: bare interpreter invoke, input already in the model's dtype
    samples: list[float] = field(default_factory=list, repr=False)
    invoke_samples: list[float] = field(default_factory=list, repr=False)


@dataclass
class Target:
    name: str
    value: float
    goal: float
    higher_is_better: bool
    unit: str
    detail: str = ""
    condition_ok: bool = True  # a side condition (e.g. accuracy drop bound) held

    @property
    def passed(self) -> bool:
        met = self.value >= self.goal if self.higher_is_better else self.value <= self.goal
        return met and self.condition_ok

    def margin(self) -> str:
        diff = self.value - self.goal if self.higher_is_better else self.goal - self.value
        return f"{'+' if diff >= 0 else '−'}{abs(diff):.{3 if self.unit == 'pts' else 2}g} {self.unit}"


def evaluate_targets(rows: dict[str, Row], bundles: dict[str, dict[str, Any]]) -> list[Target]:
    """The issue's targets from measured rows (keys: variant/format) and bundle sizes."""
    def acc(key: str) -> float:
        return rows[key].accuracy

    def best_latency(variant: str, precision: str) -> tuple[float, str]:
        cands = [(r.latency_us, r.runtime) for r in rows.values() if r.variant == variant and r.precision == precision]
        return min(cands)

    targets = []
    fp32 = acc("fp32 same epochs/onnx")
    targets.append(Target("fp32 test accuracy ≥ 0.92", fp32, 0.92, True, "acc",
                          "fp32 trained E+F epochs, onnxruntime"))
    int8_p50 = min(acc("50% pruned/onnx int8"), acc("50% pruned/tflite int8"))
    drop = (fp32 - int8_p50) * 100
    targets.append(Target("int8 + 50 % pruned within 0.3 pts of fp32 (same epochs)", drop, 0.3, False, "pts",
                          f"fp32 {fp32:.4f} vs int8 {int8_p50:.4f} (worse of ORT/LiteRT)"))
    fp32_raw = rows["fp32 same epochs/onnx"].bytes
    for label, info in bundles.items():
        ratio = fp32_raw / info["bytes"]
        b_drop = (fp32 - info["accuracy"]) * 100
        targets.append(Target(f"bundle ≥ 8× smaller than fp32 raw, ≤ 0.5 pt drop: {label}", ratio, 8.0, True,
                              "×", f"{fp32_raw} B → {info['bytes']} B, drop {b_drop:.2f} pts",
                              condition_ok=b_drop <= 0.5))
    f_lat, f_rt = best_latency("fp32 same epochs", "fp32")
    i_lat, i_rt = best_latency("fp32 same epochs", "int8")
    bare = {r.precision: r.invoke_us for r in rows.values() if r.variant == "fp32 same epochs" and r.fmt == "tflite"}
    bare_note = (f"; bare LiteRT invoke {bare['fp32']:.1f} → {bare['int8']:.1f} µs = {bare['fp32'] / bare['int8']:.2f}×"
                 if "fp32" in bare and "int8" in bare and bare["int8"] == bare["int8"] else "")
    targets.append(Target("int8 ≥ 2.5× faster than fp32 (best runtime each)", f_lat / i_lat, 2.5, True, "×",
                          f"fp32 {f_lat:.1f} µs ({f_rt}) → int8 {i_lat:.1f} µs ({i_rt}){bare_note}"))
    s_lat, s_rt = best_latency("structured", "int8")
    s_acc = min(acc("structured/onnx int8"), acc("structured/tflite int8"))
    s_drop = (fp32 - s_acc) * 100
    targets.append(Target("structured int8 ≥ 1.5× faster than int8, ≤ 0.5 pt drop", i_lat / s_lat, 1.5, True, "×",
                          f"int8 {i_lat:.1f} µs → structured int8 {s_lat:.1f} µs ({s_rt}), drop {s_drop:.2f} pts",
                          condition_ok=s_drop <= 0.5))
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run: 2000 images, 1+1 epochs, 50 timings")
    parser.add_argument("--epochs", type=int, help="training epochs E (default 6, quick 1)")
    parser.add_argument("--finetune-epochs", type=int, help="fine-tune epochs F after pruning (default 2, quick 1)")
    parser.add_argument("--structured", type=float, default=0.5, help="channel-pruning ratio (default 0.5)")
    parser.add_argument("--limit", type=int, help="images per split (default: all; quick 2000)")
    parser.add_argument("--latency-runs", type=int, help="timed runs per artifact (default 1000, quick 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="keep the artifacts here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--retime", type=Path, metavar="JSON",
                        help="only re-measure the latencies of the artifacts of an earlier run (its --json, run with "
                             "--work so the files still exist), e.g. on a quieter machine")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.retime:
        return retime(args.retime, args.latency_runs or 1000)
    epochs = args.epochs or (1 if args.quick else 6)
    ft = args.finetune_epochs if args.finetune_epochs is not None else 1 if args.quick else 2
    limit = args.limit or (2000 if args.quick else None)
    runs = args.latency_runs or (50 if args.quick else 1000)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        return run(args.work, epochs, ft, args.structured, limit, runs, args.seed, args.json)
    with tempfile.TemporaryDirectory(prefix="edgecv-bench-") as tmp:
        return run(Path(tmp), epochs, ft, args.structured, limit, runs, args.seed, args.json)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(work: Path, epochs: int, ft: int, structured: float, limit: int | None, runs: int, seed: int,
        json_out: Path | None) -> int:
    from edgecv.tools.datasets import default_input_spec, load_splits, to_model_input
    from edgecv.tools.evaluate import gzip_size, run_logits
    from edgecv.tools.export_onnx import export_onnx
    from edgecv.tools.model import build_model
    from edgecv.tools.pipeline import machine_info
    from edgecv.tools.prune import channel_prune, magnitude_prune
    from edgecv.tools.quantize_onnx import quantize_onnx_int8
    from edgecv.tools.quantize_tflite import export_tflite_fp32, export_tflite_int8
    from edgecv.tools.train import TrainConfig, train

    started = time.perf_counter()
    splits = load_splits("fashion-mnist", seed=seed, limit=limit)
    spec = default_input_spec(splits.train)
    x_test, y_test = to_model_input(splits.test.images, spec), splits.test.labels
    calib = to_model_input(splits.train.images[np.random.default_rng(seed).permutation(len(splits.train))[:200]], spec)
    say(f"data: {splits.describe()}; E={epochs} F={ft} structured={structured} latency runs={runs}")
    ft_cfg = TrainConfig(lr=1e-3, schedule="cosine", seed=seed, progress=False)

    base = build_model(spec, len(splits.classes), seed=seed)
    t0 = time.perf_counter()
    train(base, splits, spec, TrainConfig(epochs=epochs, seed=seed, progress=False, patience=0))
    say(f"trained fp32 ({epochs} epochs) in {time.perf_counter() - t0:.0f} s")
    models: dict[str, Any] = {"fp32": base}
    same = copy.deepcopy(base)
    if ft:
        train(same, splits, spec, TrainConfig(epochs=ft, lr=1e-3, schedule="cosine", seed=seed + 1, progress=False,
                                              patience=0, restore_best=False))
    models["fp32 same epochs"] = same
    for s in (0.3, 0.5, 0.7):
        t0 = time.perf_counter()
        pr = magnitude_prune(copy.deepcopy(base), splits, spec, target_sparsity=s, steps=max(1, ft),
                             finetune_epochs=1 if ft else 0, cfg=ft_cfg)
        models[f"{s:.0%} pruned"] = pr.model
        say(f"pruned {s:.0%}: sparsity {pr.global_sparsity:.3f} in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    struct, _, report = channel_prune(copy.deepcopy(base), base.arch, splits, spec, structured, finetune_epochs=ft,
                                      cfg=ft_cfg)
    models["structured"] = struct
    sp = magnitude_prune(copy.deepcopy(struct), splits, spec, target_sparsity=0.5, steps=max(1, ft),
                         finetune_epochs=1 if ft else 0, cfg=ft_cfg)
    models["structured + 50%"] = sp.model
    say(f"structured {structured:.0%}: {report['params_before']} → {report['params_after']} params, "
        f"{report['flops_before']} → {report['flops_after']} MACs in {time.perf_counter() - t0:.0f} s")

    rows: dict[str, Row] = {}

    def add(variant: str, fmt: str, precision: str, path: Path) -> None:
        key = f"{variant}/{fmt}" + (" int8" if precision == "int8" else "")
        rows[key] = Row(variant, fmt, precision, str(path), runtime="onnxruntime" if fmt == "onnx" else "litert")

    for name, model in models.items():
        slug = name.replace(" ", "_").replace("%", "").replace("+", "and")
        fp32_onnx = export_onnx(model, spec, work / f"{slug}.fp32.onnx")
        add(name, "onnx", "fp32", fp32_onnx)
        if name in ("fp32 same epochs", "structured"):
            add(name, "tflite", "fp32", export_tflite_fp32(model, spec, work / f"{slug}.fp32.tflite"))
        if name in ("fp32 same epochs", "50% pruned", "70% pruned", "structured", "structured + 50%"):
            add(name, "onnx", "int8", quantize_onnx_int8(fp32_onnx, calib, work / f"{slug}.int8.onnx"))
            add(name, "tflite", "int8", export_tflite_int8(model, spec, calib, work / f"{slug}.int8.tflite"))
        say(f"exported {name}")

    from edgecv.agent.vision.runtimes import open_engine

    for row in rows.values():
        p = Path(row.path)
        engine = open_engine(p, row.fmt, threads=1)
        row.accuracy = float(np.mean(np.argmax(run_logits(engine, x_test), axis=1) == y_test))
        row.bytes, row.gzip_bytes = p.stat().st_size, gzip_size(p)
    measure_latencies(rows, x_test[:1], runs)

    bundles = build_bundles(work, spec, splits, rows)
    targets = evaluate_targets(rows, bundles)
    print_tables(rows, bundles, targets, machine_info(), time.perf_counter() - started, len(y_test))
    if json_out:
        json_out.write_text(json.dumps({
            "machine": machine_info(), "settings": {"epochs": epochs, "finetune_epochs": ft, "structured": structured,
                                                    "limit": limit, "latency_runs": runs, "seed": seed},
            "rows": [{k: v for k, v in asdict(r).items() if not k.endswith("samples")} for r in rows.values()],
            "bundles": bundles,
            "targets": [{**asdict(t), "passed": t.passed} for t in targets]}, indent=2) + "\n")
    return 0


def measure_latencies(rows: dict[str, Row], sample: np.ndarray, runs: int, rounds: int = 10) -> None:
    """Median single-image latency of every row, in interleaved rounds so load affects all models alike."""
    from edgecv.agent.vision.runtimes import open_engine

    engines = {k: open_engine(Path(r.path), r.fmt, threads=1) for k, r in rows.items()}
    bare = {k: _bare_invoke(Path(r.path)) for k, r in rows.items() if r.fmt == "tflite"}
    for fn in [*(e.run for e in engines.values()), *bare.values()]:
        for _ in range(50):
            fn(sample)
    for _ in range(rounds):
        for key, eng in engines.items():
            rows[key].samples += _time(eng.run, sample, max(1, runs // rounds))
            if key in bare:
                rows[key].invoke_samples += _time(bare[key], sample, max(1, runs // rounds))
    for row in rows.values():
        row.latency_us = statistics.median(row.samples) * 1e6
        if row.invoke_samples:
            row.invoke_us = statistics.median(row.invoke_samples) * 1e6


def _time(fn: Any, sample: np.ndarray, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(sample)
        times.append(time.perf_counter() - t)
    return times


def _bare_invoke(path: Path) -> Any:
    """LiteRT without the agent's adapter: the input tensor is set in the model's own dtype (int8 models get
    pre-quantized data), so this is the interpreter's cost alone; the difference to the adapter's latency is
    the per-call float↔int8 conversion in Python."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    data = np.zeros(inp["shape"], dtype=inp["dtype"])

    def run(_: np.ndarray) -> np.ndarray:
        it.set_tensor(inp["index"], data)
        it.invoke()
        return it.get_tensor(out["index"])

    return run


def retime(json_path: Path, runs: int) -> int:
    import os

    from edgecv.tools.datasets import default_input_spec, load_splits, to_model_input
    from edgecv.tools.pipeline import machine_info

    doc = json.loads(json_path.read_text())
    rows = {f"{r['variant']}/{r['fmt']}" + (" int8" if r["precision"] == "int8" else ""): Row(**r)
            for r in doc["rows"]}
    splits = load_splits("fashion-mnist", seed=doc["settings"]["seed"], limit=16)
    sample = to_model_input(splits.test.images[:1], default_input_spec(splits.train))
    old = {k: r.latency_us for k, r in rows.items()}
    for r in rows.values():
        r.samples, r.invoke_samples = [], []
    measure_latencies(rows, sample, runs)
    m = machine_info()
    print(f"re-timed {json_path}: {m['cpu']}, {m['cores']} cores, load average {os.getloadavg()[0]:.2f}, "
          f"{runs} runs each")
    print(f"| {'variant':<18} | {'artifact':<11} | {'runtime':<11} | {'first run µs':>12} | {'now µs':>8} | "
          f"{'bare invoke µs':>14} |")
    print(f"|{'-' * 20}|{'-' * 13}|{'-' * 13}|{'-' * 13}:|{'-' * 9}:|{'-' * 15}:|")
    for key, r in rows.items():
        invoke = f"{r.invoke_us:.1f}" if r.invoke_us == r.invoke_us else "–"
        print(f"| {r.variant:<18} | {r.precision + ' ' + r.fmt:<11} | {r.runtime:<11} | {old[key]:>12.1f} | "
              f"{r.latency_us:>8.1f} | {invoke:>14} |")
    fp32 = min(r.latency_us for r in rows.values() if r.variant == "fp32 same epochs" and r.precision == "fp32")
    int8 = min(r.latency_us for r in rows.values() if r.variant == "fp32 same epochs" and r.precision == "int8")
    struct = min(r.latency_us for r in rows.values() if r.variant == "structured" and r.precision == "int8")
    print(f"int8 vs fp32 (best runtime each): {fp32 / int8:.2f}× (goal 2.5×); structured int8 vs int8: "
          f"{int8 / struct:.2f}× (goal 1.5×)")
    return 0


def build_bundles(work: Path, spec: Any, splits: Any, rows: dict[str, Row]) -> dict[str, dict[str, Any]]:
    """Real signed .edgecv archives: both int8 artifacts, and the single LiteRT one a LiteRT device needs."""
    from edgecv.agent.contract.signing import generate_private_key
    from edgecv.tools.bundler import build_bundle, dataset_to_frames, pack

    key = generate_private_key()
    frames = dataset_to_frames(splits.test.images[:8])
    out: dict[str, dict[str, Any]] = {}
    for variant in ("50% pruned", "70% pruned", "structured + 50%"):
        onnx, tfl = rows[f"{variant}/onnx int8"], rows[f"{variant}/tflite int8"]
        for label, arts in ((f"{variant}, int8 ONNX + TFLite", [onnx, tfl]), (f"{variant}, int8 TFLite", [tfl])):
            slug = label.replace(" ", "_").replace("%", "").replace(",", "").replace("+", "and")
            build_bundle(work / slug, name="bench", version="1", labels=splits.classes, spec=spec,
                         artifacts=[(Path(a.path), a.fmt, "int8") for a in arts], selftest_frames=frames,
                         selftest_expected=[int(v) for v in splits.test.labels[:8]], metrics={}, private_key=key)
            archive = pack(work / slug, work / f"{slug}.edgecv")
            out[label] = {"bytes": archive.stat().st_size, "accuracy": min(a.accuracy for a in arts)}
    return out


def print_tables(rows: dict[str, Row], bundles: dict[str, dict[str, Any]], targets: list[Target],
                 machine: dict[str, Any], seconds: float, n_test: int) -> None:
    print(f"edgecv pipeline benchmark — Fashion-MNIST test set ({n_test} images), single thread, batch 1")
    print(f"machine: {machine.get('cpu')}, {machine.get('cores')} cores; torch {machine.get('torch')}, onnxruntime "
          f"{machine.get('onnxruntime')}, ai-edge-litert {machine.get('ai-edge-litert')}; {seconds / 60:.1f} min")
    print()
    fp32_raw = rows["fp32 same epochs/onnx"].bytes
    fp32_lat = rows["fp32 same epochs/onnx"].latency_us
    print(f"| {'variant':<18} | {'artifact':<11} | {'runtime':<11} | {'accuracy':>8} | {'raw KiB':>8} | "
          f"{'gzip KiB':>8} | {'× fp32 raw':>10} | {'latency µs':>10} | {'× fp32 ORT':>10} | {'bare invoke µs':>14} |")
    print(f"|{'-' * 20}|{'-' * 13}|{'-' * 13}|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|{'-' * 11}:|{'-' * 11}:|{'-' * 11}:|"
          f"{'-' * 15}:|")
    for r in rows.values():
        invoke = f"{r.invoke_us:.1f}" if r.invoke_us == r.invoke_us else "–"
        print(f"| {r.variant:<18} | {r.precision + ' ' + r.fmt:<11} | {r.runtime:<11} | {r.accuracy:>8.4f} | "
              f"{r.bytes / 1024:>8.1f} | {r.gzip_bytes / 1024:>8.1f} | {fp32_raw / r.gzip_bytes:>9.1f}× | "
              f"{r.latency_us:>10.1f} | {fp32_lat / r.latency_us:>9.2f}× | {invoke:>14} |")
    print()
    print(f"| {'signed bundle (.edgecv, gzip)':<45} | {'KiB':>7} | {'× fp32 raw':>10} | {'accuracy':>8} |")
    print(f"|{'-' * 47}|{'-' * 8}:|{'-' * 11}:|{'-' * 9}:|")
    for label, info in bundles.items():
        print(f"| {label:<45} | {info['bytes'] / 1024:>7.1f} | {fp32_raw / info['bytes']:>9.1f}× | "
              f"{info['accuracy']:>8.4f} |")
    print()
    w = max(len(t.name) for t in targets)
    print(f"| {'target':<{w}} | {'measured':>9} | {'goal':>6} | {'result':<6} | {'margin':>10} | detail")
    print(f"|{'-' * (w + 2)}|{'-' * 10}:|{'-' * 7}:|{'-' * 8}|{'-' * 11}:|{'-' * 8}")
    for t in targets:
        value = f"{t.value:.4f}" if t.unit == "acc" else f"{t.value:.2f} {t.unit}"
        goal = f"{t.goal:g}" if t.unit == "acc" else f"{t.goal:g}{t.unit if t.unit == '×' else ''}"
        result = "PASS" if t.passed else "MISS"
        note = "" if t.condition_ok else " (accuracy bound missed)"
        print(f"| {t.name:<{w}} | {value:>9} | {goal:>6} | {result:<6} | {t.margin():>10} | {t.detail}{note}")


if __name__ == "__main__":
    sys.exit(main())
