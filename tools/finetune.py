"""Continue from what is deployed: find the training checkpoint of a bundle, merge old and new data by class
name, grow or shrink the output layer to the merged classes, and choose the next version.

`edgecv optimize` keeps `<out>/<name>.pt` next to `<out>/<name>/` and `<out>/<name>.edgecv`: the weights that
were quantized into the bundle, with the bundle's name, version and manifest hash and the data it was trained
on. `--init-from` takes that checkpoint, the bundle directory or its archive.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgecv.agent.contract.bundle import MANIFEST_NAME, InputSpec
from edgecv.agent.errors import BundleError
from edgecv.tools.checkpoint import Checkpoint, load_checkpoint
from edgecv.tools.datasets import FASHION_MNIST, Dataset, Splits, load_splits, spec_color
from edgecv.tools.errors import DatasetError, TrainingError
from edgecv.tools.model import head_layer, set_head_layer

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIX = ".pt"


@dataclass
class Deployed:
    """What `--init-from` named: the checkpoint (None when a bundle has none and scratch was allowed), and the
    deployed bundle's name, version and labels, and the data sources it was trained on."""

    name: str
    version: str | None
    labels: list[str]
    spec: InputSpec
    checkpoint: Checkpoint | None
    checkpoint_path: Path | None
    sources: list[str] = field(default_factory=list)
    backbone: str | None = None


def checkpoint_path_for(out: Path, name: str) -> Path:
    """Where `edgecv optimize` keeps the checkpoint of bundle `name` built into `out`."""
    return Path(out) / f"{name}{CHECKPOINT_SUFFIX}"


def bundle_record(name: str, version: str, manifest_sha256: str) -> dict[str, str]:
    """The checkpoint meta that ties a checkpoint to the bundle built from it."""
    return {"name": name, "version": version, "manifest_sha256": manifest_sha256}


