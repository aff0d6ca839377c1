"""Static int8 quantization of fp32 ONNX classifiers with onnxruntime.

A `QuantRecipe` names one configuration: activation type (uint8 or int8; weights are always int8), QDQ or
QOperator format, per-channel or per-tensor weights, the calibration method, and whether only the weighted
ops are quantized. Activation ranges are calibrated once per method on real, already preprocessed images
(`calibrate`) and reused by every recipe. `quantize_dynamic` is deliberately not offered: on CNNs it turns
convolutions into ConvInteger, measured 6.5x slower than fp32. Which recipe ships is decided by
measurement in `edgecv.tools.artifacts`, which also keeps the most sensitive nodes in float when no recipe
meets the agreement bound.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecv.tools.calibration import ArrayCalibrationReader
from edgecv.tools.errors import ExportError

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
# Node types whose weights are quantized; the candidates the accuracy-aware search may keep in float.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ACTIVATIONS = ("uint8", "int8")
QUANT_FORMATS = ("qdq", "qoperator")


@dataclass(frozen=True)
class QuantRecipe:
    """One static int8 configuration (weights are always int8, symmetric; activations asymmetric).

    `weighted_only` quantizes only Conv/Gemm/MatMul: element-wise ops whose int8 kernels are missing or slower
    (HardSigmoid, HardSwish, Mul in squeeze-excite blocks) stay float instead of being wrapped in convert steps.

    `reduce_range` (the default) keeps weights in 7 bits (-64..63). On x86 CPUs without VNNI (AVX2, AVX-512F)
    onnxruntime multiplies 8-bit activations by 8-bit weights with `vpmaddubsw`, which saturates the sum of two
    products at 16 bits; with VNNI, and on ARM, it does not. Full 8-bit weights therefore give other answers on
    an AVX2 device than on the VNNI machine that built and checked them (measured: EfficientNet-Lite0 U8S8 agreed
    with fp32 on 50 % of images on an AVX2 EPYC, 100 % with VNNI; the shipped demo CNN failed its own
    self-test). With 7-bit weights no sum can saturate, so every CPU computes the same integers.
    """

    activations: str = "int8"
    per_channel: bool = True
    format: str = "qdq"
    method: str = "minmax"
    weighted_only: bool = False
    reduce_range: bool = True

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise ExportError(f"Activation type {self.activations!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.format not in QUANT_FORMATS:
            raise ExportError(f"Quantization format {self.format!r} is not one of {', '.join(QUANT_FORMATS)}")
        if self.method not in METHODS:
            raise ExportError(f"Unknown calibration method {self.method!r}; use one of {', '.join(METHODS)}")

    @property
    def label(self) -> str:
        """Short name, e.g. 'U8S8 QDQ per-channel minmax'."""
        act = "U8S8" if self.activations == "uint8" else "S8S8"
        fmt = "QDQ" if self.format == "qdq" else "QOperator"
        scope = " weighted-only" if self.weighted_only else ""
        bits = "" if self.reduce_range else " 8-bit weights"
        return f"{act} {fmt} {'per-channel' if self.per_channel else 'per-tensor'} {self.method}{scope}{bits}"

    def as_dict(self) -> dict[str, object]:
        return {"activations": self.activations, "weights": "int8", "weight_bits": 7 if self.reduce_range else 8,
                "format": self.format, "per_channel": self.per_channel, "calibration": self.method,
                "weighted_only": self.weighted_only}


# The recipe edgecv used before recipes were chosen by measurement (int8 activations, QDQ, per channel).
LEGACY_RECIPE = QuantRecipe()


def quantize_onnx_int8(fp32_path: Path, calib: np.ndarray, out: Path, method: str = "minmax",
                       per_channel: bool = True, exclude_nodes: Sequence[str] = ()) -> Path:
    """Write a static QDQ int8 model of `fp32_path` at `out`; returns `out`.

    `calib` is float32, already preprocessed by the model's InputSpec (N, ...); a few hundred real images
    are enough. `exclude_nodes` names nodes (as in the pre-processed graph, see `quantizable_nodes`) that
    stay float.
    """
    fp32_path, out = Path(fp32_path), Path(out)
    if not fp32_path.is_file():
        raise ExportError(f"ONNX model {fp32_path} does not exist; export it first")
    with tempfile.TemporaryDirectory(prefix="edgecv-quant-") as tmp:
        pre = preprocess_for_quantization(fp32_path, Path(tmp) / "pre.onnx")
        ranges = calibrate(pre, calib, method, Path(tmp) / "ranges.json")
        return _quantize_preprocessed(pre, ranges, out, method=method, per_channel=per_channel,
                                      exclude_nodes=exclude_nodes)


def preprocess_for_quantization(fp32_path: Path, out: Path) -> Path:
    """onnxruntime's `quant_pre_process`: shape inference and graph clean-up before calibration."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=False)
    except Exception as exc:  # symbolic shape inference gives up on some graphs; retry without it
        log.debug("Symbolic shape inference failed on %s (%s); retrying without it", fp32_path, exc)
        try:
            quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=True)
        except Exception as exc2:
            raise ExportError(f"Cannot prepare {fp32_path} for quantization: {exc2}; check that it is a valid "
                              "fp32 ONNX model (onnx.checker)") from exc2
    _name_nodes(out)
    return out


