"""`edgecv collect` on the workstation: what it accepts from a device, where it writes, how it resumes
(tools/fleet/collect.py). The end-to-end run against a real agent is tests/e2e/test_collect_e2e.py."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from edgecv.agent.contract.samples import MAX_SAMPLE_BYTES
from edgecv.tools.dataset_layout import UNLABELLED, read_sidecar
from edgecv.tools.errors import FleetError
from edgecv.tools.fleet.collect import PART_SUFFIX, Listed, fetch_sample, parse_listed, present_samples

IMAGE = bytes(range(256)) * 40
GOOD = {"id": "pi-1-20261130T101500-000042", "bytes": len(IMAGE), "sha256": hashlib.sha256(IMAGE).hexdigest(),
        "predicted": "open", "score": 0.41, "camera": "garage", "region": "door", "ts": 1764497700.25,
        "reason": "low_confidence", "device": "pi-1", "truth": 1,
        "model": {"name": "door", "version": "1.2.0", "sha": "9f" * 32, "labels": ["closed", "open"]}}


@pytest.mark.parametrize(("change", "needle"), [
    ({"id": "../x"}, "unusable sample id"),
    ({"id": ".hidden"}, "unusable sample id"),
    ({"id": "a/b"}, "unusable sample id"),
    ({"id": 5}, "unusable sample id"),
    ({"bytes": MAX_SAMPLE_BYTES + 1}, "is not 1 to"),
    ({"bytes": True}, "is not 1 to"),
    ({"bytes": 0}, "is not 1 to"),
    ({"sha256": "x" * 64}, "64 hex digits"),
    ({"score": 7}, "between 0 and 1"),
    ({"reason": "because"}, "must be one of"),
    ({"truth": -1}, "class index"),
])
def test_what_a_device_lists_is_checked_before_use(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(FleetError, match=needle):
        parse_listed({**GOOD, **change})


def test_present_samples_looks_in_unlabelled_classes_and_junk_only(tmp_path: Path) -> None:
    for folder, name in [(UNLABELLED, "a.jpg"), ("door-open", "b.jpg"), ("_junk", "c.jpg"), ("_other", "d.jpg"),
                         (".hidden", "e.jpg"), (UNLABELLED, ".f.jpg.part"), (UNLABELLED, "g.json")]:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"x")
    assert sorted(present_samples(tmp_path)) == ["a", "b", "c"]


class FakeFetcher:
    """Serves chunks of `image` (or whatever `lie` returns) and counts the bytes asked for."""

    device = "pi-1"

    def __init__(self, image: bytes, lie: Any = None) -> None:
        self.image = image
        self.lie = lie
        self.asked: list[tuple[int, int]] = []

    def chunk(self, sample: Listed, offset: int, length: int) -> bytes:
        self.asked.append((offset, length))
        if self.lie is not None:
            return self.lie(offset, length)  # type: ignore[no-any-return]
        return self.image[offset:offset + length]


def test_a_fetch_resumes_verifies_and_writes_the_sidecar_before_the_image(tmp_path: Path) -> None:
    listed = parse_listed(GOOD)
    (tmp_path / f".{listed.id}{PART_SUFFIX}").write_bytes(IMAGE[:3000])
    fetcher = FakeFetcher(IMAGE)
    image = fetch_sample(fetcher, listed, tmp_path, chunk_size=4096)  # type: ignore[arg-type]
    assert image.read_bytes() == IMAGE and fetcher.asked[0] == (3000, 4096)
    side = read_sidecar(tmp_path / f"{listed.id}.json")
    assert side.predicted == "open" and side.truth == 1 and side.model is not None
    assert side.model.labels == ("closed", "open")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{listed.id}.jpg", f"{listed.id}.json"]


def test_a_wrong_prefix_is_fetched_again_and_a_lying_device_fails_without_a_visible_file(tmp_path: Path) -> None:
    listed = parse_listed(GOOD)
    (tmp_path / f".{listed.id}{PART_SUFFIX}").write_bytes(b"\0" * 3000)
    fetch_sample(FakeFetcher(IMAGE), listed, tmp_path, chunk_size=4096)  # type: ignore[arg-type]
    assert (tmp_path / f"{listed.id}.jpg").read_bytes() == IMAGE
    other = parse_listed({**GOOD, "id": "pi-1-20261130T101500-000043"})
    with pytest.raises(FleetError, match="does not match its sha256"):
        fetch_sample(FakeFetcher(IMAGE, lie=lambda o, n: b"\1" * n), other, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(FleetError, match="more of sample"):
        fetch_sample(FakeFetcher(IMAGE, lie=lambda o, n: b"\1" * (n + 10)), other, tmp_path)  # type: ignore[arg-type]
    assert not (tmp_path / f"{other.id}.jpg").exists() and not (tmp_path / f"{other.id}.json").exists()
