"""Inference runtimes behind one small interface, and the choice of which artifact of a bundle to run.

Each adapter (`onnx.py` for onnxruntime, `litert.py` for LiteRT / tflite-runtime, `openvino.py` for OpenVINO,
which runs the same ONNX files as onnxruntime) imports its runtime lazily, so a device needs only the runtime it
uses. Every engine takes the float32 preprocessed batch
(`InputSpec.shape(n)`) and returns float32 logits (n, classes); int8 input/output tensors are
(de)quantized inside the adapter with the tensor's own scale and zero point.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from edgecv.agent.errors import IncompatibleBundleError, RuntimeUnavailableError
from edgecv.agent.vision.runtimes.base import CodesEngine, Engine, require_classifier_io

if TYPE_CHECKING:
    from edgecv.agent.contract.bundle import Artifact, Bundle

__all__ = ["LITERT", "ONNXRUNTIME", "OPENVINO", "RUNTIMES", "RUNTIMES_FOR_FORMAT", "CodesEngine", "Engine",
           "available_runtimes", "candidates",
           "load_engine", "no_runtime_error", "open_engine", "require_classifier_io"]

log = logging.getLogger(__name__)

ONNXRUNTIME = "onnxruntime"
LITERT = "litert"
OPENVINO = "openvino"
RUNTIMES = (ONNXRUNTIME, LITERT, OPENVINO)
RUNTIME_FOR_FORMAT = {"onnx": ONNXRUNTIME, "tflite": LITERT, "openvino": OPENVINO}  # each format's default runtime
# every runtime that can run a format, and every format a runtime runs (its own first)
RUNTIMES_FOR_FORMAT = {"onnx": (ONNXRUNTIME, OPENVINO), "tflite": (LITERT,), "openvino": (OPENVINO,)}
FORMATS_OF_RUNTIME = {ONNXRUNTIME: ("onnx",), LITERT: ("tflite",), OPENVINO: ("openvino", "onnx")}
INSTALL_HINT = {
    ONNXRUNTIME: "pip install onnxruntime",
    LITERT: "pip install 'edgecv[litert]' (ai-edge-litert)",
    OPENVINO: "pip install 'edgecv[openvino]' (openvino)",
}


def available_runtimes() -> list[str]:
    """Runtimes importable in this environment, in preference order (LiteRT first: fastest for int8)."""
    found = []
    if _has_module("ai_edge_litert") or _has_module("tflite_runtime"):
        found.append(LITERT)
    if _has_module("onnxruntime"):
        found.append(ONNXRUNTIME)
    if _has_module("openvino"):
        found.append(OPENVINO)
    return found


def open_engine(path: Path, fmt: str, threads: int = 1, runtime: str | None = None, *,
                precision: str | None = None) -> Engine:
    """Open one model file with a runtime for its format ('onnx' → onnxruntime by default, or OpenVINO;
    'tflite' → LiteRT).

    `runtime` may name the runtime explicitly; it must be able to run the format. Raises RuntimeUnavailableError
    when that runtime is not installed, IncompatibleBundleError when the file cannot be loaded.
    """
    if fmt not in RUNTIME_FOR_FORMAT:
        raise IncompatibleBundleError(f"Model format {fmt!r} is not supported; use one of "
                                      f"{sorted(RUNTIME_FOR_FORMAT)}")
    wanted = RUNTIME_FOR_FORMAT[fmt] if runtime is None else runtime
    if wanted not in RUNTIMES_FOR_FORMAT[fmt]:
        able = " or ".join(repr(r) for r in RUNTIMES_FOR_FORMAT[fmt])
        raise RuntimeUnavailableError(f"Runtime {runtime!r} cannot run {fmt} models; {fmt} runs on {able}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    path = Path(path)
    if not path.is_file():
        raise IncompatibleBundleError(f"Model file {path} does not exist")
    if wanted == ONNXRUNTIME:
        from edgecv.agent.vision.runtimes.onnx import OnnxEngine

        return OnnxEngine(path, threads=threads, precision=precision)
    if wanted == OPENVINO:
        from edgecv.agent.vision.runtimes.openvino import OpenVinoEngine

        return OpenVinoEngine(path, threads=threads, precision=precision, fmt=fmt)
    from edgecv.agent.vision.runtimes.litert import LiteRtEngine

    return LiteRtEngine(path, threads=threads, precision=precision)


def candidates(bundle: Bundle, runtime: str = "auto") -> list[tuple[Artifact, str]]:
    """The (artifact, runtime) pairs `load_engine` would try, best first, restricted to installed runtimes.

    'auto' orders them by what was measured fastest in general (int8 LiteRT, int8 onnxruntime, int8 OpenVINO,
    then fp32 in the same runtime order); `edgecv.agent.vision.selection` measures them on the device instead.
    """
    if runtime not in ("auto", *RUNTIMES):
        raise RuntimeUnavailableError(f"Unknown runtime {runtime!r}; use 'auto', "
                                      f"{', '.join(repr(r) for r in RUNTIMES)}")
    installed = available_runtimes()
    chosen = (LITERT, ONNXRUNTIME, OPENVINO) if runtime == "auto" else (runtime,)
    out = []
    for precision in ("int8", "fp32"):
        for rt in chosen:
            for fmt in FORMATS_OF_RUNTIME[rt]:
                art = bundle.manifest.artifact(fmt, precision)
                if art is not None and rt in installed:
                    out.append((art, rt))
    return out


def load_engine(bundle: Bundle, runtime: str = "auto", threads: int = 1) -> Engine:
    """Open the best artifact of a bundle for this device.

    'auto' prefers int8 TFLite on LiteRT (fastest int8 path measured), then int8 ONNX on onnxruntime, then
    fp32. An explicit runtime restricts the choice to its format. When a candidate fails to open, the next
    one is tried (logged); if none works, the last error is raised.
    """
    pairs = candidates(bundle, runtime)
    if not pairs:
        raise no_runtime_error(bundle, runtime)
    last: Exception | None = None
    for art, rt in pairs:
        try:
            return open_engine(bundle.path_of(art.path), art.format, threads=threads, runtime=rt,
                               precision=art.precision)
        except (RuntimeUnavailableError, IncompatibleBundleError) as exc:
            log.warning("Cannot open %s with %s (%s); trying the next artifact", art.path, rt, exc)
            last = exc
    assert last is not None
    raise last


def no_runtime_error(bundle: Bundle, runtime: str) -> RuntimeUnavailableError:
    """The error for a bundle that no installed runtime allowed by `runtime` can run, with an install hint."""
    formats = sorted({f"{a.format}/{a.precision}" for a in bundle.manifest.artifacts})
    installed = available_runtimes()
    needed = sorted({RUNTIME_FOR_FORMAT[a.format] for a in bundle.manifest.artifacts
                     if a.format in RUNTIME_FOR_FORMAT} - set(installed))
    if runtime != "auto":
        needed = [runtime] if runtime not in installed else needed
    hint = "; ".join(f"install {r}: {INSTALL_HINT[r]}" for r in needed) or "add a matching artifact"
    return RuntimeUnavailableError(
        f"No installed runtime can run this bundle (artifacts: {', '.join(formats)}; runtime={runtime!r}; "
        f"installed: {', '.join(installed) or 'none'}); {hint}")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
