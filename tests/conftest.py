"""Shared fixtures: a real Mosquitto broker per test session (own port), temp dirs, the slow marker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("EDGECV_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set EDGECV_SLOW=1 to run the long form")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh broker for one test (use it when the test stops or restarts the broker)."""
    b = Broker(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for every test that only needs a broker to talk to."""
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.fail("Debian package dataset-fashion-mnist is not installed (scripts/setup.sh installs it)")
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def scene_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real model of the `synthetic:scene` garage door (closed/open), built in a few seconds."""
    from tests.scene_model import build_scene_bundle

    bundle, accuracy = build_scene_bundle(tmp_path_factory.mktemp("scene") / "door")
    assert accuracy >= 0.9, f"the scene test model reached only {accuracy:.2f} on another day of the scene"
    return bundle
