"""bench/loop_bench.py --quick: the whole loop of issue 15 (day model → agent on an infrared night with its sample
store → `edgecv collect` → labelled by script → `edgecv optimize --init-from` → `edgecv push` → the agent on an
unseen night and by day), all real processes; slow (~7 min on 2 busy cores), run with EDGECV_SLOW=1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import run_bench_quick


@pytest.mark.slow
@pytest.mark.e2e
def test_loop_bench_quick(tmp_path: Path) -> None:
    proc, r = run_bench_quick("loop_bench.py", tmp_path)
    assert "| condition | model |" in proc.stdout and "| step | wall s |" in proc.stdout
    collected = sum(r["collect"]["by_reason"].values())
    assert collected > 0 and r["label"]["labelled"] > 0
    assert r["label"]["labelled"] + r["label"]["junk"] == collected  # every collected sample was sorted
    new = r["tuned"]["version"]
    assert [p["state"] for p in r["push"]] == ["active"] and r["served_after_push"] == new
    runs = {(row["condition"], row["model"]): row for row in r["runs"]}
    assert set(runs) == {("night", "day model"), ("night", "fine-tuned"), ("day", "day model"), ("day", "fine-tuned")}
    assert runs[("night", "fine-tuned")]["model_version"] == new  # the restarted device kept the pushed model
    assert runs[("night", "day model")]["model_version"] != new
    for row in runs.values():
        assert 0.0 <= row["stable"]["accuracy"] <= 1.0 and row["per_frame"]["frames"] > 0, row
    assert all(seconds > 0 for seconds in r["steps"].values()) and len(r["steps"]) == 9
