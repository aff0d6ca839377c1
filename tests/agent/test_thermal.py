"""SoC temperature and throttling from a fake sysfs tree and a fake vcgencmd."""

from __future__ import annotations

import sys
from pathlib import Path

from edgecv.agent.system.thermal import decode_throttled, parse_throttled, read_soc_temperature, read_throttling


def zone(root: Path, n: int, kind: str, millideg: str) -> None:
    d = root / "sys/class/thermal" / f"thermal_zone{n}"
    d.mkdir(parents=True)
    (d / "type").write_text(kind + "\n")
    (d / "temp").write_text(millideg + "\n")


def test_prefers_the_cpu_zone(tmp_path: Path) -> None:
    zone(tmp_path, 0, "acpitz", "27800")
    zone(tmp_path, 1, "cpu-thermal", "48312")
    zone(tmp_path, 2, "gpu-thermal", "51000")
    assert read_soc_temperature(tmp_path) == 48.3


def test_falls_back_to_the_first_sane_zone(tmp_path: Path) -> None:
    zone(tmp_path, 10, "iwlwifi_1", "-273000")  # not wired: ignored
    zone(tmp_path, 2, "acpitz", "41000")
    zone(tmp_path, 3, "pch_skylake", "45000")
    assert read_soc_temperature(tmp_path) == 41.0


def test_absent_or_garbage_is_none(tmp_path: Path) -> None:
    assert read_soc_temperature(tmp_path) is None
    zone(tmp_path, 0, "cpu-thermal", "hot")
    assert read_soc_temperature(tmp_path) is None


def test_decode_bits_now_and_since_boot() -> None:
    d = decode_throttled(0x50005)
    assert d["raw"] == "0x50005" and d["any"] is True
    assert d["now"] == {"under_voltage": True, "freq_capped": False, "throttled": True, "soft_temp_limit": False}
    assert d["since_boot"] == {"under_voltage": True, "freq_capped": False, "throttled": True,
                               "soft_temp_limit": False}
    assert decode_throttled(0x80000)["since_boot"]["soft_temp_limit"] is True
    assert decode_throttled(0)["any"] is False
    assert parse_throttled("throttled=0x50000\n") == 0x50000
    assert parse_throttled("50005") == 0x50005
    assert parse_throttled("error") is None


def test_throttling_from_firmware_sysfs(tmp_path: Path) -> None:
    p = tmp_path / "sys/devices/platform/soc/soc:firmware/get_throttled"
    p.parent.mkdir(parents=True)
    p.write_text("20002\n")
    d = read_throttling(tmp_path)
    assert d is not None and d["now"]["freq_capped"] and d["since_boot"]["freq_capped"]
    assert not d["now"]["under_voltage"]


def test_throttling_from_a_vcgencmd_like_command(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "print('throttled=0x1')"]
    d = read_throttling(tmp_path, command=cmd)
    assert d is not None and d["now"]["under_voltage"] and not any(d["since_boot"].values())


def test_throttling_absent_is_none(tmp_path: Path) -> None:
    assert read_throttling(tmp_path) is None  # fake root, no sysfs, no command
    assert read_throttling(tmp_path, command=["/nonexistent/vcgencmd", "get_throttled"]) is None
    assert read_throttling(tmp_path, command=[sys.executable, "-c", "import sys; sys.exit(255)"]) is None
    assert read_throttling(tmp_path, command=[sys.executable, "-c", "print('VCHI init failed')"]) is None
