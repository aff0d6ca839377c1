"""`edgecv optimize` end to end on a Fashion-MNIST subset: real training, real exporters, real runtimes.

One run (2000 train / 2000 test images, 1 epoch + 1 fine-tune epoch, ~1 min on 2 cores) is shared by the
tests below; they check the signed bundle, both int8 artifacts in their runtimes, and the report.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecv.agent.contract.bundle import load_bundle, open_bundle, verify_bundle
from edgecv.agent.contract.signing import Keyring, generate_private_key, load_public_key, write_keypair
from edgecv.agent.errors import RuntimeUnavailableError
from edgecv.agent.vision.preprocess import Preprocessor
from edgecv.agent.vision.runtimes import open_engine
from edgecv.tools.bundler import read_selftest
from edgecv.tools.cli import main
from edgecv.tools.errors import ExportError, ToolsError
from edgecv.tools.pipeline import OptimizeConfig, command_for, default_name
from tests.bench_modules import load_bench


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("optimize")
    key = root / "keys" / "ws.key"
    write_keypair(generate_private_key(), key)
    out = root / "out"
    argv = ["optimize", "--data", "fashion-mnist", "--limit", "2000", "--epochs", "1", "--finetune-epochs", "1",
            "--sparsity", "0.5", "--calib", "100", "--latency-runs", "20", "--seed", "3", "--name", "fm-test",
            "--version", "0.0.1", "--key", str(key), "--out", str(out)]
    code = main(argv)
    return {"code": code, "out": out, "key": key, "pub": key.with_suffix(".pub"), "root": root}


def test_optimize_writes_a_signed_bundle_that_verifies(run: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    assert run["code"] == 0
    out = run["out"]
    assert (out / "fm-test").is_dir() and (out / "fm-test.edgecv").is_file()
    assert main(["bundle", "verify", str(out / "fm-test.edgecv"), "--keyring", str(run["pub"])]) == 0
    assert "OK fm-test 0.0.1: 3 files match the manifest, signed by" in capsys.readouterr().out
    bundle = open_bundle(out / "fm-test.edgecv", run["root"] / "extracted")
    assert verify_bundle(bundle, Keyring([load_public_key(run["pub"])])).signed_by is not None
    m = bundle.manifest
    assert sorted((a.path, a.format, a.precision) for a in m.artifacts) == [
        ("model.int8.onnx", "onnx", "int8"), ("model.int8.tflite", "tflite", "int8")]
    assert m.labels[0] == "T-shirt/top" and len(m.labels) == 10
    assert (m.input.width, m.input.height, m.input.channels, m.input.color) == (28, 28, 1, "GRAY")
    # A different key must not verify it.
    other = run["root"] / "other" / "o.key"
    write_keypair(generate_private_key(), other)
    assert main(["bundle", "verify", str(out / "fm-test.edgecv"), "--keyring", str(other.with_suffix(".pub"))]) == 1


def test_both_int8_artifacts_run_in_their_runtimes_and_pass_the_selftest(run: dict[str, Any]) -> None:
    bundle = load_bundle(run["out"] / "fm-test")
    frames, expected = read_selftest(bundle.path_of("selftest.npz"))
    assert frames.dtype == np.uint8 and frames.shape[1:] == (28, 28, 1) and len(frames) == 8
    assert expected.tolist() == list(bundle.manifest.selftest.expected_top1)  # type: ignore[union-attr]
    assert len(set(expected.tolist())) >= 4  # spread over classes
    x = Preprocessor(bundle.manifest.input).batch(frames)
    engines = {}
    for art in bundle.manifest.artifacts:
        engine = open_engine(bundle.path_of(art.path), art.format)
        engines[art.format] = engine
        top1 = [int(np.argmax(engine.run(x[i:i + 1]))) for i in range(len(x))]
        assert top1 == expected.tolist(), art.path
    assert "onnx" in engines["onnx"].name.lower() or engines["onnx"].name == "onnxruntime"
    assert "lite" in engines["tflite"].name.lower()


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_the_agent_accepts_the_bundle_with_its_own_selftest(run: dict[str, Any], runtime: str) -> None:
    from edgecv.agent.vision.classifier import Classifier, run_selftest

    classifier = Classifier.load(load_bundle(run["out"] / "fm-test"), runtime=runtime)
    report = run_selftest(classifier)
    assert report.passed and report.agreement == 1.0, report.detail


def test_int8_accuracy_is_measured_on_the_test_set_and_stored(run: dict[str, Any]) -> None:
    out = run["out"]
    report = json.loads((out / "fm-test-report" / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert set(stages) == {"fp32", "pruned fp32 (50% sparse)", "int8 ONNX", "int8 TFLite"}
    fp32 = stages["pruned fp32 (50% sparse)"]["accuracy"]
    assert fp32 > 0.6  # ten classes: chance is 0.1
    for name in ("int8 ONNX", "int8 TFLite"):
        assert abs(stages[name]["accuracy"] - fp32) < 0.03, name
        assert stages[name]["bytes"] < stages["fp32"]["bytes"] / 3  # int8 weights are a quarter of fp32
    assert stages["pruned fp32 (50% sparse)"]["gzip_bytes"] < 0.75 * stages["fp32"]["gzip_bytes"]  # zeros compress
    assert report["dataset"]["test_images"] == 2000 and 0.49 < report["model"]["global_sparsity"] < 0.51
    assert [r["phase"] for r in report["history"]] == ["train", "finetune"]
    metrics = load_bundle(out / "fm-test").manifest.metrics
    assert metrics["accuracy_int8_tflite"] == stages["int8 TFLite"]["accuracy"]
    assert metrics["test_images"] == 2000


def test_report_files_and_tables(run: dict[str, Any]) -> None:
    rep = run["out"] / "fm-test-report"
    for name in ("report.md", "report.json", "training.png", "stages.png", "sparsity.png"):
        assert (rep / name).stat().st_size > 500, name
    md = (rep / "report.md").read_text()
    assert "| 1 | Original data input | 4000 images × 28 × 28 × 1 (uint8) |" in md
    assert "Model size reduced from " in md and "| 7 | Optimized model |" in md
    assert "--limit 2000" in md  # the reproduce command


def _colour_folder(root: Path) -> Path:
    """Three classes of 20×20 images: a red, green or blue square on dark noise."""
    import cv2

    rng = np.random.default_rng(0)
    for name, bgr in {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0)}.items():
        (root / name).mkdir(parents=True)
        for i in range(40):
            img = rng.integers(0, 80, (20, 20, 3)).astype(np.uint8)
            x, y = rng.integers(0, 10, 2)
            img[y:y + 10, x:x + 10] = bgr
            cv2.imwrite(str(root / name / f"{i}.png"), img)
    return root


def test_colour_image_folder_with_channel_pruning_gives_bgr_selftest_frames(tmp_path: Path) -> None:
    from edgecv.agent.vision.classifier import Classifier, run_selftest

    _colour_folder(tmp_path / "colors")
    assert main(["optimize", "--data", str(tmp_path / "colors"), "--epochs", "3", "--finetune-epochs", "1",
                 "--structured", "0.25", "--calib", "40", "--latency-runs", "5", "--out", str(tmp_path / "out")]) == 0
    bundle = load_bundle(tmp_path / "out" / "colors")
    assert bundle.signature is None and list(bundle.manifest.labels) == ["blue", "green", "red"]
    assert bundle.manifest.input.color == "RGB" and bundle.manifest.input.channels == 3
    frames, expected = read_selftest(bundle.path_of("selftest.npz"))
    assert frames.shape[1:] == (20, 20, 3)
    # Camera-like BGR: the coloured square of a "red" frame is bright in the last (R) channel.
    red = frames[np.asarray(expected) == 2]
    assert len(red) and all(f[..., 2].max() == 255 and f[..., 0].max() < 255 for f in red)
    for runtime in ("onnxruntime", "litert"):
        assert run_selftest(Classifier.load(bundle, runtime=runtime)).passed
    report = json.loads((tmp_path / "out" / "colors-report" / "report.json").read_text())
    assert report["model"]["structured"]["params_after"] < report["model"]["structured"]["params_before"]


def test_single_runtime_bundle_carries_only_that_artifact(tmp_path: Path) -> None:
    from edgecv.agent.vision.classifier import Classifier, run_selftest

    _colour_folder(tmp_path / "colors")
    assert main(["optimize", "--data", str(tmp_path / "colors"), "--epochs", "2", "--finetune-epochs", "1",
                 "--calib", "40", "--latency-runs", "5", "--bundle-formats", "tflite",
                 "--out", str(tmp_path / "out")]) == 0
    bundle = load_bundle(tmp_path / "out" / "colors")
    assert [(a.format, a.precision) for a in bundle.manifest.artifacts] == [("tflite", "int8")]
    assert run_selftest(Classifier.load(bundle, runtime="litert")).passed
    with pytest.raises(RuntimeUnavailableError):
        Classifier.load(bundle, runtime="onnxruntime")  # no ONNX artifact shipped
    report = json.loads((tmp_path / "out" / "colors-report" / "report.json").read_text())
    assert "--bundle-formats tflite" in report["command"]  # the report's reproduce line keeps the choice


def test_optimize_prefer_size_ships_int8_onnx_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`optimize --prefer size` reaches the artifact chain: only int8 ONNX ships, fp32 never rides along (with
    `auto` it does when int8 is not clearly faster here), the choice is recorded and the report reproduces it."""
    _colour_folder(tmp_path / "colors")
    assert main(["optimize", "--data", str(tmp_path / "colors"), "--epochs", "2", "--finetune-epochs", "1",
                 "--calib", "40", "--latency-runs", "5", "--bundle-formats", "onnx", "--prefer", "size",
                 "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    bundle = load_bundle(tmp_path / "out" / "colors")
    assert [(a.format, a.precision) for a in bundle.manifest.artifacts] == [("onnx", "int8")]
    report = json.loads((tmp_path / "out" / "colors-report" / "report.json").read_text())
    selection = report["model"]["onnx_artifacts"]
    assert selection["prefer"] == "size" and len(selection["shipped"]) == 1
    assert "--prefer size ships int8 only" in selection["verdict"]
    assert "--prefer size" in report["command"]  # the reproduce line keeps it (it used to drop it)


def test_intermediates_stay_in_the_work_folder(run: dict[str, Any]) -> None:
    work = run["out"] / "work"
    assert {p.name for p in work.iterdir()} >= {"trained.pt", "pruned.pt", "model.fp32.onnx", "model.int8.onnx",
                                                "model.int8.tflite"}
    assert stat.S_ISDIR((run["out"] / "fm-test").stat().st_mode)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sparsity": 1.0}, "--sparsity"),
    ({"structured": -0.1}, "--structured"),
    ({"epochs": 0}, "--epochs"),
    ({"method": "magic"}, "--method"),
    ({"limit": 5}, "--limit"),
    ({"bundle_formats": ("tflite", "pt")}, "--bundle-formats"),
    ({"bundle_formats": ()}, "--bundle-formats"),
    ({"key": Path("/nonexistent/key")}, "edgecv keys generate"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ToolsError, match=message):
        OptimizeConfig(data="fashion-mnist", out=tmp_path, **kwargs).validate()


def test_cli_reports_missing_key_as_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["optimize", "--data", "fashion-mnist", "--key", str(tmp_path / "none.key"),
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgecv: error: Signing key") and not (tmp_path / "o").exists()


def test_default_name_follows_the_data(tmp_path: Path) -> None:
    assert default_name("fashion-mnist") == "fashion-mnist"
    (tmp_path / "my cats").mkdir()
    assert default_name(str(tmp_path / "my cats")) == "my-cats"


def test_report_command_reproduces_the_settings() -> None:
    cfg = OptimizeConfig(data="fashion-mnist", out=Path("models"), epochs=12, key=Path("models/demo-signing.key"),
                         max_drop=None)
    assert command_for(cfg) == ("edgecv optimize --data fashion-mnist --epochs 12 --max-drop -1 "
                                "--key models/demo-signing.key --out models")



def test_report_command_round_trips_every_setting(tmp_path: Path) -> None:
    """Every setting of optimize that has an option survives command_for → the parser → the config: a report's
    reproduce line used to drop --prefer, --force, --threads and --description."""
    import dataclasses
    import shlex

    from edgecv.tools.cli import build_parser
    from edgecv.tools.commands.optimize import config_from_args

    cfg = OptimizeConfig(
        data="photos", extra_data=("more",), out=tmp_path / "o", work=tmp_path / "w", name="n", version="2.0.0",
        description="a door", epochs=7, finetune_epochs=3, sparsity=0.3, structured=0.25, calib=50,
        method="entropy", prefer="size", force=True, max_drop=None, seed=4, limit=99, size="64x64", color="rgb",
        key=tmp_path / "k", include_fp32=True, latency_runs=9, bundle_formats=("tflite",), threads=2,
        progress=False, device="cpu", augment=False, flip=False, backbone="efficientnet-lite0",
        init_from=tmp_path / "b.edgecv", allow_scratch=True, old_data=False, drop_missing=True)
    args = build_parser().parse_args([*shlex.split(command_for(cfg))[1:], "--no-progress"])
    back = config_from_args(args)
    ignored = {"progress", "command", "selftest_count"}
    differ = {f.name: (getattr(cfg, f.name), getattr(back, f.name)) for f in dataclasses.fields(cfg)
              if f.name not in ignored and getattr(cfg, f.name) != getattr(back, f.name)}
    assert differ == {}

# --- bench/pipeline_bench.py ---------------------------------------------------------------------------



def test_bench_targets_pass_and_miss_with_margins() -> None:
    bench = load_bench("pipeline_bench")
    Row = bench.Row
    rows = {
        "fp32 same epochs/onnx": Row("fp32 same epochs", "onnx", "fp32", "", 0.925, 990_000, 900_000, 70.0,
                                     "onnxruntime"),
        "fp32 same epochs/tflite": Row("fp32 same epochs", "tflite", "fp32", "", 0.925, 980_000, 900_000, 66.0,
                                       "litert"),
        "fp32 same epochs/onnx int8": Row("fp32 same epochs", "onnx", "int8", "", 0.924, 270_000, 240_000, 44.0,
                                          "onnxruntime"),
        "fp32 same epochs/tflite int8": Row("fp32 same epochs", "tflite", "int8", "", 0.924, 260_000, 230_000, 24.0,
                                            "litert"),
        "50% pruned/onnx int8": Row("50% pruned", "onnx", "int8", "", 0.923, 270_000, 165_000, 44.0, "onnxruntime"),
        "50% pruned/tflite int8": Row("50% pruned", "tflite", "int8", "", 0.921, 260_000, 163_000, 24.0, "litert"),
        "structured/onnx int8": Row("structured", "onnx", "int8", "", 0.915, 70_000, 50_000, 20.0, "onnxruntime"),
        "structured/tflite int8": Row("structured", "tflite", "int8", "", 0.916, 66_000, 48_000, 12.0, "litert"),
    }
    bundles = {"both": {"bytes": 330_000, "accuracy": 0.921}, "tflite": {"bytes": 110_000, "accuracy": 0.921}}
    t = {x.name: x for x in bench.evaluate_targets(rows, bundles)}
    assert t["fp32 test accuracy ≥ 0.92"].passed
    drop = t["int8 + 50 % pruned within 0.3 pts of fp32 (same epochs)"]
    assert drop.value == pytest.approx(0.4) and not drop.passed and drop.margin() == "−0.1 pts"
    assert not t["bundle ≥ 8× smaller than fp32 raw, ≤ 0.5 pt drop: both"].passed
    assert t["bundle ≥ 8× smaller than fp32 raw, ≤ 0.5 pt drop: tflite"].passed  # 9× at 0.4 pts
    speed = t["int8 ≥ 2.5× faster than fp32 (best runtime each)"]
    assert speed.value == pytest.approx(66 / 24) and speed.passed
    structured = t["structured int8 ≥ 1.5× faster than int8, ≤ 0.5 pt drop"]
    assert structured.value == pytest.approx(2.0) and not structured.passed and not structured.condition_ok


@pytest.mark.slow
def test_bench_quick_run_prints_the_table(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[2] / "bench" / "pipeline_bench.py"
    proc = subprocess.run([sys.executable, str(path), "--quick", "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "b.json").read_text())
    assert len(doc["targets"]) == 10 and all(r["accuracy"] > 0.5 for r in doc["rows"])
    assert "| structured" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout)


def test_tflite_agreement_with_fp32_is_checked_against_the_bound(run: dict[str, Any]) -> None:
    out = run["out"]
    report = json.loads((out / "fm-test-report" / "report.json").read_text())
    verdict = report["model"]["int8_tflite_agreement"]
    assert verdict["images"] == 2000 and verdict["agreement"] >= 0.97 and verdict["shipped"]
    assert verdict["note"].startswith("int8 TFLite agrees with fp32 on")
    assert ("tflite", "int8") in [(a.format, a.precision) for a in load_bundle(out / "fm-test").manifest.artifacts]


def test_a_tflite_below_the_bound_is_left_out_or_refused(run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import edgecv.tools.quantize_tflite as qt
    from edgecv.tools.pipeline import _tflite_within_bound
    from edgecv.tools.report import RunRecord

    judge = qt.judge_tflite
    monkeypatch.setattr(qt, "judge_tflite", lambda *a, **kw: judge(*a, **{**kw, "min_agreement": 1.01}))
    work = run["out"] / "work"
    x = np.random.default_rng(0).normal(0, 1, (50, 1, 28, 28)).astype(np.float32)
    record = RunRecord(name="t", version="0", data="d", seed=0, command="", settings={}, machine={})
    notes: list[str] = []
    cfg = OptimizeConfig(data="fashion-mnist", out=run["root"])
    left = _tflite_within_bound(cfg, work / "model.fp32.onnx", work / "model.int8.tflite", x, record, notes.append)
    assert left.bundle_formats == ("onnx",) and "points under the 101% bound" in notes[0]
    assert (work / "model.int8.tflite").is_file()  # the pipeline keeps its work file for the report
    only = OptimizeConfig(data="fashion-mnist", out=run["root"], bundle_formats=("tflite",))
    with pytest.raises(ExportError, match="Refusing to bundle: int8 TFLite agrees with fp32 on"):
        _tflite_within_bound(only, work / "model.fp32.onnx", work / "model.int8.tflite", x, record, notes.append)


def test_selftest_frames_come_from_the_test_split_or_from_all_images_when_it_is_small() -> None:
    """A 3-image test split cannot be relied on for 8 (or even 3) frames every artifact answers clearly; then the
    validation and training images join the pool (the frames check runtime numerics, not accuracy)."""
    from edgecv.tools.datasets import Dataset, Splits
    from edgecv.tools.pipeline import selftest_pool

    def part(n: int, value: int) -> Dataset:
        return Dataset(np.full((n, 4, 4, 1), value, np.uint8), np.zeros(n, np.int64), ["a"])

    small = Splits(train=part(30, 1), val=part(3, 2), test=part(3, 3))
    pool = selftest_pool(small, 8)
    assert len(pool) == 36 and set(np.unique(pool)) == {1, 2, 3}
    large = Splits(train=part(300, 1), val=part(40, 2), test=part(40, 3))
    assert len(selftest_pool(large, 8)) == 40 and set(np.unique(selftest_pool(large, 8))) == {3}
