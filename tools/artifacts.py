"""The one fp32 ONNX → int8 ONNX → verified artifact chain, used by `edgecv optimize`, `edgecv quantize` and
bring-your-own models alike.

Given an fp32 ONNX classifier and preprocessed images, `build_onnx_artifacts`:

1. prepares the model: opsets below 13 are upgraded with ONNX's version converter (per-channel int8 needs
   DequantizeLinear's `axis`, opset 13); if that fails, only per-tensor recipes are tried;
2. finds what the output holds (`detect_output_kind`): probabilities when the graph ends in Softmax or the
   outputs on the calibration images are already distributions, else logits;
3. quantizes a small, fixed set of recipes (`default_recipes`), runs each and the fp32 model in onnxruntime
   on the evaluation images (top-1 agreement with fp32, overall and where fp32 is confident) and measures
   single-thread latency side by side in one interleaved run;
4. when no recipe meets the agreement bound, keeps the most sensitive weighted nodes in float (ranked by the
   quantization error each one adds, measured on the images) until it does;
5. chooses: the fastest recipe meeting the bound; it ships alone when it is clearly faster than fp32,
   otherwise beside the fp32 model so the device can measure (`prefer="size"` ships int8 only,
   `prefer="speed"` only the faster one).

`enforce_bound` is the refuse-to-sign rule every artifact of a bundle goes through.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecv.tools.errors import BoundError, ExportError
from edgecv.tools.evaluate import MIN_AGREEMENT, MIN_CONFIDENT_AGREEMENT
from edgecv.tools.quantize_onnx import WEIGHTED_OPS, QuantRecipe

log = logging.getLogger(__name__)

PREFERENCES = ("auto", "speed", "size")
MIN_OPSET_PER_CHANNEL = 13  # DequantizeLinear gained `axis` (per-channel) in opset 13
# int8 counts as faster than fp32 only below this latency ratio: closer than that is within the noise of a
# shared machine, and a device's int8 kernels differ anyway (it measures for itself).
CLEARLY_FASTER = 0.9
CONFIDENT = 0.5  # fp32 top-1 probability above which an image counts as one fp32 is confident about
# Nodes kept in float per step of the sensitivity search: grows so big models need few re-quantizations.
_KEEP_STEPS = (1, 2, 3, 5, 8, 12, 18, 27, 40)
Say = Callable[[str], None]


@dataclass(frozen=True)
class Bound:
    """What every shipped artifact must reach against fp32: top-1 agreement overall and on the images fp32 is
    confident about (p > 0.5), and, when labels are known, at most `max_drop` accuracy lost."""

    min_agreement: float = MIN_AGREEMENT  # one definition of the bound for every artifact (evaluate.py)
    min_confident_agreement: float = MIN_CONFIDENT_AGREEMENT
    max_drop: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_agreement", "min_confident_agreement"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ExportError(f"{name.replace('_', ' ').capitalize()} must be a fraction in [0, 1], got {value}")
        if self.max_drop is not None and not 0.0 <= self.max_drop < 1.0:
            raise ExportError(f"--max-drop is an accuracy fraction in [0, 1) (0.01 = one point), got {self.max_drop}")

    def misses(self, m: Measured, fp32_accuracy: float | None = None) -> list[str]:
        """Why `m` falls short of the bound, with by how much; empty when it meets it."""
        out = []
        if m.agreement + 1e-9 < self.min_agreement:
            out.append(f"agreement {m.agreement:.1%} < {self.min_agreement:.1%} "
                       f"(missed by {(self.min_agreement - m.agreement) * 100:.1f} points)")
        if m.confident_images and m.confident_agreement + 1e-9 < self.min_confident_agreement:
            out.append(f"agreement where fp32 is confident {m.confident_agreement:.1%} < "
                       f"{self.min_confident_agreement:.1%} (missed by "
                       f"{(self.min_confident_agreement - m.confident_agreement) * 100:.1f} points)")
        if self.max_drop is not None and fp32_accuracy is not None and m.accuracy is not None:
            drop = fp32_accuracy - m.accuracy
            if drop > self.max_drop + 1e-9:
                out.append(f"accuracy drop {drop * 100:.2f} points > {self.max_drop * 100:.2f} "
                           f"(missed by {(drop - self.max_drop) * 100:.2f} points)")
        return out


@dataclass
class Measured:
    """One model file measured against fp32 on the evaluation images, in onnxruntime on this machine."""

    name: str
    path: Path
    precision: str  # "fp32" | "int8"
    agreement: float = 1.0
    confident_agreement: float = 1.0
    confident_images: int = 0
    accuracy: float | None = None
    bytes: int = 0
    gzip_bytes: int = 0
    latency_ms: float = float("nan")
    recipe: QuantRecipe | None = None
    kept_float: tuple[str, ...] = ()
    build_seconds: float = 0.0
    misses: list[str] = field(default_factory=list)

    @property
    def meets_bound(self) -> bool:
        return not self.misses

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name, "precision": self.precision, "agreement": round(self.agreement, 6),
            "confident_agreement": round(self.confident_agreement, 6), "confident_images": self.confident_images,
            "bytes": self.bytes, "gzip_bytes": self.gzip_bytes, "latency_ms": round(self.latency_ms, 5),
            "build_seconds": round(self.build_seconds, 3), "meets_bound": self.meets_bound}
        if self.accuracy is not None:
            doc["accuracy"] = round(self.accuracy, 6)
        if self.recipe is not None:
            doc["recipe"] = self.recipe.as_dict()
        if self.kept_float:
            doc["kept_float"] = list(self.kept_float)
        if self.misses:
            doc["misses"] = list(self.misses)
        return doc


@dataclass
class ArtifactSet:
    """What `build_onnx_artifacts` measured and chose. `ship` lists the files a bundle carries."""

    fp32: Measured
    candidates: list[Measured]
    chosen: Measured | None
    ship: list[Measured]
    output: str
    bound: Bound
    prefer: str
    verdict: str
    notes: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # recipe label → why it could not be built or run
    eval_images: int = 0

    @property
    def int8(self) -> Measured | None:
        return next((m for m in self.ship if m.precision == "int8"), None)

    def table(self) -> str:
        """One row per model tried: latency vs fp32, agreement, size; the shipped ones marked."""
        ref = self.fp32.latency_ms
        rows = [("", "model", "ms", "vs fp32", "agree", "agree p>.5", "bytes", "gzip", "bound")]
        for m in [self.fp32, *self.candidates]:
            mark = "*" if any(m is s for s in self.ship) else ""
            ratio = m.latency_ms / ref if ref > 0 else float("nan")
            rows.append((mark, m.name, f"{m.latency_ms:.3f}", f"{ratio:.2f}x", f"{m.agreement:.1%}",
                         f"{m.confident_agreement:.1%}" if m.confident_images else "-", f"{m.bytes:,}",
                         f"{m.gzip_bytes:,}", "ok" if m.meets_bound else "MISS"))
        for label, why in self.failed.items():
            rows.append(("", label, "-", "-", "-", "-", "-", "-", "failed"))
            log.debug("%s: %s", label, why)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)

    def metrics(self) -> dict[str, Any]:
        return {
            "output": self.output, "prefer": self.prefer, "verdict": self.verdict, "notes": list(self.notes),
            "eval_images": self.eval_images,
            "bound": {"min_agreement": self.bound.min_agreement,
                      "min_confident_agreement": self.bound.min_confident_agreement,
                      "max_drop": self.bound.max_drop},
            "fp32": self.fp32.as_dict(), "candidates": [m.as_dict() for m in self.candidates],
            "shipped": [m.name for m in self.ship], "failed": dict(self.failed),
        }


# ------------------------------------------------------------------------------------------------- prepare


def model_opset(path: Path) -> int:
    """The default-domain (ai.onnx) opset a model imports."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def prepare_fp32(src: Path, dst: Path, probe: np.ndarray) -> tuple[Path, list[str], bool]:
    """Copy the fp32 model to `dst`, upgraded to opset 13 when older. Returns (dst, notes, per_channel_ok).

    The upgrade is checked by running both models on `probe`; when the converter fails or changes the
    outputs, the original is kept and only per-tensor recipes are used (one line says so).
    """
    import onnx

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(src), load_external_data=False).graph.initializer)
    model = onnx.load(str(src))  # external data, if any, is pulled in: the artifact is one file
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= MIN_OPSET_PER_CHANNEL:
        if external:
            onnx.save(model, str(dst))
        elif src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        return dst, [], True
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET_PER_CHANNEL)
        onnx.checker.check_model(upgraded)
        tmp = dst.with_name(dst.stem + ".upgraded.onnx")
        onnx.save(upgraded, str(tmp))
        _same_outputs(src, tmp, probe)
    except Exception as exc:  # the converter raises plain RuntimeErrors for ops it cannot adapt
        onnx.save(model, str(dst))
        note = (f"The model uses opset {opset}; upgrading it to opset {MIN_OPSET_PER_CHANNEL} failed ({exc}), so "
                "weights are quantized per tensor (per-channel needs opset 13)")
        log.info("%s", note)
        return dst, [note], False
    tmp.replace(dst)
    note = (f"The model uses opset {opset}; upgraded to opset {MIN_OPSET_PER_CHANNEL} with ONNX's version converter "
            "(same outputs) so weights can be quantized per channel")
    return dst, [note], True


