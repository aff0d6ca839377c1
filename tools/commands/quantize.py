"""`edgecv quantize`: export a checkpoint to fp32 ONNX, int8 ONNX and int8 TFLite, each verified in its runtime;
or, with --onnx, quantize a user's own fp32 ONNX classifier into a bundle (bring your own model).

`build_artifacts` is the library form of the checkpoint path (the pipeline reuses it).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from edgecv.agent.contract.bundle import InputSpec
    from edgecv.tools.evaluate import ArtifactEval

from edgecv.tools.commands.output import add_json_option, add_progress_option

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tflite", "tflite-fp32")
METHODS = ("minmax", "entropy", "percentile")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "quantize", help="export and int8-quantize a checkpoint (or your own ONNX model)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export an edgecv checkpoint to fp32 ONNX, int8 ONNX (onnxruntime static QDQ) and int8\n"
                    "TFLite (litert-torch PT2E), run each in its real runtime on the test set and print\n"
                    "accuracy, agreement with fp32, size and latency.\n\n"
                    "Bring your own model: --onnx MODEL.onnx --calib-images DIR --labels labels.txt quantizes an\n"
                    "existing fp32 ONNX classifier and writes a bundle to --out.\n\n"
                    "Progress and notes go to stderr; stdout gets the tables and the files written, or one\n"
                    "JSON object (the metrics) with --json. Exit status: 0 on success, 1 when an artifact\n"
                    "cannot be built or misses the agreement bound without --force, 2 on a usage error,\n"
                    "130 when interrupted.",
        epilog="examples:\n"
               "  edgecv quantize runs/fmnist.pt --data fashion-mnist --calib 200 --out runs/fmnist-int8\n"
               "  edgecv quantize runs/fmnist.pt --data fashion-mnist --max-drop 0.005 --out runs/q\n"
               "  edgecv quantize --onnx mobilenet.onnx --calib-images photos/ --labels labels.txt \\\n"
               "      --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --out bundles/mobilenet")
    parser.add_argument("checkpoint", nargs="?", type=Path, help="edgecv checkpoint (.pt) from 'edgecv train'")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (artifacts + metrics.json; with --onnx: the bundle directory)")
    parser.add_argument("--data", default=None,
                        help="'fashion-mnist' or an image folder <root>/<class>/*: calibration and test images "
                             "(default: fashion-mnist; checkpoints only)")
    parser.add_argument("--calib", type=int, default=200, help="number of calibration images (default 200)")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="activation range calibration (default: checkpoints minmax; --onnx tries minmax and "
                             "percentile and keeps the better)")
    parser.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weights")
    parser.add_argument("--max-drop", type=float, default=None,
                        help="accuracy-aware: keep the most sensitive layers in float until the int8 ONNX loses "
                             "at most this much accuracy vs fp32 (checkpoints: on the validation split; --onnx: "
                             "on labelled class folders, or as 1 - agreement with fp32 without them)")
    parser.add_argument("--formats", default=None,
                        help=f"checkpoints: comma list of {', '.join(FORMATS)} (default onnx,tflite; fp32 ONNX "
                             "always); --onnx: onnx, tflite (int8 TFLite through ONNX → PyTorch → PT2E, shipped "
                             "when within the bound) and openvino (NNCF int8 for OpenVINO), default onnx,tflite")
    parser.add_argument("--limit", type=int, default=None,
                        help="cap the images loaded per split (quick runs; checkpoints only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="runtime threads for evaluation (default 1; checkpoints only: --onnx measures on one "
                             "thread, as the device runs)")
    parser.add_argument("--latency-runs", type=int, default=500,
                        help="batch-1 inferences timed per artifact (default 500; 0 skips latency)")
    add_progress_option(parser)
    add_json_option(parser, "the metrics (what metrics.json or the manifest records)")
    byom = parser.add_argument_group("bring your own model (with --onnx)")
    byom.add_argument("--onnx", type=Path, help="your fp32 ONNX image classifier (outputs class scores)")
    byom.add_argument("--calib-images", type=Path, help="folder of images like the camera's (flat or per class)")
    byom.add_argument("--labels", type=Path, help="labels file: one class name per line, in output order")
    byom.add_argument("--size", help="HxW input size when the model's is dynamic (e.g. 224x224)")
    byom.add_argument("--color", choices=("rgb", "bgr", "gray"), help="channel order the model expects")
    byom.add_argument("--layout", choices=("NCHW", "NHWC"), help="tensor layout (default: read from the model)")
    byom.add_argument("--mean", default=None, help="per-channel mean after scaling, e.g. 0.485,0.456,0.406 "
                      "(default 0)")
    byom.add_argument("--std", default=None, help="per-channel std, e.g. 0.229,0.224,0.225 (default 1)")
    byom.add_argument("--scale", type=float, default=None, help="pixel multiplier before mean/std "
                      "(default 1/255)")
    byom.add_argument("--resize", choices=("stretch", "letterbox", "center-crop", "shorter-side"), default=None,
                      help="how a camera frame becomes the model's size (default stretch); shorter-side scales "
                           "the shorter side to --shorter-side then centre-crops (ImageNet: 256 then 224)")
    byom.add_argument("--shorter-side", type=int, default=None,
                      help="with --resize shorter-side: pixels of the shorter side before the crop (default "
                           "input size × 8/7, i.e. 256 for 224)")
    byom.add_argument("--name", help="bundle name (default: the ONNX file name)")
    byom.add_argument("--version", dest="bundle_version", default=None,
                      help="bundle version (default 1.0.0.post<UTC yyyymmddHHMMSS>, different per build)")
    byom.add_argument("--key", type=Path, help="private key to sign the bundle (from 'edgecv keys generate')")
    byom.add_argument("--include-fp32", action="store_true", help="also ship the fp32 ONNX in the bundle")
    byom.add_argument("--prefer", choices=("auto", "speed", "size"), default=None,
                      help="auto (default): int8 alone when it is clearly faster than fp32 here, else int8 and "
                           "fp32 so the device measures; size: int8 only; speed: only the faster of the two")
    byom.add_argument("--min-agreement", type=float, default=None,
                      help="top-1 agreement with fp32 every shipped artifact must reach (default 0.97; and 0.99 "
                           "on images fp32 is confident about)")
    byom.add_argument("--force", action="store_true",
                      help="sign and ship even an artifact below the agreement bound (recorded in the manifest)")
    parser.set_defaults(handler=run)


@dataclass
class QuantizeReport:
    """Artifacts written by `build_artifacts` and how each measured in its runtime on the test set."""

    paths: dict[str, Path]
    evals: dict[str, ArtifactEval]
    agreement: dict[str, float]
    seconds: dict[str, float]
    kept_float: list[str] = field(default_factory=list)
    accuracy_aware: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None  # the int8 ONNX recipes measured and the one kept


    def metrics(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for name, ev in self.evals.items():
            doc[name] = {**ev.as_dict(), "agreement_with_fp32": self.agreement.get(name, 1.0),
                         "seconds_to_build": round(self.seconds.get(name, 0.0), 3), "file": self.paths[name].name}
        if self.accuracy_aware is not None:
            doc["accuracy_aware"] = self.accuracy_aware
        if self.selection is not None:
            doc["int8_onnx_selection"] = {k: v for k, v in self.selection.items() if k != "table"}
        return doc


def build_artifacts(model: torch.nn.Module, spec: InputSpec, calib_x: np.ndarray, test_x: np.ndarray,
                    test_y: np.ndarray, out_dir: Path, *, formats: Sequence[str] = ("onnx", "tflite"),
                    method: str | None = None, per_channel: bool = True, max_drop: float | None = None,
                    min_agreement: float = 0.97,
                    val_x: np.ndarray | None = None, val_y: np.ndarray | None = None, threads: int = 1,
                    latency_runs: int = 500, progress: Callable[[str], None] | None = None) -> QuantizeReport:
    """fp32 ONNX (always) + int8 ONNX + int8 TFLite (+ fp32 TFLite) in `out_dir`, each run on the test set.

    Names: model.fp32.onnx, model.int8.onnx, model.int8.tflite, model.fp32.tflite. The int8 ONNX comes from
    the artifact chain (`edgecv.tools.artifacts`): recipes measured on (val_x, val_y), the fastest within the
    agreement bound (and `max_drop` of accuracy) kept, sensitive nodes kept float when none is; `method` and
    `per_channel=False` narrow the search. The test set stays untouched for reporting.
    """
    import numpy as np

    from edgecv.tools.artifacts import Bound, build_onnx_artifacts
    from edgecv.tools.evaluate import agreement, evaluate_artifact
    from edgecv.tools.export_onnx import export_onnx
    from edgecv.tools.quantize_onnx import torch_module_names
    from edgecv.tools.quantize_tflite import export_tflite_fp32, export_tflite_int8

    say = progress or (lambda msg: log.info("%s", msg))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        from edgecv.tools.errors import ExportError

        raise ExportError(f"Unknown format(s) {', '.join(unknown)}; use a comma list of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    report = QuantizeReport(paths, {}, {}, seconds)

    def timed(name: str, fn: Callable[[], Path]) -> None:
        say(f"building {name}")
        start = time.perf_counter()
        paths[name] = fn()
        seconds[name] = time.perf_counter() - start

    timed("fp32 onnx", lambda: export_onnx(model, spec, out_dir / "model.fp32.onnx"))
    if "onnx" in formats:
        ex = val_x if val_x is not None else test_x
        ey = val_y if val_y is not None else test_y

        def chain() -> Path:
            # The same chain as optimize and BYOM: recipes measured on the validation split, the fastest one
            # within the bound written (or, when none meets it, the closest, reported as such).
            with tempfile.TemporaryDirectory(prefix="edgecv-quantize-") as tmp:
                arts = build_onnx_artifacts(paths["fp32 onnx"], calib_x, ex, Path(tmp), eval_y=ey,
                                            bound=Bound(min_agreement=min_agreement, max_drop=max_drop),
                                            methods=[method] if method else None,
                                            per_channel=None if per_channel else False,
                                            latency_runs=min(latency_runs, 300), progress=say)
                pick = arts.chosen or max(arts.candidates, key=lambda c: (c.confident_agreement, c.agreement))
                shutil.copyfile(pick.path, out_dir / "model.int8.onnx")
            report.kept_float = list(pick.kept_float)
            report.selection = {**arts.metrics(), "table": arts.table(), "recipe": pick.name}
            if max_drop is not None:
                report.accuracy_aware = {"max_drop": max_drop, "bound_met": pick.meets_bound,
                                         "kept_float": list(pick.kept_float),
                                         "torch_modules": torch_module_names(paths["fp32 onnx"]),
                                         "eval_fp32_accuracy": arts.fp32.accuracy,
                                         "eval_int8_accuracy": pick.accuracy, "misses": list(pick.misses)}
            return out_dir / "model.int8.onnx"

        timed("int8 onnx", chain)
    if "tflite" in formats:
        timed("int8 tflite", lambda: export_tflite_int8(model, spec, calib_x, out_dir / "model.int8.tflite",
                                                        per_channel=per_channel))
    if "tflite-fp32" in formats:
        timed("fp32 tflite", lambda: export_tflite_fp32(model, spec, out_dir / "model.fp32.tflite"))

    y = np.asarray(test_y)
    for name, path in paths.items():
        say(f"evaluating {name} on {len(test_x)} images")
        fmt = "onnx" if path.suffix == ".onnx" else "tflite"
        report.evals[name] = evaluate_artifact(path, fmt, test_x, y, threads=threads, latency_runs=latency_runs)
    ref = report.evals["fp32 onnx"].top1
    report.agreement = {name: agreement(ref, ev.top1) for name, ev in report.evals.items()}
    return report


def format_table(report: QuantizeReport) -> str:
    """The table `edgecv quantize` prints: one row per artifact, latency ratio vs fp32 ONNX."""
    ref = report.evals["fp32 onnx"]
    rows = [("artifact", "accuracy", "agree fp32", "bytes", "gzip", "ms/img", "vs fp32", "build s")]
    for name, ev in report.evals.items():
        ratio = ev.latency_ms_median / ref.latency_ms_median if ref.latency_ms_median > 0 else float("nan")
        rows.append((name, f"{ev.accuracy:.4f}", f"{report.agreement[name]:.4f}", f"{ev.bytes:,}",
                     f"{ev.gzip_bytes:,}", f"{ev.latency_ms_median:.4f}", f"{ratio:.2f}x",
                     f"{report.seconds.get(name, 0.0):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from edgecv.tools.errors import ExportError

    if args.calib < 1:
        raise ExportError(f"--calib {args.calib} must be at least 1 (a few hundred images is typical)")
    if args.onnx is not None:
        given = [flag for flag, dest in CHECKPOINT_ONLY if getattr(args, dest) is not None]
        if given:
            raise ExportError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --onnx (a "
                              "brought model is calibrated on --calib-images and measured on one thread); drop "
                              f"{'it' if len(given) == 1 else 'them'}")
        return _run_byom(args)
    if args.checkpoint is None:
        raise ExportError("Pass a checkpoint to quantize (edgecv quantize CKPT ...) or your own model with --onnx")
    given = [flag for flag, dest in BYOM_ONLY if getattr(args, dest) not in (None, False)]
    if given:
        raise ExportError(f"{', '.join(given)} apply only to --onnx (bring your own model); a checkpoint carries "
                          "its own labels and preprocessing: drop them")
    args.data = args.data or "fashion-mnist"
    args.formats = args.formats or "onnx,tflite"
    args.threads = args.threads or 1
    return _run_checkpoint(args)


# Options of one path that the other would silently ignore: naming them is an error instead.
CHECKPOINT_ONLY = (("--data", "data"), ("--limit", "limit"), ("--threads", "threads"))
BYOM_ONLY = (("--calib-images", "calib_images"), ("--labels", "labels"), ("--size", "size"), ("--color", "color"),
             ("--layout", "layout"), ("--mean", "mean"), ("--std", "std"), ("--scale", "scale"),
             ("--resize", "resize"), ("--shorter-side", "shorter_side"), ("--name", "name"),
             ("--version", "bundle_version"), ("--key", "key"), ("--include-fp32", "include_fp32"),
             ("--prefer", "prefer"), ("--force", "force"))


def _run_checkpoint(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from edgecv.tools.checkpoint import load_checkpoint
    from edgecv.tools.commands.output import print_json, progress_enabled
    from edgecv.tools.datasets import load_splits, spec_color, stratified_order, to_model_input

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    ckpt = load_checkpoint(args.checkpoint)
    spec = ckpt.spec
    splits = load_splits(args.data, size=(spec.height, spec.width), color=spec_color(spec), limit=args.limit)
    if len(splits.classes) != len(ckpt.labels):
        log.warning("The data has %d classes but the checkpoint %d; accuracy compares indices as they are",
                    len(splits.classes), len(ckpt.labels))
    train = splits.train
    calib_idx = np.sort(stratified_order(train.labels, 0)[:args.calib])
    calib_x = to_model_input(train.images[calib_idx], spec)
    test_x, test_y = to_model_input(splits.test.images, spec), splits.test.labels
    val_x = to_model_input(splits.val.images, spec) if len(splits.val) else None
    steps = 2 * (1 + len(formats))  # one "building" and one "evaluating" message per artifact
    bar = tqdm(total=steps, desc="quantize", unit="step", file=sys.stderr, disable=not progress_enabled(args))
    started = [0]

    def progress(msg: str) -> None:
        if msg.startswith(("building", "evaluating")):
            if started[0]:
                bar.update(1)
            started[0] += 1
            bar.set_postfix_str(msg[:60])
        else:
            bar.write(msg, file=sys.stderr)

    try:
        report = build_artifacts(ckpt.model, spec, calib_x, test_x, test_y, args.out, formats=formats,
                                 method=args.method, per_channel=not args.per_tensor, max_drop=args.max_drop,
                                 min_agreement=0.97 if args.min_agreement is None else args.min_agreement,
                                 val_x=val_x, val_y=splits.val.labels if val_x is not None else None,
                                 threads=args.threads, latency_runs=args.latency_runs, progress=progress)
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
    metrics = {"checkpoint": str(args.checkpoint), "data": splits.describe(), "calibration_images": len(calib_x),
               "method": args.method, "per_channel": not args.per_tensor, "test_images": len(test_x),
               "artifacts": report.metrics()}
    (Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n")
    if args.json:
        print_json({**metrics, "out": str(args.out), "files": [str(p) for p in report.paths.values()]})
        return 0
    method = args.method or "minmax and percentile measured"
    print(f"{splits.describe()}; calibration {len(calib_x)} images ({method}); test {len(test_x)} images")
    if report.selection is not None:
        print("int8 ONNX recipes, measured on the validation split (one thread, this machine):")
        print(report.selection["table"])
        print(report.selection["verdict"])
    print(format_table(report))
    if args.max_drop is not None and report.accuracy_aware is not None:
        aa = report.accuracy_aware
        modules = aa["torch_modules"]
        kept = ", ".join(f"{n} ({modules[n]})" if n in modules else n for n in report.kept_float) or "none"
        state = "met" if aa["bound_met"] else "NOT met"
        print(f"accuracy-aware (max drop {args.max_drop} on validation): bound {state}; layers kept in float: {kept}"
              + (f" ({'; '.join(aa['misses'])})" if aa.get("misses") else ""))
    print(f"wrote {', '.join(p.name for p in report.paths.values())} and metrics.json to {args.out}")
    return 0


def _run_byom(args: argparse.Namespace) -> int:
    import contextlib
    import io

    from edgecv.tools.artifacts import Bound
    from edgecv.tools.byom import quantize_byom
    from edgecv.tools.commands.output import note, print_json, progress_enabled
    from edgecv.tools.datasets import parse_size
    from edgecv.tools.errors import ExportError

    missing = [opt for opt, val in (("--calib-images", args.calib_images), ("--labels", args.labels)) if val is None]
    if missing:
        raise ExportError(f"With --onnx also pass {' and '.join(missing)}")
    if args.checkpoint is not None:
        raise ExportError("Pass either a checkpoint or --onnx, not both")
    if args.shorter_side is not None and args.resize != "shorter-side":
        resize = args.resize or "stretch"
        raise ExportError(f"--shorter-side applies only to --resize shorter-side (got --resize {resize}); add "
                          "--resize shorter-side or drop --shorter-side")
    min_agreement = args.min_agreement
    max_drop = args.max_drop
    if max_drop is not None and not 0.0 <= max_drop < 1.0:
        raise ExportError(f"--max-drop is a fraction in [0, 1) (0.01 = one point), got {max_drop}")
    bound = Bound(min_agreement=0.97 if min_agreement is None else min_agreement, max_drop=max_drop)
    formats = _byom_formats(args.formats or "onnx,tflite")
    # stdout is for the result: NNCF draws its progress bars there (to stderr instead, or nowhere)
    with contextlib.redirect_stdout(sys.stderr if progress_enabled(args) else io.StringIO()):
        result = quantize_byom(args.onnx, args.calib_images, args.labels, args.out, size=parse_size(args.size),
                               color=args.color, layout=args.layout, mean=_floats(args.mean or "0", "--mean"),
                               std=_floats(args.std or "1", "--std"),
                               scale=1.0 / 255.0 if args.scale is None else args.scale,
                               resize=args.resize or "stretch", shorter_side=args.shorter_side, calib=args.calib,
                               methods=[args.method] if args.method else None,
                               per_channel=False if args.per_tensor else None, name=args.name,
                               version=args.bundle_version, private_key=args.key, include_fp32=args.include_fp32,
                               prefer=args.prefer or "auto", bound=bound, force=args.force,
                               tflite="tflite" in formats, openvino="openvino" in formats,
                               latency_runs=args.latency_runs, progress=note)
    if args.json:
        manifest = result.bundle.manifest
        print_json({"bundle": str(args.out), "archive": str(result.archive), "name": manifest.name,
                    "version": manifest.version, "artifacts": [a.path for a in manifest.artifacts],
                    "signed": bool(args.key), "metrics": result.metrics})
        return 0
    arts = result.artifacts
    print(f"{arts.eval_images} evaluation images; model output: {arts.output}; one thread, onnxruntime, this machine")
    print(arts.table())
    print(arts.verdict)
    kept = next((m.kept_float for m in arts.ship if m.kept_float), ())
    if kept:
        print(f"kept in float: {', '.join(kept)}")
    print(result.tflite_note)
    if "int8_openvino" in result.metrics:
        print(result.metrics["int8_openvino"]["note"])
    signed = " (signed)" if args.key else " (unsigned: sign it with 'edgecv bundle sign --key ...')"
    manifest = result.bundle.manifest
    print(f"wrote bundle {manifest.name} {manifest.version} ({', '.join(a.path for a in manifest.artifacts)}) to "
          f"{args.out} and {result.archive}{signed}")
    return 0


def _byom_formats(text: str) -> set[str]:
    from edgecv.tools.errors import ExportError

    formats = {f.strip() for f in text.split(",") if f.strip()}
    if "onnx" not in formats or formats - {"onnx", "tflite", "openvino"}:
        raise ExportError(f"--formats for --onnx is a comma list of onnx (always built) plus tflite and/or "
                          f"openvino (an NNCF int8 for OpenVINO), got {text!r}")
    return formats


def _floats(text: str, option: str) -> tuple[float, ...]:
    from edgecv.tools.errors import ExportError

    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ExportError(f"{option} {text!r} is not a comma list of numbers, e.g. 0.485,0.456,0.406") from None
