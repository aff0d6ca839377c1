"""`edgecv-agent`: the device command line (run the daemon, check a config, benchmark a bundle, demo).

Thin entry point: parse arguments, configure logging (stderr, for the journal), build objects and hand over.
SIGTERM and SIGINT set a stop event so the agent drains and publishes `stopped` before it exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgecv.agent import __version__, logs
from edgecv.agent.errors import ConfigError, EdgecvError, MqttError
from edgecv.agent.resources import demo_bundle, demo_public_key, example_config

log = logging.getLogger("edgecv.agent.cli")

DEMO_FIRST_PREDICTION_S = 30.0



EXIT_CODES = ("Exit status: 0 on success, 1 on an error (the reason on stderr), 2 on a usage or configuration "
              "error, 130 when interrupted.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecv-agent", description="edgecv device agent: camera → int8 model → "
                                     "MQTT predictions, with over-the-air model updates. Logs go to stderr (the "
                                     "journal under systemd); results to stdout. " + EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"edgecv-agent {__version__}")
    _add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the agent daemon (systemd runs this)", description=(
        "Run the device agent: read the cameras, classify every frame with the active model, publish predictions, "
        "status and health over MQTT, and accept signed model pushes. Logs to stderr (the journal), prints nothing "
        "on stdout. Runs until SIGTERM/SIGINT, then publishes 'stopped' and exits 0; exit status 1 when a part of "
        "the agent died or it cannot start (no usable model, store or camera), 2 on an invalid config."))
    run.add_argument("--config", "-c", required=True, type=Path, help="agent TOML config file")
    run.set_defaults(handler=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and print a summary", description=(
        "Validate an agent config without starting anything. Every problem is listed at once with its key path "
        "(and a 'did you mean' for a misspelt key). Prints a summary of the effective settings, or with --json "
        "the effective config as one object. Exit status 0 when valid, 2 when not (the problems on stderr; with "
        "--json also on stdout)."))
    check.add_argument("config", type=Path)
    check.add_argument("--json", action="store_true", help="print the effective config (or the problems) as JSON")
    check.set_defaults(handler=cmd_check_config)

    bench = sub.add_parser("bench", help="benchmark a bundle in the installed runtimes", description=(
        "Measure preprocessing + inference latency of a bundle's artifacts on this device, per installed runtime "
        "and thread count (median and p95 of --runs inferences, batch 1). Prints a table, fastest first (runtime, "
        "artifact, threads, pre/infer/p95/total ms, fps, speedup), or one JSON object with --json. " + EXIT_CODES))
    bench.add_argument("--bundle", "-b", required=True, type=Path, help="bundle directory or .edgecv file")
    bench.add_argument("--runtime", default="auto",
                       help="auto, onnxruntime, litert or openvino (default auto: all installed)")
    bench.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2")
    bench.add_argument("--runs", type=int, default=500, help="timed inferences per configuration")
    bench.add_argument("--json", action="store_true", help="print the measurements as JSON")
    bench.set_defaults(handler=cmd_bench)

    demo = sub.add_parser("demo", help="run the agent on synthetic Fashion-MNIST frames and watch the predictions "
                                       "arrive through an MQTT broker", description=(
        "Run the agent with the shipped, signed Fashion-MNIST bundle on a synthetic camera of test images (with their "
        "true labels) and print every prediction as a subscriber receives it through the broker, with a running "
        "accuracy, then a summary line. Uses 127.0.0.1:1883 if a broker answers there, else starts a private "
        "mosquitto. " + EXIT_CODES))
    demo.add_argument("--broker", help="HOST:PORT of a broker (default: 127.0.0.1:1883 if it answers, else a "
                                       "private mosquitto on a free port)")
    demo.add_argument("--frames", type=int, default=200, help="stop after this many predictions (default 200)")
    demo.add_argument("--fps", type=float, default=20.0, help="camera frame rate (default 20)")
    demo.add_argument("--runtime", default="auto", help="auto, onnxruntime, litert or openvino")
    demo.add_argument("--bundle", type=Path, default=None, help="bundle (default: the shipped Fashion-MNIST bundle)")
    demo.set_defaults(handler=cmd_demo)

    init = sub.add_parser("init", help="write a commented config file to start from", description=(
        "Write the commented example configuration (every key, its default and what it does) with this device's id "
        "filled in, ready to edit; then check it with 'edgecv-agent check-config'. Prints the path written. Exit "
        "status 0, 2 when the file exists (without --force) or the device id is not a valid topic level."))
    init.add_argument("path", nargs="?", type=Path, default=Path("agent.toml"),
                      help="where to write it (default ./agent.toml)")
    init.add_argument("--device-id", help="the device id (default: this machine's host name, made a valid topic "
                                          "level)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(handler=cmd_init)

    rollback = sub.add_parser("rollback", help="switch the model store back to the previous model (agent stopped)",
                              description=(
        "Re-activate the previous model (or --to an installed version) in the model store of a config, on the "
        "device itself, without a broker. The bundle is re-verified with the config's keyring first. Stop the "
        "agent before (so nothing races it) and start it after: it self-tests the model at start. Prints the "
        "models before and after (a JSON object with --json). Exit status 0, 1 when there is nothing valid to go "
        "back to (the reason on stderr), 2 on an invalid config. From a workstation: 'edgecv rollback --device "
        "ID'."))
    rollback.add_argument("--config", "-c", required=True, type=Path, help="agent TOML config file")
    rollback.add_argument("--to", metavar="VERSION",
                          help="installed version (or directory name, or sha256 prefix) to go back to (default: "
                               "the previous one)")
    rollback.add_argument("--json", action="store_true", help="print the result as JSON")
    rollback.set_defaults(handler=cmd_rollback)
    for child in dict.fromkeys(sub.choices.values()):
        _add_verbosity(child, top=False)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, top: bool) -> None:
    """--debug, --verbose and --quiet, before the subcommand or after it (as `edgecv`'s)."""
    kwargs: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("output")
    group.add_argument("--debug", action="store_true", help="debug logs, and tracebacks on errors", **kwargs)
    group.add_argument("-v", "--verbose", action="store_true",
                       help="also show third-party libraries' logs and banners (hidden by default)", **kwargs)
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr", **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    # The daemon never captures native output: a runtime's crash report must reach the journal.
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logs.configure(level=level, verbose=bool(getattr(args, "verbose", False)), debug=debug,
                   fmt="%(asctime)s %(levelname)s %(name)s: %(message)s", capture_native=args.command != "run")
    try:
        return int(args.handler(args) or 0)
    except EdgecvError as exc:
        if debug:
            raise
        print(f"edgecv-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgecv-agent: interrupted", file=sys.stderr)
        return 130


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handle(signum: int, frame: Any) -> None:
        log.info("Received %s; stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    return stop


# --------------------------------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from edgecv.agent.app import App
    from edgecv.agent.config import load_config

    config = load_config(args.config)
    if not getattr(args, "debug", False):
        logging.getLogger(logs.OURS).setLevel(config.log_level.upper())
    config.broker.resolve_password()  # a missing password source is a config error before anything starts
    stop = _stop_on_signals()
    return App(config).run(stop)


def cmd_check_config(args: argparse.Namespace) -> int:
    from edgecv.agent.config import load_config

    try:
        cfg = load_config(args.config)
        password = cfg.broker.resolve_password()
    except ConfigError as exc:
        if args.json:  # a script reads the verdict from stdout
            _print_json({"ok": False, "config": str(args.config), "problems": exc.problems})
        raise
    b = cfg.broker
    if args.json:
        _print_json({"ok": True, "config": str(args.config), "effective": cfg.to_dict(),
                     "password": "set" if password else None, "latency_budget_ms": cfg.latency_budget_ms()})
        return 0
    print(f"{args.config}: OK")
    print(f"  device      {cfg.device_id} (prefix {cfg.prefix}; groups: {', '.join(cfg.groups) or 'none'})")
    auth = f"user {b.username}" + (" with password" if password else "") if b.username else "anonymous"
    print(f"  broker      {b.host}:{b.port} MQTT {b.protocol}, {auth}, TLS {'on' if b.tls.enabled else 'off'}, "
          f"keepalive {b.keepalive}s, reconnect {b.reconnect_min_s:g}–{b.reconnect_max_s:g}s")
    for cam in cfg.cameras:
        print(f"  camera      {cam.name}: {cam.source} at {cam.fps:g} fps" + ("" if cam.fps else " (unlimited)")
              + ("" if cam.loop else ", played once"))
        for r in cam.regions:
            every = f" every {r.interval_s:g}s" if "interval" in r.trigger else ""
            print(f"    region    {r.name}: crop {list(r.crop)} ({'fractions' if r.fractional else 'pixels'}), "
                  f"trigger {r.trigger}{every}, state after {r.consecutive} results >= {r.min_score:g}, "
                  f"model {r.model or 'of the camera'}")
    m = cfg.model
    print(f"  model       store {m.store}, seed {m.bundle or '(none)'}, runtime {m.runtime}, {m.threads} thread(s)")
    p = cfg.publish
    print(f"  publish     QoS {p.qos}, mode {p.mode}, top {p.top_k}, buffer {p.buffer}"
          + (f", spool {p.spool_dir}" if p.spool_dir else "") + (f", expiry {p.expiry_s}s" if p.expiry_s else "")
          + (" (ignored: MQTT 3.1.1 has no message expiry)" if p.expiry_s and b.protocol == "3.1.1" else ""))
    print(f"  health      every {cfg.health.interval_s:g}s; motion gate {'on' if cfg.motion.enabled else 'off'}; "
          f"when every camera has ended: {cfg.on_cameras_ended}")
    print(f"  security    keyring {cfg.security.keyring or '(none)'}, unsigned bundles "
          f"{'allowed' if cfg.security.allow_unsigned else 'refused'}")
    u = cfg.update
    print(f"  models      latency budget {cfg.latency_budget_ms():g} ms per frame"
          f"{'' if u.max_latency_ms else ' (one frame period of the fastest camera)'}, self-test limit "
          f"{u.selftest_timeout_s:g} s, probation {u.probation_s:g} s")
    return 0


# -------------------------------------------------------------------------------------------------- init
def cmd_init(args: argparse.Namespace) -> int:
    import re

    from edgecv.agent.config import parse_config
    from edgecv.agent.contract.topics import check_level

    device = args.device_id or re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname()) or "edgecv-device"
    try:
        check_level(device, "Device id")
    except ValueError as exc:
        raise ConfigError(f"--device-id: {exc}") from None
    path = Path(args.path)
    if path.exists() and not args.force:
        raise ConfigError(f"{path} already exists; edit it, or pass --force to overwrite it")
    text, count = re.subn(r'^device_id = ".*"$', f'device_id = "{device}"', example_config().read_text(), count=1,
                          flags=re.MULTILINE)
    if count != 1:
        raise EdgecvError(f"The shipped example config {example_config()} has no device_id line; reinstall edgecv")
    import tomllib

    parse_config(tomllib.loads(text), source=str(path))  # what we write must be valid
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"Wrote {path} (device_id = {device!r}). Edit the broker, camera and model sections, then run:")
    print(f"  edgecv-agent check-config {path}")
    return 0


