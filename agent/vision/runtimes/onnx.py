"""onnxruntime adapter: runs fp32 and int8 (QDQ) ONNX models on the CPU execution provider.

Note: onnxruntime writes under `$HOME/.cache/Microsoft/...` when used; under systemd with
`ProtectHome=yes` give the service a writable HOME (e.g. its state directory) or accept the warning.
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

_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


class OnnxEngine:
    """One onnxruntime InferenceSession (thread count fixed at creation; inter-op 1; sequential)."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1, precision: str | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailableError(
                f"onnxruntime is not installed ({exc}); install it with 'pip install onnxruntime'") from exc
        self.path = Path(path)
        self.threads = threads
        self.precision = precision
        self.version = ort.__version__
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise IncompatibleBundleError(
                f"Model {self.path.name} cannot be loaded by onnxruntime {self.version}: {exc}; "
                "re-export it or check that the file is a valid ONNX model") from exc
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        require_classifier_io(self.path, len(inputs), len(outputs))
        self._input = inputs[0]
        self._output = outputs[0]
        self._in_type = _NP_TYPES.get(self._input.type)
        if self._in_type is None:
            raise IncompatibleBundleError(f"Model {self.path.name} input type {self._input.type} is not supported")
        batch_dim = self._input.shape[0] if self._input.shape else None
        self._fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self._lock = threading.Lock()
        if self._in_type in (np.int8, np.uint8):
            log.warning("Model %s has an integer input tensor; onnxruntime exposes no scale for it, "
                        "feeding values unscaled", self.path.name)

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if self._fixed_batch is not None and batch.shape[0] != self._fixed_batch:
            if self._fixed_batch != 1:
                raise InferenceError(f"Model {self.path.name} has a fixed batch of {self._fixed_batch}, "
                                     f"got {batch.shape[0]}")
            return np.concatenate([self.run(batch[i:i + 1]) for i in range(batch.shape[0])], axis=0)
        feed = batch.astype(self._in_type, copy=False)
        try:
            out = self._session.run([self._output.name], {self._input.name: feed})[0]
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed on {self.path.name} with input {feed.shape}: {exc}") from exc
        out = np.asarray(out)
        return out.reshape(out.shape[0], -1).astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "version": self.version,
            "path": str(self.path),
            "format": "onnx",
            "precision": self.precision,
            "threads": self.threads,
            "input": {"name": self._input.name, "shape": list(self._input.shape), "type": self._input.type},
            "output": {"name": self._output.name, "shape": list(self._output.shape), "type": self._output.type},
        }

