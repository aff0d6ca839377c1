"""`edgecv-agent` subcommands in process: rollback on the device with the config's keyring, check-config listing
every problem (and --json), bench --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgecv.agent.cli import main
from edgecv.agent.contract.signing import Keyring, generate_private_key, write_keypair
from edgecv.agent.delivery.store import ModelStore
from tests.bundle_factory import make_archive

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def signed_device(tmp_path: Path) -> Path:
    """A device config whose store holds two signed versions (1.1 active, 1.0 previous) and whose keyring holds
    the signer's public key."""
    key = generate_private_key()
    write_keypair(key, tmp_path / "ring" / "ws.key")
    (tmp_path / "ring" / "ws.key").unlink()
    store = ModelStore(tmp_path / "models", keyring=Keyring([key.public_key()]))
    for i, version in enumerate(("1.0", "1.1")):
        archive = make_archive(tmp_path / "build", version, top1=i, key=key)
        store.activate(store.install(archive, Keyring([key.public_key()])))
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "pi-1"\n[model]\nstore = "{tmp_path / "models"}"\n'
                      f'[security]\nkeyring = "{tmp_path / "ring"}"\n')
    return config


def test_rollback_on_the_device_uses_the_configured_keyring(signed_device: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rollback", "--config", str(signed_device)]) == 0
    captured = capsys.readouterr()
    assert "→ tiny 1.0" in captured.out and "systemctl start edgecv-agent" in captured.err
    store = ModelStore(signed_device.parent / "models")
    assert store.current().manifest.version == "1.0"  # type: ignore[union-attr]
    assert main(["rollback", "--config", str(signed_device), "--to", "1.1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["from"], doc["to"]) == ("tiny 1.0", "tiny 1.1") and doc["dir"].startswith("1.1-")
    assert main(["rollback", "--config", str(signed_device), "--to", "7.7"]) == 1
    assert "No installed model matches '7.7'; installed: " in capsys.readouterr().err


def test_rollback_without_a_previous_model_fails_with_the_reason(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "pi-1"\n[model]\nstore = "{tmp_path / "models"}"\n')
    assert main(["rollback", "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgecv-agent: error: There is no previous model to roll back to")


def test_check_config_lists_every_problem_and_says_it_in_json(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('device_id = "pi-1"\nlog_levl = "info"\n[[camera]]\nfps = -1\n[model]\nruntime = "onnx"\n')
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"edgecv-agent: error: {bad} has 3 problems:"
    assert err[1].startswith("  log_levl: unknown key; did you mean 'log_level'?")
    assert err[2] == "  camera[0].fps: expected a number >= 0, got -1"
    assert err[3].startswith("  model.runtime: expected one of")
    assert main(["check-config", str(bad), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and len(doc["problems"]) == 3
    good = tmp_path / "good.toml"
    good.write_text('device_id = "pi-1"\n')
    assert main(["check-config", str(good), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["effective"]["device_id"] == "pi-1" and doc["latency_budget_ms"] == 100.0


def test_bench_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--bundle", str(REPO / "models" / "fashion-mnist"), "--runtime", "onnxruntime",
                 "--runs", "5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "fashion-mnist" and doc["rows"]
    assert all(r["runtime"] == "onnxruntime" and r["infer_ms_median"] > 0 for r in doc["rows"])
