"""Loop benchmark (issue 15, "Close the loop"): a device whose day-trained model meets an infrared night, the
samples it kept collected, labelled, a model fine-tuned from the deployed one and pushed back, measured before and
after, with the wall time of every step; all with the shipped tools as real processes.

    python bench/loop_bench.py                  # full form (~40 min on 2 busy cores: 10-minute night runs)
    python bench/loop_bench.py --quick          # short form (~7 min; tests/e2e/test_loop_bench.py, slow)
    python bench/loop_bench.py --json out.json --seed 7

The scene is `synthetic:scene` (agent/vision/scene.py, as in bench/scene_bench.py, whose data, model, agent runs
and scoring this reuses). The night is `ir=1` with more noise, heavier JPEG and deeper lighting swings
(SHIFT below): grey, flat and dark, a condition the day model never saw.

1. Day model: door crops of the training day, `edgecv optimize` (scene_bench's cached model), copied with its
   checkpoint and signed with a key from `edgecv keys generate`; the agent trusts that key (security.keyring).
2. Before: the shipped agent (`edgecv-agent run`, pinned to core 0; broker, tools and this script on core 1) on
   the night (its own stretch of the scene, start=2000000) at 10 fps for T minutes, with the door region twice:
   "n1" classified on every frame (per-frame top-1) and "door" with the shipped defaults (trigger motion+interval,
   consecutive 3: the stable state). Its sample store is on: low confidence, state changes, pending states and a
   periodic sample, the region crop. Scored against the scene's truth with scene_bench's scoring.
3. `edgecv collect --device ... --out <dataset> --delete-after` (a real CLI process) while the agent runs.
4. Labelling by script: every sample in `_unlabelled` is moved into the folder of its true class with LabelStore
   (the moves `edgecv label` makes, journalled the same way); the truth comes from the sample's `truth` field, an
   oracle standing in for the person at the page (the page itself is tested separately).
5. `edgecv optimize --data <dataset> --init-from <day bundle> --key ...`: fine-tuned from the deployed model, the
   day data merged by class name, the next version.
6. `edgecv push` of the new archive to the running agent; `edgecv cmd ping` shows the version it serves.
7. After: the agent restarted on the same model store (so it serves what was pushed) on another, unseen stretch of
   the night (start=3000000), scored the same way; and a day check (start=1000000, scene defaults) with the day
   model and with the fine-tuned one, to see whether the night was learnt at the expense of the day.

Each step's wall time is printed; the table gives, per condition and model, the stable-state accuracy (fraction of
frames from the first confirmed state on whose published state is the truth), the per-frame top-1 accuracy, true
changes missed and wrong changes (a confirmed state that is not the truth while the door stands still).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks' helpers
from agent_bench import OTHER_CORE, machine, pin, start_broker
from scene_bench import (
    DEFAULT_REGION,
    FORMS,
    RUN_START,
    Form,
    Run,
    frame_times,
    per_frame,
    region_table,
    run_agent,
    scene_arguments,
    score_changing,
    train_bundle,
)

from edgecv.agent.vision.scene import SCENE_LABELS, Scene, SceneSpec
from edgecv.tools.dataset_layout import REASONS

SHIFT = "ir=1&noise=10&jpeg=40&drift=45"  # the night: infrared, noisier, heavier JPEG, deeper lighting swings
BEFORE_START, AFTER_START, DAY_START = 2_000_000, 3_000_000, RUN_START  # stretches of the scene, far apart
PER_FRAME, STABLE = "n1", DEFAULT_REGION  # the region classified on every frame; the shipped stable state
MAX_SIDECAR_BYTES = 64 * 1024


@dataclass(frozen=True)
class LoopForm:
    train: Form  # the day model (scene_bench's form, so its cache is shared)
    night_s: float  # each night run
    day_s: float  # each day check
    tune_epochs: int
    every_s: float  # the periodic sample


LOOP_FORMS = {"full": LoopForm(FORMS["full"], night_s=600, day_s=300, tune_epochs=8, every_s=3.0),
              "quick": LoopForm(FORMS["quick"], night_s=120, day_s=45, tune_epochs=2, every_s=1.0)}


def tool() -> list[str]:
    """The `edgecv` command of this interpreter's environment."""
    exe = Path(sys.executable).parent / "edgecv"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edgecv.tools.cli"]


