"""Sample collection benchmark: how fast `edgecv collect` fetches what a device stored, with Mosquitto's default
(Nagle on) and with `set_tcp_nodelay true` (edgecv's recommended broker config), side by side in one run.

    python bench/collect_bench.py              # 250 door crops per broker (~1 min)
    python bench/collect_bench.py --frames 60  # short form

For each broker a real agent (`edgecv-agent run`) classifies a `synthetic:scene` clip of N frames on a door region
with `[samples]` keeping every result (low_confidence = 1.0, no rate limit), so it stores N crops (~11 KB JPEG
each); then the real `edgecv collect` CLI fetches them all into a fresh dataset. Printed: samples, bytes, wall
seconds of the collect process (start-up included), samples per second, and the ratio between the two brokers.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's process helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.scene_model: the small door model
from agent_bench import agent_exe, start_broker

DOOR_CROP = (0.6, 0.275, 0.3, 0.6)


def edgecv_exe() -> list[str]:
    exe = Path(sys.executable).parent / "edgecv"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edgecv.tools.cli"]


def agent_config(device: str, port: int, frames: int, bundle: Path, work: Path) -> str:
    return f"""device_id = "{device}"
on_cameras_ended = "idle"
[broker]
host = "127.0.0.1"
port = {port}
[[camera]]
name = "garage"
source = "synthetic:scene?seed=2&hold=20&objects=0&frames={frames}"
loop = false
fps = 0.0
[[camera.region]]
name = "door"
crop = {list(DOOR_CROP)}
trigger = "every"
[model]
store = "{work / 'store'}"
bundle = "{bundle}"
[security]
allow_unsigned = true
[samples]
enabled = true
dir = "{work / 'samples'}"
low_confidence = 1.0
min_interval_s = 0.0
queue = 256
[health]
interval_s = 1.0
[homeassistant]
enabled = false
"""


def stored_samples(port: int, device: str, want: int, timeout: float) -> int:
    """Wait until the device's health reports `want` stored samples (or the count stops growing)."""
    from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient

    deadline, last = time.monotonic() + timeout, -1
    with MqttClient(ClientOptions(host="127.0.0.1", port=port)) as client:
        client.subscribe(f"edgecv/{device}/health")
        while time.monotonic() < deadline:
            msg = client.get(1.0)
            if msg is None:
                continue
            doc = json.loads(msg.payload)
            stored = int(doc.get("samples", {}).get("stored", 0))
            queued = int(doc.get("samples", {}).get("queued", 0))
            if stored >= want or (stored == last and queued == 0 and stored > 0):
                return stored
            last = stored
    raise RuntimeError(f"{device}: samples did not settle within {timeout:g} s")


def run_one(nodelay: bool, frames: int, bundle: Path, work: Path) -> dict[str, float]:
    work.mkdir(parents=True)
    broker, port = start_broker(work, nodelay=nodelay)
    device = f"collect-{'nodelay' if nodelay else 'nagle'}"
    (work / "agent.toml").write_text(agent_config(device, port, frames, bundle, work))
    agent = subprocess.Popen([*agent_exe(), "run", "--config", str(work / "agent.toml")],
                             stdout=subprocess.DEVNULL, stderr=(work / "agent.log").open("wb"))
    try:
        stored = stored_samples(port, device, frames, 300)
        started = time.perf_counter()
        out = subprocess.run([*edgecv_exe(), "collect", "--device", device, "--out", str(work / "dataset"),
                              "--broker", f"127.0.0.1:{port}", "--json", "--no-progress"],
                             capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - started
        if out.returncode != 0:
            raise RuntimeError(f"edgecv collect failed: {out.stderr[-2000:]}")
        doc = json.loads(out.stdout)[0]
        return {"stored": stored, "fetched": len(doc["fetched"]), "bytes": doc["bytes"], "wall_s": wall}
    finally:
        agent.terminate()
        agent.wait(30)
        broker.terminate()
        broker.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=250, help="samples the device stores (default 250)")
    args = parser.parse_args()
    from tests.scene_model import build_scene_bundle

    with tempfile.TemporaryDirectory(prefix="edgecv-collect-bench-") as tmp:
        root = Path(tmp)
        bundle, _ = build_scene_bundle(root / "bundle")
        rows = {nd: run_one(nd, args.frames, bundle, root / ("nodelay" if nd else "nagle")) for nd in (False, True)}
        shutil.rmtree(root / "bundle", ignore_errors=True)
    print(f"edgecv collect — {args.frames} door crops stored on a real agent, fetched by the real CLI; "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| broker | samples | bytes | collect wall s | samples/s |")
    print("|---|---:|---:|---:|---:|")
    for nd, r in rows.items():
        name = "set_tcp_nodelay true (recommended)" if nd else "Mosquitto default (Nagle on)"
        print(f"| {name} | {r['fetched']:.0f} | {r['bytes']:,.0f} | {r['wall_s']:.2f} | "
              f"{r['fetched'] / r['wall_s']:.1f} |")
    ratio = (rows[True]["fetched"] / rows[True]["wall_s"]) / (rows[False]["fetched"] / rows[False]["wall_s"])
    print(f"\nsamples/s, nodelay vs default: {ratio:.1f}×")
    return 0 if all(r["fetched"] == r["stored"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
