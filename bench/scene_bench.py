"""Scene benchmark: camera regions and stable states on a camera-like scene, measured with the shipped tools.

    python bench/scene_bench.py                 # full form (~65 min on 2 busy cores: training, 5 x 10-minute runs)
    python bench/scene_bench.py --quick         # short form (~10 min; tests/e2e/test_scene_bench.py, slow)
    python bench/scene_bench.py --json out.json

The scene is `synthetic:scene` (agent/vision/scene.py): 640x480, a textured wall with a garage door that opens and
closes at random times, lighting drift, sensor noise, JPEG artefacts, camera shake, people, cars and moths passing
(sometimes in front of the door). Every frame carries the door's true state, and frame i is a function of the seed
and i, so the agent's published states can be scored frame by frame.

1. Data: door crops (the region crop, 192x288 pixels) of frames from one "day" of the scene (frames 0.., with
   more changes and passers-by than the default, so both states and occlusions are well represented), reduced to
   48x72 with the same area resize the agent applies, written as an image folder <root>/closed, <root>/open.
2. Model: `edgecv optimize --data <root> --size 72x48 --color rgb ...` (the shipped pipeline: train, prune,
   int8 ONNX + int8 TFLite, verified, bundled). Cached under ~/.cache/edgecv-bench/scene-<hash>/.
3. Runs of the shipped agent (`edgecv-agent run`, a real process pinned to core 0, broker and this script on
   core 1) on another "day" of the same scene (start=1000000), camera at 10 fps, with four regions on the same
   crop: consecutive = 1, 3 and 5 with trigger "every" (the same per-frame results, so the stabiliser is compared
   on identical input; consecutive = 1 is the per-frame top-1), and the shipped defaults (motion+interval,
   consecutive 3). Measured from what arrives at an MQTT subscriber:
   - changing scene: stable-state accuracy (the fraction of frames, from the first confirmed state on, whose
     published state is the truth), the delay from a true change (the frame where the truth flips, halfway through
     the door's roll) to the state message's arrival (negative: confirmed during the roll, before the flip),
     changes missed, wrong changes (a state that is not the truth while the door stands still);
   - static scene, door closed and door open (passers-by every 20 s on average), door closed on a busy street
     (every 2.5 s, many in front of the door), and door closed in conditions harsher than any in training (darker
     "nights", more noise, heavier JPEG; `--static stress`): state changes after the first (false flips, target 0)
     against per-frame top-1 flips, per hour;
4. CPU per region at 10 fps on one core: short runs with 0 (source only), 1, 2 and 4 regions classified on every
   frame, a camera classifying whole frames, and one region with the default trigger on the static and the
   changing scene; CPU time of the agent process from /proc/<pid>/stat. CPU per region is the slope of CPU against
   the number of regions (least squares).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark's process helpers
from agent_bench import AGENT_CORE, OTHER_CORE, agent_exe, cpu_seconds, pin, start_broker

from edgecv.agent.config import RegionConfig
from edgecv.agent.vision.regions import resolve_crop
from edgecv.agent.vision.scene import DOOR_CROP, SCENE_LABELS, Scene, SceneSpec

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgecv-bench"
FPS = 10.0
WIDTH, HEIGHT = 640, 480
MODEL_W, MODEL_H = 48, 72  # the 192x288 crop / 4: the agent's resize is then an exact area resize, as in training
TRAIN_SCENE = {"hold": "40", "objects": "40"}  # the training "day": more changes and occluders than the default
RUN_START = 1_000_000  # the agent runs on another "day" of the same scene
STABILISED = {"n1": 1, "n3": 3, "n5": 5}  # region name -> consecutive, all with trigger "every"
DEFAULT_REGION = "default"  # the shipped defaults: trigger motion+interval, consecutive 3
STATIC_RUNS = {"closed": ("door closed", "state=closed"), "open": ("door open", "state=open"),
               "busy": ("door closed, busy street", "state=closed&objects=25"),
               # harsher than anything in training: darker "nights" (drift 60 %), noise 12, JPEG quality 30
               "stress": ("door closed, harsher than training", "state=closed&objects=25&noise=12&jpeg=30&drift=60")}
# name -> (title, scene query)
PARTS = ("changing", "static", "cpu")


@dataclass
class Form:
    per_class: int
    epochs: int
    finetune_epochs: int
    changing_s: float
    static_s: float
    cpu_s: float


FORMS = {"full": Form(per_class=1500, epochs=8, finetune_epochs=2, changing_s=600, static_s=600, cpu_s=60),
         "quick": Form(per_class=300, epochs=3, finetune_epochs=1, changing_s=90, static_s=60, cpu_s=15)}


def door_box() -> tuple[int, int, int, int]:
    box = resolve_crop(RegionConfig(name="door", crop=DOOR_CROP), WIDTH, HEIGHT)
    return box.x, box.y, box.w, box.h


# ------------------------------------------------------------------------------------------ data and model
def render_dataset(root: Path, seed: int, per_class: int) -> dict[str, int]:
    """Door crops of the training day, `per_class` per state, as 48x72 PNGs under root/<state>/."""
    scene = Scene(SceneSpec({"seed": str(seed), **TRAIN_SCENE}))
    x, y, w, h = door_box()
    counts = [0, 0]
    for label in SCENE_LABELS:
        (root / label).mkdir(parents=True, exist_ok=True)
    i = 0
    while min(counts) < per_class:
        image, truth = scene.render(i)
        if counts[truth] < per_class:
            small = cv2.resize(image[y:y + h, x:x + w], (MODEL_W, MODEL_H), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(root / SCENE_LABELS[truth] / f"{i:07d}.png"), small)
            counts[truth] += 1
        i += 3  # every third frame: more variety (lighting, passers-by) for the same number of images
    return {label: counts[k] for k, label in enumerate(SCENE_LABELS)} | {"frames_scanned": i // 3}


def train_bundle(form: Form, seed: int, notes: list[str]) -> tuple[Path, dict[str, Any]]:
    """The scene model, trained with `edgecv optimize` (cached by the data and training settings)."""
    key = hashlib.sha256(json.dumps([seed, form.per_class, form.epochs, form.finetune_epochs, TRAIN_SCENE,
                                     MODEL_W, MODEL_H, DOOR_CROP]).encode()).hexdigest()[:12]
    work = CACHE / f"scene-{key}"
    bundle = work / "out" / "scene-door"
    report = work / "out" / "scene-door-report" / "report.json"
    if (bundle / "manifest.json").is_file() and report.is_file():
        notes.append(f"model: cached {bundle}")
        return bundle, json.loads(report.read_text())
    if work.exists():
        shutil.rmtree(work)
    t0 = time.monotonic()
    counts = render_dataset(work / "data", seed, form.per_class)
    print(f"rendered {counts} door crops in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    edgecv = Path(sys.executable).parent / "edgecv"
    cmd = [str(edgecv) if edgecv.exists() else sys.executable, *([] if edgecv.exists() else ["-m", "edgecv.tools.cli"]),
           "optimize", "--data", str(work / "data"), "--size", f"{MODEL_H}x{MODEL_W}", "--color", "rgb",
           "--epochs", str(form.epochs), "--finetune-epochs", str(form.finetune_epochs), "--sparsity", "0.5",
           "--name", "scene-door", "--seed", "0", "--latency-runs", "100", "--out", str(work / "out")]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    notes.append(f"model: `{' '.join(['edgecv', *cmd[cmd.index('optimize'):]])}` on {counts['closed']} + "
                 f"{counts['open']} crops, {time.monotonic() - t0:.0f} s")
    return bundle, json.loads(report.read_text())


# ------------------------------------------------------------------------------------------ agent runs
class Recorder:
    """Everything one device publishes, with receive times (subscribed before the agent starts)."""

    def __init__(self, port: int, device: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.predictions: list[tuple[float, dict[str, Any]]] = []
        self.states: list[tuple[float, dict[str, Any]]] = []
        self.status: list[dict[str, Any]] = []
        self.health: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._frozen = False  # predictions and states after freeze() are not recorded (status and health are)
        ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"rec-{device}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"edgecv/{device}/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise RuntimeError("the recorder did not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        t = time.time()
        kind = msg.topic.split("/", 2)[2]
        if not msg.payload or not (kind in ("predictions", "status", "health") or kind.startswith("state/")):
            return  # not scored (and a pushed bundle's chunks are binary)
        doc = json.loads(msg.payload)
        with self._lock:
            if self._frozen and (kind == "predictions" or kind.startswith("state/")):
                return
            if kind == "predictions":
                self.predictions.extend((t, d) for d in (doc if isinstance(doc, list) else [doc]))
            elif kind.startswith("state/"):
                self.states.append((t, doc))
            elif kind == "status":
                self.status.append(doc)
            elif kind == "health":
                self.health.append(doc)

    def wait(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self):
                    return True
            time.sleep(0.05)
        return False

    def freeze(self) -> None:
        """Keep the predictions and states recorded so far as the run's (what comes later is not scored)."""
        with self._lock:
            self._frozen = True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def region_table(name: str, trigger: str = "every", consecutive: int = 3, **extra: Any) -> str:
    x, y, w, h = door_box()
    lines = ["[[camera.region]]", f'name = "{name}"', f"crop = [{x}, {y}, {w}, {h}]", f'trigger = "{trigger}"',
             f"consecutive = {consecutive}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines)


_runs = iter(range(10**6))
ALLOW_UNSIGNED = ("[security]", "allow_unsigned = true")


@dataclass
class Run:
    device: str
    recorder: Recorder
    seconds: float
    cpu_percent: float
    status: dict[str, Any] = field(default_factory=dict)


def run_agent(work: Path, port: int, bundle: Path, runtime: str, source: str, regions: list[str], seconds: float,
              warmup_s: float = 5.0, *, security: Sequence[str] = ALLOW_UNSIGNED, extra: Sequence[str] = (),
              store: Path | None = None, then: Callable[[str], None] | None = None) -> Run:
    """Run the agent for `seconds` after its first prediction; CPU share measured after `warmup_s`.

    `security` and `extra` are config lines (the [security] section, further sections); `store` is the model store
    (default a fresh one: a store a previous run left keeps its active model). `then(device)` runs after the
    measured period while the agent still runs; what the agent publishes meanwhile is not part of the run."""
    device = f"scene-{os.getpid()}-{next(_runs)}"
    d = work / device
    d.mkdir(parents=True)
    (d / "agent.toml").write_text("\n".join([
        f'device_id = "{device}"', 'log_level = "warning"', "[broker]", 'host = "127.0.0.1"', f"port = {port}",
        "[[camera]]", 'name = "garage"', f'source = "{source}"', f"fps = {FPS}", *regions,
        "[model]", f'store = "{store or d / "models"}"', f'bundle = "{bundle}"', f'runtime = "{runtime}"',
        "[publish]", "top_k = 2", "[health]", "interval_s = 5.0", *security, *extra,
        "[homeassistant]", "enabled = false", ""]))
    recorder = Recorder(port, device)
    proc = subprocess.Popen([*agent_exe(), "run", "--config", str(d / "agent.toml")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "agent.log", "wb"), preexec_fn=lambda: pin(AGENT_CORE))
    try:
        if not recorder.wait(lambda r: r.predictions, 120):
            raise RuntimeError(f"no prediction within 120 s; see {d / 'agent.log'}")
        start = time.monotonic()
        time.sleep(min(warmup_s, seconds / 3))
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(max(0.0, seconds - (t0 - start)))
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        if then is not None:
            recorder.freeze()
            then(device)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    recorder.wait(lambda r: any(s.get("state") == "stopped" for s in r.status), 10)
    recorder.close()
    status: dict[str, Any] = next((s for s in reversed(recorder.status) if s.get("state") == "stopped"), {})
    return Run(device, recorder, t1 - start, 100.0 * (cpu1 - cpu0) / (t1 - t0), status)


# ------------------------------------------------------------------------------------------ scoring
def frame_times(run: Run, scene: Scene, region: str = "n1") -> np.ndarray:
    """Capture time of every frame 0..N-1: the `region` (consecutive 1, trigger "every") is classified on every
    frame, in order, so its k-th prediction is frame k (checked against the scene's truth)."""
    preds = [d for _, d in sorted(run.recorder.predictions, key=lambda td: td[1]["seq"]) if d.get("region") == region]
    truths = [d.get("truth") for d in preds]
    expected = [scene.truth_at(k) for k in range(len(preds))]
    if truths != expected:
        raise RuntimeError(f"the {region} predictions do not line up with the scene's frames (a frame failed?)")
    return np.array([d["frame_ts"] for d in preds])


def confirmed(run: Run, region: str) -> list[tuple[float, dict[str, Any]]]:
    return [(t, d) for t, d in run.recorder.states if d["region"] == region and d["reason"] == "confirmed"]


def score_changing(run: Run, scene: Scene, region: str, times: np.ndarray) -> dict[str, Any]:
    n = len(times)
    states = confirmed(run, region)
    if not states:
        return {"region": region, "error": "no state was confirmed"}
    first = states[0][1]["frame"]
    timeline = np.full(n, -1)
    for _, d in states:
        if d["frame"] < n:
            timeline[d["frame"]:] = SCENE_LABELS.index(d["state"])
    truth = np.array([scene.truth_at(k) for k in range(n)])
    window = slice(first, n)
    accuracy = float((timeline[window] == truth[window]).mean())
    changes = [k for k in scene.changes(1, n) if k > first]
    delays, frames_late, missed = [], [], 0
    for j, k in enumerate(changes):
        # a change counts from the first frame of the door's roll (its truth flips halfway through the roll): a
        # state confirmed while the door is more than half-way is early, not wrong; the delay is then negative
        begin = k
        while begin > 0 and scene.rolling(begin - 1):
            begin -= 1
        until = changes[j + 1] if j + 1 < len(changes) else n
        hit = next(((t, d) for t, d in states
                    if begin <= d["frame"] < until and d["state"] == SCENE_LABELS[truth[k]]), None)
        if hit is None:
            missed += 1
            continue
        delays.append(hit[0] - times[k])
        frames_late.append(hit[1]["frame"] - k)
    # a wrong change: a state that is not the truth of its frame, the door standing still (not rolling)
    wrong = sum(1 for _, d in states if d["frame"] < n and not scene.rolling(d["frame"])
                and SCENE_LABELS.index(d["state"]) != truth[d["frame"]])
    return {"region": region, "frames": n, "accuracy": accuracy, "unknown_frames": first, "true_changes": len(changes),
            "missed": missed, "wrong_changes": wrong, "state_changes": len(states) - 1,
            "delay_s_median": statistics.median(delays) if delays else None,
            "delay_s_max": max(delays) if delays else None,
            "delay_frames_median": statistics.median(frames_late) if frames_late else None}


def per_frame(run: Run, region: str = "n1") -> dict[str, Any]:
    preds = [d for _, d in sorted(run.recorder.predictions, key=lambda td: td[1]["seq"]) if d.get("region") == region]
    labels = [d["top"][0]["label"] for d in preds]
    correct = sum(SCENE_LABELS[d["truth"]] == lab for d, lab in zip(preds, labels, strict=True))
    flips = sum(a != b for a, b in itertools.pairwise(labels))
    return {"frames": len(preds), "top1_accuracy": correct / max(1, len(preds)), "top1_flips": flips}


def score_static(run: Run) -> dict[str, Any]:
    preds = [d for _, d in sorted(run.recorder.predictions, key=lambda td: td[1]["seq"]) if d.get("region") == "n1"]
    hours = len(preds) / FPS / 3600
    labels = [d["top"][0]["label"] for d in preds]
    truth = SCENE_LABELS[preds[0]["truth"]] if preds else None
    out: dict[str, Any] = {"frames": len(preds), "hours": hours,
                           "top1_flips": sum(a != b for a, b in itertools.pairwise(labels)),
                           "top1_wrong_frames": sum(lab != truth for lab in labels)}
    for region in [*STABILISED, DEFAULT_REGION]:
        states = confirmed(run, region)
        out[region] = {"state_changes_after_first": max(0, len(states) - 1),
                       "final_state": states[-1][1]["state"] if states else None}
    return out


# ------------------------------------------------------------------------------------------ main
def scene_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options every scene benchmark takes: --quick, --seed, --runtime, --json."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short form (CI)")
    parser.add_argument("--seed", type=int, default=7, help="the scene (default 7)")
    parser.add_argument("--runtime", default="auto", help="the agent's model.runtime (default auto)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def main() -> int:
    parser = scene_arguments(__doc__)
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"what to run, comma-separated (default all: {','.join(PARTS)})")
    parser.add_argument("--static", default=",".join(STATIC_RUNS), metavar="NAMES",
                        help=f"the static runs, comma-separated (default all: {','.join(STATIC_RUNS)})")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: expected some of {', '.join(PARTS)}, got {args.parts}")
    if not set(args.static.split(",")) <= set(STATIC_RUNS):
        parser.error(f"--static: expected some of {', '.join(STATIC_RUNS)}, got {args.static}")
    form = FORMS["quick" if args.quick else "full"]
    notes: list[str] = []
    pin(OTHER_CORE)
    bundle, report = train_bundle(form, args.seed, notes)
    work = Path(tempfile.mkdtemp(prefix="edgecv-scene-bench-"))
    broker, port = start_broker(work)
    results: dict[str, Any] = {"form": "quick" if args.quick else "full", "seed": args.seed, "notes": notes,
                               "machine": {"cpu": platform.processor() or platform.machine(),
                                           "cores": os.cpu_count(), "python": platform.python_version(),
                                           "load_before": os.getloadavg()},
                               "model": {"bundle": str(bundle), "stages": report.get("stages")}}
    try:
        base = f"synthetic:scene?seed={args.seed}&start={RUN_START}"
        regions = [*(region_table(name, "every", n) for name, n in STABILISED.items()), region_table(DEFAULT_REGION,
                                                                                                     "motion+interval")]
        scene = Scene(SceneSpec({"seed": str(args.seed), "start": str(RUN_START)}))
        if "changing" in parts:
            print(f"changing scene, {form.changing_s:g} s ...", file=sys.stderr)
            run = run_agent(work, port, bundle, args.runtime, base, regions, form.changing_s)
            times = frame_times(run, scene)
            results["runtime"] = (run.recorder.status[0].get("model") or {}).get("runtime")
            results["changing"] = {"per_frame": per_frame(run),
                                   "regions": [score_changing(run, scene, r, times)
                                               for r in [*STABILISED, DEFAULT_REGION]],
                                   "cpu_percent_4_regions": run.cpu_percent}
        if "static" in parts:
            results["static"] = {}
            for name in args.static.split(","):
                title, query = STATIC_RUNS[name]
                print(f"static scene ({title}), {form.static_s:g} s ...", file=sys.stderr)
                run = run_agent(work, port, bundle, args.runtime, f"{base}&static=1&{query}", regions, form.static_s)
                results["runtime"] = (run.recorder.status[0].get("model") or {}).get("runtime")
                results["static"][name] = score_static(run)
        if "cpu" in parts:
            results["cpu"] = cpu_runs(work, port, bundle, args.runtime, base, form)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_after"] = os.getloadavg()
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def cpu_runs(work: Path, port: int, bundle: Path, runtime: str, base: str, form: Form) -> dict[str, Any]:
    """CPU share of one core at 10 fps: the source alone, whole frames, 1/2/4 regions on every frame, the default
    trigger; and the slope per region."""
    cpu: dict[str, float] = {}
    variants = {
        "source only (1 region, classified once)": (base, [region_table("r0", "interval", interval_s=3600.0)]),
        "whole frame (no regions)": (base, []),
        **{f"{k} region(s), every frame": (base, [region_table(f"r{i}") for i in range(k)]) for k in (1, 2, 4)},
        "1 region, motion+interval, static scene": (f"{base}&static=1", [region_table("r0", "motion+interval")]),
        "1 region, motion+interval, changing scene": (base, [region_table("r0", "motion+interval")]),
    }
    for name, (source, regs) in variants.items():
        print(f"CPU: {name}, {form.cpu_s:g} s ...", file=sys.stderr)
        cpu[name] = run_agent(work, port, bundle, runtime, source, regs, form.cpu_s,
                              warmup_s=min(5.0, form.cpu_s / 3)).cpu_percent
    xs = [0, 1, 2, 4]
    ys = [cpu["source only (1 region, classified once)"], *(cpu[f"{k} region(s), every frame"] for k in (1, 2, 4))]
    slope = float(np.polyfit(xs, ys, 1)[0])
    return {"percent_of_one_core": cpu, "per_region_every_frame": slope}