# ------------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from edgecv.agent.benchmark import benchmark_bundle, format_table
    from edgecv.agent.contract.bundle import load_bundle, open_bundle

    try:
        threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--threads {args.threads!r}: expected comma-separated integers, e.g. 1,2") from None
    runtimes = None if args.runtime == "auto" else [args.runtime]
    with tempfile.TemporaryDirectory(prefix="edgecv-bench-") as tmp:
        path = Path(args.bundle)
        bundle = load_bundle(path) if path.is_dir() else open_bundle(path, Path(tmp))
        rows = benchmark_bundle(bundle, runtimes, threads or None, runs=args.runs)
    if not rows:
        raise EdgecvError(f"No artifact of {args.bundle} could be benchmarked with the installed runtimes")
    if args.json:
        _print_json({"bundle": str(args.bundle), "name": bundle.manifest.name, "version": bundle.manifest.version,
                     "rows": [dataclasses.asdict(r) for r in sorted(rows, key=lambda r: r.infer_ms_median)]})
        return 0
    print(f"{bundle.manifest.name} {bundle.manifest.version}: preprocess + inference, batch 1, {args.runs} runs")
    print(format_table(rows))
    return 0


# ---------------------------------------------------------------------------------------------- rollback
def cmd_rollback(args: argparse.Namespace) -> int:
    """The on-device rollback: the config's store, verified with the config's keyring (never without one)."""
    from edgecv.agent.config import load_config
    from edgecv.agent.contract.signing import load_keyring
    from edgecv.agent.delivery.store import ModelStore

    cfg = load_config(args.config)
    store = ModelStore(Path(cfg.model.store), keep=cfg.update.keep_versions,
                       keyring=load_keyring(cfg.security.keyring), allow_unsigned=cfg.security.allow_unsigned)
    before = store.current()
    bundle = store.rollback(args.to)
    was = f"{before.manifest.name} {before.manifest.version}" if before is not None else None
    now = f"{bundle.manifest.name} {bundle.manifest.version}"
    if args.json:
        _print_json({"store": str(store.root), "from": was, "to": now, "dir": bundle.root.name,
                     "sha256": bundle.manifest_sha256})
    else:
        print(f"{store.root}: {was or '(no active model)'} → {now} ({bundle.root.name})")
    print("Start the agent to serve it (it self-tests the model first): sudo systemctl start edgecv-agent",
          file=sys.stderr)
    return 0


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=str))


