"""Make a trained model sparser or smaller: gradual global magnitude pruning, and structured channel pruning.

`magnitude_prune` zeroes the smallest weights (L1, unstructured, global across all conv and linear weights)
over a cubic schedule with fine-tuning between steps; the zeros are made permanent. It shrinks compressed
size but not compute. `channel_prune` removes whole conv filters (by L1 norm) and hidden dense units,
rebuilding a genuinely smaller model from a smaller arch dict, so it runs faster everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from edgecv.agent.contract.bundle import InputSpec
from edgecv.tools.datasets import Splits
from edgecv.tools.errors import TrainingError
from edgecv.tools.model import EdgeCNN, count_flops, count_params, validate_arch
from edgecv.tools.train import TrainConfig, evaluate_model, train

log = logging.getLogger(__name__)

PRUNABLE = (nn.Conv2d, nn.Linear)
FINETUNE_LR = 1e-3


@dataclass
class PruneResult:
    """model: the pruned model (masks permanent); per_layer: `sparsity_report` rows; global_sparsity over
    all conv/linear weights; history: one dict per step; accuracies on the test split (val if empty)."""

    model: nn.Module
    per_layer: list[dict[str, Any]]
    global_sparsity: float
    history: list[dict[str, Any]] = field(default_factory=list)
    accuracy_before: float = float("nan")
    accuracy_after: float = float("nan")


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv2d and Linear, whose `weight` magnitude pruning considers."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with: orig * mask while pruning is active (`.weight` may be stale)."""
    if hasattr(module, "weight_mask"):
        return cast(torch.Tensor, module.weight_orig).detach() * cast(torch.Tensor, module.weight_mask)
    return cast(torch.Tensor, module.weight).detach()


def sparsity_report(model: nn.Module) -> list[dict[str, Any]]:
    """One row per conv/linear layer: {layer, type, params, zeros, sparsity} (weights only, not biases)."""
    rows = []
    for name, module in prunable_layers(model):
        weight = _effective_weight(module)
        params = int(weight.numel())
        zeros = int((weight == 0).sum().item())
        rows.append({"layer": name, "type": type(module).__name__, "params": params, "zeros": zeros,
                     "sparsity": round(zeros / params, 6) if params else 0.0})
    return rows


def global_sparsity(rows: Sequence[dict[str, Any]]) -> float:
    params = sum(r["params"] for r in rows)
    return sum(r["zeros"] for r in rows) / params if params else 0.0


