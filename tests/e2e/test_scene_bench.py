"""bench/scene_bench.py --quick: the whole path (scene → image folder → `edgecv optimize` → agent with regions →
scored states); slow (~10 min on 2 busy cores), run with EDGECV_SLOW=1. The short form of this path in CI is
tests/e2e/test_regions_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import run_bench_quick


@pytest.mark.slow
@pytest.mark.e2e
def test_scene_bench_quick(tmp_path: Path) -> None:
    proc, r = run_bench_quick("scene_bench.py", tmp_path)
    assert "| region | consecutive |" in proc.stdout
    regions = {row["region"]: row for row in r["changing"]["regions"]}
    for name in ("n3", "default"):  # the shipped stabiliser: every true change seen, none invented
        row = regions[name]
        assert row["true_changes"] >= 3 and row["missed"] == 0 and row["wrong_changes"] == 0, row
        assert row["accuracy"] >= 0.95 and row["delay_s_median"] < 1.0, row
    for name, static in r["static"].items():  # door closed / open / closed on a busy street
        assert static["n3"]["state_changes_after_first"] <= static["top1_flips"]
        assert static["n3"]["final_state"] == ("open" if "open" in name else "closed")
    cpu = r["cpu"]["percent_of_one_core"]
    assert cpu["4 region(s), every frame"] > cpu["source only (1 region, classified once)"]
    assert r["cpu"]["per_region_every_frame"] > 0
