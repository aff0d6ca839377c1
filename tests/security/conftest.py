"""The hostile-peer harness: real `edgecv-agent run` processes on a real broker, driven by a peer that writes the
device's push and command topics, with memory and file-system checks after every hostile input.

One agent per input class (`Target`), shared by that class's cases. After each case the suite asserts: the agent
is alive, a final state or result was published, the old model still publishes predictions, the peak RSS (VmHWM,
reset through /proc/<pid>/clear_refs before the case) stayed within BUDGET_MB of the RSS before it, and nothing was
written outside the model store (canary paths absent, the agent's directory and the store's layout unchanged).
Measurements go to `runs/security/hostile-peers.json` (or $EDGECV_SECURITY_REPORT), summarised per class for
docs/SECURITY.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from edgecv.agent.contract.grants import DowngradeGrant
from edgecv.agent.contract.signing import generate_private_key, public_key_pem
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received
from edgecv.tools.fleet.push import DeviceResult, Pusher
from tests.broker import Broker
from tests.bundle_factory import make_archive
from tests.e2e.conftest import REPO, agent_command, merge, to_toml, wait_until

BUDGET_MB = 64.0
STORE_ENTRIES = {"versions", "current", "previous", "staging", "transfers"}
SEED_VERSION = "5.0.0"

# Property-based fuzzing: a short run in CI, a long one with EDGECV_SLOW=1.
settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=5_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("slow" if os.environ.get("EDGECV_SLOW") == "1" else "ci")


@dataclass
class Kit:
    """Keys, the seed bundle and a scratch directory shared by all cases."""

    key: Any
    ring: Path
    work: Path
    seed: Path
    canary: Path  # a directory outside every store: hostile archives aim here; it must stay empty

    def archive(self, version: str, **kwargs: Any) -> bytes:
        """A validly signed tiny bundle archive."""
        return make_archive(self.work / f"a-{version}-{time.monotonic_ns()}", version, key=self.key,
                            **kwargs).read_bytes()


@pytest.fixture(scope="session")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    work = tmp_path_factory.mktemp("hostile")
    key = generate_private_key()
    ring = work / "ring"
    ring.mkdir()
    (ring / "ws.pub").write_bytes(public_key_pem(key.public_key()))
    canary = work / "canary"
    canary.mkdir()
    seed = make_archive(work / "seed", SEED_VERSION, top1=1, key=key)
    return Kit(key=key, ring=ring, work=work, seed=seed, canary=canary)


@dataclass
class Target:
    """One agent process under attack, and a peer client that sees everything the device publishes."""

    name: str
    broker: Broker
    workdir: Path
    proc: subprocess.Popen[bytes]
    device: str
    expected_version: str
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: MqttClient | None = None
    baseline: set[str] = field(default_factory=set)

    @property
    def base(self) -> str:
        return f"edgecv/{self.device}"

    @property
    def store(self) -> Path:
        return self.workdir / "models"

    def connect(self) -> None:
        self.client = MqttClient(ClientOptions(host=self.broker.host, port=self.broker.port)).connect()
        self.client.subscribe(f"{self.base}/#", callback=self._on)

    def _on(self, msg: Received) -> None:
        with self.lock:
            self.messages.append(msg)

    def mark(self) -> int:
        with self.lock:
            return len(self.messages)

    def since(self, mark: int, suffix: str | None = None) -> list[Received]:
        with self.lock:
            msgs = self.messages[mark:]
        return [m for m in msgs if suffix is None or m.topic.endswith(suffix)]

    def wait(self, mark: int, predicate: Callable[[Received], bool], timeout: float = 30.0) -> Received:
        found: list[Received] = []

        def look() -> bool:
            found[:] = [m for m in self.since(mark) if predicate(m)]
            return bool(found)

        if not wait_until(look, timeout):
            raise AssertionError(f"{self.name}: no matching message within {timeout:g} s; last: "
                                 f"{[(m.topic, m.payload[:120]) for m in self.since(mark)[-5:]]}\n{self.log()[-2000:]}")
        return found[0]

    def state_after(self, mark: int, states: tuple[str, ...], transfer: str | object | None = ...,
                    timeout: float = 30.0) -> dict[str, Any]:
        """The first model/state in `states` published after `mark` (for `transfer`, when given)."""
        def ok(m: Received) -> bool:
            if not m.topic.endswith("/model/state"):
                return False
            doc = json.loads(m.payload)
            return doc.get("state") in states and (transfer is ... or doc.get("transfer") == transfer)

        return json.loads(self.wait(mark, ok, timeout).payload)  # type: ignore[no-any-return]

    def publish(self, topic: str, payload: bytes) -> None:
        assert self.client is not None
        self.client.publish(topic, payload, qos=1)

    def push(self, archive: bytes, version: str = "9.9.9", *, allow_downgrade: bool = False,
             grant: Callable[[str], DowngradeGrant] | None = None,
             timeout: float = 60.0) -> tuple[Pusher, DeviceResult]:
        """A well-formed push (the real protocol) of `archive` bytes, whatever they hold; `grant(sha256)` is the
        downgrade grant its begin carries (forged or not)."""
        pusher = Pusher(ClientOptions(host=self.broker.host, port=self.broker.port), archive, "hostile", version,
                        timeout=timeout, allow_downgrade=allow_downgrade or grant is not None)
        if grant is not None:
            pusher.grant_key = generate_private_key()  # never used: the grant below is what is sent
            pusher._grants[self.device] = grant(pusher.begin.sha256)
        [result] = pusher.push([self.device])
        return pusher, result

    def predictions_continue(self, n: int = 2, timeout: float = 30.0) -> None:
        """`n` new predictions, all from the expected (old) model."""
        mark = self.mark()

        def enough() -> bool:
            return len(self.since(mark, "/predictions")) >= n

        assert wait_until(enough, timeout), f"{self.name}: predictions stopped\n{self.log()[-2000:]}"
        versions = set()
        for m in self.since(mark, "/predictions"):
            doc = json.loads(m.payload)
            for p in doc if isinstance(doc, list) else [doc]:
                versions.add(p["model"]["version"])
        assert versions == {self.expected_version}, versions

    # ------------------------------------------------------------------------------- process checks
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return (self.workdir / "agent.log").read_text(errors="replace")

    def reset_peak(self) -> float:
        """Reset VmHWM to the current RSS; return that RSS (MB)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return self._status_mb("VmRSS")

    def peak_mb(self) -> float:
        return self._status_mb("VmHWM")

    def _status_mb(self, key: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"{key} not in /proc/{self.proc.pid}/status")

    def outside_store(self) -> set[str]:
        """Every path under the agent's directory outside the store (the log grows; it is ignored)."""
        out = set()
        for path in self.workdir.rglob("*"):
            rel = path.relative_to(self.workdir)
            if rel.parts[0] != "models" and rel.name != "agent.log":
                out.add(str(rel))
        return out

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Targets:
    """Agents started on first use, one per input class, stopped at the end of the session."""

    def __init__(self, broker: Broker, kit: Kit, root: Path) -> None:
        self.broker, self.kit, self.root = broker, kit, root
        self.running: dict[str, Target] = {}

    def get(self, name: str, config: dict[str, Any] | None = None) -> Target:
        if name not in self.running:
            self.running[name] = self._start(name, config or {})
        target = self.running[name]
        assert target.alive(), f"agent {name} died earlier:\n{target.log()[-3000:]}"
        return target

    def _start(self, name: str, overrides: dict[str, Any]) -> Target:
        work = self.root / name
        work.mkdir()
        device = f"hostile-{name}-{os.getpid()}"
        cfg = merge({
            "device_id": device, "prefix": "edgecv", "log_level": "info",
            "broker": {"host": self.broker.host, "port": self.broker.port, "reconnect_min_s": 0.1,
                       "reconnect_max_s": 1.0, "keepalive": 5},
            "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 20.0}],
            "model": {"store": str(work / "models"), "bundle": str(self.kit.seed)},
            "security": {"keyring": str(self.kit.ring), "allow_unsigned": False},
            "update": {"probation_s": 0.0},
            "health": {"interval_s": 5.0},
            "homeassistant": {"enabled": False},
        }, overrides)
        (work / "agent.toml").write_text(to_toml(cfg))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        proc = subprocess.Popen([*agent_command(), "run", "--config", str(work / "agent.toml")],
                                stdout=subprocess.DEVNULL, stderr=open(work / "agent.log", "wb"), env=env, cwd=work)
        target = Target(name=name, broker=self.broker, workdir=work, proc=proc, device=device,
                        expected_version=SEED_VERSION)
        target.connect()
        target.predictions_continue(3, timeout=60)
        target.baseline = target.outside_store()
        return target

    def stop(self) -> None:
        for target in self.running.values():
            target.stop()


