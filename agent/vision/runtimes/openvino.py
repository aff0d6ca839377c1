"""OpenVINO adapter: runs a bundle's ONNX artifacts (fp32 and int8 QDQ) with OpenVINO's CPU plugin, and the
`openvino` artifact (an ONNX file NNCF quantized for OpenVINO).

OpenVINO reads `.onnx` directly, so it can run the bundle's ONNX files too: a third way to run the same file.
Inference precision is forced to f32 (the CPU plugin's default on processors with bf16 or fp16 support is the
lower precision, which would change the answers the bundle's self-test recorded), one stream, latency hint.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgecv.agent.errors import IncompatibleBundleError, InferenceError, RuntimeUnavailableError
from edgecv.agent.vision.runtimes.base import require_classifier_io

log = logging.getLogger(__name__)


class OpenVinoEngine:
    """One compiled OpenVINO model and its infer request (calls serialized by a lock)."""

    name = "openvino"

    def __init__(self, path: Path, threads: int = 1, precision: str | None = None, fmt: str = "onnx") -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeUnavailableError(
                f"OpenVINO is not installed ({exc}); install it with \"pip install 'edgecv[openvino]'\"") from exc
        self.path = Path(path)
        self.threads = threads
        self.precision = precision
        self.format = fmt
        self.version = str(ov.__version__).split("-")[0]
        try:
            core = ov.Core()
            model = core.read_model(str(self.path))
            require_classifier_io(self.path, len(model.inputs), len(model.outputs))
            self._compiled = core.compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1})
        except IncompatibleBundleError:
            raise
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types for unreadable models
            raise IncompatibleBundleError(
                f"Model {self.path.name} cannot be loaded by OpenVINO {self.version}: {exc}; check that the file is "
                "a valid ONNX model or run it with onnxruntime") from exc
        self._request = self._compiled.create_infer_request()
        self._input = self._compiled.inputs[0]
        self._output = self._compiled.outputs[0]
        self._in_shape = str(self._input.get_partial_shape())
        self._out_shape = str(self._output.get_partial_shape())
        batch = self._input.get_partial_shape()[0]
        self._fixed_batch = batch.get_length() if batch.is_static else None
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self._fixed_batch is not None and batch.shape[0] != self._fixed_batch:
            if self._fixed_batch != 1:
                raise InferenceError(f"Model {self.path.name} has a fixed batch of {self._fixed_batch}, "
                                     f"got {batch.shape[0]}")
            return np.concatenate([self.run(batch[i:i + 1]) for i in range(batch.shape[0])], axis=0)
        try:
            with self._lock:
                self._request.infer({0: batch})
                out = np.array(self._request.get_output_tensor(0).data, dtype=np.float32)  # copy: the buffer is reused
        except Exception as exc:
            raise InferenceError(f"OpenVINO failed on {self.path.name} with input {batch.shape}: {exc}") from exc
        return out.reshape(out.shape[0], -1)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "version": self.version,
            "path": str(self.path),
            "format": self.format,
            "precision": self.precision,
            "threads": self.threads,
            "input": {"name": self._input.get_any_name(), "shape": self._in_shape, "type": "float32"},
            "output": {"name": self._output.get_any_name(), "shape": self._out_shape, "type": "float32"},
        }
