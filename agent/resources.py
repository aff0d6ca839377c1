"""The data files the edgecv wheel ships beside the code: the demo bundle, its public key and the example config.

In the source tree they live in the top-level `models/` and `systemd/` folders; installed, they are the data
packages `edgecv.models` and `edgecv.systemd`, so the demo and `edgecv-agent init` work from any directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgecv.agent.errors import EdgecvError


def data_dir(package: str) -> Path:
    """The folder of an installed data package (`edgecv.models`, `edgecv.systemd`)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EdgecvError(f"The edgecv installation lacks its data package {package}; reinstall edgecv")
    return Path(locations[0])


def demo_bundle() -> Path:
    """The shipped default bundle as an archive (Fashion-MNIST, signed with the demo key)."""
    return (data_dir("edgecv.models") / "fashion-mnist.edgecv").resolve()


def demo_public_key() -> Path:
    """The public half of the demo signing key, which signed `demo_bundle()`."""
    return data_dir("edgecv.models") / "demo-signing.pub"


def example_config() -> Path:
    """The commented example agent configuration (systemd/agent.example.toml in the source tree)."""
    return data_dir("edgecv.systemd") / "agent.example.toml"
