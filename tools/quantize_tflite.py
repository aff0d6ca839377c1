"""Int8 (and fp32) TFLite export of torch classifiers without TensorFlow: litert-torch with torchao PT2E.

Int8 path: torch.export → torchao `prepare_pt2e` with litert-torch's symmetric quantizer (int8 weights
per output channel, int8 activations from a histogram observer) → calibration on real preprocessed
images → `convert_pt2e(fold_quantize=False)` → `litert_torch.convert(..., quant_config=...)`.
The result has a fixed batch of 1, keeps the torch layout (NCHW) and has int8 input and output tensors
whose scale/zero-point the runtime adapter applies.

One fix to litert-torch's quantizer: it fuses a convolution only with ReLU, never with ReLU6 (`aten.relu6`, or
`hardtanh(0, 6)`), so on ReLU6 networks (MobileNet, EfficientNet-Lite) every convolution's *pre-activation*
output was quantized to int8 — ranges of tens or hundreds where the ReLU6 output needs [0, 6] — and most of the
precision was gone: EfficientNet-Lite0 agreed with fp32 on 37 % of natural crops. `_Relu6FusingQuantizer`
annotates conv → ReLU6 (and linear → ReLU6) as one fused op whose output is observed after the clamp, which is
also what TFLite executes (CONV_2D with a fused RELU6). The weight-scale floor of 2^-12 that litert-torch applies
was measured too: with or without it, per-channel int8 weights alone give the same agreement, so it stays.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecv.agent.logs import native_banners_hidden
from edgecv.tools.errors import ExportError
from edgecv.tools.evaluate import MIN_AGREEMENT, MIN_CONFIDENT_AGREEMENT, ArtifactOutcome, judge_artifact

if TYPE_CHECKING:
    import torch

    from edgecv.agent.contract.bundle import InputSpec

log = logging.getLogger(__name__)

CONVERTER_TOLERANCE = 1e-3  # max |torch - onnxruntime| relative to the output's range, on fp32


def tflite_for_onnx(onnx_path: Path, spec: InputSpec, calib: np.ndarray, x_eval: np.ndarray, out: Path, *,
                    min_agreement: float = MIN_AGREEMENT, min_confident: float = MIN_CONFIDENT_AGREEMENT,
                    force: bool = False, observer: str = "histogram") -> ArtifactOutcome:
    """int8 TFLite for an fp32 ONNX classifier, without TensorFlow: ONNX → torch (`onnx_to_torch`) → the PT2E path
    above. It is written to `out` and kept only when its top-1 agreement with the fp32 ONNX (run in onnxruntime)
    on `x_eval` meets both bounds, or with `force`; otherwise the outcome says by how much it missed.

    Never raises for a model it cannot convert: the outcome's note says why there is no TFLite artifact.
    """
    from edgecv.agent.vision.runtimes import open_engine
    from edgecv.tools.evaluate import run_logits
    from edgecv.tools.onnx_to_torch import onnx_to_torch

    out = Path(out)
    x_eval = np.asarray(x_eval, dtype=np.float32)
    try:
        model = onnx_to_torch(onnx_path)
        reference = run_logits(open_engine(Path(onnx_path), "onnx", threads=1), x_eval)
        _check_converted(model, x_eval[:8], reference[:8])
        export_tflite_int8(model, spec, calib, out, observer=observer)
    except ExportError as exc:
        out.unlink(missing_ok=True)
        return ArtifactOutcome(None, f"int8 TFLite not built: {exc}")
    return judge_tflite(reference, out, x_eval, min_agreement=min_agreement, min_confident=min_confident,
                        force=force)


def judge_tflite(reference: np.ndarray, tflite: Path, x_eval: np.ndarray, *, min_agreement: float = MIN_AGREEMENT,
                 min_confident: float = MIN_CONFIDENT_AGREEMENT, force: bool = False,
                 remove: bool = True) -> ArtifactOutcome:
    """`evaluate.judge_artifact` for an int8 TFLite in LiteRT."""
    return judge_artifact(reference, tflite, "tflite", x_eval, label="int8 TFLite", min_agreement=min_agreement,
                          min_confident=min_confident, force=force, remove=remove)


def _check_converted(model: torch.nn.Module, x: np.ndarray, reference: np.ndarray) -> None:
    """The converted torch module must compute what onnxruntime computes on the fp32 file; else it is our bug."""
    import torch

    with torch.no_grad():
        got = model(torch.from_numpy(np.ascontiguousarray(x))).numpy().reshape(reference.shape)
    scale = max(float(np.abs(reference).max()), 1e-6)
    err = float(np.abs(got - reference).max()) / scale
    if not np.isfinite(err) or err > CONVERTER_TOLERANCE:
        raise ExportError(f"the ONNX → PyTorch conversion differs from onnxruntime by {err:.2g} of the output range "
                          "(a bug in edgecv's converter, not in your model: please report it)")


def export_tflite_int8(model: torch.nn.Module, spec: InputSpec, calib: np.ndarray, out: Path, *,
                       per_channel: bool = True, observer: str = "histogram") -> Path:
    """Write a full-integer int8 TFLite of `model` at `out`, calibrated on `calib` (float32, preprocessed).

    `observer` sets how activation ranges are calibrated: "histogram" (litert-torch's default, minimises the
    quantization error and may clip outliers) or "minmax" (the full observed range).
    """
    import torch

    litert_torch, pt2e_quantizer, quant_config = _import_litert()
    from torchao.quantization.pt2e import move_exported_model_to_eval, quantize_pt2e

    out = Path(out)
    calib = np.asarray(calib, dtype=np.float32)
    if calib.ndim != 4 or tuple(calib.shape[1:]) != spec.shape()[1:] or len(calib) == 0:
        raise ExportError(f"Calibration data must be float32 of shape (N, {', '.join(map(str, spec.shape()[1:]))})"
                          f", got {calib.shape}; preprocess it with the model's InputSpec")
    model = model.to("cpu").eval()
    sample = (torch.from_numpy(calib[:1]).clone(),)
    started = time.perf_counter()
    try:
        with torch.no_grad(), _converter_quiet():
            graph, batch = _export_for_calibration(model, calib)
            quantizer = _relu6_fusing_quantizer(pt2e_quantizer)().set_global(
                _quant_config(pt2e_quantizer, per_channel, observer))
            graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
            for i in range(0, len(calib), batch):
                chunk = calib[i:i + batch]
                if batch == 1 or len(chunk) > 1:  # a dynamic batch dimension is only valid from 2 up
                    graph(torch.from_numpy(chunk))
            graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
            move_exported_model_to_eval(graph)
            graph.training = False  # the flag litert-torch checks; the ops were switched just above
            # Converted at batch 1: what a camera pipeline feeds, and what LiteRT's int8 kernels expect.
            edge = litert_torch.convert(graph, sample,
                                        quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
    except ExportError:
        raise
    except Exception as exc:  # torch.export / converter errors come in many types
        raise ExportError(f"litert-torch int8 conversion failed: {exc}. Use standard layers (Conv2d, "
                          "BatchNorm2d, ReLU, pooling, Linear) or ship the int8 ONNX only") from exc
    _write(edge, out)
    log.info("Wrote int8 TFLite %s (%d bytes, %d calibration images) in %.1f s", out, out.stat().st_size,
             len(calib), time.perf_counter() - started)
    return out


def _export_for_calibration(model: torch.nn.Module, calib: np.ndarray, batch: int = 32) -> tuple[Any, int]:
    """torch.export the model with a dynamic batch (calibration in batches is ~2x faster than image by image);
    models whose batch dimension cannot be dynamic are exported at batch 1."""
    import torch

    if len(calib) >= 2 * batch:
        try:
            dyn = ({0: torch.export.Dim("batch")},)
            return torch.export.export(model, (torch.from_numpy(calib[:2]),), dynamic_shapes=dyn).module(), batch
        except Exception as exc:  # torch.export specialization errors come in several types
            log.debug("Dynamic-batch export failed (%s); calibrating image by image", exc)
    return torch.export.export(model, (torch.from_numpy(calib[:1]),)).module(), 1


OBSERVERS = ("histogram", "minmax")


def _quant_config(pt2e_quantizer: Any, per_channel: bool, observer: str) -> Any:
    """litert-torch's symmetric int8 config, with the activation observer swapped for MinMax when asked."""
    if observer not in OBSERVERS:
        raise ExportError(f"Activation observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel)
    if observer == "histogram":
        return config
    import dataclasses

    from torchao.quantization.pt2e import MinMaxObserver

    act = config.input_activation
    act = dataclasses.replace(act, observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2 ** -12))
    return dataclasses.replace(config, input_activation=act, output_activation=act)


