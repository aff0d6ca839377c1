"""`edgecv optimize`: the whole chain in one call — data → train → prune → fp32 ONNX → int8 ONNX + int8 TFLite →
verify each in its runtime on the test set → signed bundle (directory + .edgecv) → report.

The stages are thin: each calls the module that owns the step (datasets, train, prune, export_onnx,
quantize_onnx, quantize_tflite, evaluate, bundler, report) and records what it measured in a `RunRecord`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecv.tools.errors import ExportError, ToolsError
from edgecv.tools.report import FlowStage, RunRecord, StageResult, human_bytes, write_report

if TYPE_CHECKING:
    from edgecv.agent.contract.bundle import Bundle, InputSpec
    from edgecv.tools.datasets import Splits
    from edgecv.tools.finetune import Deployed
    from edgecv.tools.train import TrainConfig, TrainResult

log = logging.getLogger(__name__)

STAGES = ("data", "train", "prune", "export fp32 ONNX", "int8 ONNX", "int8 TFLite", "verify", "bundle", "report")
DEFAULT_VERSION = "1.0.0"
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_SPARSITY = 0.5
# Global magnitude pruning of a pretrained depthwise network at 50 % took a Lite0 model from 1.00 to 0.20 test
# accuracy (training bench, 20 images per class) and sparsity buys no speed in either runtime: off by default.
BACKBONE_SPARSITY = 0.0
FINETUNE_FROM_DEPLOYED_LR = 1e-3  # the small CNN continuing from deployed weights (a third of from scratch)
Say = Callable[[str], None]


@dataclass
class OptimizeConfig:
    """Settings of one `edgecv optimize` run (the CLI flags)."""

    data: str
    out: Path
    work: Path | None = None  # intermediates (checkpoints, fp32 ONNX); default <out>/work
    name: str | None = None
    version: str | None = None  # None: a per-build version (bundler.build_version), or the next minor version of the
    # --init-from bundle
    description: str = ""
    epochs: int | None = None  # at most; None: the data's recipe (edgecv.tools.train.recipe_for)
    finetune_epochs: int = 2
    sparsity: float | None = None  # None: 0.5 for the small CNN, 0 for a backbone (see BACKBONE_SPARSITY)
    structured: float = 0.0
    calib: int = 200
    method: str | None = None  # None: the artifact chain measures minmax and percentile
    prefer: str = "auto"  # which ONNX artifacts ship (edgecv.tools.artifacts): auto | speed | size
    force: bool = False  # ship an artifact below its agreement bound
    max_drop: float | None = 0.005
    seed: int = 0
    limit: int | None = None
    size: str | None = None
    color: str | None = None
    key: Path | None = None
    include_fp32: bool = False
    # Which int8 artifacts the bundle carries. Both are always built and measured; a device needs only the one
    # its runtime runs, and one artifact halves the bundle (the only layout that meets the 8× size target).
    bundle_formats: tuple[str, ...] = ("onnx", "tflite")
    latency_runs: int = 500
    selftest_count: int = 8
    threads: int | None = None
    progress: bool = True
    command: str = ""
    # Training (edgecv.tools.train, augment, backbones, finetune)
    device: str = "auto"
    augment: bool = True  # image folders only; Fashion-MNIST keeps its recipe
    flip: bool = True  # mirror images in augmentation (off for text, digits, arrows: --no-flip)
    backbone: str | None = None  # None: the small CNN from scratch; "efficientnet-lite0": pretrained
    extra_data: tuple[str, ...] = ()  # more sources merged by class name (with --init-from)
    init_from: Path | None = None  # a deployed bundle (folder or .edgecv) or its checkpoint
    allow_scratch: bool = False  # --init-from a bundle without its checkpoint: train from scratch
    old_data: bool = True  # with --init-from: merge the data the deployed model was trained on, when it exists
    drop_missing: bool = False  # with --init-from: deployed classes without images leave the model

    def validate(self) -> None:
        from edgecv.tools.backbones import BACKBONES
        from edgecv.tools.train import DEVICES

        if self.device not in DEVICES:
            raise ToolsError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.backbone is not None and self.backbone not in BACKBONES:
            raise ToolsError(f"--backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.backbone and self.structured > 0:
            raise ToolsError("--structured (channel pruning) works on the small CNN only, not on --backbone "
                             f"{self.backbone}: use --sparsity, or drop --backbone")
        if self.backbone and self.color == "gray":
            raise ToolsError(f"--backbone {self.backbone} takes colour images: drop --color gray")
        if self.extra_data and self.init_from is None:
            raise ToolsError("Several --data sources are merged only when fine-tuning (--init-from): pass one --data")
        if self.init_from is not None and self.backbone is not None:
            raise ToolsError("--backbone applies to a model trained from scratch; --init-from continues the deployed "
                             "model with its own network: drop one of them")
        if not self.bundle_formats or set(self.bundle_formats) - {"onnx", "tflite"}:
            raise ToolsError(f"--bundle-formats must name onnx and/or tflite, got {','.join(self.bundle_formats)}")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ToolsError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 <= self.structured < 1.0:
            raise ToolsError(f"--structured must be in [0, 1) (0 = off), got {self.structured}")
        if self.epochs is not None and self.epochs < 1:
            raise ToolsError(f"--epochs must be >= 1, got {self.epochs}")
        if self.finetune_epochs < 0:
            raise ToolsError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")
        if self.calib < 1:
            raise ToolsError(f"--calib must be >= 1 image, got {self.calib}")
        if self.method is not None and self.method not in METHODS:
            raise ToolsError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.max_drop is not None and not 0.0 <= self.max_drop < 1.0:
            raise ToolsError(f"--max-drop is an accuracy fraction in [0, 1) (0.005 = half a point), "
                             f"got {self.max_drop}")
        if self.limit is not None and self.limit < 20:
            raise ToolsError(f"--limit must be at least 20 images, got {self.limit}")
        if self.key is not None and not Path(self.key).expanduser().is_file():
            raise ToolsError(f"Signing key {self.key} does not exist; create one with 'edgecv keys generate'")


@dataclass
class PipelineResult:
    bundle: Bundle
    bundle_dir: Path
    archive: Path
    report: dict[str, Path]
    record: RunRecord
    artifacts: dict[str, Path] = field(default_factory=dict)
    checkpoint: Path | None = None  # <out>/<name>.pt, what --init-from reads


def run_pipeline(cfg: OptimizeConfig, say: Say | None = None) -> PipelineResult:
    """Run every stage; returns the bundle, archive, report paths and the run record."""
    cfg.validate()
    say = say or (lambda msg: log.info("%s", msg))
    out = Path(cfg.out)
    work = Path(cfg.work) if cfg.work else out / "work"
    from edgecv.tools.bundler import build_version
    from edgecv.tools.finetune import next_version, resolve_init_from

    deployed = resolve_init_from(cfg.init_from, cfg.allow_scratch) if cfg.init_from is not None else None
    backbone = cfg.backbone or (deployed.backbone if deployed else None)
    cfg = dataclasses.replace(cfg, version=next_version(deployed.version if deployed else None, cfg.version,
                                                        build_version(DEFAULT_VERSION)),
                              sparsity=cfg.sparsity if cfg.sparsity is not None
                              else BACKBONE_SPARSITY if backbone else DEFAULT_SPARSITY)
    work.mkdir(parents=True, exist_ok=True)
    name = cfg.name or (deployed.name if deployed else default_name(cfg.data))
    record = RunRecord(name=name, version=str(cfg.version), data=str(cfg.data), seed=cfg.seed,
                       command=cfg.command or command_for(cfg),
                       settings=_settings(cfg), machine=machine_info())
    clock = _StageClock(record, say)

    import torch

    from edgecv.tools.datasets import to_model_input
    from edgecv.tools.model import count_params, describe_arch
    from edgecv.tools.train import format_epoch_header, format_epoch_row, select_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)  # before any work: --device cuda without a GPU fails here

    # 1. data
    with clock("data"):
        splits, spec, labels, sources = _load_data(cfg, deployed, clock.note)
        x_test = to_model_input(splits.test.images, spec)
        y_test = splits.test.labels
        x_val = to_model_input(splits.val.images, spec) if len(splits.val) else x_test
        y_val = splits.val.labels if len(splits.val) else y_test
        rng = np.random.default_rng(cfg.seed)
        calib_idx = np.sort(rng.permutation(len(splits.train))[:cfg.calib])
        calib = to_model_input(splits.train.images[calib_idx], spec)
        record.dataset = _dataset_info(splits)
        record.input_spec = _spec_dict(spec)
        clock.note(splits.describe())

    # 2. train
    with clock("train"):
        header = [format_epoch_header()]  # printed once, above the first epoch row

        def on_epoch(row: dict[str, Any]) -> None:
            if header:
                clock.note(header.pop())
            clock.note(format_epoch_row(row))

        model, base_cfg, result = _train_stage(cfg, deployed, splits, spec, labels, device, on_epoch, clock.note)
        record.settings.update(epochs=base_cfg.epochs, schedule=base_cfg.schedule, patience=base_cfg.patience,
                               augment=_describe_augment(base_cfg), device=str(device))
        # a backbone's rows say which part learned ("head", then "whole"); all are training epochs
        record.history += [{**row, "phase": "train", **({"part": row["phase"]} if "phase" in row else {})}
                           for row in result.history]
        _save(work / "trained.pt", model, spec, labels, result.history, {"stage": "trained"})
        record.model = {"arch": describe_arch(model.arch), "params": count_params(model),
                        "best_epoch": result.best_epoch, "stopped_early": result.stopped_early,
                        "backbone": model.arch.get("backbone"), "train_seconds": result.seconds}
        if deployed is not None:
            record.model["init_from"] = {"name": deployed.name, "version": deployed.version,
                                         "checkpoint": str(deployed.checkpoint_path or ""), "sources": sources}
        clock.note(f"{len(result.history)} epochs, best val acc {result.best_val_acc:.4f} (epoch {result.best_epoch})"
                   f", {result.seconds:.1f} s on {device}")
        hint = result.hint(base_cfg.epochs)
        if hint:
            record.model["hint"] = hint
            log.warning("%s", hint)
    fp32_trained = _export(model, spec, work / "trained.fp32.onnx")
    record.stages.append(_measure("fp32", fp32_trained, "onnx", x_test, y_test, cfg.latency_runs))
    features_shape = _feature_shape(model, x_test[:1])

    # 3. prune (fine-tuning with the training's device and augmentation; a backbone keeps BatchNorm frozen)
    ft_cfg = dataclasses.replace(base_cfg, lr=1e-3, schedule="cosine")
    if model.arch.get("backbone"):
        from edgecv.tools.backbones import finetune_config, freeze_batchnorm

        ft_cfg = finetune_config(base_cfg)
        freeze_batchnorm(model)
    with clock("prune"):
        from edgecv.tools.prune import channel_prune, magnitude_prune, sparsity_report

        if cfg.structured > 0:
            model, _arch, report = channel_prune(model, model.arch, splits, spec, cfg.structured,
                                                finetune_epochs=cfg.finetune_epochs, cfg=ft_cfg)
            record.history += [{**row, "phase": "structured"} for row in report["history"]]
            record.model["structured"] = {k: report[k] for k in ("params_before", "params_after", "flops_before",
                                                                 "flops_after", "layers")}
            clock.note(f"channels {cfg.structured:.0%} removed: {report['params_before']} → "
                       f"{report['params_after']} params, test acc {report['accuracy_after']:.4f}")
        if (cfg.sparsity or 0.0) > 0:
            steps = max(1, cfg.finetune_epochs)
            pr = magnitude_prune(model, splits, spec, target_sparsity=cfg.sparsity or 0.0, steps=steps,
                                 finetune_epochs=1 if cfg.finetune_epochs else 0, cfg=ft_cfg)
            model = pr.model
            ft_rows = [row for step in pr.history for row in step.get("finetune", [])]
            record.history += [{**row, "epoch": i, "phase": "finetune"} for i, row in enumerate(ft_rows, start=1)]
            clock.note(f"global sparsity {pr.global_sparsity:.1%}, test acc {pr.accuracy_before:.4f} → "
                       f"{pr.accuracy_after:.4f}")
        for p in model.parameters():
            p.requires_grad = True
        rows = sparsity_report(model)
        record.sparsity = {f"{r['layer']} ({r['type']}, {r['params']:,} weights)": float(r["sparsity"]) for r in rows}
        params = sum(r["params"] for r in rows)
        zeros = sum(r["zeros"] for r in rows)
        record.model.update(params_pruned=count_params(model), weights=params, zero_weights=zeros,
                            global_sparsity=round(zeros / params, 6) if params else 0.0,
                            pruned_arch=describe_arch(model.arch))
        _save(work / "pruned.pt", model, spec, labels, record.history, {"stage": "pruned"})

    # 4. fp32 ONNX of the pruned model
    with clock("export fp32 ONNX"):
        fp32 = _export(model, spec, work / "model.fp32.onnx")
        pruned_label = _pruned_label(cfg)
        if pruned_label:
            record.stages.append(_measure(pruned_label, fp32, "onnx", x_test, y_test, cfg.latency_runs))
        clock.note(f"{human_bytes(fp32.stat().st_size)}")
    fp32_ref = record.stages[-1]

    # 5. int8 ONNX: recipes measured against fp32 on the validation split, the fastest within the bound chosen
    with clock("int8 ONNX"):
        import shutil

        from edgecv.tools.artifacts import Bound, build_onnx_artifacts, enforce_bound

        int8_onnx = work / "model.int8.onnx"
        arts = build_onnx_artifacts(fp32, calib, x_val, work / "onnx", eval_y=y_val,
                                    bound=Bound(max_drop=cfg.max_drop), prefer=cfg.prefer,
                                    methods=[cfg.method] if cfg.method else None,
                                    latency_runs=min(cfg.latency_runs, 300), progress=lambda m: log.debug("%s", m))
        int8_pick = arts.chosen or max(arts.candidates, key=lambda c: (c.confident_agreement, c.agreement))
        shutil.copyfile(int8_pick.path, int8_onnx)
        onnx_ship = [(int8_onnx if m.precision == "int8" else fp32, m.precision) for m in arts.ship]
        forced = enforce_bound([(m.name, m.agreement, m.confident_agreement, m.confident_images, m.misses)
                                for m in arts.ship], force=cfg.force, say=clock.note)
        record.model["int8_onnx_kept_float"] = list(int8_pick.kept_float)
        record.model["onnx_artifacts"] = arts.metrics()
        if forced:
            record.model["below_bound"] = forced
        for line in arts.table().splitlines():
            clock.note(line)
        clock.note(arts.verdict)

    # 6. int8 TFLite
    with clock("int8 TFLite"):
        from edgecv.tools.quantize_tflite import export_tflite_int8

        int8_tflite = export_tflite_int8(model, spec, calib, work / "model.int8.tflite")
        clock.note(human_bytes(int8_tflite.stat().st_size))

    # 7. verify each artifact in its runtime on the test set
    with clock("verify"):
        onnx_eval = _measure("int8 ONNX", int8_onnx, "onnx", x_test, y_test, cfg.latency_runs)
        tfl_eval = _measure("int8 TFLite", int8_tflite, "tflite", x_test, y_test, cfg.latency_runs)
        record.stages += [onnx_eval, tfl_eval]
        broken: list[str] = []
        for st, fmt in ((onnx_eval, "onnx"), (tfl_eval, "tflite")):
            drop = (fp32_ref.accuracy or 0.0) - (st.accuracy or 0.0)
            if cfg.max_drop is not None and drop > cfg.max_drop:
                log.warning("%s loses %.2f points against fp32 on the test set (bound %.2f)", st.stage,
                            drop * 100, cfg.max_drop * 100)
            if drop > 0.05:
                broken.append(f"{st.stage} is {drop * 100:.1f} points less accurate than fp32 on the test set")
                if fmt in cfg.bundle_formats:
                    cfg = dataclasses.replace(cfg, bundle_formats=tuple(f for f in cfg.bundle_formats if f != fmt))
                    log.warning("%s: it is left out of the bundle", broken[-1])
        if not cfg.bundle_formats:
            raise ExportError(f"{'; '.join(broken)}: no artifact is fit to ship; the quantized model is broken: "
                              "try --method entropy or more --calib images")
        record.model["left_out"] = broken
        clock.note(f"test acc fp32 {fp32_ref.accuracy:.4f}, int8 ONNX {onnx_eval.accuracy:.4f}, "
                   f"int8 TFLite {tfl_eval.accuracy:.4f}")
        cfg = _tflite_within_bound(cfg, fp32, int8_tflite, x_test, record, clock.note)

    # 8. bundle (directory + archive), signed when a key is given
    with clock("bundle"):
        bundle, archive = _bundle(cfg, name, labels, spec, splits, fp32, onnx_ship, int8_tflite, record, out)
        record.bundle = {"dir": name, "archive": archive.name, "archive_bytes": archive.stat().st_size,
                         "manifest_sha256": bundle.manifest_sha256,
                         "key_id": bundle.signature.key_id if bundle.signature else "unsigned",
                         "selftest_frames": len(bundle.manifest.selftest.expected_top1)
                         if bundle.manifest.selftest else 0}
        clock.note(f"{archive} ({human_bytes(archive.stat().st_size)}), "
                   f"{'signed by ' + bundle.signature.key_id if bundle.signature else 'UNSIGNED'}")
        ckpt_path = _keep_checkpoint(work / "pruned.pt", out, name, str(cfg.version), bundle.manifest_sha256, cfg,
                                     sources)
        record.bundle["checkpoint"] = ckpt_path.name
        clock.note(f"checkpoint for 'edgecv optimize --init-from': {ckpt_path}")

    record.flow = _flow(record, cfg, spec, splits, features_shape, int8_onnx, int8_tflite, archive)
    with clock("report"):
        paths = write_report(record, out / f"{name}-report")
        clock.note(str(paths["markdown"]))
    return PipelineResult(bundle=bundle, bundle_dir=out / name, archive=archive, report=paths, record=record,
                          artifacts={"fp32": fp32, "int8_onnx": int8_onnx, "int8_tflite": int8_tflite,
                                     "trained_fp32": fp32_trained}, checkpoint=ckpt_path)


def _load_data(cfg: OptimizeConfig, deployed: Deployed | None,
               note: Say) -> tuple[Splits, InputSpec, list[str], list[str]]:
    """The splits, input spec, labels and data sources of this run.

    From scratch: `cfg.data` at `--size`/`--color` (a backbone: RGB at 128×128 unless --size). With
    `--init-from`: every --data plus, unless --no-old-data, the sources the deployed model was trained on that
    still exist, all at the deployed input, merged by class name (edgecv.tools.finetune.merge_sources).
    """
    from edgecv.tools.datasets import default_input_spec, load_splits, parse_size, spec_color

    if deployed is None:
        if cfg.backbone:
            from edgecv.tools.backbones import DEFAULT_SIZE, lite0_input_spec

            size = parse_size(cfg.size) or DEFAULT_SIZE
            spec = lite0_input_spec(size)
            splits = load_splits(cfg.data, size=size, color="rgb", seed=cfg.seed, limit=cfg.limit)
        else:
            splits = load_splits(cfg.data, size=cfg.size, color=cfg.color, seed=cfg.seed, limit=cfg.limit)
            spec = default_input_spec(splits.train)
        return splits, spec, list(splits.classes), [splits.source]
    from edgecv.tools.finetune import describe_sources, merge_sources

    spec = deployed.spec
    if cfg.size is not None and parse_size(cfg.size) != (spec.height, spec.width):
        raise ToolsError(f"--size {cfg.size} differs from the deployed model's input {spec.height}x{spec.width}: "
                         "omit --size when fine-tuning (the network keeps its input)")
    if cfg.color is not None and cfg.color != spec_color(spec):
        raise ToolsError(f"--color {cfg.color} differs from the deployed model's input ({spec_color(spec)}): "
                         "omit --color when fine-tuning")
    sources = [str(cfg.data), *cfg.extra_data]
    given = {_source_key(s) for s in sources}
    if cfg.old_data:
        for old in deployed.sources:
            if _source_key(old) in given:
                continue
            if old.lower() != "fashion-mnist" and not Path(old).is_dir():
                note(f"the deployed model's data {old} is no longer there: not merged")
                continue
            sources.append(old)
            given.add(_source_key(old))
            note(f"merging the deployed model's data {old} (--no-old-data to leave it out)")
    merged = merge_sources(sources, deployed.labels, spec, seed=cfg.seed, limit=cfg.limit,
                           drop_missing=cfg.drop_missing)
    for line in describe_sources(merged):
        note(line)
    if merged.new_classes:
        note(f"new class(es): {', '.join(merged.new_classes)} (the output layer grows)")
    if merged.dropped_classes:
        note(f"dropped class(es): {', '.join(merged.dropped_classes)}")
    return merged.splits, spec, merged.labels, merged.sources


def _source_key(source: str) -> str:
    from edgecv.tools.datasets import FASHION_MNIST

    if source.lower() in (FASHION_MNIST, "fashion_mnist", "fashionmnist"):
        return FASHION_MNIST
    return str(Path(source).expanduser().resolve())


def _train_stage(cfg: OptimizeConfig, deployed: Deployed | None, splits: Splits, spec: InputSpec, labels: list[str],
                 device: Any, on_epoch: Callable[[dict[str, Any]], None],
                 note: Say) -> tuple[Any, TrainConfig, TrainResult]:
    """Build the model (small CNN, pretrained backbone, or the deployed model with its head fitted to the
    labels) and train it with the data's recipe; returns (model, the TrainConfig used, result)."""
    from edgecv.tools.augment import AugmentConfig, flip_allowed
    from edgecv.tools.backbones import build_backbone_model, train_backbone
    from edgecv.tools.model import build_model
    from edgecv.tools.train import BACKBONE_RECIPE, TrainConfig, recipe_for, train

    backbone = cfg.backbone or (deployed.backbone if deployed else None)
    recipe = BACKBONE_RECIPE if backbone else recipe_for(cfg.data, fashion_epochs=8)
    augment = AugmentConfig(flip=flip_allowed(labels, cfg.flip)) if cfg.augment and recipe.augment else None
    base_cfg = TrainConfig(epochs=cfg.epochs or recipe.epochs, schedule=recipe.schedule, patience=recipe.patience,
                           seed=cfg.seed, progress=cfg.progress, threads=cfg.threads, device=str(device),
                           augment=augment)
    head_first = True
    if deployed is not None and deployed.checkpoint is not None:
        from edgecv.tools.finetune import fit_head

        model: Any = deployed.checkpoint.model
        added = fit_head(model, deployed.checkpoint.labels, labels, seed=cfg.seed)
        head_first = added > 0
        if not backbone:
            base_cfg = dataclasses.replace(base_cfg, lr=FINETUNE_FROM_DEPLOYED_LR)
        note(f"continuing from {deployed.checkpoint_path} ({deployed.name} {deployed.version})")
    elif backbone:
        model = build_backbone_model(backbone, spec, len(labels), seed=cfg.seed)
    else:
        model = build_model(spec, len(labels), seed=cfg.seed)
    if backbone:
        result = train_backbone(model, splits, spec, base_cfg, on_epoch=on_epoch, head_first=head_first)
    else:
        result = train(model, splits, spec, base_cfg, on_epoch=on_epoch)
    return model, base_cfg, result


