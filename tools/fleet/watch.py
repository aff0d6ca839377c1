"""Live predictions from the fleet: subscribe, filter by device or group, print a table row or a JSON line each.

Region predictions show as `<camera>/<region>` in the CAMERA column. The regions' stable states
(`<p>/<dev>/state/<camera>/<region>`, retained: the current ones arrive first) are printed as they change, as a
`STATE` row (or their JSON document, which has `state` and `region` and no `top`); they do not count towards
`--count`. Group filtering uses the devices' retained `status` (its `groups` list): the status subscription is made
first, so the broker delivers every retained status before the first prediction of the other subscriptions; the
announce request then makes online devices re-publish it live, for brokers that do not deliver retained messages to
wildcard subscriptions (RabbitMQ 3.x).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from edgecv.agent.contract import topics as T
from edgecv.tools.errors import FleetError
from edgecv.tools.fleet.devices import request_announce
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received

COLUMNS = (("TIME", 12), ("DEVICE", 16), ("CAMERA", 14), ("TOP", 14), ("SCORE", 6), ("INFER", 8), ("TOTAL", 8),
           ("SEQ", 7))


@dataclass
class WatchFilter:
    prefix: str = T.DEFAULT_PREFIX
    devices: tuple[str, ...] = ()
    group: str | None = None
    groups_of: dict[str, set[str]] = field(default_factory=dict)  # device -> groups, from retained status

    def topics(self) -> list[str]:
        devices = self.devices or ("+",)
        return [T.fleet_filter(self.prefix, kind, d) for kind in ("predictions", "state/#") for d in devices]

    def accepts(self, device: str) -> bool:
        if self.devices and device not in self.devices:
            return False
        return self.group is None or self.group in self.groups_of.get(device, set())

    def note_status(self, device: str, payload: dict[str, Any]) -> None:
        groups = payload.get("groups") or []
        self.groups_of[device] = {str(g) for g in groups} if isinstance(groups, list) else set()


def format_header() -> str:
    return "  ".join(f"{name:<{width}}" for name, width in COLUMNS)


def format_row(doc: dict[str, Any]) -> str:
    top = (doc.get("top") or [{}])[0]
    ts = float(doc.get("frame_ts") or doc.get("ts") or time.time())
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
    lat = doc.get("latency_ms") or {}
    camera = str(doc.get("camera", "?")) + (f"/{doc['region']}" if doc.get("region") else "")
    values = (stamp, str(doc.get("device", "?")), camera, str(top.get("label", "-")),
              _num(top.get("score"), "{:.3f}"), _num(lat.get("infer"), "{:.2f}ms"), _num(lat.get("total"), "{:.2f}ms"),
              str(doc.get("seq", "-")))
    return "  ".join(f"{v[:w]:<{w}}" for v, (_, w) in zip(values, COLUMNS, strict=True))


def format_state(doc: dict[str, Any]) -> str:
    """A region's stable state as a table row: `STATE previous → state` with its evidence."""
    ts = float(doc.get("since") or doc.get("ts") or time.time())
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
    where = f"{doc.get('camera', '?')}/{doc.get('region', '?')}"
    state, previous = doc.get("state") or "unknown", doc.get("previous") or "unknown"
    evidence = (f"score {doc['score']:.3f} over {doc.get('count')} results" if isinstance(doc.get("score"), int | float)
                else str(doc.get("reason", "")))
    head = "  ".join(f"{v[:w]:<{w}}" for v, (_, w) in zip((stamp, str(doc.get("device", "?")), where), COLUMNS,
                                                         strict=False))
    return f"{head}  STATE {previous} → {state} ({evidence})"


def _num(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) else "-"


def watch(options: ClientOptions, flt: WatchFilter, *, as_json: bool = False, count: int | None = None,
          timeout: float | None = None, out: TextIO | None = None) -> int:
    """Print predictions until `count` were printed, `timeout` seconds passed, or Ctrl-C; returns how many."""
    out = out or sys.stdout
    printed = 0
    with MqttClient(options) as client:
        if flt.group is not None:
            client.subscribe(T.fleet_filter(flt.prefix, "status"), qos=1)
        for topic in flt.topics():
            client.subscribe(topic, qos=0)
        if flt.group is not None:
            request_announce(client, flt.prefix)
        if not as_json:
            print(format_header(), file=out, flush=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while count is None or printed < count:
                wait = 0.5 if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    break
                msg = client.get(min(wait, 0.5))
                if msg is not None:
                    printed += _handle(msg, flt, as_json, out, limit=None if count is None else count - printed)
        except KeyboardInterrupt:
            pass
    return printed


def _handle(msg: Received, flt: WatchFilter, as_json: bool, out: TextIO, limit: int | None = None) -> int:
    """Print the predictions in `msg` (one, or a batch from a device with publish.batch_max >= 2), at most
    `limit`; returns how many were printed."""
    parsed = T.parse_device_topic(flt.prefix, msg.topic)
    if parsed is None:
        return 0
    device, kind = parsed
    try:
        if kind == "status":
            flt.note_status(device, msg.json() if msg.payload else {})
            return 0
        if not flt.accepts(device):
            return 0
        if kind.startswith("state/"):
            if msg.payload:  # an empty retained message clears a state topic
                state = msg.json()
                print(json.dumps(state, separators=(",", ":"), sort_keys=True) if as_json else format_state(state),
                      file=out, flush=True)
            return 0
        if kind != "predictions":
            return 0
        docs = T.decode_predictions(msg.payload)
    except ValueError:
        return 0
    docs = docs if limit is None else docs[:limit]
    for doc in docs:
        if as_json:
            print(json.dumps(doc, separators=(",", ":"), sort_keys=True), file=out)
        else:
            print(format_row(doc), file=out)
    out.flush()
    return len(docs)


def run_watch(options: ClientOptions, prefix: str, devices: Sequence[str], group: str | None, as_json: bool,
              count: int | None, timeout: float | None) -> int:
    """CLI body: exit 0, or 1 when --count was given and fewer predictions arrived before --timeout."""
    got = watch(options, WatchFilter(prefix, tuple(devices), group), as_json=as_json, count=count, timeout=timeout)
    if count is not None and got < count:
        raise FleetError(f"Only {got} of {count} predictions arrived within {timeout:g} s; check that the devices "
                         "are online ('edgecv devices') and the --prefix/--device/--group filters")
    return 0