def edgecv(*args: str, timeout: float = 3600) -> str:
    """Run `edgecv ARGS` and return its stdout; a failure stops the bench with the tool's own message."""
    cmd = [*tool(), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`edgecv {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


class Steps:
    """Wall time of each step, printed as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"{name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        out = fn()
        self.seconds[name] = time.monotonic() - t0
        print(f"{name}: {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)
        return out


# ------------------------------------------------------------------------------------------ 1. the day model
def day_model(form: LoopForm, seed: int, work: Path, notes: list[str]) -> tuple[Path, Path, Path, dict[str, Any]]:
    """(signed day bundle folder, private key, public key, its optimize report): scene_bench's model copied with its
    checkpoint (what --init-from reads beside the bundle) and signed with a fresh key."""
    cached, report = train_bundle(form.train, seed, notes)
    day = work / "day"
    day.mkdir()
    shutil.copytree(cached, day / cached.name)
    shutil.copy2(cached.parent / f"{cached.name}.pt", day / f"{cached.name}.pt")
    key = work / "keys" / "bench.key"
    edgecv("keys", "generate", "--out", str(key))
    edgecv("bundle", "sign", str(day / cached.name), "--key", str(key))
    return day / cached.name, key, key.with_suffix(".pub"), report


def samples_section(store: Path, form: LoopForm) -> list[str]:
    """The agent's sample store: region crops that are uncertain, at a state change, of a pending state, and one
    every `every_s` seconds."""
    return ["[samples]", "enabled = true", f'dir = "{store}"', "max_mb = 200", "low_confidence = 0.8",
            "state_changes = true", "pending = true", f"every_s = {form.every_s}", "min_interval_s = 1.0",
            'what = "crop"', "jpeg_quality = 90"]


def regions() -> list[str]:
    return [region_table(PER_FRAME, "every", 1), region_table(STABLE, "motion+interval")]


def score(run: Run, query: str) -> dict[str, Any]:
    """Stable-state and per-frame accuracy of one run against the scene's truth (scene_bench's scoring)."""
    scene = Scene(SceneSpec(dict(kv.split("=", 1) for kv in query.split("&"))))
    times = frame_times(run, scene, PER_FRAME)
    stable = score_changing(run, scene, STABLE, times)
    model = (run.recorder.status[0].get("model") or {}) if run.recorder.status else {}
    return {"stable": stable, "per_frame": per_frame(run, PER_FRAME), "model_version": model.get("version"),
            "runtime": model.get("runtime")}


# ------------------------------------------------------------------------------------------ 3. and 4.
def read_truth(sidecar: Path) -> str | None:
    """The true class a sample's sidecar records (`truth`: a label, or an index into SCENE_LABELS), else None."""
    try:
        if sidecar.stat().st_size > MAX_SIDECAR_BYTES:
            return None
        doc = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    truth = doc.get("truth") if isinstance(doc, dict) else None
    if isinstance(truth, bool):
        return None
    if isinstance(truth, int) and 0 <= truth < len(SCENE_LABELS):
        return SCENE_LABELS[truth]
    return truth if truth in SCENE_LABELS else None


def label_by_truth(dataset: Path) -> dict[str, Any]:
    """Move every waiting sample into its true class (or `_junk` without a truth) with LabelStore, journalled as the
    page's moves are; count what the deployed model had predicted wrong."""
    from edgecv.tools.label.store import LabelStore

    store = LabelStore(dataset)
    folders = {c.name for c in store.summary().classes if c.has_folder}
    for name in SCENE_LABELS:
        if name not in folders:
            store.add_class(name)
    labelled: Counter[str] = Counter()
    wrong, junk = 0, 0
    for sample in store.samples():
        truth = read_truth(store.unlabelled / f"{sample.id}.json")
        if truth is None:
            store.junk(sample.name)
            junk += 1
            continue
        store.label(sample.name, truth)
        labelled[truth] += 1
        wrong += int(sample.sidecar is None or sample.sidecar.predicted != truth)
    return {"labelled": sum(labelled.values()), "by_class": dict(labelled), "day_model_wrong": wrong, "junk": junk}


def collected_reasons(dataset: Path) -> dict[str, int]:
    """Samples in the collected dataset by the reason the device kept them (from the sidecars)."""
    reasons: Counter[str] = Counter({r: 0 for r in REASONS})
    for sidecar in (dataset / "_unlabelled").glob("*.json"):
        try:
            doc = json.loads(sidecar.read_text()) if sidecar.stat().st_size <= MAX_SIDECAR_BYTES else {}
        except (OSError, ValueError):
            doc = {}
        reasons[str(doc.get("reason") if isinstance(doc, dict) else None)] += 1
    return dict(reasons)


def served_version(device: str, broker: str) -> str | None:
    """The model version the device says it serves (`edgecv cmd ping`)."""
    answers = json.loads(edgecv("cmd", "ping", "--device", device, "--broker", broker, "--json", timeout=120))
    for answer in answers if isinstance(answers, list) else [answers]:
        model = (answer.get("result") or answer).get("model") if isinstance(answer, dict) else None
        if isinstance(model, dict) and model.get("version"):
            return str(model["version"])
    return None


# ------------------------------------------------------------------------------------------ the loop
def loop(form: LoopForm, seed: int, work: Path, port: int, runtime: str, notes: list[str]) -> dict[str, Any]:
    steps = Steps()
    broker = f"127.0.0.1:{port}"
    bundle, key, pub, report = steps.run("1. day model", lambda: day_model(form, seed, work, notes))
    security = ["[security]", f'keyring = "{pub}"']
    night = f"seed={seed}&{SHIFT}"
    day = f"seed={seed}"
    store = work / "device-models"
    dataset = work / "collected"
    out: dict[str, Any] = {"steps": steps.seconds,
                           "day_model": {"version": report.get("version"), "data": report.get("data"),
                                         "optimize_s": sum((report.get("timings_s") or {}).values())}}

    def close_the_loop(device: str) -> None:
        """Steps 3-6, while the device keeps running on the night."""
        out["device"] = device
        collect = steps.run("3. collect", lambda: edgecv("collect", "--device", device, "--out", str(dataset),
                                                         "--delete-after", "--broker", broker, "--json",
                                                         "--no-progress", timeout=1800))
        out["collect"] = {"cli": [{k: v for k, v in r.items() if k not in ("fetched", "already")}
                                  for r in json.loads(collect)], "by_reason": collected_reasons(dataset)}
        out["label"] = steps.run("4. label by script (truth)", lambda: label_by_truth(dataset))
        tuned = work / "tuned"
        result = steps.run("5. fine-tune (edgecv optimize --init-from)", lambda: json.loads(edgecv(
            "optimize", "--data", str(dataset), "--init-from", str(bundle), "--epochs", str(form.tune_epochs),
            "--finetune-epochs", str(form.train.finetune_epochs), "--sparsity", "0.5", "--seed", "0",
            "--latency-runs", "100", "--key", str(key), "--out", str(tuned), "--no-progress", "--json")))
        record = result["record"]
        out["tuned"] = {"bundle": result["bundle"], "archive": result["archive"], "version": record["version"],
                        "stages": [{k: s.get(k) for k in ("stage", "runtime", "accuracy")}
                                   for s in record.get("stages", [])],
                        "sources": (record["model"].get("init_from") or {}).get("sources")}
        push = steps.run("6. push", lambda: json.loads(edgecv("push", result["archive"], "--device", device,
                                                              "--broker", broker, "--timeout", "600", "--json",
                                                              "--no-progress")))
        out["push"] = push
        out["served_after_push"] = served_version(device, broker)

    def before() -> Run:
        return run_agent(work, port, bundle, runtime, f"synthetic:scene?{night}&start={BEFORE_START}", regions(),
                         form.night_s, security=security, extra=samples_section(work / "device-samples", form),
                         store=store, then=close_the_loop)

    # steps 3-6 run inside the "before" run (the device keeps running); its own time is the rest
    run = before()
    out["runs"] = {("night", "day model"): score(run, f"{night}&start={BEFORE_START}")}
    steps.seconds["2. before: the night with the day model"] = run.seconds
    tuned_bundle = Path(out["tuned"]["bundle"])
    after = steps.run("7. after: an unseen night with the fine-tuned model", lambda: run_agent(
        work, port, bundle, runtime, f"synthetic:scene?{night}&start={AFTER_START}", regions(), form.night_s,
        security=security, store=store))
    out["runs"][("night", "fine-tuned")] = score(after, f"{night}&start={AFTER_START}")
    for name, b in (("day model", bundle), ("fine-tuned", tuned_bundle)):
        r = steps.run(f"7. day check, {name}", lambda b=b: run_agent(
            work, port, b, runtime, f"synthetic:scene?{day}&start={DAY_START}", regions(), form.day_s,
            security=security))
        out["runs"][("day", name)] = score(r, f"{day}&start={DAY_START}")
    out["runs"] = [{"condition": c, "model": m, **v} for (c, m), v in out["runs"].items()]
    return out


def main() -> int:
    args = scene_arguments(__doc__).parse_args()
    form_name = "quick" if args.quick else "full"
    form = LOOP_FORMS[form_name]
    notes: list[str] = []
    pin(OTHER_CORE)
    work = Path(tempfile.mkdtemp(prefix="edgecv-loop-bench-"))
    broker, port = start_broker(work)
    results: dict[str, Any] = {"form": form_name, "seed": args.seed, "shift": SHIFT, "notes": notes,
                               "machine": machine()}
    try:
        results |= loop(form, args.seed, work, port, args.runtime, notes)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def _f(v: Any, fmt: str = "{:.4f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(r: dict[str, Any]) -> str:
    lines = [f"## Loop benchmark ({r['form']} form, scene seed {r['seed']}, night = `{r['shift']}`)", "",
             f"machine: {r['machine']}; load average after {r['load_after'][0]:.1f}", ""]
    c = r["collect"]
    lab = r["label"]
    lines += [f"- day model {r['day_model']['version']}: `edgecv optimize` took "
              f"{r['day_model']['optimize_s']:.0f} s (its report; step 1 reuses scene_bench's cached model when there "
              "is one)",
              f"- collected {sum(c['by_reason'].values())} samples from {r['device']} "
              f"({sum(x.get('bytes', 0) for x in c['cli']) / 1e6:.1f} MB): "
              + ", ".join(f"{k} {v}" for k, v in c["by_reason"].items()),
              f"- labelled by script from each sample's recorded truth (an oracle standing in for the person at the "
              f"page): {lab['labelled']} ({', '.join(f'{k} {v}' for k, v in sorted(lab['by_class'].items()))}), "
              f"{lab['day_model_wrong']} of them predicted wrong by the day model; {lab['junk']} without a truth "
              "to junk",
              f"- fine-tuned {r['tuned']['version']} on {', '.join(map(str, r['tuned']['sources'] or []))} "
              f"(accuracy on the held-out part of that data: "
              + ", ".join(f"{st['stage']} {_f(st['accuracy'])}" for st in r["tuned"]["stages"]) + "); "
              f"pushed: {', '.join(str(p.get('state')) for p in r['push'])}; the device then served "
              f"{r['served_after_push']}", "",
              "| condition | model | version | stable-state accuracy | per-frame accuracy | true changes | missed | "
              "wrong changes | frames |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["runs"]:
        s, p = row["stable"], row["per_frame"]
        lines.append(f"| {row['condition']} | {row['model']} | {row['model_version']} | {_f(s.get('accuracy'))} | "
                     f"{_f(p['top1_accuracy'])} | {s.get('true_changes', '-')} | {s.get('missed', '-')} | "
                     f"{s.get('wrong_changes', '-')} | {p['frames']} |")
    lines += ["", "| step | wall s |", "|---|---:|"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in sorted(r["steps"].items())]
    lines += [f"- {n}" for n in r["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
