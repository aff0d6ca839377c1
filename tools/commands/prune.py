"""`edgecv prune`: structured channel pruning and/or gradual magnitude pruning of a checkpoint, with
fine-tuning, printing accuracy before/after and a per-layer sparsity table."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgecv.tools.commands.output import EXIT_CODES, add_json_option, print_json, progress_enabled, results_printer
from edgecv.tools.commands.train import add_data_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prune", help="prune a checkpoint (magnitude and/or channel pruning) and fine-tune",
                              description="Structured channel pruning (--structured, really shrinks the network) "
                                          "then global magnitude pruning to --sparsity with fine-tuning. Prints the "
                                          "accuracy before and after, each pruning step and a per-layer sparsity "
                                          "table, and writes the pruned checkpoint (with --json those lines go to "
                                          "stderr and one JSON object to stdout). " + EXIT_CODES)
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="checkpoint from 'edgecv train'")
    add_data_arguments(p, required=False)
    p.add_argument("--sparsity", type=float, default=0.3,
                   help="target share of zero conv/linear weights; 0 = no magnitude pruning (default 0.3)")
    p.add_argument("--steps", type=int, default=3, metavar="K", help="gradual pruning steps (default 3)")
    p.add_argument("--finetune-epochs", type=int, default=1, metavar="N",
                   help="fine-tuning epochs after each pruning step (default 1)")
    p.add_argument("--structured", type=float, metavar="RATIO",
                   help="first remove this share of every conv's filters (and hidden dense units) by L1 norm")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate, cosine decay (default 1e-3)")
    p.add_argument("--out", required=True, type=Path, metavar="CKPT", help="pruned checkpoint to write")
    add_json_option(p, "the result (accuracies, sizes, what was pruned)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from torch import nn

    from edgecv.tools.checkpoint import load_checkpoint, save_checkpoint
    from edgecv.tools.datasets import load_splits, parse_size
    from edgecv.tools.errors import DatasetError, TrainingError
    from edgecv.tools.model import count_flops, count_params, describe_arch
    from edgecv.tools.prune import channel_prune, format_sparsity_table, magnitude_prune, sparsity_report
    from edgecv.tools.train import TrainConfig, apply_threads, evaluate_model

    say = results_printer(args)
    if not args.structured and args.sparsity == 0:
        raise TrainingError("Nothing to do: give --sparsity above 0 and/or --structured RATIO")
    ckpt = load_checkpoint(args.checkpoint)
    spec, meta = ckpt.spec, ckpt.meta
    size = (spec.height, spec.width)
    color = "gray" if spec.channels == 1 else "rgb"
    if args.size is not None and parse_size(args.size) != size:
        raise DatasetError(f"--size {args.size} does not match the checkpoint's input {size[0]}x{size[1]}: "
                           "omit --size or pass the size it was trained with")
    if args.color is not None and args.color != color:
        raise DatasetError(f"--color {args.color} does not match the checkpoint's input ({color})")
    source = args.data or meta.get("data")
    if not source:
        raise DatasetError("The checkpoint does not say which data it was trained on: pass --data")
    seed = args.seed if args.seed is not None else int(meta.get("seed", 0))
    limit = args.limit if args.limit is not None else meta.get("limit")
    apply_threads(args.threads)
    splits = load_splits(source, size=size, color=color, val_fraction=float(meta.get("val_fraction", 0.1)),
                         test_fraction=float(meta.get("test_fraction", 0.1)), seed=seed, limit=limit)
    if splits.classes != ckpt.labels:
        raise DatasetError(f"The data's classes {splits.classes} differ from the checkpoint's {ckpt.labels}: "
                           "prune with the data the model was trained on")
    say(splits.describe())
    cfg = TrainConfig(lr=args.lr, schedule="cosine", batch_size=args.batch_size, seed=seed, threads=args.threads,
                      progress=progress_enabled(args), device=args.device)
    cfg.validate()
    model: nn.Module = ckpt.model
    if ckpt.arch.get("backbone"):
        from edgecv.tools.backbones import finetune_config, freeze_batchnorm

        cfg = finetune_config(cfg)  # a pretrained network: low learning rate, BatchNorm frozen
        freeze_batchnorm(model)
    arch = ckpt.arch
    before = evaluate_model(model, splits.test if len(splits.test) else splits.val, spec)
    say(f"accuracy before: {before:.4f}  ({describe_arch(arch)}, {count_params(model):,} params)")
    pruned_meta: dict[str, object] = {"source_checkpoint": str(args.checkpoint), "accuracy_before": before}
    history = list(ckpt.history)
    if args.structured:
        model, arch, report = channel_prune(model, arch, splits, spec, args.structured, args.finetune_epochs, cfg)
        say(f"channel pruning {args.structured:.0%}: {describe_arch(arch)}")
        for row in report["layers"]:
            say(f"  {row['layer']:<14} {row['before']:>5} → {row['after']:>5}")
        say(f"  params {report['params_before']:,} → {report['params_after']:,}, "
              f"MACs {report['flops_before']:,} → {report['flops_after']:,}, "
              f"accuracy {report['accuracy_pruned']:.4f} before / {report['accuracy_after']:.4f} after fine-tuning")
        pruned_meta["structured"] = {k: v for k, v in report.items() if k != "history"}
        history += [dict(h, phase="structured") for h in report["history"]]
    if args.sparsity > 0:
        result = magnitude_prune(model, splits, spec, args.sparsity, args.steps, args.finetune_epochs, cfg)
        model = result.model
        for step in result.history:
            say(f"step {step['step']}: sparsity {step['sparsity']:.4f}, val acc {step['val_acc_pruned']:.4f} "
                  f"pruned → {step['val_acc']:.4f} fine-tuned")
        pruned_meta["magnitude"] = {"target_sparsity": args.sparsity, "steps": args.steps,
                                    "global_sparsity": result.global_sparsity, "per_layer": result.per_layer}
        history += [dict(h, phase="finetune", step=s["step"]) for s in result.history for h in s["finetune"]]
    say(format_sparsity_table(sparsity_report(model)))
    after = evaluate_model(model, splits.test if len(splits.test) else splits.val, spec)
    pruned_meta["accuracy_after"] = after
    out_meta = dict(meta, params=count_params(model), flops=count_flops(arch), test_accuracy=after,
                    pruned=pruned_meta)
    save_checkpoint(args.out, model, spec, ckpt.labels, arch, history, out_meta)
    say(f"accuracy after: {after:.4f}  ({count_params(model):,} params, {count_flops(arch):,} MACs)")
    say(f"wrote {args.out}")
    if args.json:
        print_json({"checkpoint": str(args.out), "accuracy_before": before, "accuracy_after": after,
                    "params": count_params(model), "flops": count_flops(arch), "pruned": pruned_meta})
    return 0
