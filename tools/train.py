"""Train and evaluate a model on `Splits`: AdamW with a one-cycle, cosine or plateau schedule, early stopping on
validation accuracy (restoring the best epoch), optional augmentation, on the CPU or a CUDA device, a tqdm bar per
epoch on stderr and one history row per epoch."""

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
from edgecv.tools.augment import AugmentConfig, augment_batch
from edgecv.tools.datasets import Dataset, Splits, to_model_input
from edgecv.tools.errors import TrainingError

log = logging.getLogger(__name__)

SCHEDULES = ("onecycle", "cosine", "constant", "plateau")
DEVICES = ("auto", "cpu", "cuda")
EpochCallback = Callable[[dict[str, Any]], None]
# Image folders train until validation stops improving: this is only the ceiling (--epochs means "at most").
MAX_EPOCHS = 100
PLATEAU_FACTOR = 0.2  # the plateau schedule multiplies the learning rate by this when validation stalls
PLATEAU_MIN_LR_FRACTION = 1e-3


def select_device(name: str = "auto") -> torch.device:
    """The torch device for `--device`: 'auto' is CUDA when torch sees a GPU, else the CPU; 'cuda' without a
    usable GPU is a TrainingError that says what to do."""
    if name not in DEVICES:
        raise TrainingError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "cuda" and not available:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise TrainingError(f"--device cuda was asked for but torch sees no CUDA GPU (torch {torch.__version__}, "
                            f"{build}): use --device cpu, or install a CUDA build of torch on a machine with an "
                            "NVIDIA GPU and driver")
    return torch.device("cuda" if available else "cpu")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass(frozen=True)
class Recipe:
    """Default training settings for a kind of data."""

    epochs: int
    schedule: str
    patience: int
    augment: bool


# A pretrained backbone converges in a few epochs per phase; each epoch costs far more than the small CNN's.
BACKBONE_RECIPE = Recipe(epochs=30, schedule="plateau", patience=4, augment=True)


def recipe_for(source: str, fashion_epochs: int) -> Recipe:
    """Fashion-MNIST keeps its measured recipe (one-cycle over `fashion_epochs`, no augmentation); image
    folders train with the plateau schedule and augmentation until validation stops improving (at most
    MAX_EPOCHS), so a small folder is not cut off while it is still learning."""
    from edgecv.tools.datasets import FASHION_MNIST

    if str(source).lower() in (FASHION_MNIST, "fashion_mnist", "fashionmnist"):
        return Recipe(epochs=fashion_epochs, schedule="onecycle", patience=3, augment=False)
    return Recipe(epochs=MAX_EPOCHS, schedule="plateau", patience=8, augment=True)


@dataclass
class TrainConfig:
    """Hyper-parameters. `patience` 0 disables early stopping; `threads` None keeps torch's default.

    `schedule` plateau: the learning rate is multiplied by PLATEAU_FACTOR after max(2, patience // 2) epochs
    without a better validation score. `augment` (None = off) transforms each training batch. `freeze_bn`
    keeps every BatchNorm layer in inference mode (running statistics untouched) while training.
    `device`: auto | cpu | cuda (see `select_device`); the model is back on the CPU when `train` returns.
    """

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
    device: str = "auto"
    augment: AugmentConfig | None = None
    freeze_bn: bool = False

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
        if self.device not in DEVICES:
            raise TrainingError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.augment is not None:
            self.augment.validate()


@dataclass
class TrainResult:
    """history: one dict per epoch {epoch, loss, train_acc, val_acc, val_loss, seconds, lr}.

    `still_improving`: the epoch limit ended training while validation was still reaching new bests (in the
    last or the one before last epoch): more epochs would probably help.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = float("nan")
    stopped_early: bool = False
    seconds: float = 0.0
    still_improving: bool = False
    device: str = "cpu"

    def hint(self, epochs: int) -> str:
        """One line telling the user to raise --epochs, or '' when training ended on its own."""
        if not self.still_improving:
            return ""
        vals = [r["val_acc"] for r in self.history if r.get("val_acc") is not None]
        trend = f" ({vals[-min(len(vals), 4)]:.4f} → {vals[-1]:.4f} over the last epochs)" if len(vals) > 1 else ""
        return (f"Validation accuracy was still improving at the last epoch{trend}: the limit of {epochs} epochs "
                f"cut training short; raise --epochs (it is a maximum: early stopping ends training when "
                f"validation stops improving)")


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(int(threads))


def predict_logits(model: nn.Module, images: np.ndarray, spec: InputSpec, batch_size: int = 1024) -> np.ndarray:
    """float32 logits (N, classes) for uint8 N×H×W×C images at the spec's size/colour, computed on the
    device the model is on."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(to_model_input(images[start:start + batch_size], spec)).to(device)
                out.append(model(x).float().cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)


