"""Real MQTT brokers for tests, each a process of its own on private ports that can be stopped and restarted.

    Broker(workdir)           Mosquitto: MQTT 5 and 3.1.1 (the default broker of every test)
    NatsBroker(workdir)       nats-server with JetStream and its MQTT gateway: MQTT 3.1.1 only
    NatsCluster(workdir, 3)   that many nats-servers joined by routes, JetStream clustered, MQTT on each node
    RabbitBroker(workdir)     a private RabbitMQ node (never the machine's own) with its MQTT plugin: MQTT 3.1.1

All share `BrokerProcess`: `host`, `port` (the MQTT listener), `kind`, `protocols` (the MQTT versions it speaks),
`address` ("host:port"), `start()` (returns once an MQTT client can connect) and `stop(kill=False)`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mqtt311_connack(host: str, port: int, timeout: float) -> int | None:
    """Send an MQTT 3.1.1 CONNECT (clean session) and return the CONNACK return code (0 = accepted), or None when
    no CONNACK arrives within `timeout`. Disconnects cleanly after an accepted CONNECT."""
    client_id = f"ready-{uuid.uuid4().hex[:8]}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(bytes([0x10, len(body)]) + body)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return None
                reply += chunk
            if reply[0] != 0x20:
                return None
            if reply[3] == 0:
                sock.sendall(b"\xe0\x00")  # DISCONNECT: no Will, no error in the broker's log
            return reply[3]
    except OSError:
        return None


class BrokerProcess:
    """One broker process on a private port. Subclasses give the command line and may refine `ready()`."""

    kind = ""
    protocols: tuple[str, ...] = ("5", "3.1.1")
    start_timeout_s = 10.0

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.kind or 'broker'}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> Mapping[str, str] | None:
        return None

    def ready(self) -> bool:
        """True once the MQTT listener accepts TCP connections."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready (a cluster starts all its nodes first)."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.environment(), start_new_session=True)

    def wait_ready(self, timeout: float | None = None) -> Self:
        timeout = self.start_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} on port {self.port} was not ready within {timeout:g} s; log:\n"
                           f"{self.log_tail()}")

    def start(self) -> Self:
        self.spawn()
        return self.wait_ready()

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Broker(BrokerProcess):
    """A real mosquitto process on a private port; can be stopped and restarted on the same port."""

    kind = "mosquitto"

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "") -> None:
        super().__init__(workdir, port)
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             f"max_queued_messages 100000\nset_tcp_nodelay true\n{extra_conf}")

    def command(self) -> list[str]:
        return [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.conf)]


def nats_server() -> str | None:
    return shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)


class NatsBroker(BrokerProcess):
    """nats-server with JetStream (its MQTT gateway keeps sessions and retained messages there) and MQTT 3.1.1 on
    `port`. The JetStream store lives in the workdir, so retained messages survive a restart. Ready once an MQTT
    CONNECT is accepted: the first one creates the gateway's JetStream streams (seconds in a cluster)."""

    kind = "nats"
    protocols = ("3.1.1",)

    def __init__(self, workdir: Path, port: int | None = None, *, name: str | None = None,
                 cluster: str = "") -> None:
        super().__init__(workdir, port)
        self.client_port = free_port()  # NATS's own protocol; never the machine's 4222
        self.name = name or f"nats-{self.port}"
        self.conf = workdir / f"{self.name}.conf"
        self.cluster = cluster
        self._write_conf()

    def _write_conf(self) -> None:
        store = self.workdir / f"{self.name}-jetstream"
        self.conf.write_text(f"server_name: {self.name}\nlisten: 127.0.0.1:{self.client_port}\n"
                             f'jetstream {{ store_dir: "{store}" }}\n'
                             f"mqtt {{ listen: 127.0.0.1:{self.port} }}\n{self.cluster}")

    def command(self) -> list[str]:
        exe = nats_server()
        if exe is None:
            raise RuntimeError("nats-server is not installed (Debian package nats-server; scripts/setup.sh)")
        return [exe, "-c", str(self.conf)]

    def ready(self) -> bool:
        return mqtt311_connack(self.host, self.port, timeout=5.0) == 0


class NatsCluster:
    """`size` nats-servers joined by routes into one cluster: JetStream clustered (so the MQTT gateway replicates
    sessions and retained messages to min(size, 3) nodes), a unique `server_name` each, MQTT on every node."""

    def __init__(self, workdir: Path, size: int = 3, name: str = "edgecv") -> None:
        route_ports = [free_port() for _ in range(size)]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
        self.nodes = [NatsBroker(workdir / f"n{i}", name=f"n{i}",
                                 cluster=f"cluster {{ name: {name}, listen: 127.0.0.1:{route_ports[i]}, "
                                         f"routes: [{routes}] }}\n")
                      for i in range(size)]

    def start(self, timeout: float = 60.0) -> NatsCluster:
        for node in self.nodes:
            node.spawn()
        for node in self.nodes:  # electing the JetStream meta leader and creating the R3 streams takes seconds
            node.wait_ready(timeout)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def rabbitmq_server() -> str | None:
    exe = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    return str(exe) if exe.exists() else None


class RabbitBroker(BrokerProcess):
    """A private RabbitMQ node (own node name, Erlang cookie, data and log directories, ports) with the
    rabbitmq_mqtt plugin enabled for it alone: the machine's own RabbitMQ, if any, is left untouched. MQTT 3.1.1;
    anonymous logins as guest. Starting a node takes ~10-20 s."""

    kind = "rabbitmq"
    protocols = ("3.1.1",)
    start_timeout_s = 120.0

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.node = f"edgecv-test-{os.getpid()}-{self.port}@localhost"
        self.amqp_port, self.dist_port = free_port(), free_port()
        (workdir / "home").mkdir(exist_ok=True)
        (workdir / "rabbitmq-env.conf").write_text("")  # never read /etc/rabbitmq/rabbitmq-env.conf
        (workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\nmqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\nloopback_users = none\n")
        (workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")

    def command(self) -> list[str]:
        exe = rabbitmq_server()
        if exe is None:
            raise RuntimeError("rabbitmq-server is not installed (Debian package rabbitmq-server)")
        return [exe]

    def environment(self) -> Mapping[str, str]:
        w = self.workdir
        return {**os.environ, "HOME": str(w / "home"), "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(w / "mnesia"), "RABBITMQ_LOG_BASE": str(w / "log"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(w / "plugins"), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"}

    def ready(self) -> bool:
        return mqtt311_connack(self.host, self.port, timeout=5.0) == 0

    def stop(self, kill: bool = False) -> None:
        # The start script runs the Erlang VM as a child: signal the whole process group (its own session).
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=60)
        super().stop()
