"""Export a trained torch classifier to one self-contained fp32 ONNX file and prove it matches torch.

The file has one input named "input" (float32, `InputSpec.shape` with a dynamic batch dimension) and one
output named "logits". Weights are embedded (no `.onnx.data` side file), the graph passes `onnx.checker`,
and onnxruntime's output is compared with torch's on random inputs before the path is returned.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgecv.tools.errors import ExportError

if TYPE_CHECKING:
    import torch

    from edgecv.agent.contract.bundle import InputSpec

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 20


def export_onnx(model: torch.nn.Module, spec: InputSpec, out: Path, *, atol: float = 1e-4,
                rtol: float = 1e-3) -> Path:
    """Write `model` as a one-file fp32 ONNX at `out`, verified against torch; returns `out`.

    Uses the torch.export-based exporter (folds BatchNorm); falls back to the TorchScript exporter when
    the model cannot be traced by torch.export. Raises ExportError when the result does not verify.
    """
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    example = torch.randn(*spec.shape(2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(example)
    if expected.ndim != 2:
        raise ExportError(f"The model must output logits of shape (batch, classes); it gave {tuple(expected.shape)}."
                          " Add a Flatten/Linear head")
    _remove_side_files(out)
    try:
        _export_dynamo(model, example, out)
    except Exception as exc:  # torch.export raises many types (UserError, GuardOnDataDependent, ...)
        log.warning("torch.export-based ONNX export failed (%s); retrying with the TorchScript exporter",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        _remove_side_files(out)
        _export_torchscript(model, example, out)
    if out.with_name(out.name + ".data").exists():
        raise ExportError(f"The exporter wrote external weights next to {out}; expected one self-contained file")
    verify_onnx(out, model, spec, atol=atol, rtol=rtol)
    log.info("Exported fp32 ONNX %s (%d bytes)", out, out.stat().st_size)
    return out


def verify_onnx(path: Path, model: torch.nn.Module, spec: InputSpec, *, atol: float = 1e-4,
                rtol: float = 1e-3, batch: int = 3) -> float:
    """Check the ONNX graph and compare onnxruntime with torch on random input; returns the max abs error."""
    import onnx
    import onnxruntime as ort
    import torch

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx.checker.ValidationError, InferenceError
        raise ExportError(f"The exported ONNX {path} does not pass onnx.checker: {exc}") from exc
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ExportError(f"The exported ONNX has inputs/outputs {names}; expected (['{INPUT_NAME}'], "
                          f"['{OUTPUT_NAME}'])")
    x = torch.randn(*spec.shape(batch), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    err = float(np.max(np.abs(got - ref)))
    if got.shape != ref.shape or not np.allclose(got, ref, atol=atol, rtol=rtol):
        raise ExportError(f"onnxruntime output of {path} differs from torch (max abs error {err:.3g}, shapes "
                          f"{got.shape} vs {ref.shape}); the export is wrong — report the model architecture")
    log.debug("ONNX %s matches torch within %.3g", path, err)
    return err


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    import torch

    with _quiet():
        torch.onnx.export(model, (example,), str(out), dynamo=True, external_data=False, optimize=True,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, out: Path) -> None:
    import torch

    try:
        with _quiet():
            torch.onnx.export(model, (example,), str(out), dynamo=False, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=17,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as exc:
        raise ExportError(f"Cannot export the model to ONNX: {exc}. Use standard layers (Conv2d, BatchNorm2d, "
                          "ReLU, pooling, Linear) in the model") from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and deprecation notes on stdout/warnings, and the torch.export-based one
    warns that torchvision ops cannot be registered when torchvision is absent; keep CLI output clean."""
    # logger → the least severe level let through while exporting (onnxscript narrates every pass at INFO)
    quieter = {"torch.onnx._internal.exporter._registration": logging.ERROR, "onnxscript": logging.WARNING,
               "onnx_ir": logging.WARNING}
    saved = {name: logging.getLogger(name).level for name in quieter}
    for name, level in quieter.items():
        logging.getLogger(name).setLevel(max(level, logging.getLogger(name).level))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _remove_side_files(out: Path) -> None:
    for p in (out, out.with_name(out.name + ".data")):
        p.unlink(missing_ok=True)
