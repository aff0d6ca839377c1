"""Agent benchmark: what the daemon costs on one core, measured side by side with a bare inference loop.

    python bench/agent_bench.py            # full form (includes a 10-minute memory soak)
    python bench/agent_bench.py --quick    # short form (~4 min on 2 cores; 60 s soak)

The agent (`edgecv-agent run`, a real process) is pinned to core 0 (like `taskset -c 0`); the broker and this
script's subscriber run on core 1, so the agent has one core to itself as on a busy Raspberry Pi. For the default
bundle (`models/fashion-mnist/`) and for a 64×64 RGB bundle (untrained weights, exported with the workstation
tools: torch → ONNX/int8 QDQ and int8 TFLite), in each installed runtime:

- throughput: predictions per second arriving at a subscriber with every frame published (QoS 1) vs a bare loop
  that renders the same synthetic camera frames and runs the same preprocess + inference + top-k, in one
  process on the same core (target ≥ 85 %). The agent's synthetic camera is unpaced (fps = 0): a non-live
  source is read on the loop's thread when it asks for a frame, exactly like the bare loop. Measured twice:
  one prediction per MQTT message (publish.batch_max = 1, the default) and batched (publish.batch_max = 100:
  each message a JSON array of the predictions queued when the sender runs).
- CPU share of one core following a 30 fps camera (target ≤ 25 %), from /proc/<pid>/stat.
- frame → subscriber latency p50/p99 on loopback at 30 fps (target p99 ≤ inference + 10 ms).
- steady-state RSS (target ≤ 120 MB onnxruntime, ≤ 100 MB LiteRT), from /proc/<pid>/status (--drop-caches: with
  the page cache dropped first, so freshly installed libraries in large folios do not inflate RssFile).
- RSS growth over a 10-minute run at 30 fps (--quick: 60 s), first sample after 1/6 of the run (target < 5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "models" / "fashion-mnist"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgecv-bench"
AGENT_CORE, OTHER_CORE = 0, 1


# ------------------------------------------------------------------------------------------------ bundles
def rgb64_bundle(out: Path) -> Path:
    """A 64×64 RGB bundle with untrained weights, made with the workstation tools (int8 ONNX + int8 TFLite)."""
    if (out / "manifest.json").is_file():
        return out
    import numpy as np

    from edgecv.agent.contract.bundle import InputSpec
    from edgecv.agent.vision.preprocess import Preprocessor
    from edgecv.tools.bundler import build_bundle
    from edgecv.tools.export_onnx import export_onnx
    from edgecv.tools.model import build_model
    from edgecv.tools.quantize_onnx import quantize_onnx_int8
    from edgecv.tools.quantize_tflite import export_tflite_int8

    spec = InputSpec(width=64, height=64, channels=3, color="RGB", layout="NCHW", mean=(0.5,), std=(0.25,))
    model = build_model(spec, 10, seed=0).eval()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)
    pre = Preprocessor(spec)
    calib = np.concatenate([pre(f) for f in frames]).astype(np.float32)
    work = out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, spec, work / "model.fp32.onnx")
    int8 = quantize_onnx_int8(fp32, calib, work / "model.int8.onnx")
    artifacts = [(int8, "onnx", "int8")]
    try:
        artifacts.append((export_tflite_int8(model, spec, calib, work / "model.int8.tflite"), "tflite", "int8"))
    except Exception as exc:  # the LiteRT converter is optional on a workstation
        print(f"note: no int8 TFLite for the 64x64 bundle ({exc})", file=sys.stderr)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    expected = [int(sess.run(None, {sess.get_inputs()[0].name: pre(f)})[0].argmax()) for f in frames[:8]]
    build_bundle(out, name="rgb64-untrained", version="0.0.1", labels=[f"class{i}" for i in range(10)], spec=spec,
                 artifacts=artifacts, selftest_frames=frames[:8], selftest_expected=expected,
                 metrics={"note": "untrained weights, for benchmarks"}, min_agreement=0.5,
                 description="64x64 RGB CNN with untrained weights (benchmark only)")
    return out


def default_bundle(note: list[str]) -> Path:
    if (DEFAULT_BUNDLE / "manifest.json").is_file():
        return DEFAULT_BUNDLE
    sys.path.insert(0, str(REPO))
    from tests.e2e.conftest import build_linear_fashion_bundle

    out = CACHE / "fashion-linear"
    if not (out / "manifest.json").is_file():
        build_linear_fashion_bundle(out)
    note.append(f"models/fashion-mnist/ is missing: used a linear Fashion-MNIST stand-in bundle ({out})")
    return out


def bundle_runtimes(bundle: Path) -> list[str]:
    from edgecv.agent.contract.bundle import load_bundle
    from edgecv.agent.vision.runtimes import available_runtimes

    fmts = {a.format for a in load_bundle(bundle).manifest.artifacts}
    out = []
    for rt, fmt in (("onnxruntime", "onnx"), ("litert", "tflite")):
        if fmt in fmts and rt in available_runtimes():
            out.append(rt)
    return out


# ------------------------------------------------------------------------------------------- processes
def pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > core:
        os.sched_setaffinity(0, {core})


def start_broker(workdir: Path, nodelay: bool = True) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    conf = workdir / f"mosquitto-{port}.conf"
    # set_tcp_nodelay: the broker config edgecv recommends (systemd/mosquitto/edgecv.conf); Mosquitto's default
    # holds every reply ~40 ms behind a delayed ACK (issue-4 figures in BENCHMARKS.md before 2026-11-29 ran without).
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_queued_messages 100000\nset_tcp_nodelay {'true' if nodelay else 'false'}\n")
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([mosq, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: pin(OTHER_CORE))
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("mosquitto did not start") from None
            time.sleep(0.05)


def agent_exe() -> list[str]:
    exe = Path(sys.executable).parent / "edgecv-agent"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edgecv.agent.cli"]


_n = iter(range(10**6))
PREDICTION_QOS = 1  # --qos: the agent's publish.qos for predictions
BATCH_MAX = 100  # publish.batch_max of the batched throughput run (5 ms of predictions at 20,000/s)


def start_agent(workdir: Path, port: int, bundle: Path, runtime: str, fps: float,
                batch_max: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    device = f"bench-{os.getpid()}-{next(_n)}"
    d = workdir / device
    d.mkdir()
    (d / "agent.toml").write_text(f"""device_id = "{device}"