def _name_nodes(path: Path) -> None:
    """Give every unnamed node a unique name (`<op>_<n>`): onnxruntime excludes nodes from quantization by
    name only, and exporters often leave element-wise nodes (HardSigmoid, Mul) unnamed."""
    import onnx

    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node if n.name}
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            changed = True
    if changed:
        onnx.save(model, str(path))


def quantizable_nodes(model_path: Path) -> list[str]:
    """Names of the weighted nodes (Conv, Gemm, MatMul, ...) of a model, in graph order."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS and n.name]


def torch_module_names(model_path: Path) -> dict[str, str]:
    """Weighted node name → the torch module it came from (e.g. 'features.0'), where the exporter recorded it.

    The torch.export-based exporter stores the module path in each node's `pkg.torch.onnx.name_scopes`;
    a conv with BatchNorm folded in is recorded under the BatchNorm, so its parent block is named instead.
    """
    import ast

    import onnx

    names: dict[str, str] = {}
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        props = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = [str(x) for x in ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))]
        except (ValueError, SyntaxError):
            continue
        modules = [x for x in scopes[:-1] if x]  # the last scope is the op itself
        if "FuseBatchNorm" in props.get("pkg.onnxscript.rewriter.rule_name", "") and len(modules) > 1:
            modules = modules[:-1]
        if modules:
            names[node.name] = modules[-1]
    return names


def _method(method: str) -> object:
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ExportError(f"Unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    return methods[method]


# Calibrator settings. quantize_static does not forward bin counts, and with its entropy defaults
# (128 bins, 128 quantized bins) the KL search has one candidate: the min/max range. Entropy therefore
# uses TensorRT's 2048/128. Activation ranges are asymmetric (most follow a ReLU).
_CALIBRATOR_OPTIONS: dict[str, dict[str, object]] = {
    "minmax": {"symmetric": False, "max_intermediate_outputs": 16},
    "entropy": {"symmetric": False, "num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"symmetric": False, "num_bins": 2048, "percentile": 99.999},
}


def calibrate(pre: Path, calib: np.ndarray, method: str, cache: Path) -> Path:
    """Run the calibration images through `pre` once and save the activation ranges to `cache` (JSON).

    The ranges are reused by every quantization of the same model (the accuracy-aware search quantizes
    many times), so calibration — the slow part for entropy/percentile — happens once.
    """
    import inspect

    import onnxruntime
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    try:
        from onnxruntime.quantization.calibrate import save_tensors_data
    except ImportError:
        save_tensors_data = None
    if save_tensors_data is None or "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise ExportError(f"onnxruntime {onnxruntime.__version__} cannot reuse calibration ranges; upgrade it "
                          "(pip install -U onnxruntime; 1.32 is tested)")

    calib_method = _method(method)
    calib = np.asarray(calib, dtype=np.float32)
    if calib.ndim < 2 or len(calib) == 0:
        raise ExportError(f"Calibration data must be a non-empty float32 batch (N, ...), got shape {calib.shape}")
    reader = ArrayCalibrationReader(pre, calib)
    started = time.perf_counter()
    chatter = io.StringIO()  # the histogram calibrators print progress on stdout
    with tempfile.TemporaryDirectory(prefix="edgecv-calib-") as tmp:
        try:
            with contextlib.redirect_stdout(chatter):
                calibrator = create_calibrator(
                    Path(pre), sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                    augmented_model_path=str(Path(tmp) / "augmented.onnx"), calibrate_method=calib_method,
                    extra_options=dict(_CALIBRATOR_OPTIONS[method]))
                calibrator.collect_data(reader)
                ranges = calibrator.compute_data()
        except ExportError:
            raise
        except Exception as exc:  # onnxruntime raises plain Exceptions and its own Fail types
            raise ExportError(f"Calibration of {Path(pre).name} failed ({method}): {exc}") from exc
    if not isinstance(ranges, TensorsData):
        raise ExportError(f"onnxruntime calibration returned {type(ranges).__name__}, not tensor ranges")
    save_tensors_data(ranges, cache)
    if chatter.getvalue():
        log.debug("onnxruntime calibration: %s", chatter.getvalue().strip().replace("\n", "; "))
    log.debug("Calibrated %d tensors (%s) on %d images in %.2f s", len(ranges.data), method, len(calib),
             time.perf_counter() - started)
    return cache


def _quantize_preprocessed(pre: Path, ranges: Path, out: Path, *, method: str, per_channel: bool,
                           exclude_nodes: Sequence[str]) -> Path:
    return quantize_with_recipe(pre, ranges, out, QuantRecipe(per_channel=per_channel, method=method),
                                exclude_nodes=exclude_nodes)


def quantize_with_recipe(pre: Path, ranges: Path, out: Path, recipe: QuantRecipe,
                         exclude_nodes: Sequence[str] = ()) -> Path:
    """Quantize the pre-processed model `pre` with activation ranges `ranges` (from `calibrate` with
    `recipe.method`) into `out`; `exclude_nodes` (node names of `pre`) stay float."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    names = set(quantizable_nodes(pre))
    unknown = [n for n in exclude_nodes if n not in names and not _node_exists(pre, n)]
    if unknown:
        raise ExportError(f"Nodes {unknown} to keep in float are not in the model; pick from {sorted(names)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    act = QuantType.QUInt8 if recipe.activations == "uint8" else QuantType.QInt8
    fmt = QuantFormat.QDQ if recipe.format == "qdq" else QuantFormat.QOperator
    ops = list(WEIGHTED_OPS) if recipe.weighted_only else None
    try:
        quantize_static(
            str(pre), str(out), calibration_data_reader=None, calibration_cache_path=str(ranges),
            quant_format=fmt, per_channel=recipe.per_channel, activation_type=act, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude_nodes), op_types_to_quantize=ops, calibrate_method=_method(recipe.method),
            reduce_range=recipe.reduce_range,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    except Exception as exc:  # onnxruntime raises plain Exceptions and its own Fail types
        raise ExportError(f"onnxruntime static quantization of {pre.name} failed ({recipe.label}): {exc}") from exc
    log.debug("Quantized %s → %s (%s, %d nodes kept float) in %.2f s", pre.name, out, recipe.label,
             len(exclude_nodes), time.perf_counter() - started)
    return out


def _node_exists(model_path: Path, name: str) -> bool:
    import onnx

    return any(n.name == name for n in onnx.load(str(model_path), load_external_data=False).graph.node)
