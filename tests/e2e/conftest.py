"""End-to-end fixtures: real `edgecv-agent run` processes with a temp config, a real bundle and a real broker.

    def test_x(start_agent, shared_broker):
        agent = start_agent({"publish": {"qos": 1}}, broker=shared_broker)
        ... agent.proc, agent.config_path, agent.topics, agent.device, agent.log() ...
        assert agent.stop() == 0          # SIGTERM, wait, return code
        agent.kill()                      # SIGKILL

`fashion_bundle` is the shipped default bundle `models/fashion-mnist/` when it exists, otherwise a small linear
Fashion-MNIST classifier built here (ridge regression, fp32 ONNX made with the onnx helper API, ~80 % test
accuracy recorded in its manifest metrics), so the agent tests do not wait for the training pipeline.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecv.agent.contract.topics import DeviceTopics, decode
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received
from tests.broker import Broker, BrokerProcess, nats_server
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = REPO / "models" / "fashion-mnist"
_ids = itertools.count()


# ------------------------------------------------------------------------------------------------- bundle
def build_linear_fashion_bundle(out_dir: Path, train_limit: int = 20000) -> Path:
    """A real (if simple) Fashion-MNIST bundle: ridge-regression logits as one fp32 ONNX Gemm."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgecv.agent.contract.bundle import InputSpec
    from edgecv.agent.vision.synthetic import FASHION_MNIST_LABELS, load_fashion_mnist
    from edgecv.tools.bundler import build_bundle

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    x = train_x[:train_limit].reshape(train_limit, -1).astype(np.float32) / 255.0
    x = np.hstack([x, np.ones((train_limit, 1), np.float32)])
    y = np.eye(10, dtype=np.float32)[train_y[:train_limit]]
    wb = np.linalg.solve(x.T @ x + 10.0 * np.eye(x.shape[1], dtype=np.float32), x.T @ y).astype(np.float32)
    weights, bias = wb[:-1], wb[-1]

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "B"], ["logits"])],
        "linear-fashion",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    work = out_dir.parent / f"{out_dir.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "model.fp32.onnx"
    onnx.save(model, str(fp32))

    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    test_in = (test_x.astype(np.float32) / 255.0)[:, None]
    pred = session.run(None, {"input": test_in})[0].argmax(1)
    accuracy = float((pred == test_y).mean())
    spec = InputSpec(width=28, height=28, channels=1, color="GRAY", layout="NCHW")
    frames = test_x[:16, :, :, None].copy()
    build_bundle(out_dir, name="fashion-linear", version="1.0.0", labels=FASHION_MNIST_LABELS, spec=spec,
                 artifacts=[(fp32, "onnx", "fp32")], selftest_frames=frames,
                 selftest_expected=[int(i) for i in pred[:16]],
                 metrics={"dataset": "fashion-mnist", "test_images": len(test_y), "accuracy_fp32": accuracy,
                          "accuracy_fp32_onnx": accuracy},
                 description="Linear Fashion-MNIST classifier for the agent's end-to-end tests")
    return out_dir


def recorded_accuracy(bundle_dir: Path, engine: Mapping[str, Any]) -> float:
    """The test accuracy the bundle's manifest records for the artifact the agent actually ran."""
    import json

    metrics = json.loads((bundle_dir / "manifest.json").read_text())["metrics"]
    fmt = "onnx" if engine.get("format") == "onnx" or engine.get("runtime") == "onnxruntime" else "tflite"
    precision = engine.get("precision", "int8")
    for key in (f"accuracy_{precision}_{fmt}", f"accuracy_{precision}"):
        if isinstance(metrics.get(key), int | float):
            return float(metrics[key])
    raise AssertionError(f"Bundle {bundle_dir} records no accuracy for {precision} {fmt}: {sorted(metrics)}")


@pytest.fixture(scope="session")
def fashion_bundle(fashion_mnist_dir: Path) -> Path:
    """The shipped default bundle: the agent tests run the model users get."""
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        pytest.fail(f"The shipped default bundle {DEFAULT_BUNDLE} is missing; rebuild it (models/README.md)")
    return DEFAULT_BUNDLE


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """(private key, keyring directory holding only its public key): sign bundles with the key, give agents the
    keyring."""
    from edgecv.agent.contract.signing import generate_private_key, write_keypair

    work = tmp_path_factory.mktemp("keys")
    key = generate_private_key()
    write_keypair(key, work / "ring" / "ws.key")
    (work / "ring" / "ws.key").unlink()  # the keyring holds only the public key
    return key, work / "ring"