log_level = "warning"
[broker]
host = "127.0.0.1"
port = {port}
[[camera]]
name = "cam0"
source = "synthetic:fashion-mnist?shuffle=1"
fps = {fps}
[model]
store = "{d / 'models'}"
bundle = "{bundle}"
runtime = "{runtime}"
[publish]
qos = {PREDICTION_QOS}
top_k = 3
batch_max = {batch_max}
[health]
interval_s = 5.0
[security]
allow_unsigned = true
[homeassistant]
enabled = false
""")
    proc = subprocess.Popen([*agent_exe(), "run", "--config", str(d / "agent.toml")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "agent.log", "wb"), preexec_fn=lambda: pin(AGENT_CORE))
    return proc, device


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """VmRSS (or RssAnon / RssFile) of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drop_page_cache(notes: list[str]) -> None:
    """`sync; echo 1 > /proc/sys/vm/drop_caches` (root only). Shared libraries that were just installed sit in the
    page cache in large folios, and mapping them then makes whole folios resident: measured RssFile +12 to +30 MB
    on a freshly set-up machine, gone after dropping the cache. Dropping it before each RSS measurement makes the
    figure the agent's, not the install's."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        note = f"--drop-caches: could not drop the page cache ({exc.strerror}); RSS may include large file folios"
        if note not in notes:
            notes.append(note)


def file_huge_pages_mb() -> float:
    """Page-cache memory held in large folios (/proc/meminfo FileHugePages). Freshly written files (a new pip
    install) can sit in the page cache as 2 MB folios, and mapping a shared library then makes whole folios
    resident: RssFile, and so VmRSS, grows by tens of MB with no change in the agent (measured: 93 -> 122 MB for
    LiteRT, back to 93 MB after the page cache was dropped). RssAnon does not depend on it."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("FileHugePages:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Subscriber:
    """Records (receive time, prediction) for one device's predictions."""

    def __init__(self, port: int, device: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.got: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{device}")
        topic = f"edgecv/{device}/predictions"
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("subscriber did not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        t = time.time()
        doc = json.loads(msg.payload)
        with self._lock:
            self.got.extend((t, d) for d in (doc if isinstance(doc, list) else [doc]))  # batch_max >= 2: arrays

    def since(self, t0: float, t1: float = float("inf")) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return [(t, d) for t, d in self.got if t0 <= t < t1]

    def wait_first(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.got:
            if time.monotonic() > deadline:
                raise RuntimeError("no prediction arrived")
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ----------------------------------------------------------------------------------------- measurements
def bare_loop(bundle: Path, runtime: str, seconds: float) -> dict[str, float]:
    """In a fresh process pinned to the agent's core: preprocess + inference + top-k on synthetic frames."""
    out = subprocess.run([sys.executable, __file__, "--bare", str(bundle), runtime, str(seconds)],
                         capture_output=True, text=True, preexec_fn=lambda: pin(AGENT_CORE), check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _bare_main(bundle: str, runtime: str, seconds: float) -> None:
    import numpy as np

    from edgecv.agent.vision.classifier import Classifier
    from edgecv.agent.vision.synthetic import SyntheticSource

    clf = Classifier.load(Path(bundle), runtime=runtime, threads=1)
    src = SyntheticSource("synthetic:fashion-mnist?shuffle=1")
    for _ in range(50):
        src.grab()
        clf.classify(src.retrieve()[0])
    n, infer = 0, []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        src.grab()  # the same synthetic camera frames the agent gets (rendering included, as in the agent)
        r = clf.classify(src.retrieve()[0])
        infer.append(r.latency_ms["infer"])
        n += 1
    dt = time.perf_counter() - t0
    print(json.dumps({"fps": n / dt, "infer_ms": float(np.median(infer))}))


@dataclass
class Row:
    bundle: str
    runtime: str
    bare_fps: float = 0.0
    agent_fps: float = 0.0  # one prediction per MQTT message (publish.batch_max = 1, the default)
    batched_fps: float = 0.0  # publish.batch_max = BATCH_MAX
    infer_ms: float = 0.0
    cpu_30fps: float = 0.0
    lat_p50: float = 0.0
    lat_p99: float = 0.0
    rss: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.agent_fps / self.bare_fps if self.bare_fps else 0.0

    @property
    def ratio_batched(self) -> float:
        return self.batched_fps / self.bare_fps if self.bare_fps else 0.0


def throughput(work: Path, port: int, bundle: Path, runtime: str, seconds: float, batch_max: int = 1) -> float:
    """Predictions per second reaching the subscriber, camera unpaced (fps = 0: the next synthetic frame is
    rendered as soon as the loop asks, as in the bare loop)."""
    proc, device = start_agent(work, port, bundle, runtime, fps=0.0, batch_max=batch_max)
    sub = Subscriber(port, device)
    try:
        sub.wait_first(60)
        time.sleep(2.0)  # warm-up
        t0 = time.time()
        time.sleep(seconds)
        got = sub.since(t0, time.time())
        return len(got) / seconds
    finally:
        stop(proc)
        sub.close()


def follow(work: Path, port: int, bundle: Path, runtime: str, seconds: float, fps: float = 30.0,
           rss_samples: bool = False) -> dict[str, Any]:
    proc, device = start_agent(work, port, bundle, runtime, fps=fps)
    sub = Subscriber(port, device)
    try:
        sub.wait_first(60)
        time.sleep(3.0)
        t0, c0 = time.time(), cpu_seconds(proc.pid)
        samples = [(0.0, rss_mb(proc.pid))]
        while time.time() - t0 < seconds:
            time.sleep(min(5.0, max(0.1, seconds - (time.time() - t0))))
            samples.append((time.time() - t0, rss_mb(proc.pid)))
        t1, c1 = time.time(), cpu_seconds(proc.pid)
        got = sub.since(t0, t1)
        lat = sorted((t - d["frame_ts"]) * 1e3 for t, d in got)
        on_device = sorted((d["ts"] - d["frame_ts"]) * 1e3 for _, d in got)  # frame → prediction queued
        infer = statistics.median(d["latency_ms"]["infer"] for _, d in got)
        seqs = [d["seq"] for _, d in got]
        out = {"cpu": 100 * (c1 - c0) / (t1 - t0), "p50": lat[len(lat) // 2], "p99": lat[int(0.99 * (len(lat) - 1))],
               "infer": infer, "rss": samples[-1][1], "rate": len(got) / (t1 - t0),
               "rss_anon": rss_mb(proc.pid, "RssAnon"), "rss_file": rss_mb(proc.pid, "RssFile"),
               "device_p99": on_device[int(0.99 * (len(on_device) - 1))], "load": os.getloadavg()[0],
               "gaps": (max(seqs) - min(seqs) + 1) - len(set(seqs)) if seqs else 0}
        if rss_samples:
            first = next((r for t, r in samples if t >= seconds / 6), samples[0][1])
            out.update(rss_first=first, rss_last=samples[-1][1], growth=100 * (samples[-1][1] - first) / first)
        return out
    finally:
        stop(proc)
        sub.close()


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, "
            f"load average {load:.1f} at start")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--bare":
        _bare_main(argv[1], argv[2], float(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short form: 5 s windows, 60 s soak")
    parser.add_argument("--bundle", type=Path, help="default bundle (default models/fashion-mnist/)")
    parser.add_argument("--no-rgb64", action="store_true", help="skip the 64x64 RGB bundle")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the page cache before each RSS measurement (needs root; see drop_page_cache)")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1,
                        help="QoS of the agent's predictions (default 1; 0 shows the cost of the PUBACK path)")
    args = parser.parse_args(argv)
    global PREDICTION_QOS
    PREDICTION_QOS = args.qos
    sys.path.insert(0, str(REPO))
    window = 5.0 if args.quick else 15.0
    follow_s = 10.0 if args.quick else 30.0
    soak_s = 60.0 if args.quick else 600.0
    notes: list[str] = []
    bundles = [("fashion-mnist", args.bundle or default_bundle(notes))]
    if not args.no_rgb64:
        bundles.append(("rgb64 untrained", rgb64_bundle(CACHE / "rgb64")))
    print(f"machine: {machine()}", flush=True)
    pin(OTHER_CORE)  # this process (subscriber) and the broker stay off the agent's core
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="edgecv-agent-bench-") as tmp:
        work = Path(tmp)
        broker, port = start_broker(work)
        try:
            for name, path in bundles:
                for rt in bundle_runtimes(path):
                    row = Row(name, rt)
                    print(f"… {name} / {rt}", file=sys.stderr, flush=True)
                    bare = bare_loop(path, rt, window)
                    row.bare_fps = bare["fps"]
                    row.agent_fps = throughput(work, port, path, rt, window)
                    row.batched_fps = throughput(work, port, path, rt, window, batch_max=BATCH_MAX)
                    if args.drop_caches:
                        drop_page_cache(notes)
                    f = follow(work, port, path, rt, follow_s)
                    row.infer_ms, row.cpu_30fps, row.lat_p50, row.lat_p99, row.rss = (
                        f["infer"], f["cpu"], f["p50"], f["p99"], f["rss"])
                    row.extra = {"bare_infer_ms": bare["infer_ms"], "rate_30fps": f["rate"], "gaps": f["gaps"],
                                 "rss_anon": f["rss_anon"], "rss_file": f["rss_file"],
                                 "device_p99": f["device_p99"], "load": f["load"]}
                    rows.append(row)
            soak_bundle, soak_rt = bundles[0][1], bundle_runtimes(bundles[0][1])[-1]
            print(f"… soak {soak_s:.0f} s ({bundles[0][0]} / {soak_rt}, 30 fps)", file=sys.stderr, flush=True)
            if args.drop_caches:
                drop_page_cache(notes)
            soak = follow(work, port, soak_bundle, soak_rt, soak_s, rss_samples=True)
        finally:
            broker.terminate()
            broker.wait(10)
    print_table(rows, soak, soak_rt, soak_s, notes)
    if args.json:
        table = [r.__dict__ | {"ratio": r.ratio, "ratio_batched": r.ratio_batched} for r in rows]
        args.json.write_text(json.dumps({"machine": machine(), "rows": table, "soak": soak, "notes": notes}, indent=2,
                                        default=str))
    return 0


def print_table(rows: list[Row], soak: dict[str, Any], soak_rt: str, soak_s: float, notes: list[str]) -> None:
    header = ("bundle", "runtime", "bare fps", "agent fps", "agent/bare", "batched fps", "batched/bare", "infer ms",
              "CPU @30fps", "lat p50 ms", "lat p99 ms", "p99 target", "on-device p99", "RSS MB", "anon+file MB", "load")
    lines = [header]
    for r in rows:
        target = r.infer_ms + 10.0
        lines.append((r.bundle, r.runtime, f"{r.bare_fps:.0f}", f"{r.agent_fps:.0f}", f"{100 * r.ratio:.0f} %",
                      f"{r.batched_fps:.0f}", f"{100 * r.ratio_batched:.0f} %",
                      f"{r.infer_ms:.3f}", f"{r.cpu_30fps:.1f} %", f"{r.lat_p50:.2f}", f"{r.lat_p99:.2f}",
                      f"≤ {target:.1f}", f"{r.extra['device_p99']:.2f}", f"{r.rss:.0f}",
                      f"{r.extra['rss_anon']:.0f}+{r.extra['rss_file']:.0f}", f"{r.extra['load']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print()
    for line in lines:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))))
    print(f"\nRSS soak ({soak_s:.0f} s at 30 fps, {soak_rt}): {soak['rss_first']:.1f} MB after {soak_s / 6:.0f} s → "
          f"{soak['rss_last']:.1f} MB at the end ({soak['growth']:+.2f} %); CPU {soak['cpu']:.1f} %, "
          f"latency p50 {soak['p50']:.2f} / p99 {soak['p99']:.2f} ms (on-device p99 {soak['device_p99']:.2f}), "
          f"seq gaps {soak['gaps']}")
    print(f"RSS = VmRSS = RssAnon + RssFile (+ shmem); page cache in large folios (FileHugePages) at the end: "
          f"{file_huge_pages_mb():.0f} MB — when it is large, RssFile of the shared libraries is inflated")
    print("lat = frame capture → subscriber (loopback); on-device = frame capture → prediction queued in the outbox; "
          "load = 1-min load average of the machine at the end of the 30 fps run")
    print(f"agent fps: one prediction per MQTT message (publish.batch_max = 1, the default); batched: "
          f"publish.batch_max = {BATCH_MAX} (every message a JSON array of what is queued)")
    print("targets: agent/bare ≥ 85 %, CPU @30fps ≤ 25 %, p99 ≤ infer + 10 ms, RSS ≤ 120 MB (onnxruntime) / "
          "≤ 100 MB (litert), soak growth < 5 %")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    sys.exit(main())
