"""The small CNN edgecv trains, described by a plain `arch` dict so pruning and checkpoints can rebuild it.

Only export-friendly layers are used (Conv2d, BatchNorm2d, ReLU, MaxPool2d, Flatten, Linear, Dropout), so
the model converts cleanly to ONNX and TFLite. Each conv block is conv3x3 (no bias) → BatchNorm → ReLU →
MaxPool2; the classifier is Flatten → Linear(dense) → ReLU → Dropout → Linear(classes), output = logits.

arch = {"input": [C, H, W], "convs": [32, 64, 128], "dense": 128, "dropout": 0.3, "num_classes": 10}

An arch with a "backbone" key describes a pretrained backbone instead (edgecv.tools.backbones); `model_from_arch`,
`count_flops` and `describe_arch` accept both.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from edgecv.agent.contract.bundle import InputSpec
from edgecv.tools.errors import TrainingError

ARCH_KEYS = ("input", "convs", "dense", "dropout", "num_classes")
KERNEL = 3


def default_arch(spec: InputSpec, num_classes: int, channels: Sequence[int] | None = None,
                 dense: int | None = None, dropout: float | None = None) -> dict[str, Any]:
    """The arch sized from the input: small inputs (side ≤ 32, e.g. 28×28×1 Fashion-MNIST) get three blocks
    (32, 64, 128) → ~242k params; larger inputs get blocks of 16, 32, 64… until the feature map side is ≤ 16
    (64×64×3 → conv16 → pool → conv32 → pool → 16×16×32)."""
    side = min(spec.height, spec.width)
    if channels is None:
        if side <= 32:
            channels = (32, 64, 128)
        else:
            blocks, s = 0, side
            while s > 16 and blocks < 6:
                s //= 2
                blocks += 1
            channels = tuple(16 * 2 ** i for i in range(blocks))
    arch = {"input": [spec.channels, spec.height, spec.width], "convs": [int(c) for c in channels],
            "dense": int(dense if dense is not None else 128),
            "dropout": float(dropout if dropout is not None else 0.3), "num_classes": int(num_classes)}
    validate_arch(arch)
    return arch


def validate_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """Check an arch dict and return a clean copy; TrainingError names what is wrong."""
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise TrainingError(f"Model arch lacks {', '.join(missing)}: it needs {', '.join(ARCH_KEYS)}")
    out: dict[str, Any] = {"input": [int(v) for v in arch["input"]], "convs": [int(c) for c in arch["convs"]],
           "dense": int(arch["dense"]), "dropout": float(arch["dropout"]), "num_classes": int(arch["num_classes"])}
    c, h, w = out["input"] if len(out["input"]) == 3 else (0, 0, 0)
    if c not in (1, 3) or h < 1 or w < 1:
        raise TrainingError(f"Model arch input {arch['input']} is invalid: expected [channels 1|3, height, width]")
    if not out["convs"] or any(ch < 1 for ch in out["convs"]):
        raise TrainingError(f"Model arch convs {arch['convs']} is invalid: expected positive channel widths")
    fh, fw = feature_size(out)
    if fh < 1 or fw < 1:
        raise TrainingError(f"Input {h}x{w} is too small for {len(out['convs'])} conv blocks (each halves the "
                            "size): use fewer --channels or a larger --size")
    if out["dense"] < 0 or not 0.0 <= out["dropout"] < 1.0 or out["num_classes"] < 2:
        raise TrainingError(f"Model arch dense={out['dense']} dropout={out['dropout']} "
                            f"num_classes={out['num_classes']} is invalid")
    return out


def feature_size(arch: Mapping[str, Any]) -> tuple[int, int]:
    """(h, w) of the last conv block's output (each block's MaxPool2 floors the size by half)."""
    _, h, w = arch["input"]
    for _ in arch["convs"]:
        h, w = h // 2, w // 2
    return int(h), int(w)


class EdgeCNN(nn.Module):
    """conv blocks (`features`) + MLP head (`classifier`); `arch` is the dict it was built from."""

    def __init__(self, arch: Mapping[str, Any]) -> None:
        super().__init__()
        self.arch = validate_arch(arch)
        blocks: list[nn.Module] = []
        cin = self.arch["input"][0]
        for cout in self.arch["convs"]:
            blocks.append(nn.Sequential(nn.Conv2d(cin, cout, KERNEL, padding=KERNEL // 2, bias=False),
                                        nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)))
            cin = cout
        self.features = nn.Sequential(*blocks)
        fh, fw = feature_size(self.arch)
        flat = cin * fh * fw
        dense, classes, p = self.arch["dense"], self.arch["num_classes"], self.arch["dropout"]
        head: list[nn.Module] = [nn.Flatten()]
        if dense > 0:
            head += [nn.Linear(flat, dense), nn.ReLU(), nn.Dropout(p), nn.Linear(dense, classes)]
        else:
            head += [nn.Dropout(p), nn.Linear(flat, classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def convs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """(conv, batchnorm) pairs of the feature blocks, in order."""
        return [(blk[0], blk[1]) for blk in self.features]  # type: ignore[index]

    def linears(self) -> list[nn.Linear]:
        return [m for m in self.classifier if isinstance(m, nn.Linear)]


def model_from_arch(arch: Mapping[str, Any]) -> nn.Module:
    """Build an (untrained) model from an arch dict: the small CNN, or a backbone's network (no pretrained
    weights loaded: a checkpoint's state_dict follows)."""
    if "backbone" in arch:
        from edgecv.tools.backbones import Lite0Classifier

        return Lite0Classifier(copy.deepcopy(dict(arch)))
    return EdgeCNN(copy.deepcopy(dict(arch)))