def _same_outputs(a: Path, b: Path, probe: np.ndarray) -> None:
    from edgecv.agent.vision.runtimes import open_engine
    from edgecv.tools.evaluate import run_logits

    x = np.asarray(probe[:4], dtype=np.float32)
    ya, yb = run_logits(open_engine(a, "onnx"), x), run_logits(open_engine(b, "onnx"), x)
    if ya.shape != yb.shape or not np.allclose(ya, yb, rtol=1e-3, atol=1e-4):
        raise ExportError("the upgraded model's outputs differ from the original's")


# ------------------------------------------------------------------------------------------- output kind

# Ops that pass a probability vector through unchanged in value.
_PASS_THROUGH = ("Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast")


def trailing_softmax(path: Path) -> str | None:
    """Name of the Softmax node that produces the model's first output (through reshapes), or None."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    name = graph.output[0].name if graph.output else ""
    for _ in range(8):
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Softmax":
            return node.name or node.output[0]
        if node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
    return None


def looks_like_probabilities(outputs: np.ndarray) -> bool:
    """Every row non-negative and summing to 1: the model already applies softmax (or a sigmoid-free
    equivalent) even when the graph does not show it as a trailing Softmax node."""
    y = np.asarray(outputs, dtype=np.float64)
    if y.ndim != 2 or len(y) == 0 or y.shape[1] < 2:
        return False
    return bool(np.all(y >= -1e-6) and np.all(y <= 1 + 1e-6) and np.allclose(y.sum(axis=1), 1.0, atol=1e-3))


def detect_output_kind(path: Path, outputs: np.ndarray) -> tuple[str, str]:
    """('logits' | 'probabilities', why) from the graph's last op and the outputs on calibration images."""
    softmax = trailing_softmax(path)
    if softmax is not None:
        return "probabilities", f"the graph ends in Softmax ({softmax})"
    if looks_like_probabilities(outputs):
        return "probabilities", "its outputs on the calibration images are already probabilities (rows sum to 1)"
    return "logits", "its outputs are not probabilities (the device applies softmax)"


