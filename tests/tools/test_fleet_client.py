"""The tools' MQTT client against a scripted MQTT 3.1.1 server: which connection refusals it tries again.

The server answers each CONNECT with the next scripted outcome: "drop" closes the connection without a CONNACK
(what NATS's MQTT gateway does while its JetStream lookups time out), a number is the CONNACK return code
(0 accepted, 3 server unavailable, 5 not authorized). Accepted connections stay open until the client leaves.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from edgecv.tools.errors import FleetError
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient


class ScriptedServer:
    def __init__(self, outcomes: list[str | int]) -> None:
        self.outcomes = list(outcomes)
        self.connects = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.settimeout(10)
            try:
                header = conn.recv(2)  # CONNECT fixed header: type, remaining length (< 128 here)
                if not header or header[0] != 0x10:
                    conn.close()
                    continue
                _ = conn.recv(header[1])
            except OSError:
                conn.close()
                continue
            self.connects += 1
            outcome = self.outcomes.pop(0) if self.outcomes else 0
            if outcome == "drop":
                conn.close()
                continue
            conn.sendall(bytes([0x20, 0x02, 0x00, int(outcome)]))
            if outcome == 0:
                self._open.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        self._sock.close()
        for conn in self._open:
            conn.close()


Serve = Callable[[list[str | int]], ScriptedServer]


@pytest.fixture
def server() -> Iterator[Serve]:
    servers: list[ScriptedServer] = []

    def make(outcomes: list[str | int]) -> ScriptedServer:
        s = ScriptedServer(outcomes)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def client(port: int) -> MqttClient:
    return MqttClient(ClientOptions(host="127.0.0.1", port=port, protocol="3.1.1"))


def test_a_connection_dropped_before_connack_or_server_unavailable_is_tried_again(server: Serve) -> None:
    s = server(["drop", 3, 0])
    c = client(s.port).connect(timeout=20)
    try:
        assert c.connected and s.connects == 3
    finally:
        c.close()


def test_three_transient_refusals_in_a_row_fail_with_the_reason(server: Serve) -> None:
    s = server([3, 3, 3, 0])
    with pytest.raises(FleetError, match="refused or dropped the connection: Server unavailable"):
        client(s.port).connect(timeout=20)
    assert s.connects == 3


def test_a_refusal_that_will_not_pass_fails_at_once(server: Serve) -> None:
    s = server([5, 0])
    with pytest.raises(FleetError, match="Not authorized"):
        client(s.port).connect(timeout=20)
    assert s.connects == 1