def _describe_augment(cfg: TrainConfig) -> str:
    a = cfg.augment
    if a is None:
        return "off"
    return (f"crop {a.crop_scale[0]:.2f}-{a.crop_scale[1]:.2f} of the area, flip {'on' if a.flip else 'off'}, "
            f"brightness ±{a.brightness:.0%}, contrast ±{a.contrast:.0%}")


def _keep_checkpoint(pruned: Path, out: Path, name: str, version: str, manifest_sha256: str, cfg: OptimizeConfig,
                     sources: list[str]) -> Path:
    """Write <out>/<name>.pt: the weights quantized into the bundle, tied to it by its manifest hash, with the
    data it was trained on (what `--init-from` reads)."""
    from edgecv.tools.checkpoint import load_checkpoint, save_checkpoint
    from edgecv.tools.finetune import bundle_record, checkpoint_path_for

    ckpt = load_checkpoint(pruned)
    meta = {"bundle": bundle_record(name, version, manifest_sha256), "name": name, "data": str(cfg.data),
            "data_sources": sources, "seed": cfg.seed, "backbone": ckpt.arch.get("backbone")}
    return save_checkpoint(checkpoint_path_for(out, name), ckpt.model, ckpt.spec, ckpt.labels, ckpt.arch,
                           ckpt.history, meta)


