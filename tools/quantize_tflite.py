"""Int8 (and fp32) TFLite export of torch classifiers without TensorFlow: litert-torch with torchao PT2E.

Int8 path: torch.export → torchao `prepare_pt2e` with litert-torch's symmetric quantizer (int8 weights
per output channel, int8 activations from a histogram observer) → calibration on real preprocessed
images → `convert_pt2e(fold_quantize=False)` → `litert_torch.convert(..., quant_config=...)`.
The result has a fixed batch of 1, keeps the torch layout (NCHW) and has int8 input and output tensors
whose scale/zero-point the runtime adapter applies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecv.tools.errors import ExportError

if TYPE_CHECKING:
    import torch

    from edgecv.agent.contract.bundle import InputSpec

log = logging.getLogger(__name__)


def export_tflite_int8(model: torch.nn.Module, spec: InputSpec, calib: np.ndarray, out: Path, *,
                       per_channel: bool = True) -> Path:
    """Write a full-integer int8 TFLite of `model` at `out`, calibrated on `calib` (float32, preprocessed)."""
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
            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel))
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
    # enum it registers; the converter's native code logs through absl unless told not to.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer, quant_config
    except ImportError as exc:
        raise ExportError(f"litert-torch is not installed ({exc}); install the workstation extras: "
                          "pip install 'edgecv[tools]'") from exc
    finally:
        pytree.setLevel(level)
    # Its rich progress lines would interleave with our progress bar and tables.
    litert_torch.config.show_progress = False
    return litert_torch, pt2e_quantizer, quant_config