def to_probabilities(outputs: np.ndarray, output: str) -> np.ndarray:
    """Model outputs → probabilities, honouring the output kind."""
    y = np.asarray(outputs, dtype=np.float64)
    if output == "probabilities":
        return y
    z = y - y.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------- recipes


def default_recipes(*, per_channel_ok: bool = True, methods: Sequence[str] | None = None,
                    per_channel: bool | None = None) -> list[QuantRecipe]:
    """The candidate recipes, in a fixed order (deterministic search), at most seven.

    uint8 activations with int8 weights (U8S8) are what onnxruntime's x86 and Arm int8 kernels are built for;
    int8 activations (edgecv's former recipe) leave many convolutions in float on x86. QOperator is the
    other file layout; per-tensor and weighted-only cover depthwise nets and HardSigmoid-heavy tails.
    `methods` / `per_channel` narrow the search when the user fixed them.
    """
    methods = list(methods or ("minmax", "percentile"))
    layouts: list[tuple[str, str, bool, bool]] = [  # activations, format, per_channel, weighted_only
        ("uint8", "qdq", True, False), ("uint8", "qoperator", True, False), ("int8", "qdq", True, False),
        ("uint8", "qdq", False, False), ("uint8", "qdq", True, True)]
    out: list[QuantRecipe] = []
    for method_i, method in enumerate(methods):
        for act, fmt, pc, weighted in layouts:
            if per_channel is not None and pc != per_channel:
                pc = per_channel
            if pc and not per_channel_ok:
                pc = False
            if method_i > 0 and (act, fmt, weighted) not in (("uint8", "qdq", False), ("uint8", "qoperator", False)):
                continue  # other calibrations only for the layouts that usually win
            recipe = QuantRecipe(activations=act, per_channel=pc, format=fmt, method=method, weighted_only=weighted)
            if recipe not in out:
                out.append(recipe)
    return out