def resolve_init_from(path: Path | str, allow_scratch: bool = False) -> Deployed:
    """Read `--init-from`: a checkpoint file, a bundle directory or a `.edgecv` archive.

    For a bundle, the checkpoint is `<folder holding the bundle>/<bundle name>.pt` and must be the one the
    bundle was built from (same manifest hash). A bundle without it is refused with the path looked for,
    unless `allow_scratch` (then `checkpoint` is None: the caller trains from scratch but keeps the bundle's
    name, labels, input and version floor).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TrainingError(f"--init-from {path} does not exist: pass the deployed bundle (<out>/<name>/ or "
                            f"<out>/<name>.edgecv) or its checkpoint (<out>/<name>.pt)")
    if path.is_file() and path.suffix == CHECKPOINT_SUFFIX:
        ckpt = load_checkpoint(path)
        record = ckpt.meta.get("bundle") or {}
        if not record.get("version"):
            log.warning("Checkpoint %s does not say which bundle version it was deployed as: the new version is "
                        "not checked against it", path)
        return Deployed(name=str(record.get("name") or ckpt.meta.get("name") or path.stem),
                        version=record.get("version"), labels=list(ckpt.labels), spec=ckpt.spec, checkpoint=ckpt,
                        checkpoint_path=path, sources=_sources(ckpt.meta), backbone=ckpt.arch.get("backbone"))
    with tempfile.TemporaryDirectory(prefix="edgecv-init-") as tmp:
        try:
            from edgecv.agent.contract.bundle import open_bundle

            if path.is_dir() and not (path / MANIFEST_NAME).is_file():
                raise TrainingError(f"--init-from {path} is a folder without {MANIFEST_NAME}: pass a bundle folder, "
                                    f"a .edgecv archive or a {CHECKPOINT_SUFFIX} checkpoint")
            bundle = open_bundle(path, Path(tmp) / "bundle")
        except BundleError as exc:
            raise TrainingError(f"--init-from {path} is not a readable bundle ({exc}): pass the bundle folder, "
                                f"its .edgecv archive or its {CHECKPOINT_SUFFIX} checkpoint") from exc
        manifest, sha = bundle.manifest, bundle.manifest_sha256
    expected = checkpoint_path_for(path.parent, manifest.name)
    if not expected.is_file():
        if allow_scratch:
            log.warning("Bundle %s %s has no checkpoint at %s: training from scratch (--allow-scratch) with its "
                        "classes, input and a higher version", manifest.name, manifest.version, expected)
            return Deployed(name=manifest.name, version=manifest.version, labels=list(manifest.labels),
                            spec=manifest.input, checkpoint=None, checkpoint_path=None)
        raise TrainingError(f"Bundle {manifest.name} {manifest.version} has no training checkpoint next to it "
                            f"(looked for {expected}; 'edgecv optimize' writes it beside every bundle it builds): "
                            f"pass the checkpoint itself with --init-from CKPT.pt, or add --allow-scratch to train "
                            f"from scratch with the bundle's classes and a higher version")
    ckpt = load_checkpoint(expected)
    record = ckpt.meta.get("bundle") or {}
    if record.get("manifest_sha256") != sha:
        raise TrainingError(f"Checkpoint {expected} belongs to {record.get('name', '?')} {record.get('version', '?')}, "
                            f"not to the bundle {manifest.name} {manifest.version} given (its manifest hash differs): "
                            "pass the checkpoint that was built with this bundle via --init-from CKPT.pt")
    return Deployed(name=manifest.name, version=manifest.version, labels=list(manifest.labels), spec=ckpt.spec,
                    checkpoint=ckpt, checkpoint_path=expected, sources=_sources(ckpt.meta),
                    backbone=ckpt.arch.get("backbone"))


def _sources(meta: dict[str, Any]) -> list[str]:
    sources = meta.get("data_sources") or ([meta["data"]] if meta.get("data") else [])
    return [str(s) for s in sources]


def next_version(deployed: str | None, requested: str | None, default: str) -> str:
    """The version of the fine-tuned bundle: `requested` if given (it must order above the deployed version the way
    devices order versions, `edgecv.agent.contract.versions`: they refuse a lower one, and the same one with other
    content), else the deployed version with its minor part raised (1.4.2 → 1.5.0, 1.0.0.post20261129… → 1.1.0),
    or `default` when the deployed version is unknown."""
    from edgecv.agent.contract.versions import compare, version_key

    if deployed is None:
        return requested or default
    key = version_key(deployed)
    if key is None:
        raise TrainingError(f"The deployed version {deployed!r} is not a version devices can order: pass --version")
    if requested is not None:
        if compare(requested, deployed) != 1:
            raise TrainingError(f"--version {requested} is not above the deployed version {deployed}: devices refuse "
                                "a lower version (and the same version with other content); use a higher one or "
                                "omit --version for the next minor version")
        return requested
    parts = [*key[0], 0, 0][:3]
    return f"{parts[0]}.{parts[1] + 1}.0"


@dataclass
class MergedData:
    """The merged splits, their labels (deployed classes first, in the deployed order) and what was merged."""

    splits: Splits
    labels: list[str]
    sources: list[str]
    new_classes: list[str]
    dropped_classes: list[str]
    per_source: dict[str, dict[str, int]]


def merge_sources(sources: Sequence[str], deployed_labels: Sequence[str], spec: InputSpec, seed: int,
                  limit: int | None = None, drop_missing: bool = False) -> MergedData:
    """Load every source at the deployed input size and colour, split each one deterministically, and merge
    them by class name (matched without regard to letter case; the deployed spelling wins).

    Classes the deployed model does not know are appended (the head grows). A deployed class with no images
    in any source is refused, naming it, unless `drop_missing` (then it leaves the label list).
    """
    if not sources:
        raise DatasetError("No data to fine-tune on: pass --data")
    size, color = (spec.height, spec.width), spec_color(spec)
    labels = list(deployed_labels)
    by_key = {lbl.casefold(): lbl for lbl in labels}
    parts: dict[str, list[Dataset]] = {"train": [], "val": [], "test": []}
    per_source: dict[str, dict[str, int]] = {}
    new: list[str] = []
    for src in sources:
        splits = load_splits(src, size=size, color=color, seed=seed, limit=limit)
        mapping = []
        for cls in splits.classes:
            key = cls.casefold()
            if key not in by_key:
                by_key[key] = cls
                labels.append(cls)
                new.append(cls)
            mapping.append(labels.index(by_key[key]))
        index = np.asarray(mapping, dtype=np.int64)
        for part in ("train", "val", "test"):
            ds = getattr(splits, part)
            parts[part].append(Dataset(ds.images, index[ds.labels], [], ds.skipped))
        counts = np.bincount(index[splits.train.labels], minlength=len(labels))
        per_source[splits.source] = {labels[i]: int(c) for i, c in enumerate(counts) if c}
    train_counts = np.bincount(np.concatenate([d.labels for d in parts["train"]]), minlength=len(labels))
    missing = [labels[i] for i in range(len(labels)) if train_counts[i] == 0]
    if missing and not drop_missing:
        raise DatasetError(f"The deployed class(es) {', '.join(missing)} have no images in {', '.join(sources)}: pass "
                           "the data they were trained on too (another --data), or --drop-missing-classes to ship "
                           "a model without them")
    keep = [i for i in range(len(labels)) if train_counts[i] > 0]
    remap = np.full(len(labels), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    kept_labels = [labels[i] for i in keep]
    if len(kept_labels) < 2:
        raise DatasetError(f"Fine-tuning needs images of at least 2 classes, found {kept_labels}")

    def join(items: list[Dataset]) -> Dataset:
        images = np.concatenate([d.images for d in items])
        lbls = remap[np.concatenate([d.labels for d in items])]
        ok = lbls >= 0
        return Dataset(np.ascontiguousarray(images[ok]), lbls[ok], list(kept_labels),
                       tuple(s for d in items for s in d.skipped))

    merged = Splits(join(parts["train"]), join(parts["val"]), join(parts["test"]), source=" + ".join(per_source))
    dropped = [lbl for lbl in missing]
    if dropped:
        log.warning("Dropping class(es) without images: %s (--drop-missing-classes)", ", ".join(dropped))
    return MergedData(merged, kept_labels, list(per_source), [c for c in new if c in kept_labels], dropped,
                      per_source)


def fit_head(model: nn.Module, old_labels: Sequence[str], new_labels: Sequence[str], seed: int = 0) -> int:
    """Make the output layer produce `new_labels`: rows of classes the model knew are copied (matched by
    name, ignoring letter case), new classes get fresh rows (bias = the mean of the old biases, so they start
    neither favoured nor ruled out). Returns how many classes are new."""
    old = head_layer(model)
    where = {lbl.casefold(): i for i, lbl in enumerate(old_labels)}
    if [lbl.casefold() for lbl in new_labels] == [lbl.casefold() for lbl in old_labels]:
        return 0
    torch.manual_seed(seed)
    layer = nn.Linear(old.in_features, len(new_labels))
    added = 0
    with torch.no_grad():
        layer.weight.mul_(0.1)
        layer.bias.fill_(float(old.bias.mean()))
        for row, lbl in enumerate(new_labels):
            src = where.get(lbl.casefold())
            if src is None:
                added += 1
                continue
            layer.weight[row] = old.weight[src]
            layer.bias[row] = old.bias[src]
    set_head_layer(model, layer)
    return added


def describe_sources(merged: MergedData) -> list[str]:
    """One line per merged source: its training images per class."""
    lines = []
    for src, counts in merged.per_source.items():
        shown = "fashion-mnist" if src == FASHION_MNIST else src
        lines.append(f"{shown}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return lines
