"""`edgecv watch` and `edgecv devices` show camera regions and their stable states (message handling, no broker)."""

from __future__ import annotations

import io
import json

from edgecv.agent.contract.topics import encode, state_payload, status_payload
from edgecv.tools.fleet.devices import HEADERS, DeviceInfo, update
from edgecv.tools.fleet.mqtt_client import Received
from edgecv.tools.fleet.watch import WatchFilter, _handle, format_row

PREDICTION = {"boot": "b", "camera": "garage", "region": "door", "device": "pi-1", "frame_ts": 1.0, "seq": 4,
              "latency_ms": {"infer": 0.2, "total": 0.5}, "model": {"name": "m", "version": "1"},
              "top": [{"index": 1, "label": "open", "score": 0.91}], "ts": 1.1}


def state(value: str | None, previous: str | None = None, reason: str = "confirmed") -> bytes:
    return encode(state_payload("pi-1", "b", "garage", "door", state=value, previous=previous, since=2.0,
                                reason=reason, score=0.9 if value else None, count=3 if value else 0, frame=9,
                                frame_ts=1.9, model={"name": "m", "version": "1"}))


def test_watch_shows_the_region_and_prints_state_changes() -> None:
    assert "garage/door" in format_row(PREDICTION)
    flt = WatchFilter("edgecv")
    assert "edgecv/+/state/#" in flt.topics() and "edgecv/+/predictions" in flt.topics()
    assert WatchFilter("edgecv", ("pi-1",)).topics() == ["edgecv/pi-1/predictions", "edgecv/pi-1/state/#"]
    out = io.StringIO()
    printed = _handle(Received("edgecv/pi-1/predictions", json.dumps(PREDICTION).encode()), flt, False, out)
    printed += _handle(Received("edgecv/pi-1/state/garage/door", state("open", "closed")), flt, False, out)
    printed += _handle(Received("edgecv/pi-1/state/garage/door", state(None, "open", "model_changed")), flt, False,
                       out)
    printed += _handle(Received("edgecv/pi-1/state/garage/door", b"", retain=True), flt, False, out)  # cleared
    lines = out.getvalue().splitlines()
    assert printed == 1  # states do not count towards --count
    assert "garage/door" in lines[1] and "STATE closed → open (score 0.900 over 3 results)" in lines[1]
    assert "STATE open → unknown (model_changed)" in lines[2] and len(lines) == 3
    as_json = io.StringIO()
    _handle(Received("edgecv/pi-1/state/garage/door", state("open", "closed")), flt, True, as_json)
    assert json.loads(as_json.getvalue())["state"] == "open"
    grouped = WatchFilter("edgecv", group="lab")
    quiet = io.StringIO()
    _handle(Received("edgecv/pi-1/state/garage/door", state("open")), grouped, False, quiet)
    assert quiet.getvalue() == ""  # pi-1 is not in group lab


def test_devices_list_region_states_and_crop_errors() -> None:
    infos: dict[str, DeviceInfo] = {}
    doc = status_payload("pi-1", "online", "0.1", None, {"garage": {"state": "open", "regions": {
        "door": {"crop": [0.6, 0.3, 0.3, 0.6], "box": [384, 144, 192, 288], "error": None},
        "bins": {"crop": [600, 400, 100, 100], "box": None, "error": "camera[0].region[1].crop: does not fit"}}}})
    update(infos, "edgecv", Received("edgecv/pi-1/status", encode(doc)))
    update(infos, "edgecv", Received("edgecv/pi-1/state/garage/door", state("open", "closed")))
    update(infos, "edgecv", Received("edgecv/pi-1/state/garage/lights", state(None, reason="start")))
    update(infos, "edgecv", Received("edgecv/pi-1/state/garage/gone", b""))
    info = infos["pi-1"]
    assert info.regions["garage/door"]["state"] == "open" and info.regions["garage/door"]["score"] == 0.9
    assert info.region_states() == "garage/bins=! garage/door=open garage/lights=?"
    assert HEADERS[-1] == "REGIONS" and info.row()[-1] == info.region_states()
    assert DeviceInfo("pi-2").row()[-1] == "-"