def head_layer(model: nn.Module) -> nn.Linear:
    """The output layer (class logits) of an edgecv model."""
    if isinstance(model, EdgeCNN):
        return model.linears()[-1]
    head = getattr(model, "head", None)
    if head is None:
        raise TrainingError(f"{type(model).__name__} has no known output layer")
    return head()  # type: ignore[no-any-return]


def set_head_layer(model: nn.Module, layer: nn.Linear) -> None:
    """Replace the output layer (and record its new class count in `model.arch`)."""
    if isinstance(model, EdgeCNN):
        model.classifier[len(model.classifier) - 1] = layer
        model.arch = dict(model.arch, num_classes=layer.out_features)
        return
    model.set_head(layer)  # type: ignore[operator]


def build_model(spec: InputSpec, num_classes: int, channels: Sequence[int] | None = None,
                dense: int | None = None, dropout: float | None = None, seed: int | None = None) -> EdgeCNN:
    """A fresh model for `spec` (NCHW only) with `default_arch` unless channels/dense/dropout are given.

    `model.arch` is the dict to store in checkpoints. `seed` makes the initial weights reproducible.
    """
    if spec.layout != "NCHW":
        raise TrainingError(f"edgecv trains NCHW models; the input spec says {spec.layout}")
    arch = default_arch(spec, num_classes, channels, dense, dropout)
    if seed is not None:
        torch.manual_seed(seed)
    return EdgeCNN(arch)


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_flops(arch: Mapping[str, Any]) -> int:
    """Multiply-accumulates of one forward pass (convs and linears; BN/ReLU/pool are negligible)."""
    if "backbone" in arch:
        from edgecv.tools.backbones import backbone_flops

        return backbone_flops(arch)
    arch = validate_arch(arch)
    cin, h, w = arch["input"]
    macs = 0
    for cout in arch["convs"]:
        macs += cin * cout * KERNEL * KERNEL * h * w
        h, w, cin = h // 2, w // 2, cout
    flat = cin * h * w
    if arch["dense"] > 0:
        macs += flat * arch["dense"] + arch["dense"] * arch["num_classes"]
    else:
        macs += flat * arch["num_classes"]
    return int(macs)


def describe_arch(arch: Mapping[str, Any]) -> str:
    if "backbone" in arch:
        from edgecv.tools.backbones import describe_backbone

        return describe_backbone(arch)
    c, h, w = arch["input"]
    convs = "-".join(str(ch) for ch in arch["convs"])
    return f"{h}x{w}x{c} → conv {convs} → dense {arch['dense']} → {arch['num_classes']} classes"
