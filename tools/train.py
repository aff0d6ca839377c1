"""Train and evaluate a model on `Splits`: AdamW with a one-cycle (or cosine) schedule, early stopping on
validation accuracy, a tqdm bar per epoch on stderr and one history row per epoch."""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgecv.agent.contract.bundle import InputSpec
from edgecv.tools.datasets import Dataset, Splits, to_model_input
from edgecv.tools.errors import TrainingError

log = logging.getLogger(__name__)

SCHEDULES = ("onecycle", "cosine", "constant")
EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainConfig:
    """Hyper-parameters. `patience` 0 disables early stopping; `threads` None keeps torch's default."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-2
    schedule: str = "onecycle"
    patience: int = 3
    label_smoothing: float = 0.0
    seed: int = 0
    threads: int | None = None
    restore_best: bool = True
    progress: bool = True
    eval_batch_size: int = 1024

    def validate(self) -> None:
        if self.epochs < 0:
            raise TrainingError(f"--epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2:
            raise TrainingError(f"--batch-size must be >= 2 (BatchNorm needs it), got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr must be a positive number, got {self.lr}")
        if self.patience < 0:
            raise TrainingError(f"--patience must be >= 0, got {self.patience}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"Schedule {self.schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
        if self.threads is not None and self.threads < 1:
            raise TrainingError(f"--threads must be >= 1, got {self.threads}")


@dataclass
class TrainResult:
    """history: one dict per epoch {epoch, loss, train_acc, val_acc, seconds, lr}."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = float("nan")
    stopped_early: bool = False
    seconds: float = 0.0


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(int(threads))


def predict_logits(model: nn.Module, images: np.ndarray, spec: InputSpec, batch_size: int = 1024) -> np.ndarray:
    """float32 logits (N, classes) for uint8 N×H×W×C images at the spec's size/colour."""
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(to_model_input(images[start:start + batch_size], spec))
                out.append(model(x).float().numpy())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)


def evaluate_model(model: nn.Module, dataset: Dataset, spec: InputSpec, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on `dataset` (nan for an empty dataset)."""
    if len(dataset) == 0:
        return float("nan")
    logits = predict_logits(model, dataset.images, spec, batch_size)
    return float((logits.argmax(axis=1) == dataset.labels).mean())


def _check_shapes(model: nn.Module, splits: Splits, spec: InputSpec) -> None:
    if len(splits.train) == 0:
        raise TrainingError("The training split is empty: add images or raise --limit")
    x = torch.from_numpy(to_model_input(splits.train.images[:2], spec))
    model.eval()
    with torch.inference_mode():
        try:
            out = model(x)
        except RuntimeError as exc:
            raise TrainingError(f"Model does not accept {tuple(x.shape[1:])} input: "
                                f"{str(exc).splitlines()[0]}") from exc
    if out.shape[1] != len(splits.classes):
        raise TrainingError(f"Model has {out.shape[1]} outputs but the data has {len(splits.classes)} classes: "
                            "use data with the checkpoint's classes")


def train(model: nn.Module, splits: Splits, spec: InputSpec, cfg: TrainConfig | None = None,
          on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train `model` in place on splits.train, monitoring splits.val (train accuracy if val is empty).

    Early stopping: stop after `cfg.patience` epochs without a better validation accuracy, and (with
    `cfg.restore_best`) load the best epoch's weights at the end. `on_epoch` gets each history row.
    """
    cfg = cfg or TrainConfig()
    cfg.validate()
    apply_threads(cfg.threads)
    _check_shapes(model, splits, spec)
    result = TrainResult()
    if cfg.epochs == 0:
        return result
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    n = len(splits.train)
    steps = max(1, n // cfg.batch_size + (1 if n % cfg.batch_size > 1 else 0))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    if cfg.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps,
                                                        pct_start=0.25)
    elif cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    labels_all = torch.from_numpy(splits.train.labels)
    monitor_val = len(splits.val) > 0
    if not monitor_val:
        log.warning("Validation split is empty: early stopping watches training accuracy")
    best_acc, best_state, best_epoch, bad_epochs = -1.0, None, 0, 0
    started = time.perf_counter()
    from tqdm import tqdm

    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = rng.permutation(n)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", file=sys.stderr,
                   leave=False, disable=not cfg.progress, dynamic_ncols=True)
        try:
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                    continue
                x = torch.from_numpy(to_model_input(splits.train.images[idx], spec))
                y = labels_all[idx]
                optimizer.zero_grad(set_to_none=True)
                logits = model(x)
                loss = loss_fn(logits, y)
                if not torch.isfinite(loss):
                    raise TrainingError(f"Training diverged (loss {loss.item()}) in epoch {epoch}: lower --lr")
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                total_loss += float(loss.item()) * len(idx)
                correct += int((logits.argmax(1) == y).sum().item())
                seen += len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
        finally:
            bar.close()
        train_acc = correct / max(seen, 1)
        val_acc = evaluate_model(model, splits.val, spec, cfg.eval_batch_size) if monitor_val else float("nan")
        row = {"epoch": epoch, "loss": round(total_loss / max(seen, 1), 6), "train_acc": round(train_acc, 6),
               "val_acc": round(val_acc, 6) if monitor_val else None,
               "seconds": round(time.perf_counter() - t0, 3), "lr": float(optimizer.param_groups[0]["lr"])}
        result.history.append(row)
        log.debug("epoch %d: %s", epoch, row)
        if on_epoch is not None:
            on_epoch(row)
        score = val_acc if monitor_val else train_acc
        if score > best_acc:
            best_acc, best_epoch, bad_epochs = score, epoch, 0
            if cfg.restore_best:
                best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if cfg.patience and bad_epochs >= cfg.patience and epoch < cfg.epochs:
                log.info("Early stopping after epoch %d: no better validation accuracy for %d epochs (best %.4f "
                         "in epoch %d)", epoch, bad_epochs, best_acc, best_epoch)
                result.stopped_early = True
                break
    if cfg.restore_best and best_state is not None and best_epoch != len(result.history):
        model.load_state_dict(best_state)
    model.eval()
    result.best_epoch, result.best_val_acc = best_epoch, best_acc
    result.seconds = round(time.perf_counter() - started, 3)
    return result


EPOCH_COLUMNS = ("epoch", "loss", "train acc", "val acc", "time")


def format_epoch_header() -> str:
    return f"{'epoch':>5}  {'loss':>8}  {'train acc':>9}  {'val acc':>7}  {'time':>7}"


def format_epoch_row(row: dict[str, Any]) -> str:
    val = "-" if row.get("val_acc") is None else f"{row['val_acc']:.4f}"
    return (f"{row['epoch']:>5}  {row['loss']:>8.4f}  {row['train_acc']:>9.4f}  {val:>7}  "
            f"{row['seconds']:>6.1f}s")
