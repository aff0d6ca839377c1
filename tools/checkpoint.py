"""Save and load training checkpoints: weights plus everything needed to rebuild and deploy the model.

A checkpoint is `torch.save` of a dict holding only tensors (the state_dict) and plain JSON-able values
(labels, the InputSpec as a dict, the arch dict, the epoch history, free-form meta), so it loads with
`torch.load(..., weights_only=True)` and never executes pickled code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecv.agent.contract.bundle import InputSpec
from edgecv.agent.errors import BundleFormatError
from edgecv.tools.errors import TrainingError
from edgecv.tools.model import model_from_arch

FORMAT = "edgecv.checkpoint/1"


@dataclass
class Checkpoint:
    model: nn.Module
    spec: InputSpec
    labels: list[str]
    arch: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def spec_to_dict(spec: InputSpec) -> dict[str, Any]:
    doc = asdict(spec)
    doc["mean"], doc["std"] = list(spec.mean), list(spec.std)
    return doc


def spec_from_dict(doc: Mapping[str, Any]) -> InputSpec:
    try:
        return InputSpec(**{**doc, "mean": tuple(doc.get("mean", (0.0,))), "std": tuple(doc.get("std", (1.0,)))})
    except (TypeError, BundleFormatError) as exc:
        raise TrainingError(f"Checkpoint input spec is invalid ({exc}): re-train the model") from exc


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"Checkpoint {what} must be plain JSON-able data: {exc}") from exc


def save_checkpoint(path: Path | str, model: nn.Module, spec: InputSpec, labels: Sequence[str],
                    arch: Mapping[str, Any], history: Sequence[Mapping[str, Any]] = (),
                    meta: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (temp file + rename) and return its path.

    `model` must be plain (no active pruning re-parametrizations: call `prune.make_permanent` first).
    """
    path = Path(path)
    state = model.state_dict()
    if any(k.endswith(("_orig", "_mask")) for k in state):
        raise TrainingError("Model still has pruning masks attached: make them permanent before saving")
    if len(labels) != int(arch["num_classes"]):
        raise TrainingError(f"Checkpoint has {len(labels)} labels but the model has {arch['num_classes']} outputs")
    doc = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()},
        "spec": spec_to_dict(spec),
        "labels": [str(lbl) for lbl in labels],
        "arch": _jsonable(dict(arch), "arch"),
        "history": _jsonable([dict(h) for h in history], "history"),
        "meta": _jsonable(dict(meta or {}), "meta"),
    }
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    torch.save(doc, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` and rebuild the model (in eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"Checkpoint {path} does not exist: train one with 'edgecv train --out {path.name}'")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or truncated files
        raise TrainingError(f"{path} is not a readable edgecv checkpoint ({type(exc).__name__}): "
                            "train one with 'edgecv train'") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TrainingError(f"{path} is not an edgecv checkpoint (expected format {FORMAT!r})")
    spec = spec_from_dict(doc["spec"])
    model = model_from_arch(doc["arch"])
    try:
        model.load_state_dict(doc["state_dict"])
    except RuntimeError as exc:
        raise TrainingError(f"Checkpoint {path} weights do not match its arch: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return Checkpoint(model=model, spec=spec, labels=list(doc["labels"]), arch=dict(model.arch),  # type: ignore[arg-type]
                      history=list(doc.get("history", [])), meta=dict(doc.get("meta", {})))
