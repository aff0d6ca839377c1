"""bench/collect_bench.py runs end to end in its short form (CI): both brokers, every stored sample fetched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_collect_bench_short_form_fetches_every_sample_from_both_brokers() -> None:
    bench = Path(__file__).resolve().parents[2] / "bench" / "collect_bench.py"
    out = subprocess.run([sys.executable, str(bench), "--frames", "20"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "samples" not in line]
    assert len(rows) == 2 and all(line.split("|")[2].strip() == "20" for line in rows), out.stdout
    assert "nodelay vs default" in out.stdout
