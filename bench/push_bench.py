"""Delivery benchmark: push a ~1 MB signed bundle to 1 and to 20 agents over a loopback Mosquitto (time until
every device reports `active`, i.e. including transfer, verification, self-test and swap), frames lost around
hot swaps, and agent RSS before/after 20 swaps.

    python bench/push_bench.py [--devices 20] [--swaps 20] [--repeat 3]

Starts its own broker (private port) and real `edgecv-agent run` processes (fps 20 for the swap agent, fps 2 for
the fleet, onnxruntime threads=1). Prints a Markdown table; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgecv.agent.contract.signing import generate_private_key, write_keypair  # noqa: E402
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received  # noqa: E402
from edgecv.tools.fleet.push import Pusher  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.bundle_factory import make_archive  # noqa: E402


def agent_toml(device: str, port: int, store: Path, seed: Path, ring: Path, fps: float, groups: list[str]) -> str:
    return (f'device_id = "{device}"\ngroups = {json.dumps(groups)}\n'
            f'[broker]\nport = {port}\nreconnect_min_s = 0.1\nreconnect_max_s = 1.0\n'
            f'[[camera]]\nname = "cam0"\nsource = "synthetic:fashion-mnist"\nfps = {fps}\n'
            f'[model]\nstore = "{store}"\nbundle = "{seed}"\nthreads = 1\n'
            f'[security]\nkeyring = "{ring}"\n[update]\nprobation_s = 5\n'
            f'[health]\ninterval_s = 5\n[homeassistant]\nenabled = false\n')


def start_agent(work: Path, device: str, port: int, seed: Path, ring: Path, fps: float,
                groups: list[str]) -> subprocess.Popen[bytes]:
    d = work / device
    d.mkdir(parents=True, exist_ok=True)
    (d / "agent.toml").write_text(agent_toml(device, port, d / "models", seed, ring, fps, groups))
    exe = Path(sys.executable).parent / "edgecv-agent"
    return subprocess.Popen([str(exe), "run", "--config", str(d / "agent.toml")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "agent.log", "wb"), cwd=d)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Listener:
    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.status: dict[str, str] = {}
        self.preds: dict[str, list[dict[str, Any]]] = {}
        self.client = MqttClient(ClientOptions(port=port)).connect()
        self.client.subscribe("edgecv/+/status", callback=self._on)
        self.client.subscribe("edgecv/+/predictions", callback=self._on)

    def _on(self, msg: Received) -> None:
        _, device, kind = msg.topic.split("/", 2)
        doc = msg.json()
        with self.lock:
            if kind == "status":
                self.status[device] = str(doc.get("state"))
            else:
                self.preds.setdefault(device, []).append(doc)

    def wait_online(self, devices: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(self.status.get(d) == "online" for d in devices):
                    return
            time.sleep(0.1)
        raise SystemExit(f"agents did not come online within {timeout:g} s")


def timed_push(port: int, archive: bytes, version: str, devices: list[str], group: str | None, key: Any) -> float:
    t0 = time.perf_counter()
    results = Pusher(ClientOptions(port=port), archive, "bench", version, timeout=120, allow_downgrade=True,
                     grant_key=key).push(devices, group=group)  # the bench alternates 2.0 and 3.0 (signed request)
    elapsed = time.perf_counter() - t0
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"push failed: {bad}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = generate_private_key()
        write_keypair(key, work / "ring" / "ws.key")
        (work / "ring" / "ws.key").unlink()
        ring = work / "ring"
        seed = make_archive(work / "b", "1.0", top1=1, key=key)
        big = {v: make_archive(work / "b", v, top1=i + 2, key=key, pad_bytes=1_000_000).read_bytes()
               for i, v in enumerate(("2.0", "3.0"))}
        size = len(big["2.0"])
        broker = Broker(work).start()
        try:
            listener = Listener(broker.port)
            solo = "bench-solo"
            procs.append(start_agent(work, solo, broker.port, seed, ring, 20.0, []))
            listener.wait_online([solo], 60)
            time.sleep(2)
            one = [timed_push(broker.port, big["2.0" if i % 2 == 0 else "3.0"], "x", [solo], None, key)
                   for i in range(args.repeat)]
            # swaps: RSS and frame continuity on the fps-20 agent
            rss_before = rss_mb(procs[0].pid)
            with listener.lock:
                start_n = len(listener.preds[solo])
            swap_times = []
            for i in range(args.swaps):
                swap_times.append(timed_push(broker.port, big["2.0" if i % 2 else "3.0"], "x", [solo], None, key))
                time.sleep(0.3)
                if os.environ.get("BENCH_VERBOSE"):
                    print(f"swap {i + 1}: RSS {rss_mb(procs[0].pid):.1f} MB", file=sys.stderr)
            time.sleep(2)
            rss_after = rss_mb(procs[0].pid)
            with listener.lock:
                seqs = [p["seq"] for p in listener.preds[solo][start_n:]]
                stamps = [p["frame_ts"] for p in listener.preds[solo][start_n:]]
            lost = sum(b - a - 1 for a, b in itertools.pairwise(seqs) if b > a + 1)
            max_gap_ms = max(b - a for a, b in itertools.pairwise(stamps)) * 1e3
            # fleet
            fleet = [f"bench-{i:02d}" for i in range(args.devices)]
            for d in fleet:
                procs.append(start_agent(work, d, broker.port, seed, ring, 2.0, ["bench"]))
            listener.wait_online(fleet, 180)
            time.sleep(3)
            many = [timed_push(broker.port, big["2.0" if i % 2 == 0 else "3.0"], "x", fleet, "bench", key)
                    for i in range(args.repeat)]
        finally:
            for p in procs:
                p.kill()
                p.wait(10)
            broker.stop()
    rows = [
        ("push ~1 MB to 1 device (median)", f"{statistics.median(one):.2f} s", "≤ 2 s"),
        (f"push ~1 MB to {args.devices} devices, group topic (median)", f"{statistics.median(many):.2f} s",
         "≤ 10 s"),
        (f"frames lost over {args.swaps} hot swaps at 20 fps", f"{lost} of {len(seqs)} predictions", "0"),
        ("longest gap between consecutive classified frames during the swaps", f"{max_gap_ms:.0f} ms",
         "frame period 50 ms"),
        (f"agent RSS before → after {args.swaps} swaps", f"{rss_before:.1f} → {rss_after:.1f} MB "
                                                          f"({(rss_after / rss_before - 1) * 100:+.1f} %)", "≤ +5 %"),
        ("single push+swap time (median of swaps)", f"{statistics.median(swap_times):.2f} s", ""),
    ]
    print(f"bundle {size} bytes, chunk 64 KiB; {platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.python_version()}, {platform.platform()}")
    print("| measurement | result | target |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"raw: one={[round(x, 2) for x in one]} many={[round(x, 2) for x in many]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
