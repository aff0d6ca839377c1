"""systemd/edgecv-agent.service: `systemd-analyze verify` clean, hardening exposure low, the directives the agent
relies on (notify + watchdog, credentials, writable cache for onnxruntime, camera devices) present."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "edgecv-agent.service"
EXEC = "/opt/edgecv/venv/bin/edgecv-agent"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit[section] if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"{section}.{key}: {found}"
    return found[0]


def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is missing: install the Debian package systemd (scripts/setup.sh does)")
    return exe


def verifiable_copy(tmp_path: Path, text: str, name: str = "edgecv-agent.service") -> Path:
    """The unit with its ExecStart binary replaced by a real executable, so verify checks everything else."""
    fake = tmp_path / "bin" / "edgecv-agent"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert EXEC in text
    unit = tmp_path / name
    unit.write_text(text.replace(EXEC, str(fake)))
    return unit


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          cwd=unit.parent)


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    out = verify(verifiable_copy(tmp_path, UNIT.read_text()))
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "" and out.stdout.strip() == "", out.stderr + out.stdout


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    # Control: the check above is meaningful only if verify reports mistakes in this very unit.
    broken = UNIT.read_text().replace("Type=notify", "Type=notifyy").replace("WatchdogSec=30", "WatchdogSec=soon")
    out = verify(verifiable_copy(tmp_path, broken))
    assert "notifyy" in out.stderr and "soon" in out.stderr
    missing = tmp_path / "missing.service"
    missing.write_text(UNIT.read_text().replace(EXEC, str(tmp_path / "nope" / "edgecv-agent")))
    out = verify(missing)
    assert out.returncode != 0 and "not executable" in out.stderr


def test_hardening_exposure_is_low(tmp_path: Path) -> None:
    unit = verifiable_copy(tmp_path, UNIT.read_text())
    out = subprocess.run([systemd_analyze(), "security", "--offline=yes", str(unit)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout)
    assert m, out.stdout[-500:] + out.stderr
    assert float(m.group(1)) <= 2.5, out.stdout  # systemd rates <= 2.5 as "OK"


def test_notify_watchdog_restart_and_commands() -> None:
    unit = parse_unit(UNIT.read_text())
    svc = "Service"
    assert one(unit, svc, "Type") == "notify" and one(unit, svc, "NotifyAccess") == "main"
    assert one(unit, svc, "WatchdogSec") == "30"
    assert one(unit, svc, "Restart") == "on-failure" and one(unit, svc, "RestartSec") == "5"
    assert int(one(unit, "Unit", "StartLimitBurst")) >= 3 and one(unit, "Unit", "StartLimitIntervalSec")
    assert one(unit, svc, "ExecStartPre") == f"{EXEC} check-config /etc/edgecv/agent.toml"
    assert one(unit, svc, "ExecStart") == f"{EXEC} run --config /etc/edgecv/agent.toml"
    assert one(unit, svc, "KillSignal") == "SIGTERM" and one(unit, svc, "TimeoutStopSec")
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_sandbox_keeps_cameras_network_and_caches_working() -> None:
    unit = parse_unit(UNIT.read_text())
    svc = "Service"
    assert one(unit, svc, "User") == "edgecv" and "video" in one(unit, svc, "SupplementaryGroups").split()
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectControlGroups", "LockPersonality", "RestrictRealtime"):
        assert one(unit, svc, key) == "yes", key
    assert one(unit, svc, "ProtectSystem") == "strict"
    assert set(one(unit, svc, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6",
                                                                      "AF_NETLINK"}
    assert one(unit, svc, "SystemCallArchitectures") == "native"
    assert one(unit, svc, "DevicePolicy") == "closed"
    assert "char-video4linux rw" in values(unit, svc, "DeviceAllow")
    assert one(unit, svc, "PrivateDevices") == "no"  # PrivateDevices=yes would hide /dev/video*
    assert one(unit, svc, "MemoryMax")
    # With ProtectSystem=strict + ProtectHome, the only writable places are the managed directories: the
    # model store and onnxruntime's $HOME/.cache must live there.
    assert one(unit, svc, "StateDirectory") == "edgecv" and one(unit, svc, "CacheDirectory") == "edgecv"
    assert one(unit, svc, "ConfigurationDirectory") == "edgecv"
    env = dict(v.split("=", 1) for v in values(unit, svc, "Environment"))
    assert env["HOME"] == "/var/lib/edgecv" and env["XDG_CACHE_HOME"] == "/var/cache/edgecv"
    assert one(unit, svc, "LoadCredential") == "mqtt-password:/etc/edgecv/mqtt-password"