def format_sparsity_table(rows: Sequence[dict[str, Any]]) -> str:
    width = max([len("layer"), *(len(r["layer"]) for r in rows)])
    lines = [f"{'layer':<{width}}  {'type':<6}  {'params':>9}  {'zeros':>9}  {'sparsity':>8}"]
    for r in rows:
        lines.append(f"{r['layer']:<{width}}  {r['type']:<6}  {r['params']:>9}  {r['zeros']:>9}  "
                     f"{r['sparsity']:>8.2%}")
    params = sum(r["params"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    lines.append(f"{'total':<{width}}  {'':<6}  {params:>9}  {zeros:>9}  {global_sparsity(rows):>8.2%}")
    return "\n".join(lines)


def cubic_schedule(target: float, steps: int) -> list[float]:
    """Sparsity after each of `steps` steps: target * (1 - (1 - k/steps)^3) (Zhu & Gupta, 2017)."""
    return [target * (1.0 - (1.0 - k / steps) ** 3) for k in range(1, steps + 1)]


def _apply_global_masks(layers: Sequence[tuple[str, nn.Module]], sparsity: float) -> None:
    """Mask the globally smallest-magnitude weights so that `sparsity` of all of them are zero.

    Already-masked weights are zero, hence among the smallest, and masks combine, so zeros stay zeros.
    """
    weights = [_effective_weight(m).abs().flatten() for _, m in layers]
    flat = torch.cat(weights)
    k = round(sparsity * flat.numel())
    keep = torch.ones_like(flat)
    if k > 0:
        keep[torch.argsort(flat, stable=True)[:k]] = 0.0
    offset = 0
    for (_, m), w in zip(layers, weights, strict=True):
        mask = keep[offset:offset + w.numel()].view(_effective_weight(m).shape)
        offset += w.numel()
        torch_prune.custom_from_mask(m, "weight", mask)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold pruning masks into the weights (weight = orig * mask) and drop the re-parametrization."""
    for _, module in prunable_layers(model):
        if torch_prune.is_pruned(module) and hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")
    return model


def _finetune_cfg(cfg: TrainConfig | None, epochs: int, seed_offset: int) -> TrainConfig:
    base = cfg or TrainConfig(lr=FINETUNE_LR, schedule="cosine")
    return dataclasses.replace(base, epochs=epochs, patience=0, restore_best=False, seed=base.seed + seed_offset)


def _score_split(splits: Splits) -> Any:
    return splits.test if len(splits.test) else splits.val


def magnitude_prune(model: nn.Module, splits: Splits, spec: InputSpec, target_sparsity: float = 0.3,
                    steps: int = 3, finetune_epochs: int = 1, cfg: TrainConfig | None = None) -> PruneResult:
    """Global L1 unstructured pruning of all conv/linear weights to `target_sparsity`, in place.

    Sparsity follows a cubic schedule over `steps`; after each step the model is fine-tuned for
    `finetune_epochs` on splits.train with the masks active (default: AdamW, cosine from lr 1e-3; `cfg`
    overrides hyper-parameters, its epochs/patience are ignored). Masks are made permanent at the end.
    Accuracies are measured on splits.test (splits.val when test is empty).
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise TrainingError(f"--sparsity must be in [0, 1), got {target_sparsity}")
    if steps < 1:
        raise TrainingError(f"--steps must be >= 1, got {steps}")
    if finetune_epochs < 0:
        raise TrainingError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    layers = prunable_layers(model)
    if not layers:
        raise TrainingError("Model has no Conv2d or Linear layers to prune")
    if cfg is not None:
        from edgecv.tools.train import apply_threads

        apply_threads(cfg.threads)
    scored = _score_split(splits)
    before = evaluate_model(model, scored, spec)
    history: list[dict[str, Any]] = []
    try:
        for step, target in enumerate(cubic_schedule(target_sparsity, steps), start=1):
            t0 = time.perf_counter()
            _apply_global_masks(layers, target)
            reached = global_sparsity(sparsity_report(model))
            pruned_acc = evaluate_model(model, splits.val, spec)
            row: dict[str, Any] = {"step": step, "target_sparsity": round(target, 6), "sparsity": round(reached, 6),
                                   "val_acc_pruned": round(pruned_acc, 6), "finetune": []}
            if finetune_epochs:
                res = train(model, splits, spec, _finetune_cfg(cfg, finetune_epochs, step))
                row["finetune"] = res.history
            row["val_acc"] = round(evaluate_model(model, splits.val, spec), 6)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            log.info("Prune step %d/%d: sparsity %.3f, val acc %.4f after pruning, %.4f after fine-tuning",
                     step, steps, reached, pruned_acc, row["val_acc"])
            history.append(row)
    finally:
        make_permanent(model)
    model.eval()
    rows = sparsity_report(model)
    return PruneResult(model=model, per_layer=rows, global_sparsity=global_sparsity(rows), history=history,
                       accuracy_before=before, accuracy_after=evaluate_model(model, scored, spec))


def _keep_by_l1(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Sorted indices of the rows (output filters / units) with the largest L1 norms, dropping `ratio` of them."""
    n = weight.shape[0]
    n_keep = max(1, round(n * (1.0 - ratio)))
    norms = weight.detach().abs().reshape(n, -1).sum(dim=1)
    return torch.sort(torch.topk(norms, n_keep).indices).values


def shrink_channels(model: EdgeCNN, ratio: float, prune_dense: bool = True) -> tuple[EdgeCNN, dict[str, Any]]:
    """Copy of `model` without the `ratio` lowest-L1 filters of every conv (and hidden dense units when
    `prune_dense`), with BatchNorm entries, next-layer input channels and linear columns sliced to match."""
    if any(torch_prune.is_pruned(m) for _, m in prunable_layers(model)):
        raise TrainingError("Model has active pruning masks: make them permanent before channel pruning")
    arch = validate_arch(model.arch)
    convs = model.convs()
    keeps = [_keep_by_l1(conv.weight, ratio) for conv, _ in convs]
    linears = model.linears()
    dense_keep = None
    if prune_dense and arch["dense"] > 0:
        dense_keep = _keep_by_l1(linears[0].weight, ratio)
    new_arch = dict(arch, convs=[len(k) for k in keeps],
                    dense=len(dense_keep) if dense_keep is not None else arch["dense"])
    new = EdgeCNN(new_arch)
    with torch.no_grad():
        prev = torch.arange(arch["input"][0])
        for (conv, bn), (nconv, nbn), keep in zip(convs, new.convs(), keeps, strict=True):
            nconv.weight.copy_(conv.weight[keep][:, prev])
            nbn.weight.copy_(bn.weight[keep])
            nbn.bias.copy_(bn.bias[keep])
            assert bn.running_mean is not None and bn.running_var is not None
            assert nbn.running_mean is not None and nbn.running_var is not None
            nbn.running_mean.copy_(bn.running_mean[keep])
            nbn.running_var.copy_(bn.running_var[keep])
            if bn.num_batches_tracked is not None and nbn.num_batches_tracked is not None:
                nbn.num_batches_tracked.copy_(bn.num_batches_tracked)
            prev = keep
        # first linear: its input is the flattened (C, H, W) map of the last block; keep kept channels' columns
        first, nfirst = linears[0], new.linears()[0]
        c_last = arch["convs"][-1]
        w = first.weight.reshape(first.out_features, c_last, -1)[:, prev].reshape(first.out_features, -1)
        rows = dense_keep if dense_keep is not None else torch.arange(first.out_features)
        nfirst.weight.copy_(w[rows])
        nfirst.bias.copy_(first.bias[rows])
        if len(linears) > 1:
            last, nlast = linears[1], new.linears()[1]
            nlast.weight.copy_(last.weight[:, rows])
            nlast.bias.copy_(last.bias)
    new.eval()
    layers = [{"layer": f"features.{i}.0", "before": int(c), "after": len(k)}
              for i, (c, k) in enumerate(zip(arch["convs"], keeps, strict=True))]
    if arch["dense"] > 0:
        layers.append({"layer": "classifier.1", "before": arch["dense"], "after": new_arch["dense"]})
    return new, {"layers": layers}


def channel_prune(model: nn.Module, arch: dict[str, Any], splits: Splits, spec: InputSpec, ratio: float,
                  finetune_epochs: int = 1, cfg: TrainConfig | None = None,
                  prune_dense: bool = True) -> tuple[EdgeCNN, dict[str, Any], dict[str, Any]]:
    """Structured pruning: drop `ratio` (0 < ratio < 1) of each conv's filters by L1 norm (and of the hidden
    dense units when `prune_dense`), rebuild a smaller model from the smaller arch, copy the surviving
    weights, then fine-tune it for `finetune_epochs` (default: AdamW, cosine from lr 1e-3; `cfg` overrides).

    Returns (new_model, new_arch, report) with report keys: ratio, layers [{layer, before, after}],
    params_before/after, flops_before/after (MACs), accuracy_before, accuracy_pruned (before fine-tuning),
    accuracy_after (test split, val if empty), history (fine-tune epochs). `model` is not modified.
    """
    if not 0.0 < ratio < 1.0:
        raise TrainingError(f"--structured must be a ratio in (0, 1), got {ratio}")
    if finetune_epochs < 0:
        raise TrainingError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    if not isinstance(model, EdgeCNN):
        raise TrainingError("Channel pruning needs an edgecv model (built by tools.model); got "
                            f"{type(model).__name__}")
    if validate_arch(arch) != validate_arch(model.arch):
        raise TrainingError(f"Arch {arch} does not describe the given model ({model.arch})")
    if cfg is not None:
        from edgecv.tools.train import apply_threads

        apply_threads(cfg.threads)
    scored = _score_split(splits)
    before = evaluate_model(model, scored, spec)
    new, detail = shrink_channels(model, ratio, prune_dense)
    pruned_acc = evaluate_model(new, scored, spec)
    history: list[dict[str, Any]] = []
    if finetune_epochs:
        history = train(new, splits, spec, _finetune_cfg(cfg, finetune_epochs, 100)).history
    new.eval()
    report = {"ratio": ratio, "layers": detail["layers"],
              "params_before": count_params(model), "params_after": count_params(new),
              "flops_before": count_flops(arch), "flops_after": count_flops(new.arch),
              "accuracy_before": before, "accuracy_pruned": pruned_acc,
              "accuracy_after": evaluate_model(new, scored, spec), "history": history}
    log.info("Channel pruning %.0f%%: %d → %d params, %d → %d MACs, accuracy %.4f → %.4f", ratio * 100,
             report["params_before"], report["params_after"], report["flops_before"], report["flops_after"],
             before, report["accuracy_after"])
    return new, dict(new.arch), report
