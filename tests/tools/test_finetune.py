"""Fine-tune from what is deployed: optimize keeps <out>/<name>.pt beside each bundle, --init-from finds it from the
bundle folder, the archive or itself, refuses a bundle without it (naming the path), merges old and new data by
class name, grows the head for a new class, and raises the version above the deployed one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgecv.agent.contract.bundle import load_bundle
from edgecv.tools.checkpoint import load_checkpoint
from edgecv.tools.cli import main
from edgecv.tools.datasets import default_input_spec
from edgecv.tools.errors import DatasetError, TrainingError
from edgecv.tools.finetune import fit_head, merge_sources, next_version, resolve_init_from
from edgecv.tools.model import build_model
from tests.tools.conftest import make_image_folder

FAST = ["--finetune-epochs", "1", "--sparsity", "0.3", "--calib", "20", "--latency-runs", "3", "--size", "16x16",
        "--threads", "1", "--seed", "1"]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("deployed")
    old = make_image_folder(root / "day", classes=3, per_class=14, corrupt=False, empty_class=False, seed=1)
    out = root / "out"
    code = main(["optimize", "--data", str(old.root), "--name", "shapes", "--version", "1.0.0", "--epochs", "4", *FAST,
                 "--out", str(out)])
    return {"code": code, "out": out, "old": old.root, "root": root}


def test_optimize_keeps_the_checkpoint_beside_the_bundle(deployed: dict[str, Any]) -> None:
    assert deployed["code"] == 0
    out = deployed["out"]
    bundle = load_bundle(out / "shapes")
    ckpt = load_checkpoint(out / "shapes.pt")
    assert ckpt.meta["bundle"] == {"name": "shapes", "version": "1.0.0", "manifest_sha256": bundle.manifest_sha256}
    assert ckpt.labels == list(bundle.manifest.labels) and ckpt.spec == bundle.manifest.input
    assert ckpt.meta["data_sources"] == [str(deployed["old"].absolute())]
    report = json.loads((out / "shapes-report" / "report.json").read_text())
    assert report["bundle"]["checkpoint"] == "shapes.pt"


def test_init_from_reads_the_bundle_folder_the_archive_or_the_checkpoint(deployed: dict[str, Any]) -> None:
    out = deployed["out"]
    found = [resolve_init_from(p) for p in (out / "shapes", out / "shapes.edgecv", out / "shapes.pt")]
    assert {(d.name, d.version, str(d.checkpoint_path)) for d in found} == {("shapes", "1.0.0", str(out / "shapes.pt"))}
    weights = [d.checkpoint.model.state_dict() for d in found if d.checkpoint]
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])


def test_a_bundle_without_its_checkpoint_is_refused_with_the_path_looked_for(deployed: dict[str, Any],
                                                                              tmp_path: Path) -> None:
    shutil.copytree(deployed["out"] / "shapes", tmp_path / "shapes")
    with pytest.raises(TrainingError, match=f"looked for {tmp_path / 'shapes.pt'}.*--allow-scratch"):
        resolve_init_from(tmp_path / "shapes")
    scratch = resolve_init_from(tmp_path / "shapes", allow_scratch=True)
    assert scratch.checkpoint is None and scratch.version == "1.0.0" and len(scratch.labels) == 3
    # a checkpoint of another build at that place is not taken for this bundle's
    other = load_checkpoint(deployed["out"] / "shapes.pt")
    from edgecv.tools.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "shapes.pt", other.model, other.spec, other.labels, other.arch, [],
                    dict(other.meta, bundle={"name": "shapes", "version": "0.9.0", "manifest_sha256": "0" * 64}))
    with pytest.raises(TrainingError, match=r"belongs to shapes 0.9.0, not to the bundle shapes 1.0.0"):
        resolve_init_from(tmp_path / "shapes")
    with pytest.raises(TrainingError, match="does not exist"):
        resolve_init_from(tmp_path / "nothing")


def test_next_version_is_above_the_deployed_one() -> None:
    assert next_version("1.0.0", None, "1.0.0") == "1.1.0"
    assert next_version("2.7.3", None, "1.0.0") == "2.8.0"
    assert next_version("3", None, "1.0.0") == "3.1.0"
    assert next_version("1.0.0", "2.0.0", "1.0.0") == "2.0.0"
    assert next_version(None, None, "1.0.0") == "1.0.0"
    for lower in ("1.0.0", "0.9.9"):
        with pytest.raises(TrainingError, match=r"not above the deployed version 1.0.0: devices refuse"):
            next_version("1.0.0", lower, "1.0.0")


def test_data_merges_by_class_name_and_missing_classes_are_refused_or_dropped(tmp_path: Path) -> None:
    old = make_image_folder(tmp_path / "old", classes=3, per_class=10, corrupt=False, empty_class=False)
    new = make_image_folder(tmp_path / "new", classes=4, per_class=10, corrupt=False, empty_class=False, seed=5)
    (new.root / "square").rename(new.root / "Square")  # another letter case: the same class
    shutil.rmtree(new.root / "circle")  # no circles in the new data
    spec = default_input_spec(make_splits_for_spec(old.root))
    deployed = ["circle", "square", "triangle"]
    with pytest.raises(DatasetError, match=r"circle have no images in .*another --data.*--drop-missing-classes"):
        merge_sources([str(new.root)], deployed, spec, seed=0)
    merged = merge_sources([str(new.root), str(old.root)], deployed, spec, seed=0)
    assert merged.labels == ["circle", "square", "triangle", "cross"] and merged.new_classes == ["cross"]
    counts = np.bincount(merged.splits.train.labels, minlength=4)
    assert all(counts > 0) and counts[1] > counts[0]  # squares from both folders, circles from the old one only
    assert merged.splits.train.size == (spec.height, spec.width)
    dropped = merge_sources([str(new.root)], deployed, spec, seed=0, drop_missing=True)
    assert dropped.labels == ["square", "triangle", "cross"] and dropped.dropped_classes == ["circle"]


def make_splits_for_spec(root: Path) -> Any:
    from edgecv.tools.datasets import load_splits

    return load_splits(root, size="16x16", seed=0).train


def test_a_grown_head_keeps_the_known_classes_outputs() -> None:
    from edgecv.agent.contract.bundle import InputSpec

    model = build_model(InputSpec(width=16, height=16, channels=3), 3, channels=(4,), dense=8, seed=0).eval()
    x = torch.randn(5, 3, 16, 16)
    before = model(x).detach()
    added = fit_head(model, ["a", "b", "c"], ["c", "A", "b", "new"])
    after = model(x).detach()
    assert added == 1 and model.arch["num_classes"] == 4 and after.shape == (5, 4)
    assert torch.allclose(after[:, [1, 2, 0]], before, atol=1e-6)  # rows follow the names, in the new order


def test_fine_tune_from_the_deployed_bundle_with_a_new_class(deployed: dict[str, Any], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    from edgecv.agent.vision.classifier import Classifier, run_selftest

    new = make_image_folder(tmp_path / "night", classes=4, per_class=12, corrupt=False, empty_class=False, seed=9)
    out2 = tmp_path / "out2"
    assert main(["optimize", "--data", str(new.root), "--init-from", str(deployed["out"] / "shapes.edgecv"),
                 "--epochs", "2", *[a for a in FAST if a not in ("--size", "16x16")], "--out", str(out2)]) == 0
    err = capsys.readouterr().err
    assert f"merging the deployed model's data {deployed['old'].absolute()}" in err
    assert "new class(es): cross (the output layer grows)" in err
    bundle = load_bundle(out2 / "shapes")
    assert bundle.manifest.version == "1.1.0"
    assert list(bundle.manifest.labels) == ["circle", "square", "triangle", "cross"]
    assert run_selftest(Classifier.load(bundle, runtime="onnxruntime")).passed
    report = json.loads((out2 / "shapes-report" / "report.json").read_text())
    assert report["model"]["init_from"]["version"] == "1.0.0"
    assert "--init-from" in report["command"]
    # the next round starts from this one: its checkpoint names both data sources
    ckpt = load_checkpoint(out2 / "shapes.pt")
    assert set(ckpt.meta["data_sources"]) == {str(new.root.absolute()), str(deployed["old"].absolute())}
    assert resolve_init_from(out2 / "shapes").version == "1.1.0"


def test_cli_refuses_a_version_not_above_the_deployed_one(deployed: dict[str, Any], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    assert main(["optimize", "--data", str(deployed["old"]), "--init-from", str(deployed["out"] / "shapes"),
                 "--version", "1.0.0", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--version 1.0.0 is not above the deployed version 1.0.0" in err[0]
    assert not (tmp_path / "o").exists()