@pytest.fixture(scope="session")
def targets(tmp_path_factory: pytest.TempPathFactory, kit: Kit) -> Iterator[Targets]:
    broker = Broker(tmp_path_factory.mktemp("hostile-broker"),
                    extra_conf="message_size_limit 4194304\n").start()  # room for the oversized-chunk cases
    t = Targets(broker, kit, tmp_path_factory.mktemp("agents"))
    yield t
    t.stop()
    broker.stop()


# --------------------------------------------------------------------------------------------- measurements
@dataclass
class Record:
    cls: str
    case: str
    outcome: str
    peak_delta_mb: float
    rss_mb: float
    seconds: float


class Report:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def add(self, record: Record) -> None:
        self.records.append(record)

    def summary(self) -> dict[str, Any]:
        classes: dict[str, dict[str, Any]] = {}
        for r in self.records:
            c = classes.setdefault(r.cls, {"count": 0, "max_peak_delta_mb": 0.0, "max_rss_mb": 0.0, "seconds": 0.0,
                                           "outcomes": {}})
            c["count"] += 1
            c["max_peak_delta_mb"] = round(max(c["max_peak_delta_mb"], r.peak_delta_mb), 1)
            c["max_rss_mb"] = round(max(c["max_rss_mb"], r.rss_mb + r.peak_delta_mb), 1)
            c["seconds"] = round(c["seconds"] + r.seconds, 1)
            kind = r.outcome.split(":", 1)[0]
            c["outcomes"][kind] = c["outcomes"].get(kind, 0) + 1
        return classes

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count()},
               "budget_mb": BUDGET_MB, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "classes": self.summary(), "cases": [r.__dict__ for r in self.records]}
        path.write_text(json.dumps(doc, indent=2) + "\n")


@pytest.fixture(scope="session")
def report() -> Iterator[Report]:
    rep = Report()
    yield rep
    if rep.records:
        out = Path(os.environ.get("EDGECV_SECURITY_REPORT") or REPO / "runs" / "security" / "hostile-peers.json")
        rep.write(out)