# ----------------------------------------------------------------------------------------------- the chain


def build_onnx_artifacts(fp32_src: Path, calib_x: np.ndarray, eval_x: np.ndarray, work_dir: Path, *,
                         eval_y: np.ndarray | None = None, bound: Bound | None = None, prefer: str = "auto",
                         recipes: Sequence[QuantRecipe] | None = None, methods: Sequence[str] | None = None,
                         per_channel: bool | None = None, latency_runs: int = 200, search_float: bool = True,
                         progress: Say | None = None) -> ArtifactSet:
    """Prepare, quantize, measure and choose the ONNX artifacts of one fp32 classifier (see the module doc).

    Files are written in `work_dir`: model.fp32.onnx and one int8 file per candidate; the caller copies
    `ArtifactSet.ship` into a bundle. `eval_y` (labels) adds accuracy and the `max_drop` bound.
    Raises ExportError when not one recipe yields a model onnxruntime can run: that is edgecv's bug.
    """
    from edgecv.agent.vision.runtimes import open_engine
    from edgecv.tools.evaluate import run_logits
    from edgecv.tools.quantize_onnx import calibrate, preprocess_for_quantization, quantize_with_recipe

    if prefer not in PREFERENCES:
        raise ExportError(f"--prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    bound = bound or Bound()
    say = progress or (lambda msg: log.info("%s", msg))
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    calib_x = np.ascontiguousarray(calib_x, dtype=np.float32)
    eval_x = np.ascontiguousarray(eval_x, dtype=np.float32)
    if len(calib_x) == 0 or len(eval_x) == 0:
        raise ExportError("Quantization needs calibration and evaluation images; got none")

    fp32_path, notes, per_channel_ok = prepare_fp32(fp32_src, work / "model.fp32.onnx", calib_x)
    for note in notes:
        say(note)
    fp32_engine = open_engine(fp32_path, "onnx")
    fp32_calib_out = run_logits(fp32_engine, calib_x[:64])
    output, why = detect_output_kind(fp32_path, fp32_calib_out)
    say(f"Model output: {output} ({why})")
    ref_out = run_logits(fp32_engine, eval_x)
    ref_top1 = ref_out.argmax(axis=1)
    confident = to_probabilities(ref_out, output).max(axis=1) > CONFIDENT
    y = None if eval_y is None else np.asarray(eval_y)
    fp32 = _measure_file("fp32", fp32_path, "fp32", ref_out, ref_top1, confident, y)
    fp32_accuracy = fp32.accuracy

    def measure(name: str, path: Path, recipe: QuantRecipe, kept: Sequence[str], seconds: float) -> Measured:
        out = run_logits(open_engine(path, "onnx"), eval_x)
        m = _measure_file(name, path, "int8", out, ref_top1, confident, y)
        m.recipe, m.kept_float, m.build_seconds = recipe, tuple(kept), seconds
        m.misses = bound.misses(m, fp32_accuracy)
        return m

    if recipes is None:
        recipes = default_recipes(per_channel_ok=per_channel_ok, methods=methods, per_channel=per_channel)
    elif not per_channel_ok:
        recipes = [QuantRecipe(r.activations, False, r.format, r.method, r.weighted_only) for r in recipes]
    candidates: list[Measured] = []
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="edgecv-artifacts-") as tmp_dir:
        tmp = Path(tmp_dir)
        pre = preprocess_for_quantization(fp32_path, tmp / "pre.onnx")
        # A trailing Softmax stays float: quantized probabilities tie at 0 and 1/255 steps.
        softmax = trailing_softmax(pre)
        base_exclude = [softmax] if softmax and _node_exists(pre, softmax) else []
        ranges: dict[str, Path] = {}
        for i, recipe in enumerate(recipes):
            if recipe.method not in ranges:
                say(f"Calibrating activation ranges ({recipe.method}) on {len(calib_x)} images")
                ranges[recipe.method] = calibrate(pre, calib_x, recipe.method, tmp / f"ranges-{recipe.method}.json")
            path = work / f"model.int8.c{i}.onnx"
            started = time.perf_counter()
            try:
                quantize_with_recipe(pre, ranges[recipe.method], path, recipe, exclude_nodes=base_exclude)
                m = measure(recipe.label, path, recipe, [], time.perf_counter() - started)
            except Exception as exc:  # a recipe onnxruntime cannot build or run is skipped, not fatal
                failed[recipe.label] = str(exc).splitlines()[0][:200]
                log.warning("Quantization recipe %s failed: %s", recipe.label, failed[recipe.label])
                continue
            say(f"  {recipe.label}: agreement {m.agreement:.1%}"
                + (f", {m.confident_agreement:.1%} where fp32 is confident" if m.confident_images else ""))
            candidates.append(m)
        if not candidates:
            raise ExportError(f"No int8 recipe produced a model onnxruntime can run ({'; '.join(failed.values())}); "
                              "this is a bug in edgecv, please report it with the model")
        if search_float and not any(c.meets_bound for c in candidates):
            start = _search_start(candidates)
            assert start.recipe is not None
            kept_m = _keep_sensitive_float(pre, ranges[start.recipe.method], start, base_exclude, calib_x,
                                           work, measure, say)
            if kept_m is not None:
                candidates.append(kept_m)

    side_by_side_latency([fp32, *candidates], eval_x[:1], latency_runs)
    fp32.misses = []
    chosen, ship, verdict = _choose(fp32, candidates, prefer)
    say(verdict)
    return ArtifactSet(fp32=fp32, candidates=candidates, chosen=chosen, ship=ship, output=output, bound=bound,
                       prefer=prefer, verdict=verdict, notes=notes, failed=failed, eval_images=len(eval_x))


