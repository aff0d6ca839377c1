"""What the wheel ships for a device with nothing else: the demo bundle (signed, verifiable with the shipped demo
key), a Fashion-MNIST sample for the synthetic camera, and the example config behind `edgecv-agent init`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edgecv.agent.cli import main
from edgecv.agent.config import load_config
from edgecv.agent.contract.bundle import open_bundle, verify_bundle
from edgecv.agent.contract.signing import load_keyring
from edgecv.agent.errors import CameraError
from edgecv.agent.resources import demo_bundle, demo_public_key, example_config
from edgecv.agent.vision import synthetic
from edgecv.agent.vision.synthetic import SyntheticSource


def test_demo_bundle_is_signed_by_the_shipped_demo_key(tmp_path: Path) -> None:
    assert demo_bundle().is_file() and demo_bundle().suffix == ".edgecv"
    bundle = open_bundle(demo_bundle(), tmp_path / "b")
    keyring = load_keyring(demo_public_key())
    assert keyring is not None and len(keyring) == 1
    assert verify_bundle(bundle, keyring).signed_by == keyring.key_ids()[0]


def test_synthetic_camera_falls_back_to_the_shipped_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGECV_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(synthetic, "FASHION_MNIST_ROOT", Path("/nonexistent/fashion-mnist"))
    root = synthetic.default_fashion_mnist_root()
    assert root.name == synthetic.FASHION_MNIST_SAMPLE
    images, labels = synthetic.load_fashion_mnist("test", root)
    assert images.shape == (1000, 28, 28) and set(labels.tolist()) == set(range(10))
    src = SyntheticSource("synthetic:fashion-mnist")
    assert src.grab()
    image, truth = src.retrieve()
    assert image.shape == (112, 112, 3) and truth == int(labels[0])
    with pytest.raises(CameraError, match="dataset-fashion-mnist"):  # the sample has no train split
        synthetic.load_fashion_mnist("train", root)


def test_an_explicit_dataset_directory_is_never_replaced_by_the_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECV_FASHION_MNIST_DIR", "/nonexistent/fashion-mnist")
    monkeypatch.setattr(synthetic, "FASHION_MNIST_ROOT", Path("/nonexistent/fashion-mnist"))
    assert synthetic.default_fashion_mnist_root() == Path("/nonexistent/fashion-mnist")


def test_init_writes_a_valid_commented_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "etc" / "agent.toml"
    assert main(["init", str(path), "--device-id", "pi-garage"]) == 0
    text = path.read_text()
    assert text.count("\n#") > 50  # the comments came along
    assert tomllib.loads(text)["device_id"] == "pi-garage"
    assert load_config(path).device_id == "pi-garage"
    assert "check-config" in capsys.readouterr().out
    # Never overwritten without --force; the rest of the file is the shipped example.
    assert main(["init", str(path), "--device-id", "other"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["init", str(path), "--device-id", "other", "--force"]) == 0
    assert load_config(path).device_id == "other"
    assert text.replace('"pi-garage"', '"x"') == example_config().read_text().replace('"pi-kitchen"', '"x"')


def test_init_refuses_a_device_id_that_is_not_a_topic_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "a.toml"), "--device-id", "pi/+"]) == 2
    assert "Device id" in capsys.readouterr().err and not (tmp_path / "a.toml").exists()
