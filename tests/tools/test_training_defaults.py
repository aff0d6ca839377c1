"""Training that converges by default and runs where asked: device selection (auto|cpu|cuda), the plateau
schedule, the "raise --epochs" hint, frozen BatchNorm, and augmentation (crops, flips where they fit, jitter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecv.tools.augment import AugmentConfig, augment_batch, flip_allowed
from edgecv.tools.cli import main
from edgecv.tools.datasets import default_input_spec, load_splits
from edgecv.tools.errors import TrainingError
from edgecv.tools.model import build_model
from edgecv.tools.pipeline import OptimizeConfig, run_pipeline
from edgecv.tools.train import MAX_EPOCHS, TrainConfig, TrainResult, recipe_for, select_device, train
from tests.tools.conftest import ImageFolder

QUIET = {"progress": False, "threads": 1}


# ------------------------------------------------------------------ device


def test_auto_picks_cuda_when_torch_sees_a_gpu_and_cpu_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    assert select_device("cuda") == torch.device("cuda")
    assert select_device("cpu") == torch.device("cpu")  # an explicit cpu wins over a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(TrainingError, match=r"--device cuda was asked for but torch sees no CUDA GPU.*--device cpu"):
        select_device("cuda")
    with pytest.raises(TrainingError, match="--device must be one of auto, cpu, cuda"):
        select_device("tpu")


def test_training_runs_on_the_selected_device_and_returns_the_model_on_the_cpu(
        image_folder: ImageFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = load_splits(image_folder.root, size="16x16", seed=0)
    spec = default_input_spec(splits.train)
    model = build_model(spec, 3, channels=(4,), dense=0, seed=0)
    seen: list[torch.device] = []
    real_to = torch.nn.Module.to

    def spy(self: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
        if self is model:
            seen.append(torch.device(args[0]))  # type: ignore[arg-type]
        return real_to(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = train(model, splits, spec, TrainConfig(epochs=1, batch_size=8, device="auto", **QUIET))
    assert result.device == "cpu" and seen == [torch.device("cpu"), torch.device("cpu")]
    with pytest.raises(TrainingError, match="no CUDA GPU"):
        train(model, splits, spec, TrainConfig(epochs=1, batch_size=8, device="cuda", **QUIET))


def test_cli_device_cuda_without_a_gpu_is_one_clear_line(image_folder: ImageFolder, tmp_path: pytest.TempPathFactory,
                                                         capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["train", "--data", str(image_folder.root), "--device", "cuda", "--out", str(tmp_path / "m.pt")],
                 ["optimize", "--data", str(image_folder.root), "--device", "cuda", "--out", str(tmp_path / "o")]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("edgecv: error: --device cuda was asked for"), err
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "o" / "work" / "trained.pt").exists()


# ------------------------------------------------------------------ convergence


def test_folders_get_a_generous_limit_and_fashion_mnist_keeps_its_recipe() -> None:
    folder = recipe_for("/data/photos", fashion_epochs=8)
    assert (folder.epochs, folder.schedule, folder.augment) == (MAX_EPOCHS, "plateau", True) and folder.patience > 3
    fm = recipe_for("fashion-mnist", fashion_epochs=8)
    assert (fm.epochs, fm.schedule, fm.augment) == (8, "onecycle", False)


def test_plateau_schedule_lowers_the_rate_when_validation_stalls_and_stops_with_the_best(
        image_folder: ImageFolder) -> None:
    splits = load_splits(image_folder.root, size="16x16", seed=0)
    spec = default_input_spec(splits.train)
    model = build_model(spec, 3, channels=(4,), dense=0, seed=0)
    # a rate this small cannot change validation accuracy: the plateau rule fires, then early stopping
    result = train(model, splits, spec, TrainConfig(epochs=20, lr=1e-9, schedule="plateau", patience=6,
                                                    batch_size=8, **QUIET))
    lrs = [r["lr"] for r in result.history]
    assert result.stopped_early and len(result.history) == 7 and result.best_epoch == 1
    assert lrs[0] == pytest.approx(1e-9) and lrs[-1] < lrs[0] * 0.5  # lowered after 3 stale epochs
    assert not result.still_improving and result.hint(20) == ""


def test_hint_when_the_epoch_limit_cuts_training_short(image_folder: ImageFolder) -> None:
    splits = load_splits(image_folder.root, size="16x16", seed=0)
    spec = default_input_spec(splits.train)
    model = build_model(spec, 3, channels=(8,), dense=0, seed=0)
    result = train(model, splits, spec, TrainConfig(epochs=3, lr=1e-2, schedule="plateau", batch_size=8, **QUIET))
    vals = [r["val_acc"] for r in result.history]
    assert result.still_improving == (result.best_epoch >= 2 and not result.stopped_early)
    # a made-up history shows the message itself
    climbing = TrainResult(history=[{"val_acc": v} for v in (0.5, 0.6, 0.7, 0.8)], best_epoch=4,
                           still_improving=True)
    hint = climbing.hint(4)
    assert "still improving" in hint and "0.5000 → 0.8000" in hint and "raise --epochs" in hint, vals


def test_frozen_batchnorm_keeps_its_running_statistics(image_folder: ImageFolder) -> None:
    splits = load_splits(image_folder.root, size="16x16", seed=0)
    spec = default_input_spec(splits.train)
    model = build_model(spec, 3, channels=(4,), dense=0, seed=0)
    bn = model.convs()[0][1]
    before = bn.running_mean.clone()  # type: ignore[union-attr]
    train(model, splits, spec, TrainConfig(epochs=1, batch_size=8, freeze_bn=True, **QUIET))
    assert torch.equal(bn.running_mean, before)  # type: ignore[arg-type]
    train(model, splits, spec, TrainConfig(epochs=1, batch_size=8, **QUIET))
    assert not torch.equal(bn.running_mean, before)  # type: ignore[arg-type]


# ------------------------------------------------------------------ augmentation


def _asymmetric(n: int = 4) -> np.ndarray:
    img = np.zeros((n, 16, 16, 3), dtype=np.uint8)
    img[:, :, :4] = 250  # a bright band on the left
    img[:, 4:12, 4:12, 1] = 120
    return img


def test_augmentation_crops_flips_and_jitters_but_keeps_shape_and_dtype() -> None:
    images = _asymmetric(64)
    out = augment_batch(images, np.random.default_rng(0), AugmentConfig())
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)
    again = augment_batch(images, np.random.default_rng(0), AugmentConfig())
    assert np.array_equal(out, again)  # reproducible from the seed
    # crop = whole image, no jitter: each output is the image or its mirror, both occur
    plain = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), brightness=0.0, contrast=0.0)
    flipped = augment_batch(images, np.random.default_rng(1), plain)
    kinds = {("same" if np.array_equal(f, images[0]) else "mirror" if np.array_equal(f, images[0][:, ::-1])
              else "other") for f in flipped}
    assert kinds == {"same", "mirror"}
    no_flip = augment_batch(images, np.random.default_rng(1), AugmentConfig(**{**plain.__dict__, "flip": False}))
    assert all(np.array_equal(f, images[0]) for f in no_flip)
    # jitter alone changes brightness but not the layout
    jitter = augment_batch(images, np.random.default_rng(2), AugmentConfig(crop_scale=(1.0, 1.0),
                                                                         crop_ratio=(1.0, 1.0), flip=False))
    means = jitter.reshape(len(jitter), -1).mean(axis=1)
    assert means.std() > 1.0 and (jitter[:, :, :4].mean() > jitter[:, :, 12:].mean())


def test_flips_are_off_for_left_right_classes_and_when_asked() -> None:
    assert flip_allowed(["cat", "dog"])
    assert not flip_allowed(["cat", "dog"], requested=False)
    assert not flip_allowed(["turn-left", "turn_right", "straight"])
    assert not flip_allowed(["Left", "other"])
    assert flip_allowed(["bright", "leftover"])  # words that merely contain the letters


def test_augmented_training_still_learns(image_folder: ImageFolder) -> None:
    splits = load_splits(image_folder.root, size="16x16", seed=0, val_fraction=0.2, test_fraction=0.2)
    spec = default_input_spec(splits.train)
    model = build_model(spec, 3, channels=(8, 16), dense=16, seed=1)
    cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, patience=0, augment=AugmentConfig(), **QUIET)
    result = train(model, splits, spec, cfg)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    from edgecv.tools.train import evaluate_model

    assert evaluate_model(model, splits.train, spec) > 0.6  # chance is 1/3


def test_optimize_records_the_recipe_and_passes_the_device_to_every_training_step(
        image_folder: ImageFolder, tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgecv.tools.train as train_module

    devices: list[str] = []
    real_train = train_module.train

    def spy(model: torch.nn.Module, splits: object, spec: object, cfg: TrainConfig | None = None,
            on_epoch: object = None) -> TrainResult:
        assert cfg is not None
        devices.append(cfg.device)
        return real_train(model, splits, spec, cfg, on_epoch)  # type: ignore[arg-type]

    monkeypatch.setattr(train_module, "train", spy)
    import edgecv.tools.prune as prune_module

    monkeypatch.setattr(prune_module, "train", spy)
    result = run_pipeline(OptimizeConfig(data=str(image_folder.root), out=tmp_path / "o", epochs=2,
                                         finetune_epochs=1, structured=0.25, calib=20, latency_runs=3,
                                         device="cpu", threads=1, progress=False, size="16x16"))
    assert devices and set(devices) == {"cpu"} and len(devices) == 3  # train, channel-prune and magnitude fine-tune
    settings = result.record.settings
    assert settings["epochs"] == 2 and settings["schedule"] == "plateau" and settings["device"] == "cpu"
    assert settings["augment"].startswith("crop") and "flip on" in settings["augment"]