# -------------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from edgecv.agent.app import App
    from edgecv.agent.config import parse_config

    bundle = (args.bundle or demo_bundle()).resolve()
    if not (bundle / "manifest.json").is_file() and not bundle.is_file():
        raise EdgecvError(f"Demo bundle {bundle} not found; build it with 'edgecv optimize' or pass --bundle")
    if not getattr(args, "debug", False):
        logging.getLogger("edgecv.agent").setLevel(logging.WARNING)  # the predictions table is the output
    with _demo_broker(args.broker) as (host, port), tempfile.TemporaryDirectory(prefix="edgecv-demo-") as tmp:
        device = f"demo-{os.getpid()}"
        config = parse_config({
            "device_id": device, "prefix": "edgecv-demo",
            "broker": {"host": host, "port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
            "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist?shuffle=1", "fps": args.fps}],
            "model": {"store": str(Path(tmp) / "models"), "bundle": str(bundle), "runtime": args.runtime},
            # The shipped bundle is verified against the shipped demo key; a bundle of your own may be unsigned.
            "security": {"allow_unsigned": True} if args.bundle else {"keyring": str(demo_public_key())},
            "homeassistant": {"enabled": False},
            "health": {"interval_s": 5.0},
        }, source="<demo>")
        stop = _stop_on_signals()
        app = App(config)
        clf = app.load_model()
        print(f"edgecv demo: broker {host}:{port}, model {clf.name} {clf.version} ({clf.engine.name}), "
              f"camera synthetic:fashion-mnist at {args.fps:g} fps", file=sys.stderr)
        metrics = dict(clf.bundle.manifest.metrics)
        viewer = _DemoViewer(host, port, app.topics.predictions, args.frames, stop)
        viewer.set_labels(clf.labels)
        viewer.start()
        runner = threading.Thread(target=app.run, args=(stop,), name="agent", daemon=True)
        runner.start()
        deadline = time.monotonic() + DEMO_FIRST_PREDICTION_S
        silent = False
        try:
            while runner.is_alive() and not stop.wait(0.2):
                if viewer.count == 0 and time.monotonic() > deadline:
                    silent = True
                    break
        finally:
            stop.set()
            runner.join(timeout=15)
            viewer.close(clear_retained=app.topics.status)
        if silent:
            cams = "; ".join(f"{cam.name}: {cam.status().get('state')} ({cam.status().get('last_error') or 'no error'})"
                             for cam in app.agent.cameras)
            raise EdgecvError(f"No prediction arrived within {DEMO_FIRST_PREDICTION_S:g} s (camera {cams}); check "
                              "the camera source and the broker, or run with --debug")
        viewer.summary(metrics, clf.engine.describe())
    return 0


