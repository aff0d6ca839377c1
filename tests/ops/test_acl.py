"""The shipped Mosquitto example (edgecv.conf + edgecv.acl) enforced by a real mosquitto, over TLS with passwords:
devices stay in their own subtree, only the workstation pushes and commands, group pushes reach members only, and a
device that copies another's client id cannot kick it off the broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ops.fleet_broker import PASSWORD, FleetBroker
from tests.ops.probe import Probe
from tests.waiting import wait_until

USERS = ("workstation", "homeassistant", "pi-kitchen", "pi-hall", "pi-garage")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetBroker]:
    b = FleetBroker(tmp_path_factory.mktemp("fleet-broker"), USERS)
    b.start()
    yield b
    b.stop()


def login(fleet: FleetBroker, user: str, client_id: str | None = None, port: int | None = None) -> Probe:
    return Probe(port or fleet.port_for(user), username=user, password=PASSWORD.format(user),
                 ca_file=str(fleet.ca_file), client_id=client_id)


@pytest.fixture
def ws(fleet: FleetBroker) -> Iterator[Probe]:
    p = login(fleet, "workstation")
    yield p
    p.close()


def test_anonymous_and_wrong_passwords_are_refused(fleet: FleetBroker, tmp_path: Path) -> None:
    with pytest.raises(PermissionError):
        Probe(fleet.port)  # local listener, no credentials
    with pytest.raises(PermissionError):
        Probe(fleet.tls_port, username="pi-kitchen", password="wrong", ca_file=str(fleet.ca_file))
    login(fleet, "pi-kitchen").close()  # TLS verified against the CA, password accepted


def test_device_publishes_only_under_its_own_subtree(fleet: FleetBroker, ws: Probe) -> None:
    assert ws.subscribe("edgecv/#")
    dev = login(fleet, "pi-kitchen")
    try:
        for topic in ("edgecv/pi-kitchen/predictions", "edgecv/pi-kitchen/status", "edgecv/pi-kitchen/health",
                      "edgecv/pi-kitchen/model/state", "edgecv/pi-kitchen/model/push/t1/ack",
                      "edgecv/pi-kitchen/cmd/ping/result", "edgecv/pi-kitchen/state/garage/door",
                      "edgecv/pi-kitchen/latest", "edgecv/pi-kitchen/latest/garage/door"):
            assert dev.publish(topic), topic
        assert len({m.topic for m in ws.collect(3, n=9)}) == 9
        denied = ("edgecv/pi-hall/predictions", "edgecv/pi-hall/status", "edgecv/pi-hall/state/garage/door",
                  "edgecv/pi-hall/latest", "edgecv/pi-kitchen/cmd/reload",
                  "edgecv/pi-kitchen/model/push/t1/0", "edgecv/groups/kitchen/model/push/t1/0",
                  "homeassistant/sensor/pi-hall/fps/config", "homeassistant/status", "edgecv/pi-kitchen/other")
        for topic in denied:
            assert not dev.publish(topic), f"{topic} should be refused"
        assert ws.collect(0.5) == []  # and none of them reached anyone
    finally:
        dev.close()


def test_only_the_workstation_sends_commands_and_pushes(fleet: FleetBroker, ws: Probe) -> None:
    kitchen, hall = login(fleet, "pi-kitchen"), login(fleet, "pi-hall")
    try:
        assert kitchen.subscribe("edgecv/pi-kitchen/cmd/+") and kitchen.subscribe("edgecv/pi-kitchen/model/push/#")
        # Mosquitto grants any SUBACK; the ACL filters at delivery: even these filters must receive nothing.
        hall.subscribe("edgecv/pi-kitchen/cmd/+")
        hall.subscribe("edgecv/#")
        assert ws.publish("edgecv/pi-kitchen/cmd/ping", b'{"id":"1"}')
        assert ws.publish("edgecv/pi-kitchen/model/push/t9/0", b"chunk")
        got = kitchen.collect(3, n=2)
        assert [m.topic for m in got] == ["edgecv/pi-kitchen/cmd/ping", "edgecv/pi-kitchen/model/push/t9/0"]
        assert not hall.publish("edgecv/pi-kitchen/cmd/reload")  # a device cannot command another
        assert kitchen.collect(0.5) == []
        assert [m.topic for m in hall.collect(0.5)] == []
    finally:
        kitchen.close()
        hall.close()


def test_the_announce_request_reaches_every_device_from_the_workstation_only(fleet: FleetBroker, ws: Probe) -> None:
    kitchen, hall = login(fleet, "pi-kitchen"), login(fleet, "pi-hall")
    try:
        assert kitchen.subscribe("edgecv/announce") and hall.subscribe("edgecv/announce")
        assert ws.publish("edgecv/announce", b'{"id":"a1"}')
        assert [m.payload for m in kitchen.collect(3, n=1)] == [b'{"id":"a1"}']
        assert [m.payload for m in hall.collect(3, n=1)] == [b'{"id":"a1"}']
        assert not kitchen.publish("edgecv/announce")  # a device cannot make the fleet answer
        assert hall.collect(0.5) == []
    finally:
        kitchen.close()
        hall.close()


def test_devices_listing_works_for_a_user_that_may_not_announce(fleet: FleetBroker) -> None:
    """The announce request is best effort: Home Assistant's user may not publish it (PUBACK "not authorized"),
    and `discover` still lists the fleet from the retained status."""
    from edgecv.tools.fleet.devices import discover, request_announce
    from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient

    dev = login(fleet, "pi-garage")
    try:
        assert dev.publish("edgecv/pi-garage/status", b'{"state": "online", "groups": ["garage"]}', retain=True)
        opts = ClientOptions(port=fleet.port_for("homeassistant"), ca_file=str(fleet.ca_file), username="homeassistant",
                             password=PASSWORD.format("homeassistant"))
        with MqttClient(opts) as ha:
            assert request_announce(ha, "edgecv") is False  # refused, and said so
        infos = discover(opts, wait=0.5)
        assert infos["pi-garage"].state == "online" and infos["pi-garage"].groups == ("garage",)
    finally:
        dev.publish("edgecv/pi-garage/status", b"", retain=True)  # clear the retained status
        dev.close()


def test_group_pushes_reach_members_only(fleet: FleetBroker, ws: Probe) -> None:
    kitchen, hall, garage = (login(fleet, u) for u in ("pi-kitchen", "pi-hall", "pi-garage"))
    try:
        assert kitchen.subscribe("edgecv/groups/kitchen/model/push/#")
        assert kitchen.subscribe("edgecv/groups/ground-floor/model/push/#")
        assert hall.subscribe("edgecv/groups/ground-floor/model/push/#")
        hall.subscribe("edgecv/groups/kitchen/model/push/#")  # granted, but the ACL filters delivery
        garage.subscribe("edgecv/groups/ground-floor/model/push/#")
        garage.subscribe("edgecv/groups/#")
        assert ws.publish("edgecv/groups/kitchen/model/push/t2/0", b"k")
        assert ws.publish("edgecv/groups/ground-floor/model/push/t3/0", b"g")
        assert sorted(m.payload for m in kitchen.collect(3, n=2)) == [b"g", b"k"]
        assert [m.payload for m in hall.collect(3, n=1)] == [b"g"]
        assert hall.collect(0.3) == [] and garage.collect(0.3) == []
    finally:
        for p in (kitchen, hall, garage):
            p.close()


def test_home_assistant_reads_the_fleet_and_cannot_command(fleet: FleetBroker) -> None:
    ha, dev = login(fleet, "homeassistant"), login(fleet, "pi-garage")
    try:
        for flt in ("edgecv/+/predictions", "edgecv/+/state/#", "edgecv/+/latest/#", "homeassistant/sensor/#"):
            assert ha.subscribe(flt), flt
        assert dev.subscribe("homeassistant/status")
        # What Home Assistant's entities read: predictions, a region's stable state, the rate-limited latest.
        published = ["edgecv/pi-garage/predictions", "edgecv/pi-garage/state/cam/door", "edgecv/pi-garage/latest",
                     "edgecv/pi-garage/latest/cam/door"]
        for topic in published:
            assert dev.publish(topic, b"p"), topic
        assert dev.publish("homeassistant/sensor/pi-garage/top_label/config", b"{}", retain=True)
        assert sorted(m.topic for m in ha.collect(3, n=5)) == sorted(
            [*published, "homeassistant/sensor/pi-garage/top_label/config"])
        assert ha.publish("homeassistant/status", b"online")  # the birth message reaches devices
        assert [m.payload for m in dev.collect(3, n=1)] == [b"online"]
        assert not ha.publish("edgecv/pi-garage/cmd/reload")
        assert not ha.publish("edgecv/groups/kitchen/model/push/t/0")
    finally:
        ha.close()
        dev.close()



def test_a_device_copying_another_devices_client_id_cannot_kick_it_off(fleet: FleetBroker, ws: Probe) -> None:
    """Session takeover: an MQTT client that connects with a client id already in use disconnects its holder. On
    the device listener the broker replaces every client id by the username, so pi-hall connecting with
    pi-kitchen's client id (or with the client id "pi-kitchen") stays pi-hall, and pi-kitchen keeps its session:
    it still receives its commands afterwards."""
    victim = login(fleet, "pi-kitchen", client_id="edgecv-pi-kitchen-1a2b3c")
    impostors: list[Probe] = []
    try:
        assert victim.subscribe("edgecv/pi-kitchen/cmd/+")
        for copied in ("edgecv-pi-kitchen-1a2b3c", "pi-kitchen"):
            impostors.append(login(fleet, "pi-hall", client_id=copied))
        assert ws.publish("edgecv/pi-kitchen/cmd/ping", b'{"id":"after-impostors"}')
        assert [m.payload for m in victim.collect(5, n=1)] == [b'{"id":"after-impostors"}']
        assert victim.client.is_connected()
    finally:
        for p in (victim, *impostors):
            p.close()


def test_devices_cannot_log_in_where_client_ids_are_free(fleet: FleetBroker) -> None:
    with pytest.raises(PermissionError):  # the TLS operator listener: device passwords are not valid there
        login(fleet, "pi-kitchen", port=fleet.ops_port)
    with pytest.raises(PermissionError):  # nor on the local one
        Probe(fleet.port, username="pi-kitchen", password=PASSWORD.format("pi-kitchen"))
    Probe(fleet.port, username="workstation", password=PASSWORD.format("workstation")).close()


def test_without_the_forced_client_id_a_copy_would_kick_the_holder_off(fleet: FleetBroker) -> None:
    """The control that shows the takeover test above can fail: on the operator listener (client ids as given),
    a second client with the same client id disconnects the first one."""
    first = login(fleet, "workstation", client_id="edgecv-tool-shared")
    try:
        second = login(fleet, "homeassistant", client_id="edgecv-tool-shared")
        assert wait_until(lambda: not first.client.is_connected(), 10), "the first client was not taken over"
        second.close()
    finally:
        first.close()