def _measure_file(name: str, path: Path, precision: str, out: np.ndarray, ref_top1: np.ndarray,
                  confident: np.ndarray, y: np.ndarray | None) -> Measured:
    top1 = out.argmax(axis=1)
    same = top1 == ref_top1
    return Measured(name=name, path=path, precision=precision, agreement=float(same.mean()),
                    confident_agreement=float(same[confident].mean()) if confident.any() else 1.0,
                    confident_images=int(confident.sum()),
                    accuracy=None if y is None else float(np.mean(top1 == y)),
                    bytes=path.stat().st_size, gzip_bytes=len(gzip.compress(path.read_bytes(), 9, mtime=0)))


def _search_start(candidates: Sequence[Measured]) -> Measured:
    """The QDQ candidate to keep nodes float in: best agreement, then fastest-looking layout (U8S8 first)."""
    qdq = [c for c in candidates if c.recipe is not None and c.recipe.format == "qdq"] or list(candidates)
    return max(qdq, key=lambda c: (round(c.confident_agreement, 4), round(c.agreement, 4),
                                   c.recipe is not None and c.recipe.activations == "uint8"))


def _keep_sensitive_float(pre: Path, ranges: Path, start: Measured, base_exclude: list[str], calib_x: np.ndarray,
                          work: Path, measure: Callable[..., Measured], say: Say) -> Measured | None:
    """Keep the weighted nodes that add the most quantization error in float, a growing prefix at a time,
    until the bound holds. Returns the first model that meets it, else the best one tried (None if none).
    Keeping nodes float does not always help: a float node between quantized ones can move where rounding
    happens, so every step is measured rather than assumed better."""
    from edgecv.tools.quantize_onnx import quantize_with_recipe

    assert start.recipe is not None
    ranking = rank_sensitive_nodes(pre, start.path, calib_x[:16])
    if not ranking:
        return None
    say(f"No recipe meets the bound; keeping the most sensitive of {len(ranking)} nodes in float "
        f"(starting from {start.recipe.label})")
    last: Measured | None = None
    best: Measured | None = None
    for step in _KEEP_STEPS:
        kept = [name for name, _ in ranking[:step]]
        path = work / f"model.int8.kept{len(kept)}.onnx"
        started = time.perf_counter()
        quantize_with_recipe(pre, ranges, path, start.recipe, exclude_nodes=[*base_exclude, *kept])
        last = measure(f"{start.recipe.label} +{len(kept)} float", path, start.recipe, kept,
                       time.perf_counter() - started)
        say(f"  {len(kept)} node(s) float ({', '.join(kept[:3])}{'…' if len(kept) > 3 else ''}): agreement "
            f"{last.agreement:.1%}")
        if best is None or (last.confident_agreement, last.agreement) > (best.confident_agreement, best.agreement):
            best = last
        if last.meets_bound or step >= len(ranking):
            break
    return last if last is not None and last.meets_bound else best


