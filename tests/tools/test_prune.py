"""Pruning: global magnitude pruning hits its target and its zeros survive fine-tuning and saving; channel
pruning slices weights correctly and really shrinks the network; `edgecv prune` end to end."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch

from edgecv.tools.checkpoint import load_checkpoint, save_checkpoint
from edgecv.tools.cli import main
from edgecv.tools.datasets import load_splits
from edgecv.tools.errors import TrainingError
from edgecv.tools.model import EdgeCNN, count_flops, count_params, model_from_arch
from edgecv.tools.prune import (
    channel_prune,
    cubic_schedule,
    format_sparsity_table,
    magnitude_prune,
    shrink_channels,
    sparsity_report,
)
from edgecv.tools.train import TrainConfig
from tests.tools.conftest import ImageFolder

FT = TrainConfig(lr=1e-3, schedule="cosine", batch_size=32, progress=False, threads=1)


@pytest.fixture(scope="module")
def fashion(fashion_checkpoint: Path) -> tuple:
    ckpt = load_checkpoint(fashion_checkpoint)
    splits = load_splits("fashion-mnist", seed=0, limit=1000)
    return ckpt, splits


def test_cubic_schedule_ends_at_target() -> None:
    s = cubic_schedule(0.5, 3)
    assert s[-1] == pytest.approx(0.5) and s[0] < s[1] < s[2] and s[0] > 0.5 / 3


def test_magnitude_prune_reaches_target_and_zeros_are_permanent(fashion: tuple, tmp_path: Path) -> None:
    ckpt, splits = fashion
    model = copy.deepcopy(ckpt.model)
    result = magnitude_prune(model, splits, ckpt.spec, target_sparsity=0.3, steps=2, finetune_epochs=1, cfg=FT)
    # fine-tuning ran after the last step with AdamW: only masks that held keep the sparsity at the target
    assert result.history[-1]["finetune"], "fine-tuning did not run"
    assert result.global_sparsity == pytest.approx(0.3, abs=0.01)
    assert [round(h["target_sparsity"], 4) for h in result.history] == [round(v, 4) for v in cubic_schedule(0.3, 2)]
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    rows = result.per_layer
    assert [r["layer"] for r in rows] == ["features.0.0", "features.1.0", "features.2.0", "classifier.1",
                                          "classifier.4"]
    assert sum(r["zeros"] for r in rows) / sum(r["params"] for r in rows) == pytest.approx(result.global_sparsity)
    assert "total" in format_sparsity_table(rows) and "30.00%" in format_sparsity_table(rows)
    assert result.accuracy_after > 0.5  # still far better than chance (0.1)
    # zeros are real zeros in the weights: they survive a save/load and stay zero in inference
    path = save_checkpoint(tmp_path / "p.pt", model, ckpt.spec, ckpt.labels, ckpt.arch)
    again = load_checkpoint(path)
    assert sparsity_report(again.model) == rows
    zero_before = [(m.weight == 0) for m in (again.model.features[2][0], again.model.classifier[1])]
    assert all(z.float().mean() > 0.2 for z in zero_before)


def test_magnitude_prune_keeps_earlier_zeros_across_steps(fashion: tuple) -> None:
    ckpt, splits = fashion
    first = copy.deepcopy(ckpt.model)
    magnitude_prune(first, splits, ckpt.spec, target_sparsity=0.2, steps=1, finetune_epochs=0, cfg=FT)
    zeros = {n: p == 0 for n, p in first.named_parameters() if n.endswith("weight") and p.ndim > 1}
    second = copy.deepcopy(first)
    result = magnitude_prune(second, splits, ckpt.spec, target_sparsity=0.5, steps=1, finetune_epochs=1, cfg=FT)
    assert result.global_sparsity == pytest.approx(0.5, abs=0.01)
    for name, p in second.named_parameters():
        if name in zeros:
            assert bool((p[zeros[name]] == 0).all()), name


def test_magnitude_prune_rejects_bad_arguments(fashion: tuple) -> None:
    ckpt, splits = fashion
    for kwargs, msg in (({"target_sparsity": 1.0}, "--sparsity"), ({"steps": 0}, "--steps"),
                        ({"finetune_epochs": -1}, "--finetune-epochs")):
        with pytest.raises(TrainingError, match=msg):
            magnitude_prune(copy.deepcopy(ckpt.model), splits, ckpt.spec, **kwargs)


def test_shrink_channels_drops_exactly_the_dead_filters() -> None:
    """Filters with zero weights whose BatchNorm output is clipped by ReLU contribute nothing: removing them
    (and the matching next-layer inputs, linear columns and dense units) must leave the outputs unchanged."""
    torch.manual_seed(0)
    model = model_from_arch({"input": [3, 16, 16], "convs": [8, 12], "dense": 10, "dropout": 0.0,
                             "num_classes": 4}).eval()
    with torch.no_grad():
        for conv, bn in model.convs():
            dead = torch.arange(0, conv.out_channels, 2)
            conv.weight[dead] = 0.0
            bn.bias[dead] = -1.0  # BN(0) = bias - gamma*mean/std → negative → ReLU 0
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_mean[dead] = 0.0
        first = model.linears()[0]
        first.weight[::2] = 0.0
        first.bias[::2] = -1.0
    x = torch.randn(5, 3, 16, 16)
    small, detail = shrink_channels(model, 0.5)
    assert small.arch["convs"] == [4, 6] and small.arch["dense"] == 5
    assert [row["after"] for row in detail["layers"]] == [4, 6, 5]
    assert torch.allclose(small(x), model(x), atol=1e-5)
    assert count_params(small) < count_params(model) / 2.5


def test_channel_prune_shrinks_params_flops_and_cpu_time(fashion: tuple) -> None:
    ckpt, splits = fashion
    original = copy.deepcopy(ckpt.model.state_dict())
    small, arch, report = channel_prune(ckpt.model, ckpt.arch, splits, ckpt.spec, 0.5, finetune_epochs=1, cfg=FT)
    assert isinstance(small, EdgeCNN) and arch == small.arch
    assert arch["convs"] == [16, 32, 64] and arch["dense"] == 64
    assert report["params_after"] == count_params(small) < 0.3 * report["params_before"]
    assert report["flops_after"] == count_flops(arch) < 0.3 * report["flops_before"]
    assert len(report["history"]) == 1 and report["accuracy_after"] > 0.4
    assert all(torch.equal(v, ckpt.model.state_dict()[k]) for k, v in original.items())  # input model untouched
    x = torch.randn(256, 1, 28, 28)
    assert small(x).shape == ckpt.model(x).shape == (256, 10)
    rebuilt = model_from_arch(arch)
    rebuilt.load_state_dict(small.state_dict())  # the arch dict fully describes the smaller network

    ckpt.model.eval()
    best = {"small": float("inf"), "big": float("inf")}
    with torch.inference_mode():
        for _ in range(7):  # interleaved, best of 7: robust against other jobs on a shared CPU
            for name, m in (("small", small), ("big", ckpt.model)):
                t0 = time.perf_counter()
                m(x)
                best[name] = min(best[name], time.perf_counter() - t0)
    assert best["small"] < best["big"], best


def test_channel_prune_rejects_bad_ratio_and_foreign_models(fashion: tuple) -> None:
    ckpt, splits = fashion
    with pytest.raises(TrainingError, match="--structured"):
        channel_prune(ckpt.model, ckpt.arch, splits, ckpt.spec, 1.0)
    with pytest.raises(TrainingError, match="edgecv model"):
        channel_prune(torch.nn.Sequential(torch.nn.Flatten()), ckpt.arch, splits, ckpt.spec, 0.5)


def test_cli_prune_structured_and_magnitude(shapes_checkpoint: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pruned.pt"
    rc = main(["prune", str(shapes_checkpoint), "--sparsity", "0.4", "--steps", "2", "--structured", "0.5",
               "--batch-size", "8", "--threads", "1", "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "accuracy before: " in text and "accuracy after: " in text and "channel pruning 50%" in text
    assert "sparsity" in text and "total" in text
    pruned = load_checkpoint(out)
    assert pruned.arch["convs"] == [4, 8] and pruned.arch["dense"] == 8
    assert pruned.meta["pruned"]["magnitude"]["global_sparsity"] == pytest.approx(0.4, abs=0.01)
    assert pruned.labels == load_checkpoint(shapes_checkpoint).labels
    assert pruned.model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize(("extra", "message"), [
    (["--size", "64x64"], "--size 64x64 does not match the checkpoint's input 32x32"),
    (["--color", "gray"], "--color gray does not match"),
    (["--sparsity", "0"], "Nothing to do"),
    (["--structured", "1.5"], "--structured must be a ratio in (0, 1)"),
])
def test_cli_prune_bad_input_is_one_clear_line(shapes_checkpoint: Path, tmp_path: Path, extra: list[str],
                                               message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["prune", str(shapes_checkpoint), "--no-progress", "--threads", "1", *extra,
               "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("edgecv: error: ") and message in err[-1]
    assert not (tmp_path / "x.pt").exists()


def test_cli_prune_missing_checkpoint_and_wrong_data(image_folder_factory, tmp_path: Path,
                                                     shapes_checkpoint: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["prune", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.pt")]) == 1
    assert "Checkpoint" in capsys.readouterr().err
    other: ImageFolder = image_folder_factory(classes=4, per_class=4, corrupt=False, empty_class=False)
    assert main(["prune", str(shapes_checkpoint), "--data", str(other.root), "--out", str(tmp_path / "x.pt")]) == 1
    assert "differ from the checkpoint's" in capsys.readouterr().err
