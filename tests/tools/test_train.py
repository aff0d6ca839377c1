"""Model sizing, training (better than chance, deterministic, early stopping), checkpoints and `edgecv train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecv.agent.contract.bundle import InputSpec
from edgecv.tools.checkpoint import load_checkpoint, save_checkpoint
from edgecv.tools.cli import main
from edgecv.tools.datasets import default_input_spec, load_splits, to_model_input
from edgecv.tools.errors import TrainingError
from edgecv.tools.model import build_model, count_flops, count_params, model_from_arch
from edgecv.tools.train import TrainConfig, evaluate_model, format_epoch_header, format_epoch_row, train
from tests.tools.conftest import ImageFolder

QUIET = {"progress": False, "threads": 1}  # one thread: the CI machine has 2 cores shared by parallel jobs


def test_default_arch_is_sized_from_the_input() -> None:
    fm = build_model(InputSpec(width=28, height=28, channels=1, color="GRAY"), 10)
    assert fm.arch["convs"] == [32, 64, 128] and count_params(fm) == 241_770  # FIELD-NOTES' 3-block CNN
    assert fm(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    rgb = build_model(InputSpec(width=64, height=64, channels=3), 5)
    assert rgb.arch["convs"] == [16, 32]
    assert rgb.features(torch.zeros(1, 3, 64, 64)).shape == (1, 32, 16, 16)
    assert count_flops(rgb.arch) > count_flops({**rgb.arch, "convs": [8, 16]})
    assert model_from_arch({**rgb.arch, "convs": [8, 16]}).features(torch.zeros(1, 3, 64, 64)).shape[1] == 16
    kinds = {type(m).__name__ for m in fm.modules()} - {"EdgeCNN", "Sequential"}
    assert kinds == {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "Dropout"}
    with pytest.raises(TrainingError, match="too small"):
        build_model(InputSpec(width=4, height=4, channels=1, color="GRAY"), 3)


def test_one_epoch_on_tiny_fashion_mnist_beats_chance(fashion_mnist_dir: Path) -> None:
    splits = load_splits("fashion-mnist", limit=1200, seed=0)
    spec = default_input_spec(splits.train)
    model = build_model(spec, 10, seed=0)
    rows: list[dict] = []
    result = train(model, splits, spec, TrainConfig(epochs=1, batch_size=32, **QUIET), on_epoch=rows.append)
    assert rows == result.history and len(rows) == 1
    assert set(rows[0]) >= {"epoch", "loss", "train_acc", "val_acc", "seconds"}
    acc = evaluate_model(model, splits.test, spec)
    assert acc > 0.5, acc  # chance is 0.1


def test_training_on_shapes_is_deterministic_and_learns(image_folder: ImageFolder) -> None:
    splits = load_splits(image_folder.root, size="16x16", seed=0, val_fraction=0.2, test_fraction=0.2)
    spec = default_input_spec(splits.train)
    cfg = TrainConfig(epochs=4, batch_size=8, lr=1e-2, patience=0, **QUIET)
    a = build_model(spec, 3, channels=(8, 16), dense=16, seed=1)
    b = build_model(spec, 3, channels=(8, 16), dense=16, seed=1)
    ha = train(a, splits, spec, cfg).history
    hb = train(b, splits, spec, cfg).history
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert ha[-1]["loss"] < ha[0]["loss"]
    assert evaluate_model(a, splits.train, spec) > 0.6  # chance is 1/3


def test_early_stopping_restores_the_best_epoch(image_folder: ImageFolder) -> None:
    splits = load_splits(image_folder.root, size="16x16", seed=0)
    spec = default_input_spec(splits.train)
    model = build_model(spec, 3, channels=(4,), dense=0, seed=0)
    # a learning rate this small cannot change validation accuracy after the first epoch
    result = train(model, splits, spec, TrainConfig(epochs=10, lr=1e-12, patience=2, batch_size=8, **QUIET))
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1


def test_bad_hyper_parameters_are_training_errors(image_folder: ImageFolder) -> None:
    splits = load_splits(image_folder.root, size="16x16")
    spec = default_input_spec(splits.train)
    model = build_model(spec, 3, channels=(4,), dense=0)
    for cfg, msg in ((TrainConfig(lr=0), "--lr"), (TrainConfig(batch_size=1), "--batch-size"),
                     (TrainConfig(schedule="warp"), "Schedule")):
        with pytest.raises(TrainingError, match=msg):
            train(model, splits, spec, cfg)
    wrong = build_model(spec, 5, channels=(4,), dense=0)
    with pytest.raises(TrainingError, match="5 outputs but the data has 3 classes"):
        train(wrong, splits, spec, TrainConfig(epochs=1, **QUIET))


def test_checkpoint_round_trip_gives_the_same_outputs(shapes_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(shapes_checkpoint)
    assert ckpt.labels == ["circle", "square", "triangle"] and ckpt.arch["convs"] == [8, 16]
    assert ckpt.spec.width == 32 and ckpt.spec.color == "RGB" and len(ckpt.history) == 4
    raw = torch.load(shapes_checkpoint, weights_only=True)  # plain tensors + JSON-able data only
    assert raw["spec"]["mean"] == list(ckpt.spec.mean)
    x = torch.randn(3, 3, 32, 32)
    before = ckpt.model(x)
    again = tmp_path / "again.pt"
    save_checkpoint(again, ckpt.model, ckpt.spec, ckpt.labels, ckpt.arch, ckpt.history, {"note": "copy"})
    copy = load_checkpoint(again)
    assert torch.equal(copy.model(x), before)
    assert copy.meta == {"note": "copy"} and copy.spec == ckpt.spec and not copy.model.training
    with pytest.raises(TrainingError, match="JSON-able"):
        save_checkpoint(tmp_path / "x.pt", ckpt.model, ckpt.spec, ckpt.labels, ckpt.arch, meta={"x": object()})
    with pytest.raises(TrainingError, match="labels"):
        save_checkpoint(tmp_path / "x.pt", ckpt.model, ckpt.spec, ["a", "b"], ckpt.arch)


def test_load_checkpoint_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="not a readable edgecv checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(TrainingError, match="not an edgecv checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_epoch_table_rows() -> None:
    row = {"epoch": 3, "loss": 0.25, "train_acc": 0.9, "val_acc": 0.875, "seconds": 12.34}
    assert format_epoch_header().split() == ["epoch", "loss", "train", "acc", "val", "acc", "time"]
    assert format_epoch_row(row).split() == ["3", "0.2500", "0.9000", "0.8750", "12.3s"]


def test_cli_train_prints_table_and_test_accuracy(image_folder: ImageFolder, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.pt"
    rc = main(["train", "--data", str(image_folder.root), "--size", "16x16", "--epochs", "2", "--batch-size", "8",
               "--channels", "8,16", "--dense", "16", "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "3 classes, 16x16x3" in text and "skipped 2 unreadable file(s)" in text
    assert "epoch" in text and "val acc" in text and "test accuracy: " in text
    ckpt = load_checkpoint(out)
    assert ckpt.meta["data"] == str(image_folder.root) and ckpt.meta["size"] == [16, 16]
    assert len(ckpt.history) == 2
    x = to_model_input(load_splits(image_folder.root, size="16x16").test.images, ckpt.spec)
    assert ckpt.model(torch.from_numpy(x)).shape == (len(x), 3)
    assert np.isfinite(ckpt.meta["test_accuracy"])
    # --json: the same lines on stderr, one JSON object on stdout
    rc = main(["train", "--data", str(image_folder.root), "--size", "16x16", "--epochs", "1", "--batch-size", "8",
               "--channels", "8,16", "--dense", "16", "--no-progress", "--json", "--out", str(out)])
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert rc == 0 and "test accuracy: " in captured.err and doc["checkpoint"] == str(out)
    assert len(doc["history"]) == 1 and doc["classes"] == ckpt.labels and "test_accuracy" in doc


@pytest.mark.parametrize(("argv", "message"), [
    (["--data", "/nonexistent/dir"], "Dataset folder /nonexistent/dir does not exist"),
    (["--data", "fashion-mnist", "--size", "huge"], "Image size 'huge' is not valid"),
    (["--data", "fashion-mnist", "--epochs", "1", "--lr", "-1"], "--lr must be a positive number"),
])
def test_cli_train_bad_input_is_one_clear_line(argv: list[str], message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", *argv, "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("edgecv: error: ") and message in err[-1]
    assert not (tmp_path / "x.pt").exists()


def test_cli_process_exits_non_zero_with_one_line(image_folder_factory: Callable[..., ImageFolder],
                                                  tmp_path: Path) -> None:
    one = image_folder_factory(classes=1, per_class=2, corrupt=False, empty_class=False)
    proc = subprocess.run([sys.executable, "-m", "edgecv.tools.cli", "-q", "train", "--data", str(one.root), "--out",
                           str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"edgecv: error: Dataset folder {one.root} needs at least 2 class sub-folders with images, found only "
        "'circle': lay it out as <root>/<class>/<image files>"], proc.stderr


def test_workstation_command_without_the_tools_extra_names_the_extra() -> None:
    """On a device-only install (no torch), `edgecv train` says which extra to install instead of a traceback."""
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def fake(name, *a, **k):\n"
            "    if name.split('.')[0] == 'torch':\n"
            "        raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = fake\n"
            "from edgecv.tools.cli import main\n"
            "sys.exit(main(['train', '--data', 'fashion-mnist', '--out', '/tmp/never.pt']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "edgecv[tools]" in proc.stderr and "Traceback" not in proc.stderr