def default_name(data: str) -> str:
    from edgecv.tools.datasets import FASHION_MNIST

    if str(data) == FASHION_MNIST:
        return FASHION_MNIST
    stem = Path(str(data)).expanduser().resolve().name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem) or "model"


def machine_info() -> dict[str, Any]:
    """CPU model, core count and library versions: recorded next to every measured number."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": model, "cores": os.cpu_count(), "machine": platform.machine(),
                            "python": platform.python_version()}
    from importlib import metadata

    for dist in ("torch", "onnxruntime", "ai-edge-litert", "litert-torch", "numpy"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info


# ------------------------------------------------------------------------------------------- stage helpers


class _StageClock:
    """Announces each stage ("[3/9] prune …"), times it and records the seconds."""

    def __init__(self, record: RunRecord, say: Say) -> None:
        self.record, self.say = record, say
        self.current = ""

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self.current = stage
        index = STAGES.index(stage) + 1
        self.say(f"[{index}/{len(STAGES)}] {stage} …")
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.record.timings_s[stage] = round(seconds, 2)
        self.say(f"[{index}/{len(STAGES)}] {stage} done in {seconds:.1f} s")

    def note(self, text: str) -> None:
        self.say(f"      {self.current}: {text}")


def _settings(cfg: OptimizeConfig) -> dict[str, Any]:
    return {"epochs": cfg.epochs, "finetune_epochs": cfg.finetune_epochs, "sparsity": cfg.sparsity,
            "structured": cfg.structured, "calib_images": cfg.calib,
            "calibration": cfg.method or "measured: minmax, percentile",
            "max_drop": cfg.max_drop, "seed": cfg.seed, "limit": cfg.limit, "backbone": cfg.backbone,
            "init_from": str(cfg.init_from) if cfg.init_from else None}


def _dataset_info(splits: Splits) -> dict[str, Any]:
    h, w = splits.train.size
    return {"source": splits.source, "classes": len(splits.classes), "image": f"{h}×{w}×{splits.train.channels}",
            "train_images": len(splits.train), "val_images": len(splits.val), "test_images": len(splits.test)}


def _spec_dict(spec: InputSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(spec)


def _save(path: Path, model: Any, spec: InputSpec, labels: list[str], history: list[dict[str, Any]],
          meta: dict[str, Any]) -> None:
    from edgecv.tools.checkpoint import save_checkpoint

    save_checkpoint(path, model, spec, labels, model.arch, history, meta)


def _export(model: Any, spec: InputSpec, out: Path) -> Path:
    from edgecv.tools.export_onnx import export_onnx

    return export_onnx(model, spec, out)


def _measure(stage: str, path: Path, fmt: str, x: np.ndarray, y: np.ndarray, latency_runs: int) -> StageResult:
    from edgecv.tools.evaluate import evaluate_artifact

    ev = evaluate_artifact(path, fmt, x, y, threads=1, latency_runs=latency_runs)
    return StageResult(stage=stage, accuracy=round(ev.accuracy, 6), bytes=ev.bytes, gzip_bytes=ev.gzip_bytes,
                       latency_ms=round(ev.latency_ms_median, 5) if latency_runs > 0 else None,
                       runtime="onnxruntime" if fmt == "onnx" else "litert")


def _tflite_within_bound(cfg: OptimizeConfig, fp32: Path, tflite: Path, x: np.ndarray, record: RunRecord,
                         note: Say) -> OptimizeConfig:
    """The TFLite artifact ships only when it agrees with fp32 within the bound (quantize_tflite.judge_tflite) on
    the test set; otherwise it is left out of the bundle, or the run stops when it was the only format asked."""
    from dataclasses import replace

    from edgecv.tools.quantize_tflite import judge_tflite

    verdict = judge_tflite(_logits_fn(fp32, "onnx")(x), tflite, x, remove=False)
    record.model["int8_tflite_agreement"] = verdict.as_dict()
    note(verdict.note)
    if verdict.shipped or "tflite" not in cfg.bundle_formats:
        return cfg
    formats = tuple(f for f in cfg.bundle_formats if f != "tflite")
    if not formats:
        raise ExportError(f"Refusing to bundle: {verdict.note}; add the ONNX format (--bundle-formats onnx,tflite)")
    log.warning("int8 TFLite left out of the bundle: %s", verdict.note)
    return replace(cfg, bundle_formats=formats)


def _pruned_label(cfg: OptimizeConfig) -> str:
    parts = []
    if cfg.structured > 0:
        parts.append(f"{cfg.structured:.0%} channels")
    if (cfg.sparsity or 0.0) > 0:
        parts.append(f"{cfg.sparsity:.0%} sparse")
    return f"pruned fp32 ({', '.join(parts)})" if parts else ""


def _feature_shape(model: Any, x: np.ndarray) -> tuple[int, ...]:
    import torch

    features = getattr(model, "features", None)
    if features is None:
        return ()
    with torch.no_grad():
        return tuple(features(torch.from_numpy(x)).shape[1:])


def _logits_fn(path: Path, fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    from edgecv.agent.vision.runtimes import open_engine
    from edgecv.tools.evaluate import run_logits

    engine = open_engine(path, fmt, threads=1)
    return lambda x: run_logits(engine, x)


def _bundle(cfg: OptimizeConfig, name: str, labels: list[str], spec: InputSpec, splits: Splits, fp32: Path,
            onnx_ship: list[tuple[Path, str]], int8_tflite: Path, record: RunRecord,
            out: Path) -> tuple[Bundle, Path]:
    from edgecv.agent.contract.bundle import verify_bundle
    from edgecv.agent.contract.signing import Keyring, load_private_key
    from edgecv.agent.vision.preprocess import Preprocessor
    from edgecv.tools.bundler import build_bundle, choose_selftest_frames, pack, read_selftest

    pre = Preprocessor(spec)
    # The ONNX artifacts the chain chose (int8, and fp32 beside it when int8 is not clearly faster here).
    artifacts: list[tuple[Path, str, str]] = [(path, "onnx", precision) for path, precision in onnx_ship
                                              if "onnx" in cfg.bundle_formats]
    if "tflite" in cfg.bundle_formats:
        artifacts.append((int8_tflite, "tflite", "int8"))
    if cfg.include_fp32 and not any(fmt == "onnx" and p == "fp32" for _, fmt, p in artifacts):
        artifacts.append((fp32, "onnx", "fp32"))
    candidates = {f"{precision} {fmt}": _logits_fn(path, fmt) for path, fmt, precision in artifacts
                  if precision == "int8"}
    frames, expected = choose_selftest_frames(splits.test.images, pre.batch, _logits_fn(fp32, "onnx"), candidates,
                                              count=min(cfg.selftest_count, len(splits.test)), seed=cfg.seed)
    by_stage = {s.stage: s for s in record.stages}
    metrics = {
        "dataset": record.dataset.get("source", cfg.data),
        "test_images": record.dataset.get("test_images"),
        "accuracy_fp32": by_stage["fp32"].accuracy,
        "accuracy_int8_onnx": by_stage["int8 ONNX"].accuracy,
        "accuracy_int8_tflite": by_stage["int8 TFLite"].accuracy,
        "latency_ms_int8_onnx": by_stage["int8 ONNX"].latency_ms,
        "latency_ms_int8_tflite": by_stage["int8 TFLite"].latency_ms,
        "sparsity": record.model.get("global_sparsity", 0.0),
        "structured": cfg.structured,
        "params": record.model.get("params_pruned"),
    }
    pruned = _pruned_label(cfg)
    if pruned:
        metrics["accuracy_pruned_fp32"] = by_stage[pruned].accuracy
    key = load_private_key(Path(cfg.key).expanduser()) if cfg.key else None
    bundle_dir = out / name
    bundle = build_bundle(bundle_dir, name=name, version=str(cfg.version), labels=labels, spec=spec,
                          artifacts=artifacts, selftest_frames=frames, selftest_expected=expected, metrics=metrics,
                          private_key=key,
                          description=cfg.description or f"{name}: {record.model.get('pruned_arch', '')}, int8")
    archive = pack(bundle_dir, out / f"{name}.edgecv")
    # Check what was written the way a device will: hashes, signature, and the self-test in every runtime.
    keyring = Keyring([key.public_key()]) if key else None
    verify_bundle(bundle, keyring)
    st_frames, st_expected = read_selftest(bundle_dir / "selftest.npz")
    for art in bundle.manifest.artifacts:
        top1 = np.argmax(_logits_fn(bundle.path_of(art.path), art.format)(pre.batch(st_frames)), axis=1)
        if not np.array_equal(top1, st_expected):
            raise ExportError(f"Bundle artifact {art.path} fails its own self-test ({int((top1 == st_expected).sum())}"
                              f"/{len(st_expected)}); this is a bug in the export, please report it")
    return bundle, archive


def _int8_weight_example(path: Path) -> str:
    """'Weight 0.1234 (float32) becomes 37 (int8, scale 0.00333)' from the first quantized weight of an ONNX."""
    try:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        inits = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
                continue
            q = numpy_helper.to_array(inits[node.input[0]])
            if q.dtype != np.int8 or q.ndim < 2:
                continue
            scale = numpy_helper.to_array(inits[node.input[1]]).reshape(-1)
            flat = q.reshape(q.shape[0], -1)
            row, col = np.unravel_index(int(np.argmax(np.abs(flat) >= 12)), flat.shape)
            value = int(flat[row, col])
            s = float(scale[row] if scale.size > 1 else scale[0])
            return f"Weight {value * s:.4f} (float32) becomes {value} (int8, scale {s:.5f})"
    except Exception as exc:  # the example is decoration; never fail the run for it
        log.debug("No int8 weight example from %s: %s", path, exc)
    return ""


def _flow(record: RunRecord, cfg: OptimizeConfig, spec: InputSpec, splits: Splits, features: tuple[int, ...],
          int8_onnx: Path, int8_tflite: Path, archive: Path) -> list[FlowStage]:
    h, w, c = spec.height, spec.width, spec.channels
    total = len(splits.train) + len(splits.val) + len(splits.test)
    n_train = len(splits.train)
    fp32_stage = next(s for s in record.stages if s.stage == "fp32")
    m = record.model
    pixel = (128 * spec.scale - spec.mean[0]) / spec.std[0]
    layout = f"{c} × {h} × {w}" if spec.layout == "NCHW" else f"{h} × {w} × {c}"
    feat = " × ".join(str(v) for v in features) if features else "?"
    last_rows = [r for r in record.history if r.get("phase") == "train"]
    last_train: dict[str, Any] = last_rows[-1] if last_rows else {}
    prune_ops = []
    if cfg.structured > 0:
        prune_ops.append(f"Remove {cfg.structured:.0%} of conv filters and dense units (smallest L1)")
    if (cfg.sparsity or 0.0) > 0:
        prune_ops.append(f"Remove {cfg.sparsity:.0%} of smallest weights (set to zero), fine-tune "
                         f"{cfg.finetune_epochs} epoch(s)")
    zero_w, all_w = m.get("zero_weights", 0), m.get("weights", 0)
    pruned_stage = next((s for s in record.stages if s.stage == _pruned_label(cfg)), fp32_stage)
    pruned_acc = pruned_stage.accuracy or 0.0
    reduction = f"Model size reduced from {human_bytes(fp32_stage.bytes)} to {human_bytes(archive.stat().st_size)}"
    return [
        FlowStage("Original data input", f"{total} images × {h} × {w} × {c} (uint8)",
                  f"Load {record.dataset.get('source')}, split train/val/test (seed {cfg.seed})",
                  f"{n_train} / {len(splits.val)} / {len(splits.test)} images × {h} × {w} × {c}",
                  f"Classes: {', '.join(splits.classes[:4])}…"),
        FlowStage("Preprocessing", f"{total} images × {h} × {w} × {c} (uint8)",
                  f"x = (pixel × {spec.scale:.5f} − {spec.mean[0]}) / {spec.std[0]}, layout {spec.layout}",
                  f"{total} × {layout} float32", f"Pixel value 128 becomes {pixel:.3f}"),
        FlowStage("Feature extraction", f"{n_train} × {layout}",
                  (f"EfficientNet-Lite0 body with ImageNet weights ({record.model.get('arch', '')})"
                   if record.model.get("backbone") else f"Conv 3×3 + BatchNorm + ReLU + max-pool blocks "
                   f"({record.model.get('arch', '')})"), f"{n_train} × {feat} feature maps",
                  "Edges, then textures and object parts"),
        FlowStage("Model training", f"{n_train} × {feat}",
                  f"AdamW, {record.settings.get('schedule', 'one-cycle')} LR, {len(last_rows)} of at most "
                  f"{record.settings.get('epochs')} epoch(s), augmentation {record.settings.get('augment', 'off')}",
                  f"Trained weights: {m.get('params', 0):,} parameters (fp32 ONNX {human_bytes(fp32_stage.bytes)})",
                  f"Val accuracy {last_train.get('val_acc') or 0:.4f} after epoch {last_train.get('epoch', '?')}"),
        FlowStage("Pruning", f"Trained weights ({m.get('params', 0):,} parameters)", "; ".join(prune_ops) or "off",
                  f"Sparse weights: {all_w - zero_w:,} non-zero of {all_w:,} ({m.get('global_sparsity', 0):.1%} zero)",
                  f"Test accuracy {fp32_stage.accuracy:.4f} → {pruned_acc:.4f}"),
        FlowStage("Quantization", "Pruned weights (float32)",
                  f"Weights and activations float32 → int8, calibrated on {cfg.calib} images",
                  f"int8 ONNX {human_bytes(int8_onnx.stat().st_size)}, int8 TFLite "
                  f"{human_bytes(int8_tflite.stat().st_size)}", _int8_weight_example(int8_onnx)),
        FlowStage("Optimized model", "Quantized model weights",
                  "Bundle: manifest (sha256 of every file), self-test frames, Ed25519 signature",
                  f"{archive.name}: {human_bytes(archive.stat().st_size)} (gzip)", reduction),
    ]


def command_for(cfg: OptimizeConfig) -> str:
    """The `edgecv optimize` command that reproduces `cfg` (settings that differ from the defaults)."""
    default = OptimizeConfig(data=cfg.data, out=cfg.out)
    args = ["edgecv", "optimize", "--data", str(cfg.data)]
    flags = (("name", "--name"), ("version", "--version"), ("epochs", "--epochs"),
             ("finetune_epochs", "--finetune-epochs"), ("sparsity", "--sparsity"), ("structured", "--structured"),
             ("calib", "--calib"), ("method", "--method"), ("max_drop", "--max-drop"), ("seed", "--seed"),
             ("limit", "--limit"), ("size", "--size"), ("color", "--color"), ("key", "--key"),
             ("latency_runs", "--latency-runs"), ("work", "--work"), ("device", "--device"),
             ("backbone", "--backbone"), ("init_from", "--init-from"), ("prefer", "--prefer"),
             ("threads", "--threads"), ("description", "--description"))
    for extra in cfg.extra_data:
        args += ["--data", extra]
    for attr, flag in flags:
        value = getattr(cfg, attr)
        if value != getattr(default, attr):
            args += [flag, "-1" if attr == "max_drop" and value is None else str(value)]
    for attr, flag in (("include_fp32", "--include-fp32"), ("allow_scratch", "--allow-scratch"),
                       ("drop_missing", "--drop-missing-classes"), ("force", "--force")):
        if getattr(cfg, attr):
            args.append(flag)
    for attr, flag in (("augment", "--no-augment"), ("flip", "--no-flip"), ("old_data", "--no-old-data")):
        if not getattr(cfg, attr):
            args.append(flag)
    if cfg.bundle_formats != default.bundle_formats:
        args += ["--bundle-formats", ",".join(cfg.bundle_formats)]
    return shlex.join([*args, "--out", str(cfg.out)])