# -------------------------------------------------------------------------------------------------- agent
def to_toml(doc: Mapping[str, Any]) -> str:
    """Enough TOML for agent configs: scalars, lists of scalars, tables, arrays of tables."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines: list[str] = []

    def table(prefix: str, body: Mapping[str, Any], header: str | None) -> None:
        if header:
            lines.append(header)
        nested = []
        for key, value in body.items():
            is_tables = isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value)
            if isinstance(value, Mapping) or is_tables:
                nested.append((key, value))
            else:
                lines.append(f"{key} = {scalar(value)}")
        for key, value in nested:
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                table(f"{name}.", value, f"[{name}]")
            else:
                for item in value:
                    table(f"{name}.", item, f"[[{name}]]")

    table("", doc, None)
    return "\n".join(lines) + "\n"


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def agent_command() -> list[str]:
    exe = Path(sys.executable).parent / "edgecv-agent"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edgecv.agent.cli"]


@dataclass
class AgentHandle:
    proc: subprocess.Popen[bytes]
    config_path: Path
    config: dict[str, Any]
    log_path: Path
    workdir: Path
    env: Mapping[str, str] | None = None
    args: tuple[str, ...] = ()
    topics: DeviceTopics = field(init=False)

    def __post_init__(self) -> None:
        self.topics = DeviceTopics(self.config["prefix"], self.config["device_id"])

    @property
    def device(self) -> str:
        return str(self.config["device_id"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code (kills and fails the test if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                log = self.log()
                raise AssertionError(f"Agent did not exit within {timeout:g} s of SIGTERM; log:\n{log}") from None
        return int(self.proc.returncode)

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return int(self.proc.returncode)

    def wait_exit(self, timeout: float) -> int:
        return int(self.proc.wait(timeout))

    def restart(self) -> None:
        """Start the same config again (after a kill or stop), appending to the same log."""
        if self.proc.poll() is None:
            raise AssertionError("restart() needs the agent to have exited; stop() or kill() it first")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([*agent_command(), "run", "--config", str(self.config_path), *self.args],
                                         stdout=subprocess.DEVNULL, stderr=log, env=self.env, cwd=self.workdir)


StartAgent = Callable[..., AgentHandle]


class AgentLauncher:
    """Starts `edgecv-agent run` processes under `workdir` and kills them all on `close()`: the `start_agent`
    fixture (one test) and module-scoped fleets (tests/e2e/test_broker_matrix.py) share it."""

    def __init__(self, workdir: Path, bundle: Path) -> None:
        self.workdir = workdir
        self.bundle = bundle
        self.handles: list[AgentHandle] = []

    def start(self, config_overrides: Mapping[str, Any] | None = None, *, broker: BrokerProcess | None = None,
              bundle: Path | None = None, env: Mapping[str, str] | None = None,
              args: tuple[str, ...] = ()) -> AgentHandle:
        n = next(_ids)
        work = self.workdir / f"agent{n}"
        work.mkdir()
        base: dict[str, Any] = {
            "device_id": f"e2e-{os.getpid()}-{n}", "prefix": "edgecv", "log_level": "info",
            "broker": {"host": broker.host if broker else "127.0.0.1", "port": broker.port if broker else 1883,
                       "reconnect_min_s": 0.1, "reconnect_max_s": 1.0, "keepalive": 5},
            "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 20.0}],
            "model": {"store": str(work / "models"), "bundle": str(bundle or self.bundle)},
            "security": {"allow_unsigned": True},
            "health": {"interval_s": 1.0},
            "homeassistant": {"enabled": False},
        }
        config = merge(base, config_overrides or {})
        config_path = work / "agent.toml"
        config_path.write_text(to_toml(config))
        log_path = work / "agent.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        full_env.pop("NOTIFY_SOCKET", None)  # never the runner's own; a test may pass one in `env`
        full_env.update(env or {})
        proc = subprocess.Popen([*agent_command(), "run", "--config", str(config_path), *args],
                                stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), env=full_env, cwd=work)
        handle = AgentHandle(proc, config_path, config, log_path, work, env=full_env, args=args)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        for handle in self.handles:
            handle.kill()


@pytest.fixture
def start_agent(tmp_path: Path, fashion_bundle: Path) -> Iterator[StartAgent]:
    """Factory: start_agent(config_overrides, *, broker=None, bundle=None, env=None, args=()) -> AgentHandle.

    The base config: unique device_id, the given broker, one synthetic:fashion-mnist camera at 20 fps, a fresh
    model store seeded with `bundle` (default: the fashion bundle), unsigned bundles allowed, health every 1 s,
    fast reconnects, Home Assistant discovery off. `config_overrides` is merged in (tables deeply; `camera`
    replaces the list).
    """
    launcher = AgentLauncher(tmp_path, fashion_bundle)
    yield launcher.start
    launcher.close()



def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None or Path("/usr/sbin/mosquitto").exists()


def persistent_broker(workdir: Path) -> Broker:
    """A broker that keeps sessions across a SIGKILL (autosave every second): a subscriber whose session predates
    the kill receives what is published right after the restart, however fast the publisher reconnects."""
    import getpass

    return Broker(workdir, extra_conf=f"persistence true\npersistence_location {workdir}/\nautosave_interval 1\n"
                                      f"user {getpass.getuser()}\n")


def durable_subscriber(broker: Broker, filters: list[str], client_id: str) -> Any:
    """A subscriber with a persistent session (clean_start false, 1 h expiry) on `filters`."""
    client = MqttClient(ClientOptions(host=broker.host, port=broker.port, client_id=client_id, clean_start=False,
                                      session_expiry_s=3600)).connect()
    for flt in filters:
        client.subscribe(flt)
    return client


def wait_for_autosave(workdir: Path, since: float, timeout: float = 6.0) -> None:
    """Wait until a persistent_broker wrote its database after `since` (epoch s), so a session created before
    `since` survives a SIGKILL."""
    db = workdir / "mosquitto.db"
    if not wait_until(lambda: db.exists() and db.stat().st_mtime > since, timeout):
        raise AssertionError(f"mosquitto did not autosave {db} within {timeout:g} s")


# ------------------------------------------------------------------------------------------ broker matrix
@dataclass
class Target:
    """A running broker and the MQTT version every client of this target speaks."""

    name: str
    broker: BrokerProcess
    protocol: str

    def client(self, *filters: str) -> MqttClient:
        client = MqttClient(ClientOptions(host=self.broker.host, port=self.broker.port,
                                          protocol=self.protocol)).connect()
        for flt in filters:
            client.subscribe(flt)
        return client

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `edgecv ARGS --broker ... --protocol ...`."""
        return subprocess.run([*edgecv_command(), *args, "--broker", self.broker.address, "--protocol", self.protocol],
                              capture_output=True, text=True, timeout=timeout)


