"""Host side of scripts/arm64-check.sh: collect one agent's predictions from MQTT, then score runs against the
synthetic camera's `truth` and against a reference run of the same frames (x86, same wheel, same runtime).

    arm64_score.py collect --broker HOST:PORT --prefix P --device D --frames N --out run.json [--timeout S]
    arm64_score.py compare [--min-accuracy A] [--max-gap G] [--min-agreement R] --pair LABEL REF.json RUN.json ...
    arm64_score.py forget --broker HOST:PORT --prefix P --device D [D ...]

`collect` prints "subscribed" on stdout once the broker has acknowledged its subscriptions (the caller starts
the agent only then, so no prediction is missed), and writes seq 0..N-1 of one agent boot to the output file.
With one camera, publish mode `every` and a non-shuffled `synthetic:fashion-mnist` source, seq k is test image
k on every machine, so two runs can be compared frame by frame; `compare` checks that through the truth labels.
`forget` clears the retained topics (status, model/state) the throw-away check devices left on the broker.
Needs paho-mqtt and edgecv (the host venv the check script makes from the wheel has both).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

PROG = "arm64_score"


class ScoreError(Exception):
    """A run could not be collected or did not meet a bound; the message says which and why."""


# ------------------------------------------------------------------------------------------------- collect
class Collector:
    """Subscribes to one device's predictions and status; keeps the first boot's predictions by seq."""

    def __init__(self, host: str, port: int, prefix: str, device: str, frames: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from edgecv.agent.contract.topics import DeviceTopics

        self.topics = DeviceTopics(prefix, device)
        self.host, self.port, self.frames = host, port, frames
        self.subscribed = threading.Event()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.boot: str | None = None
        self.boots: set[str] = set()
        self.runtime: str | None = None
        self.by_seq: dict[int, dict[str, Any]] = {}
        self.bad_payloads = 0
        self._pending: set[int] = set()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{PROG}-{device}")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            return  # paho retries; the caller's timeout reports it
        _, mid = client.subscribe([(self.topics.predictions, 1), (self.topics.status, 1)])
        with self.lock:
            self._pending.add(mid)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self.lock:
            self._pending.discard(mid)
            if not self._pending:
                self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        from edgecv.agent.contract.topics import decode, decode_predictions

        try:
            if msg.topic == self.topics.status:
                model = decode(msg.payload).get("model") if msg.payload else None
                if isinstance(model, dict) and model.get("runtime"):
                    self.runtime = str(model["runtime"])
                return
            docs = decode_predictions(msg.payload)
        except ValueError:
            self.bad_payloads += 1
            return
        with self.lock:
            for doc in docs:
                boot = str(doc.get("boot"))
                self.boots.add(boot)
                if self.boot is None:
                    self.boot = boot
                seq = doc.get("seq")
                if boot == self.boot and isinstance(seq, int) and 0 <= seq < self.frames:
                    self.by_seq.setdefault(seq, doc)  # QoS 1 may deliver one twice
            if len(self.by_seq) == self.frames:
                self.done.set()

    def start(self, timeout: float) -> None:
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise ScoreError(f"Cannot connect to the broker {self.host}:{self.port}: {exc}") from None
        self._client.loop_start()
        if not self.subscribed.wait(timeout):
            raise ScoreError(f"No subscription acknowledgement from {self.host}:{self.port} within {timeout:g} s")

    def wait(self, timeout: float) -> dict[str, Any]:
        if not self.done.wait(timeout):
            raise ScoreError(f"Only {len(self.by_seq)} of {self.frames} predictions arrived on "
                             f"{self.topics.predictions} within {timeout:g} s; see the agent's log")
        with self.lock:
            docs = [self.by_seq[seq] for seq in range(self.frames)]
            return {"device": self.topics.device, "boot": self.boot, "boots": sorted(self.boots),
                    "runtime": self.runtime, "frames": self.frames,
                    "top1": [int(d["top"][0]["index"]) for d in docs],
                    "truth": [d.get("truth") for d in docs],
                    "infer_ms": [float(d["latency_ms"]["infer"]) for d in docs]}

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def parse_broker(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ScoreError(f"--broker {address!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


def cmd_collect(args: argparse.Namespace) -> int:
    host, port = parse_broker(args.broker)
    if args.frames < 1:
        raise ScoreError("--frames must be at least 1")
    collector = Collector(host, port, args.prefix, args.device, args.frames)
    try:
        collector.start(timeout=30.0)
        print("subscribed", flush=True)
        run = collector.wait(args.timeout)
    finally:
        collector.close()
    Path(args.out).write_text(json.dumps(run))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgecv.agent.contract.topics import DeviceTopics

    host, port = parse_broker(args.broker)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{PROG}-forget")
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise ScoreError(f"Cannot connect to the broker {host}:{port}: {exc}") from None
    client.loop_start()
    try:
        for device in args.device:
            topics = DeviceTopics(args.prefix, device)
            for topic in (topics.status, topics.model_state):
                client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return 0


# ------------------------------------------------------------------------------------------------- compare
def load_run(path: str) -> dict[str, Any]:
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ScoreError(f"Cannot read the run file {path}: {exc}") from None
    if not isinstance(run, dict) or not isinstance(run.get("top1"), list) or not isinstance(run.get("truth"), list):
        raise ScoreError(f"{path} is not a run file written by '{PROG} collect'")
    return run


def accuracy(run: dict[str, Any]) -> float:
    if any(t is None for t in run["truth"]):
        raise ScoreError(f"Predictions of {run.get('device')} carry no truth: the camera must be "
                         "synthetic:fashion-mnist")
    return sum(int(p == t) for p, t in zip(run["top1"], run["truth"], strict=True)) / len(run["truth"])


def score_pair(label: str, ref: dict[str, Any], run: dict[str, Any], min_accuracy: float, max_gap: float,
               min_agreement: float) -> tuple[list[str], list[str]]:
    """(table cells, failures) for one runtime: the run against truth, the reference and the bounds."""
    failures: list[str] = []
    n = len(run["top1"])
    if len(ref["top1"]) != n:
        raise ScoreError(f"{label}: the reference has {len(ref['top1'])} frames, the run {n}; use the same --frames")
    acc_ref, acc = accuracy(ref), accuracy(run)
    if run.get("runtime") not in (None, label):
        failures.append(f"{label}: the agent ran on {run['runtime']}, not {label}")
    if len(run.get("boots", [])) > 1:
        failures.append(f"{label}: the agent restarted during the run (boots {', '.join(run['boots'])})")
    if acc < min_accuracy:
        failures.append(f"{label}: accuracy {acc:.4f} is below {min_accuracy:g}")
    if abs(acc - acc_ref) > max_gap:
        failures.append(f"{label}: accuracy {acc:.4f} differs from the reference's {acc_ref:.4f} by more than "
                        f"{max_gap:g}")
    if ref["truth"] == run["truth"]:
        same = sum(int(a == b) for a, b in zip(ref["top1"], run["top1"], strict=True))
        agree = f"{same}/{n}"
        if same / n < min_agreement:
            failures.append(f"{label}: only {same} of {n} top-1 predictions equal the reference's "
                            f"(need {min_agreement:g})")
    else:  # a skipped frame shifts seq against the image index; accuracy still compares
        agree = "n/a (frames not aligned)"
    cells = [label, str(n), f"{acc_ref:.4f}", f"{acc:.4f}", f"{acc - acc_ref:+.4f}", agree]
    return cells, failures


def cmd_compare(args: argparse.Namespace) -> int:
    header = ["runtime", "frames", "x86 accuracy", "arm64 accuracy", "gap", "top-1 same as x86"]
    rows = [header]
    failures: list[str] = []
    for label, ref_path, run_path in args.pair:
        cells, failed = score_pair(label, load_run(ref_path), load_run(run_path), args.min_accuracy, args.max_gap,
                                   args.min_agreement)
        rows.append(cells)
        failures += failed
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    for failure in failures:
        print(f"{PROG}: FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    collect = sub.add_parser("collect", help="collect seq 0..N-1 of one device's predictions")
    collect.add_argument("--broker", required=True, help="HOST:PORT")
    collect.add_argument("--prefix", default="edgecv")
    collect.add_argument("--device", required=True)
    collect.add_argument("--frames", type=int, required=True)
    collect.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all N (default 600)")
    collect.add_argument("--out", required=True)
    collect.set_defaults(handler=cmd_collect)
    compare = sub.add_parser("compare", help="score runs against truth and a reference run")
    compare.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LABEL", "REF", "RUN"),
                         help="runtime name, reference run file, run file (repeatable)")
    compare.add_argument("--min-accuracy", type=float, default=0.75)
    compare.add_argument("--max-gap", type=float, default=0.005, help="largest accuracy difference to the reference")
    compare.add_argument("--min-agreement", type=float, default=0.99,
                         help="smallest share of frames whose top-1 equals the reference's")
    compare.set_defaults(handler=cmd_compare)
    forget = sub.add_parser("forget", help="clear the retained topics of devices")
    forget.add_argument("--broker", required=True, help="HOST:PORT")
    forget.add_argument("--prefix", default="edgecv")
    forget.add_argument("--device", nargs="+", required=True)
    forget.set_defaults(handler=cmd_forget)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ScoreError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