def evaluate_model(model: nn.Module, dataset: Dataset, spec: InputSpec, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on `dataset` (nan for an empty dataset)."""
    return evaluate_with_loss(model, dataset, spec, batch_size)[0]


def evaluate_with_loss(model: nn.Module, dataset: Dataset, spec: InputSpec,
                       batch_size: int = 1024) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) of `model` on `dataset` (nan, nan for an empty dataset)."""
    if len(dataset) == 0:
        return float("nan"), float("nan")
    logits = predict_logits(model, dataset.images, spec, batch_size)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(dataset)), dataset.labels].mean())
    return float((logits.argmax(axis=1) == dataset.labels).mean()), loss


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
    `cfg.restore_best`) load the best epoch's weights at the end. Training runs on `cfg.device`; the model is
    on the CPU again when this returns. `on_epoch` gets each history row.
    """
    cfg = cfg or TrainConfig()
    cfg.validate()
    device = select_device(cfg.device)
    apply_threads(cfg.threads)
    _check_shapes(model, splits, spec)
    result = TrainResult(device=str(device))
    if cfg.epochs == 0:
        return result
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    aug_rng = np.random.default_rng([cfg.seed, 1])
    n = len(splits.train)
    steps = max(1, n // cfg.batch_size + (1 if n % cfg.batch_size > 1 else 0))
    model.to(device)
    try:
        _fit(model, splits, spec, cfg, device, steps, rng, aug_rng, result, on_epoch)
    finally:
        model.to("cpu")
    model.eval()
    return result


def _fit(model: nn.Module, splits: Splits, spec: InputSpec, cfg: TrainConfig, device: torch.device, steps: int,
         rng: np.random.Generator, aug_rng: np.random.Generator, result: TrainResult,
         on_epoch: EpochCallback | None) -> None:
    n = len(splits.train)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("Nothing to train: every parameter of the model is frozen")
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    if cfg.schedule == "onecycle" and cfg.epochs * steps >= 8:  # torch's one-cycle divides by zero below that
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps,
                                                        pct_start=0.25)
    elif cfg.schedule in ("cosine", "onecycle"):
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps)
    plateau_after = max(2, cfg.patience // 2) if cfg.patience else 3
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    labels_all = torch.from_numpy(splits.train.labels)
    monitor_val = len(splits.val) > 0
    if not monitor_val:
        log.warning("Validation split is empty: early stopping watches training accuracy")
    best_acc, best_state, best_epoch, bad_epochs, stale = -1.0, None, 0, 0, 0
    started = time.perf_counter()
    from tqdm import tqdm

    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        if cfg.freeze_bn:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        order = rng.permutation(n)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", file=sys.stderr,
                   leave=False, disable=not cfg.progress, dynamic_ncols=True)
        try:
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                    continue
                images = splits.train.images[idx]
                if cfg.augment is not None:
                    images = augment_batch(images, aug_rng, cfg.augment)
                x = torch.from_numpy(to_model_input(images, spec)).to(device)
                y = labels_all[idx].to(device)
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
        if monitor_val:
            val_acc, val_loss = evaluate_with_loss(model, splits.val, spec, cfg.eval_batch_size)
        else:
            val_acc, val_loss = float("nan"), float("nan")
        row = {"epoch": epoch, "loss": round(total_loss / max(seen, 1), 6), "train_acc": round(train_acc, 6),
               "val_acc": round(val_acc, 6) if monitor_val else None,
               "val_loss": round(val_loss, 6) if monitor_val else None,
               "seconds": round(time.perf_counter() - t0, 3), "lr": float(optimizer.param_groups[0]["lr"])}
        result.history.append(row)
        log.debug("epoch %d: %s", epoch, row)
        if on_epoch is not None:
            on_epoch(row)
        score = val_acc if monitor_val else train_acc
        if score > best_acc:
            best_acc, best_epoch, bad_epochs, stale = score, epoch, 0, 0
            if cfg.restore_best:
                best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            stale += 1
            if cfg.patience and bad_epochs >= cfg.patience and epoch < cfg.epochs:
                log.info("Early stopping after epoch %d: no better validation accuracy for %d epochs (best %.4f "
                         "in epoch %d)", epoch, bad_epochs, best_acc, best_epoch)
                result.stopped_early = True
                break
            if cfg.schedule == "plateau" and stale >= plateau_after:
                stale = 0
                for group in optimizer.param_groups:
                    group["lr"] = max(group["lr"] * PLATEAU_FACTOR, cfg.lr * PLATEAU_MIN_LR_FRACTION)
                log.debug("Validation stalled for %d epochs: learning rate now %.2e", plateau_after,
                          optimizer.param_groups[0]["lr"])
    if cfg.restore_best and best_state is not None and best_epoch != len(result.history):
        model.load_state_dict(best_state)
    result.best_epoch, result.best_val_acc = best_epoch, best_acc
    result.still_improving = (not result.stopped_early and len(result.history) == cfg.epochs
                              and best_epoch >= max(2, len(result.history) - 1))
    result.seconds = round(time.perf_counter() - started, 3)


EPOCH_COLUMNS = ("epoch", "loss", "train acc", "val acc", "time")


def format_epoch_header() -> str:
    return f"{'epoch':>5}  {'loss':>8}  {'train acc':>9}  {'val acc':>7}  {'time':>7}"


def format_epoch_row(row: dict[str, Any]) -> str:
    val = "-" if row.get("val_acc") is None else f"{row['val_acc']:.4f}"
    return (f"{row['epoch']:>5}  {row['loss']:>8.4f}  {row['train_acc']:>9.4f}  {val:>7}  "
            f"{row['seconds']:>6.1f}s")
