"""Per-frame cost of `Agent.process` (a camera without regions): this tree against a git revision, side by side.

    python bench/process_ab.py --base 9e239e2 [--runtime litert] [--pairs 60]

The agent package of `--base` is exported (git archive) into a temporary directory as the package `edgecvbase.agent`
(imports rewritten), so both versions live in one process: batches of 500 frames alternate between the two, pinned
to one core, and background load hits both alike. Both get the same config (Home Assistant discovery on, as by
default), the shipped Fashion-MNIST bundle, the in-memory link, and the same synthetic frames; what each stages is
drained between batches. Prints the median µs per frame of each and the median ratio with its interquartile range.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "models" / "fashion-mnist"


def export_base(rev: str, into: Path) -> None:
    """agent/ at `rev` as the package edgecvbase.agent under `into`."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev, "agent"], capture_output=True, check=True).stdout
    root = into / "edgecvbase"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(root, filter="data")
    (root / "__init__.py").write_text("")
    for path in root.rglob("*.py"):
        path.write_text(re.sub(r"\bedgecv\.agent\b", "edgecvbase.agent", path.read_text()))


def frame_loop(package: str, runtime: str, store: Path) -> Callable[[int], float]:
    """A function running n frames through that package's Agent.process; returns µs per frame."""
    def m(name: str) -> object:
        return importlib.import_module(f"{package}.agent.{name}")

    cfg = m("config").parse_config({"device_id": "pi-1", "camera": [{"name": "cam0"}],  # type: ignore[attr-defined]
                                    "model": {"store": str(store), "runtime": runtime}})
    clf = m("vision.classifier").Classifier.load(BUNDLE, runtime=runtime)  # type: ignore[attr-defined]
    outbox = m("link.outbox").Outbox(100_000)  # type: ignore[attr-defined]
    topics = m("contract.topics").DeviceTopics(cfg.prefix, cfg.device_id)  # type: ignore[attr-defined]
    stream = m("link.predictions").PredictionStream(outbox, topics.predictions, 1)  # type: ignore[attr-defined]
    service = m("service")
    agent = service.Agent(cfg, topics, link=m("link.memory").MemoryLink(loopback=False),  # type: ignore[attr-defined]
                          outbox=outbox, predictions=stream, classifier=clf)
    loop = service.LoopState("cam0", agent.monitor.counters())  # type: ignore[attr-defined]
    frame_type = m("vision.camera").Frame  # type: ignore[attr-defined]
    source = m("vision.synthetic").SyntheticSource("synthetic:fashion-mnist")  # type: ignore[attr-defined]
    frames = []
    for _ in range(512):
        source.grab()
        frames.append(source.retrieve())

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            image, truth = frames[i & 511]
            agent.process(loop, frame_type(image, time.time(), i, truth, "cam0"))
        dt = time.perf_counter() - t0
        stream.drain()
        while batch := outbox.take_run({}):
            outbox.ack_all(msg.id for msg in batch)
        return dt / n * 1e6

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare with (e.g. main)")
    parser.add_argument("--runtime", default="litert", help="onnxruntime or litert (default litert)")
    parser.add_argument("--pairs", type=int, default=60, help="interleaved pairs of 500-frame batches (default 60)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory(prefix="edgecv-ab-") as tmp:
        export_base(args.base, Path(tmp))
        sys.path.insert(0, tmp)
        base = frame_loop("edgecvbase", args.runtime, Path(tmp) / "store-a")
        this = frame_loop("edgecv", args.runtime, Path(tmp) / "store-b")
        base(1000)
        this(1000)
        a, b = [], []
        for _ in range(args.pairs):
            a.append(base(500))
            b.append(this(500))
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    q = statistics.quantiles(ratios, n=4)
    print(f"{args.runtime}: {args.base} {statistics.median(a):.1f} µs/frame, this tree {statistics.median(b):.1f} "
          f"µs/frame; median ratio this/base {statistics.median(ratios):.3f} (IQR {q[0]:.3f}-{q[2]:.3f}), "
          f"{args.pairs} interleaved pairs of 500 frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
