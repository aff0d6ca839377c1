"""SoC temperature and Raspberry Pi throttling state, for the health payload; absent sources give None.

Temperature comes from the kernel's thermal zones (`/sys/class/thermal/thermal_zone*/{type,temp}`, millidegrees
Celsius), preferring the zone that is the SoC/CPU (`cpu-thermal` on a Raspberry Pi). Throttling comes from the
firmware's `get_throttled` bit field: the Pi kernel exposes it in sysfs (`/sys/devices/platform/soc/
soc:firmware/get_throttled`, readable without extra groups) and `vcgencmd get_throttled` prints it
(`throttled=0x50000`; needs the `video` group for /dev/vchiq). Nothing here raises: a non-Pi machine, a
container or a sandbox without these files simply has no value.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Zone types that are the SoC/CPU, best first (Raspberry Pi, generic ARM SoCs, x86).
_PREFERRED_TYPES = ("cpu-thermal", "cpu_thermal", "soc-thermal", "soc_thermal", "soc", "cpu", "x86_pkg_temp")

# Bits of the firmware's get_throttled value (Raspberry Pi documentation, "vcgencmd get_throttled").
THROTTLE_BITS = {
    0: "under_voltage",
    1: "freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
}
SINCE_BOOT_SHIFT = 16
FIRMWARE_SYSFS = Path("sys/devices/platform/soc/soc:firmware/get_throttled")


def read_soc_temperature(root: Path = Path("/")) -> float | None:
    """SoC temperature in °C (one decimal), or None when the machine exposes no thermal zone."""
    zones = sorted((root / "sys/class/thermal").glob("thermal_zone*"), key=_zone_number)
    readings: list[tuple[int, float]] = []
    for zone in zones:
        temp = _read_millidegrees(zone / "temp")
        if temp is None:
            continue
        kind = _read_text(zone / "type") or ""
        readings.append((_rank(kind), temp))
    if not readings:
        return None
    best = min(readings, key=lambda r: r[0])  # stable: the lowest-numbered zone among equally ranked ones
    return round(best[1], 1)


def _zone_number(path: Path) -> int:
    digits = path.name.removeprefix("thermal_zone")
    return int(digits) if digits.isdigit() else 1 << 30


def _rank(kind: str) -> int:
    kind = kind.strip().lower()
    for i, preferred in enumerate(_PREFERRED_TYPES):
        if kind == preferred or (len(preferred) > 3 and preferred in kind):
            return i
    return len(_PREFERRED_TYPES)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_millidegrees(path: Path) -> float | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = int(text) / 1000.0
    except ValueError:
        return None
    # Zones that are not wired up report nonsense such as -273 °C or 0; ignore them.
    return value if -40.0 < value < 150.0 and value != 0.0 else None


def decode_throttled(value: int) -> dict[str, Any]:
    """Decode the firmware bit field into {"raw": "0x50005", "now": {...}, "since_boot": {...}, "any": bool}."""
    now = {name: bool(value & (1 << bit)) for bit, name in THROTTLE_BITS.items()}
    since = {name: bool(value & (1 << (bit + SINCE_BOOT_SHIFT))) for bit, name in THROTTLE_BITS.items()}
    return {"raw": hex(value), "now": now, "since_boot": since, "any": bool(value)}


def parse_throttled(text: str) -> int | None:
    """Parse `throttled=0x50000` (vcgencmd) or a bare `50000` (sysfs, hexadecimal)."""
    m = re.fullmatch(r"(?:throttled=)?(?:0x)?([0-9a-fA-F]+)", text.strip())
    return int(m.group(1), 16) if m else None


def read_throttling(root: Path = Path("/"), command: Sequence[str] | None = None,
                    timeout: float = 2.0) -> dict[str, Any] | None:
    """The Pi's under-voltage/throttling state now and since boot, or None on machines that have none.

    Reads sysfs under `root` first; then runs `command` (default `vcgencmd get_throttled` when it is on PATH
    and `root` is the real root).
    """
    text = _read_text(root / FIRMWARE_SYSFS)
    if text is not None:
        value = parse_throttled(text)
        if value is not None:
            return decode_throttled(value)
    if command is None:
        if root != Path("/"):
            return None
        exe = shutil.which("vcgencmd")
        if exe is None:
            return None
        command = (exe, "get_throttled")
    try:
        out = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("vcgencmd get_throttled failed: %s", exc)
        return None
    if out.returncode != 0:
        log.debug("vcgencmd get_throttled exited %s: %s", out.returncode, out.stderr.strip())
        return None
    value = parse_throttled(out.stdout)
    return decode_throttled(value) if value is not None else None
