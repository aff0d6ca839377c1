"""Which devices a fleet command addresses, checked before anything is sent to them.

Named device ids (`--device`) must be known to the broker: a retained status on `<p>/<dev>/status`, or an answer to
the announce request (`<p>/announce`, agent/link/announce.py) from a device that is online. A device never seen fails
in about `SEEN_WAIT_S` seconds with a message naming it, instead of after the command's whole timeout (a typo in an id
looked exactly like a slow device). `--wait-for-device S` is for a device that is expected to come online (just
installed, rebooting): the check then waits up to S seconds for every named device to be online. A group (`--group`)
resolves to the online devices whose retained status lists it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edgecv.agent.contract import topics as T
from edgecv.tools.errors import FleetError
from edgecv.tools.fleet.devices import DeviceInfo, discover, group_members, request_announce, update
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient

log = logging.getLogger(__name__)

SEEN_WAIT_S = 2.0  # how long an unknown device id has to show up (retained status at once, announce answers < 1 s)
GROUP_WAIT_S = 1.0  # how long a group's members are collected


@dataclass(frozen=True)
class Targets:
    """The devices a command goes to, with what the broker said about each (state `unknown` = never seen)."""

    devices: tuple[str, ...]
    infos: dict[str, DeviceInfo]
    group: str | None = None

    def offline(self) -> list[str]:
        return [d for d in self.devices if self.infos.get(d, DeviceInfo(d)).state != T.STATUS_ONLINE]


def resolve_targets(options: ClientOptions, prefix: str, devices: Sequence[str] = (), group: str | None = None, *,
                    wait_for_device: float | None = None) -> Targets:
    """The named devices, checked to have been seen (FleetError otherwise), or the group's online members
    (FleetError when it has none)."""
    if group is not None:
        infos = discover(options, prefix=prefix, wait=GROUP_WAIT_S)
        members = group_members(infos, group)
        if not members:
            raise FleetError(f"No online device lists group {group!r} in its status; check 'edgecv devices --group "
                             f"{group}'")
        return Targets(tuple(members), {d: infos[d] for d in members}, group)
    names = tuple(dict.fromkeys(devices))
    if not names:
        raise FleetError("No target device: name one with --device ID (repeatable) or a group with --group G")
    infos = seen_devices(options, prefix, names, wait_for_device)
    never = [d for d in names if d not in infos]
    if never:
        waited = f"{wait_for_device:g} s" if wait_for_device else f"{SEEN_WAIT_S:g} s"
        listed = ", ".join(repr(d) for d in never)
        raise FleetError(
            f"Device {listed} {'has' if len(never) == 1 else 'have'} never been seen on {options.host}:{options.port} "
            f"under prefix {prefix!r} (no retained status, no answer to the announce request within {waited}); "
            "check the id with 'edgecv devices', or pass --wait-for-device SECONDS to wait for a device that is "
            "coming online")
    return Targets(names, infos)


def seen_devices(options: ClientOptions, prefix: str, devices: Sequence[str],
                 wait_for_device: float | None = None) -> dict[str, DeviceInfo]:
    """What the broker knows about `devices`: their retained status, and the live status of the online ones (asked
    for with the announce request). Returns as soon as every device is known (with `wait_for_device`: online), or
    after SEEN_WAIT_S (`wait_for_device`) seconds with those that were."""
    for device in devices:
        try:
            T.check_level(device, "Device id")
        except ValueError as exc:
            raise FleetError(f"{exc}; check --device") from None
    wanted = set(devices)
    infos: dict[str, DeviceInfo] = {}

    def done() -> bool:
        if wait_for_device:
            return all(infos.get(d, DeviceInfo(d)).state == T.STATUS_ONLINE for d in wanted)
        return wanted <= set(infos)

    deadline = time.monotonic() + (wait_for_device if wait_for_device else SEEN_WAIT_S)
    with MqttClient(options) as client:
        for device in devices:
            client.subscribe(T.DeviceTopics(prefix, device).status, qos=1)
        request_announce(client, prefix)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            msg = client.get(min(left, 0.2))
            if msg is not None:
                update(infos, prefix, msg)
    return {d: i for d, i in infos.items() if d in wanted}