@contextmanager
def _demo_broker(address: str | None) -> Iterator[tuple[str, int]]:
    if address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--broker {address!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
        yield host, int(port)
        return
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=0.5):
            pass
        yield "127.0.0.1", 1883
        return
    except OSError:
        pass
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        raise MqttError("No broker answers on 127.0.0.1:1883 and mosquitto is not installed; install the "
                        "Debian package mosquitto or pass --broker HOST:PORT")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = int(sock.getsockname()[1])
    with tempfile.TemporaryDirectory(prefix="edgecv-demo-broker-") as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {free} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
        proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", free), timeout=0.2):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise MqttError(f"Could not start a private mosquitto on port {free}") from None
                    time.sleep(0.05)
            print(f"edgecv demo: started a private mosquitto on 127.0.0.1:{free}", file=sys.stderr)
            yield "127.0.0.1", free
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


class _DemoViewer:
    """Subscribes to the predictions like any consumer would and prints them with a running accuracy."""

    def __init__(self, host: str, port: int, topic: str, frames: int, stop: threading.Event) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.topic, self.frames, self.stop = topic, frames, stop
        self.count = self.correct = self.with_truth = 0
        self.latencies: list[float] = []
        self.delays: list[float] = []
        self._subscribed = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"edgecv-demo-viewer-{os.getpid()}")
        self._client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self._client.on_message = self._on_message
        self._host, self._port = host, port
        self._labels: dict[int, str] = {}

    def start(self) -> None:
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise MqttError(f"The demo subscriber could not subscribe on {self._host}:{self._port}")
        print(f"{'seq':>5}  {'time':8}  {'prediction':12} {'score':>6}  {'truth':12} {'':1} {'infer':>7}  "
              f"{'accuracy':>8}", flush=True)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        from edgecv.agent.contract.topics import decode_predictions

        for doc in decode_predictions(msg.payload):
            if self.count < self.frames:
                self._show(doc)

    def _show(self, doc: dict[str, Any]) -> None:
        self.delays.append(max(0.0, time.time() - float(doc["frame_ts"])) * 1e3)
        top = doc["top"][0]
        truth = doc.get("truth")
        mark = " "
        truth_label = "-"
        if truth is not None:
            self.with_truth += 1
            ok = int(truth) == int(top["index"])
            self.correct += ok
            mark = "✓" if ok else "✗"
            truth_label = self._labels.get(int(truth), str(truth))
        self.count += 1
        self.latencies.append(float(doc["latency_ms"]["infer"]))
        acc = f"{100 * self.correct / self.with_truth:7.1f}%" if self.with_truth else "      -"
        stamp = time.strftime("%H:%M:%S", time.localtime(float(doc["ts"])))
        print(f"{doc['seq']:>5}  {stamp:8}  {top['label'][:12]:12} {top['score']:6.3f}  {truth_label[:12]:12} {mark} "
              f"{doc['latency_ms']['infer']:6.2f}ms  {acc}", flush=True)
        if self.count >= self.frames:
            self.stop.set()

    def set_labels(self, labels: Sequence[str]) -> None:
        self._labels = dict(enumerate(labels))

    def close(self, clear_retained: str | None = None) -> None:
        if clear_retained:  # leave no retained status of this throw-away device on a shared broker
            self._client.publish(clear_retained, b"", qos=1, retain=True).wait_for_publish(2)
        self._client.disconnect()
        self._client.loop_stop()

    def summary(self, metrics: dict[str, Any], engine: dict[str, Any]) -> None:
        if not self.count:
            print("edgecv demo: no predictions arrived", file=sys.stderr)
            return
        lat = sorted(self.latencies)
        delay = sorted(self.delays)
        print(f"\n{self.count} predictions via MQTT; accuracy {100 * self.correct / max(1, self.with_truth):.1f}% "
              f"(truth on {self.with_truth}); inference median {lat[len(lat) // 2]:.2f} ms "
              f"({engine.get('runtime')} {engine.get('precision', '')}); frame→subscriber median "
              f"{delay[len(delay) // 2]:.1f} ms")
        key = f"accuracy_{engine.get('precision', 'int8')}_{'onnx' if engine.get('format') == 'onnx' else 'tflite'}"
        recorded = metrics.get(key)
        if isinstance(recorded, int | float):
            print(f"bundle's recorded test accuracy ({key}): {100 * recorded:.1f}%")


if __name__ == "__main__":
    sys.exit(main())