def rank_sensitive_nodes(fp32_pre: Path, int8_qdq: Path, x: np.ndarray) -> list[tuple[str, float]]:
    """Nodes of `fp32_pre` ranked by the relative error their int8 version adds: the error of the node's output
    in the QDQ model minus the largest error already in its inputs. Not only weighted nodes: on MobileNetV3-style
    nets the quantized activations of squeeze-excite gates (HardSigmoid, Mul) cost more than any weight. Both
    graphs expose the same tensor names (QDQ keeps the float tensors and inserts Q/DQ pairs around them), so
    one run of each with those tensors as extra outputs, optimisations off, measures every node at once."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(fp32_pre), load_external_data=False).graph
    consts = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    nodes = [(n.name, [i for i in n.input if i and i not in consts], n.output[0]) for n in graph.node
             if n.name and n.output and n.op_type not in _NOT_RANKED]
    tensors = sorted({t for _, ins, o in nodes for t in (*ins, o)})

    def session(path: Path) -> tuple[Any, list[str]]:
        model = onnx.load(str(path))
        present = {o for n in model.graph.node for o in n.output}
        names = [t for t in tensors if t in present]
        existing = {o.name for o in model.graph.output}
        for t in names:
            if t not in existing:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), names

    try:
        f_sess, f_names = session(fp32_pre)
        q_sess, q_names = session(int8_qdq)
    except Exception as exc:  # the ranking is a heuristic: without it, nodes are taken in graph order
        log.warning("Cannot rank nodes by quantization error (%s); keeping nodes float in graph order", exc)
        return [(name, 0.0) for name, _, _ in nodes if name in _weighted_names(fp32_pre)]
    common = [t for t in f_names if t in set(q_names)]
    err = {t: 0.0 for t in common}
    norm = {t: 0.0 for t in common}
    inp = f_sess.get_inputs()[0].name
    for i in range(len(x)):
        feed = {inp: x[i:i + 1].astype(np.float32)}
        fo = dict(zip([o.name for o in f_sess.get_outputs()], f_sess.run(None, feed), strict=True))
        qo = dict(zip([o.name for o in q_sess.get_outputs()], q_sess.run(None, feed), strict=True))
        for t in common:
            a, b = np.asarray(fo[t], np.float64), np.asarray(qo[t], np.float64)
            if a.shape != b.shape:
                continue
            err[t] += float(np.sum((a - b) ** 2))
            norm[t] += float(np.sum(a ** 2))
    rel = {t: err[t] / norm[t] if norm[t] > 0 else 0.0 for t in common}
    scored = [(name, rel.get(o, 0.0) - max((rel.get(i, 0.0) for i in ins), default=0.0)) for name, ins, o in nodes
              if o in rel]
    return sorted(scored, key=lambda s: -s[1])


# Shape plumbing and ops that are never quantized: not candidates for keeping in float.
_NOT_RANKED = ("Shape", "Constant", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Cast",
               "Identity", "Softmax", "ConstantOfShape", "Range", "Expand")


def _weighted_names(path: Path) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in WEIGHTED_OPS}


def side_by_side_latency(models: Sequence[Measured], sample: np.ndarray, runs: int, rounds: int = 5) -> None:
    """Median single-thread batch-1 latency of every model, measured in interleaved rounds so that load from
    other processes falls on all of them alike (`evaluate.side_by_side_ms`); fills `latency_ms` in place."""
    from edgecv.agent.vision.runtimes import open_engine
    from edgecv.tools.evaluate import side_by_side_ms

    if runs <= 0:
        return
    engines = [open_engine(m.path, "onnx", threads=1) for m in models]
    for m, ms in zip(models, side_by_side_ms(engines, sample, runs=runs, rounds=rounds), strict=True):
        m.latency_ms = ms


def _choose(fp32: Measured, candidates: Sequence[Measured], prefer: str) -> tuple[Measured | None, list[Measured],
                                                                                  str]:
    """(chosen int8 or None, what ships, one plain sentence saying why)."""
    good = [c for c in candidates if c.meets_bound]
    if not good:
        best = max(candidates, key=lambda c: (c.confident_agreement, c.agreement))
        if prefer == "size":
            return best, [best], (f"No int8 recipe meets the agreement bound (best: {best.name}, "
                                  f"{'; '.join(best.misses)}); --prefer size ships it anyway only with --force")
        return None, [fp32], (f"No int8 recipe meets the agreement bound (best: {best.name}, {'; '.join(best.misses)});"
                              " shipping the fp32 model only")
    if any(np.isnan(c.latency_ms) for c in [fp32, *good]):  # latency not measured (latency_runs=0)
        chosen = max(good, key=lambda c: (c.confident_agreement, c.agreement))
        if prefer == "speed":
            raise ExportError("--prefer speed needs latency measurements; drop --latency-runs 0")
        if prefer == "size":
            return chosen, [chosen], f"{chosen.name}: latency not measured; --prefer size ships int8 only"
        return chosen, [chosen, fp32], (f"{chosen.name}: latency not measured, so int8 is not known to be faster; "
                                        "shipping the fp32 model beside int8 so the device can measure and pick")
    # Latencies within 3 % are a tie on a shared machine: the tie goes to the better agreement.
    fastest = min(c.latency_ms for c in good)
    close = [c for c in good if c.latency_ms <= fastest * 1.03]
    chosen = max(close, key=lambda c: (c.confident_agreement, c.agreement, -c.latency_ms))
    ratio = chosen.latency_ms / fp32.latency_ms if fp32.latency_ms > 0 else float("nan")
    faster = ratio <= CLEARLY_FASTER
    head = f"{chosen.name}: {ratio:.2f}× fp32 latency, agreement {chosen.agreement:.1%}"
    if prefer == "size":
        return chosen, [chosen], f"{head}; --prefer size ships int8 only"
    if prefer == "speed":
        if chosen.latency_ms < fp32.latency_ms:
            return chosen, [chosen], f"{head}; --prefer speed ships the faster one: int8"
        return chosen, [fp32], f"{head}; --prefer speed ships the faster one: fp32"
    if faster:
        return chosen, [chosen], f"{head}: int8 is faster on this machine, shipping int8"
    return chosen, [chosen, fp32], (f"{head}: no int8 variant is clearly faster than fp32 on this machine "
                                    f"(needs ≤ {CLEARLY_FASTER:.2f}×); shipping the fp32 model beside int8 so the "
                                    "device can measure and pick")


def enforce_bound(artifacts: Sequence[tuple[str, float, float, int, list[str]]], *, force: bool,
                  say: Say | None = None) -> list[str]:
    """The refuse-to-sign rule. `artifacts` are (name, agreement, confident agreement, confident images,
    misses); any artifact with misses stops the build with a BoundError saying by how much it missed, unless
    `force` (then the misses are returned and printed as a warning, to be recorded in the manifest)."""
    say = say or (lambda msg: log.warning("%s", msg))
    missed = [f"{name}: {'; '.join(misses)}" for name, _, _, _, misses in artifacts if misses]
    if missed and not force:
        raise BoundError("Refusing to sign: " + " | ".join(missed) + ". Keep more nodes in float, calibrate on "
                         "more images, relax the bound (--min-agreement/--max-drop), or pass --force to ship it "
                         "anyway")
    for line in missed:
        say(f"WARNING: shipping below the agreement bound because of --force: {line}")
    return missed


def _node_exists(path: Path, name: str) -> bool:
    import onnx

    return any(n.name == name for n in onnx.load(str(path), load_external_data=False).graph.node)