_RELU6_QUANTIZER: type | None = None


def _relu6_fusing_quantizer(pt2e_quantizer: Any) -> type:
    """litert-torch's PT2EQuantizer that first annotates conv/linear → ReLU6 as fused (see the module docstring)."""
    global _RELU6_QUANTIZER
    if _RELU6_QUANTIZER is not None:
        return _RELU6_QUANTIZER
    import torch
    from litert_torch.quantize import pt2e_quantizer_utils as qu

    relu6_ops = (torch.ops.aten.relu6.default, torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)
    producer_ops = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default, torch.ops.aten.linear.default)

    def is_relu6(node: Any) -> bool:
        if node.op != "call_function" or node.target not in relu6_ops:
            return False
        if node.target == torch.ops.aten.relu6.default:
            return True
        bounds = (list(node.args[1:3]) + [-1.0, 1.0][len(node.args) - 1:])[:2]  # hardtanh's defaults are -1, 1
        return [float(b) for b in bounds] == [0.0, 6.0]

    class Relu6FusingQuantizer(pt2e_quantizer.PT2EQuantizer):  # type: ignore[misc]
        def annotate(self, model: Any) -> Any:
            config = self.global_config
            if config is not None and config.input_activation is not None:
                for node in model.graph.nodes:
                    if not is_relu6(node):
                        continue
                    prod = node.args[0]
                    if getattr(prod, "op", None) != "call_function" or prod.target not in producer_ops \
                            or len(prod.users) != 1:
                        continue
                    partition = [node, prod, prod.args[1]]
                    qmap = {prod.args[0]: qu.get_input_act_qspec(config), prod.args[1]: qu.get_weight_qspec(config)}
                    bias = prod.args[2] if len(prod.args) > 2 else None
                    if isinstance(bias, torch.fx.Node):
                        qmap[bias] = qu.get_bias_qspec(config)
                        partition.append(bias)
                    if qu._is_annotated(partition):
                        continue
                    prod.meta["quantization_annotation"] = qu.QuantizationAnnotation(
                        input_qspec_map=qmap, _annotated=True)
                    node.meta["quantization_annotation"] = qu.QuantizationAnnotation(
                        output_qspec=qu.get_output_act_qspec(config), _annotated=True)
                    qu._mark_nodes_as_annotated(partition)
            return super().annotate(model)

    _RELU6_QUANTIZER = Relu6FusingQuantizer
    return Relu6FusingQuantizer