def render(r: dict[str, Any]) -> str:
    lines = [f"## Scene benchmark ({r['form']} form, scene seed {r['seed']}, runtime {r.get('runtime')})", ""]
    for stage in r["model"].get("stages") or []:
        if stage.get("accuracy") is not None:
            lines.append(f"- model, {stage['stage']} ({stage.get('runtime')}): accuracy {stage['accuracy']:.4f} on the "
                         f"held-out door crops of the training day, {stage.get('latency_ms', 0) * 1000:.0f} µs")
    if "changing" in r:
        lines += changing_table(r)
    if "static" in r:
        lines += static_table(r)
    if "cpu" in r:
        lines += ["", f"| CPU at {FPS:g} fps, one core | % of one core |", "|---|---:|"]
        for name, value in r["cpu"]["percent_of_one_core"].items():
            lines.append(f"| {name} | {value:.1f} |")
        lines.append(f"| per region classified on every frame (slope) | {r['cpu']['per_region_every_frame']:.2f} |")
    lines += ["", f"load average before {r['machine']['load_before']}, after {r['machine']['load_after']}"]
    lines += [f"- {n}" for n in r["notes"]]
    return "\n".join(lines)


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def changing_table(r: dict[str, Any]) -> list[str]:
    f = _f
    lines: list[str] = []
    pf = r["changing"]["per_frame"]
    lines += ["", f"Changing scene: {pf['frames']} frames at {FPS:g} fps ({pf['frames'] / FPS / 60:.1f} min); "
              f"per-frame top-1 accuracy {pf['top1_accuracy']:.4f}, {pf['top1_flips']} top-1 changes", "",
              "| region | consecutive | trigger | state accuracy | true changes | missed | wrong changes | "
              "delay median s | delay max s | delay median frames |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["changing"]["regions"]:
        name = row["region"]
        cons, trig = (STABILISED[name], "every") if name in STABILISED else (3, "motion+interval")
        lines.append(f"| {name} | {cons} | {trig} | {f(row.get('accuracy'), '{:.4f}')} | {row.get('true_changes')} | "
                     f"{row.get('missed')} | {row.get('wrong_changes')} | {f(row.get('delay_s_median'), '{:.2f}')} | "
                     f"{f(row.get('delay_s_max'), '{:.2f}')} | {f(row.get('delay_frames_median'), '{:.0f}')} |")
    return lines


def static_table(r: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    lines += ["", "| static scene | minutes | per-frame top-1 changes (per hour) | frames wrong | "
              + " | ".join(f"state changes {k} (per hour)" for k in [*STABILISED, DEFAULT_REGION]) + " |",
              "|---|---:|---:|---:|" + "---:|" * (len(STABILISED) + 1)]
    for state, s in r["static"].items():
        h = max(s["hours"], 1e-9)
        cells = " | ".join(f"{s[k]['state_changes_after_first']} ({s[k]['state_changes_after_first'] / h:.0f})"
                           for k in [*STABILISED, DEFAULT_REGION])
        title = STATIC_RUNS[state][0] if state in STATIC_RUNS else state
        lines.append(f"| {title} | {s['hours'] * 60:.1f} | {s['top1_flips']} ({s['top1_flips'] / h:.0f}) | "
                     f"{s['top1_wrong_frames']} | {cells} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