def edgecv_command() -> list[str]:
    exe = Path(sys.executable).parent / "edgecv"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edgecv.tools.cli"]


def require_nats() -> None:
    if nats_server() is None:
        pytest.fail("nats-server is not installed: the broker matrix needs it (scripts/setup.sh installs it)")


def collect(client: MqttClient, until: Callable[[list[Received]], bool], timeout: float,
            agent: AgentHandle | None = None) -> list[Received]:
    """Messages until `until(messages)` holds; fails with the agent's log on timeout."""
    out: list[Received] = []
    deadline = time.monotonic() + timeout
    while not until(out):
        left = deadline - time.monotonic()
        if left <= 0:
            log = agent.log()[-3000:] if agent else ""
            raise AssertionError(f"Timed out after {timeout:g} s with {len(out)} messages: "
                                 f"{[(m.topic, m.payload[:80], m.retain) for m in out[-5:]]}; agent log:\n{log}")
        msg = client.get(min(left, 0.2))
        if msg is not None:
            out.append(msg)
    return out


def docs_of(msgs: list[Received], topic: str, retained: bool | None = None) -> list[dict[str, Any]]:
    return [decode(m.payload) for m in msgs if m.topic == topic and m.payload
            and (retained is None or m.retain == retained)]


def run_bench_quick(script: str, tmp_path: Path, timeout: float = 3600) -> tuple[subprocess.CompletedProcess[str],
                                                                                 dict[str, Any]]:
    """Run `bench/<script> --quick --json ...` to its end (it must succeed); its stdout and its JSON results."""
    out = tmp_path / f"{Path(script).stem}.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "bench" / script), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())