def export_tflite_fp32(model: torch.nn.Module, spec: InputSpec, out: Path) -> Path:
    """Write an fp32 TFLite of `model` (batch 1, NCHW float32 input, float32 logits) at `out`."""
    import torch

    litert_torch, _, _ = _import_litert()
    out = Path(out)
    model = model.to("cpu").eval()
    sample = (torch.zeros(*spec.shape(1)),)
    try:
        with torch.no_grad():
            graph = torch.export.export(model, sample).module()
            _fold_batchnorm(graph)
            graph.training = False
            with _converter_quiet():
                edge = litert_torch.convert(graph, sample)
    except Exception as exc:
        raise ExportError(f"litert-torch fp32 conversion failed: {exc}") from exc
    _write(edge, out)
    log.info("Wrote fp32 TFLite %s (%d bytes)", out, out.stat().st_size)
    return out


def _fold_batchnorm(graph: Any) -> None:
    """Fold BatchNorm into the preceding conv (the int8 path gets this from prepare_pt2e)."""
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.utils import _fuse_conv_bn_

        _fuse_conv_bn_(graph)
        move_exported_model_to_eval(graph)
    except Exception as exc:  # a private helper: an unfused BatchNorm is slower, not wrong
        log.debug("BatchNorm folding skipped: %s", exc)


class _DropRootInfo(logging.Filter):
    """The converter logs one INFO line per lowered op on the root logger; keep warnings only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def _converter_quiet() -> Iterator[None]:
    """Drop the converter's per-op INFO lines and torch's pytree FutureWarnings during one conversion."""
    root = logging.getLogger()
    flt = _DropRootInfo()
    root.addFilter(flt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        root.removeFilter(flt)


def _write(edge: object, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    edge.export(str(tmp))  # type: ignore[attr-defined]
    tmp.replace(out)


def _import_litert() -> tuple[Any, Any, Any]:
    # torchao warns on import about optional CUDA kernels that a CPU install never has, and torch about an
    # enum it registers; the converter's native code prints absl and oneDNN banners when it loads.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        with native_banners_hidden():
            import litert_torch
            from litert_torch.quantize import pt2e_quantizer, quant_config
            with contextlib.suppress(ImportError):  # loaded by the first conversion otherwise: its banners too
                import litert_converter.converter_api_ext  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"litert-torch is not installed ({exc}); install the workstation extras: "
                          "pip install 'edgecv[tools]'") from exc
    finally:
        pytree.setLevel(level)
    # Its rich progress lines would interleave with our progress bar and tables.
    litert_torch.config.show_progress = False
    return litert_torch, pt2e_quantizer, quant_config
