"""bench/training_bench.py's CI form: every method through the real pipeline on tiny photo crops, one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "training_bench.py"


def test_photo_crops_are_deterministic_and_differ_between_seeds() -> None:
    sys.path.insert(0, str(BENCH.parent))
    try:
        import training_bench
    finally:
        sys.path.remove(str(BENCH.parent))
    a = training_bench.make_photo_crops(3, seed=1, size=32, classes=2)
    b = training_bench.make_photo_crops(3, seed=1, size=32, classes=2)
    c = training_bench.make_photo_crops(3, seed=2, size=32, classes=2)
    assert list(a) == ["astronaut", "cat"] and all(img.shape == (32, 32, 3) for img in a["cat"])
    assert all((x == y).all() for x, y in zip(a["cat"], b["cat"], strict=True))
    assert not all((x == y).all() for x, y in zip(a["cat"], c["cat"], strict=True))


def test_quick_run_measures_every_method(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads", "1", "--json", str(tmp_path / "t.json")],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "t.json").read_text())
    cells = {c["method"]: c for c in doc["cells"]}
    assert set(cells) == {"scratch", "scratch+aug", "lite0"}
    for c in cells.values():
        assert 0.0 <= c["accuracy_int8"] <= 1.0 and c["latency_ms_int8"] > 0 and c["int8_onnx_bytes"] > 10_000
        assert c["epochs"] >= 1 and c["train_s"] > 0
    assert cells["lite0"]["params"] > 3_000_000 > cells["scratch"]["params"]  # the backbone really was used
    assert "| images/class | method" in proc.stdout and "| lite0" in proc.stdout
