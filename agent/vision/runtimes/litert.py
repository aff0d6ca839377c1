"""LiteRT adapter: runs .tflite models with `ai_edge_litert` (preferred) or the legacy `tflite_runtime`.

Int8/uint8 input tensors are quantized from the float32 preprocessed batch with the tensor's own scale and
zero point; integer outputs are dequantized back to float32 logits. Models with a dynamic batch dimension
are resized to the batch; models with a fixed batch of 1 (what litert-torch exports) are run frame by frame.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecv.agent.errors import IncompatibleBundleError, InferenceError, RuntimeUnavailableError
from edgecv.agent.logs import native_banners_hidden
from edgecv.agent.vision.runtimes.base import require_classifier_io

log = logging.getLogger(__name__)


def load_interpreter_class() -> tuple[type, str]:
    """The Interpreter class and the name of the package that provided it."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError as first:
        try:
            from tflite_runtime.interpreter import Interpreter as LegacyInterpreter

            return LegacyInterpreter, "tflite-runtime"
        except ImportError:
            raise RuntimeUnavailableError(
                f"LiteRT is not installed ({first}); install it with \"pip install 'edgecv[litert]'\" "
                "(ai-edge-litert)") from first


def quant_params(detail: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(scales, zero_points, axis) of a tensor detail dict, or None when the tensor is not quantized."""
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", ()), dtype=np.float32)
    zeros = np.asarray(params.get("zero_points", ()), dtype=np.int64)
    axis = int(params.get("quantized_dimension", 0))
    if scales.size == 0:
        scale, zero = detail.get("quantization", (0.0, 0))
        if not scale:
            return None
        scales, zeros = np.asarray([scale], np.float32), np.asarray([zero], np.int64)
    if zeros.size == 0:
        zeros = np.zeros_like(scales, dtype=np.int64)
    return scales, zeros, axis


def _broadcast(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = values.size
    return values.reshape(shape)


def quantize(x: np.ndarray, dtype: Any, scales: Sequence[float] | np.ndarray,
             zero_points: Sequence[int] | np.ndarray, axis: int = 0) -> np.ndarray:
    """float → integer tensor: q = clip(round(x / scale) + zero_point) (per-tensor or per-axis)."""
    info = np.iinfo(dtype)
    s = _broadcast(np.asarray(scales, np.float32), x.ndim, axis)
    z = _broadcast(np.asarray(zero_points, np.float32), x.ndim, axis)
    q = np.rint(np.asarray(x, np.float32) / s) + z
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scales: Sequence[float] | np.ndarray,
               zero_points: Sequence[int] | np.ndarray, axis: int = 0) -> np.ndarray:
    """integer → float32 tensor: x = (q - zero_point) * scale."""
    s = _broadcast(np.asarray(scales, np.float32), q.ndim, axis)
    z = _broadcast(np.asarray(zero_points, np.float32), q.ndim, axis)
    return ((q.astype(np.float32) - z) * s).astype(np.float32)


class InputQuantizer:
    """`quantize` with everything precomputed: it runs on every frame, where numpy call overhead dominates."""

    def __init__(self, dtype: Any, scales: np.ndarray, zero_points: np.ndarray, axis: int, ndim: int) -> None:
        info = np.iinfo(dtype)
        self.dtype = np.dtype(dtype)
        self.lo, self.hi = float(info.min), float(info.max)
        self.inv = (1.0 / _broadcast(np.asarray(scales, np.float32), ndim, axis)).astype(np.float32)
        self.zero = _broadcast(np.asarray(zero_points, np.float32), ndim, axis)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        q = np.multiply(x, self.inv, dtype=np.float32)
        q += self.zero
        np.rint(q, out=q)
        np.clip(q, self.lo, self.hi, out=q)
        return q.astype(self.dtype)


class OutputDequantizer:
    """`dequantize` for 8-bit per-tensor outputs as one table look-up (256 entries), else the general path."""

    def __init__(self, dtype: Any, scales: np.ndarray, zero_points: np.ndarray, axis: int) -> None:
        self.params = (scales, zero_points, axis)
        self.table: np.ndarray | None = None
        dt = np.dtype(dtype)
        if dt.itemsize == 1 and scales.size == 1:
            codes = np.arange(256, dtype=np.uint8).view(dt)
            self.table = dequantize(codes, scales, zero_points)

    def __call__(self, q: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return self.table[q.view(np.uint8)]
        return dequantize(q, *self.params)


class LiteRtEngine:
    """One LiteRT interpreter (not thread-safe itself: calls are serialized by a lock)."""

    name = "litert"

    def __init__(self, path: Path, threads: int = 1, precision: str | None = None) -> None:
        interpreter_cls, self.provider = load_interpreter_class()
        self.path = Path(path)
        self.threads = threads
        self.precision = precision
        try:
            with native_banners_hidden():  # the first interpreter prints an XNNPACK banner (CLIs hide it)
                self._interp = interpreter_cls(model_path=str(self.path), num_threads=threads)
                self._interp.allocate_tensors()
        except Exception as exc:
            if self.provider == "tflite-runtime" and int(np.__version__.split(".")[0]) >= 2:
                raise RuntimeUnavailableError(
                    f"tflite-runtime cannot create an interpreter under numpy {np.__version__} ({exc}); "
                    "install ai-edge-litert (\"pip install 'edgecv[litert]'\") or use numpy < 2") from exc
            raise IncompatibleBundleError(
                f"Model {self.path.name} cannot be loaded by {self.provider}: {exc}; check that the file is a "
                "valid .tflite model") from exc
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        require_classifier_io(self.path, len(inputs), len(outputs))
        self._in = inputs[0]
        self._out = outputs[0]
        self._in_dtype = np.dtype(self._in["dtype"])
        self._out_dtype = np.dtype(self._out["dtype"])
        self._in_quant = quant_params(self._in) if self._in_dtype.kind in "iu" else None
        self._out_quant = quant_params(self._out) if self._out_dtype.kind in "iu" else None
        signature = self._in.get("shape_signature")
        self._dynamic_batch = signature is not None and len(signature) > 0 and int(signature[0]) == -1
        self._batch = int(self._in["shape"][0])
        self._quantize = (InputQuantizer(self._in_dtype, *self._in_quant, ndim=len(self._in["shape"]))
                          if self._in_quant is not None else None)
        self._dequantize = (OutputDequantizer(self._out_dtype, *self._out_quant)
                            if self._out_quant is not None else None)
        self._lock = threading.Lock()
        try:
            from ai_edge_litert import __version__ as version  # type: ignore[attr-defined]
        except ImportError:
            version = "unknown"
        self.version = str(version)

    @property
    def input_quantizer(self) -> InputQuantizer | None:
        """The float → code mapping of a per-tensor-quantized input (None otherwise), so a caller can fold it
        into preprocessing and call `run_codes`."""
        if self._quantize is None or self._in_quant is None or self._in_quant[0].size != 1:
            return None
        return self._quantize

    def run_codes(self, codes: np.ndarray) -> np.ndarray:
        """Run an already-quantized input batch (see `input_quantizer`); returns float32 logits."""
        if self._quantize is None or codes.dtype != self._in_dtype:
            raise InferenceError(f"Model {self.path.name} takes {self._in_dtype} input, not {codes.dtype} codes")
        return self._run_feed(codes)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a float32 preprocessed batch; int8/uint8 model inputs are quantized here."""
        batch = np.asarray(batch, dtype=np.float32)
        feed = self._quantize(batch) if self._quantize is not None else np.ascontiguousarray(batch, self._in_dtype)
        return self._run_feed(feed)

    def _run_feed(self, feed: np.ndarray) -> np.ndarray:
        """Feed tensors already in the model's input dtype, resizing or looping to the model's batch."""
        n = feed.shape[0]
        with self._lock:
            if n != self._batch:
                if self._dynamic_batch:
                    self._resize(n)
                elif self._batch == 1:
                    return np.concatenate([self._invoke(feed[i:i + 1]) for i in range(n)], axis=0)
                else:
                    raise InferenceError(f"Model {self.path.name} has a fixed batch of {self._batch}, got {n}")
            return self._invoke(feed)

    def _resize(self, n: int) -> None:
        shape = [n, *(int(d) for d in self._in["shape"][1:])]
        try:
            self._interp.resize_tensor_input(self._in["index"], shape, strict=False)
            self._interp.allocate_tensors()
        except Exception as exc:
            raise InferenceError(f"LiteRT cannot resize {self.path.name} to batch {n}: {exc}") from exc
        self._batch = n

    def _invoke(self, feed: np.ndarray) -> np.ndarray:
        try:
            self._interp.set_tensor(self._in["index"], feed)
            self._interp.invoke()
            out = self._interp.get_tensor(self._out["index"])
        except Exception as exc:
            raise InferenceError(f"LiteRT failed on {self.path.name} with input {feed.shape}: {exc}") from exc
        if self._dequantize is not None:
            out = self._dequantize(out)
        return np.asarray(out, dtype=np.float32).reshape(feed.shape[0], -1)

    def describe(self) -> dict[str, Any]:
        def tensor(detail: Mapping[str, Any], quant: tuple[np.ndarray, np.ndarray, int] | None) -> dict[str, Any]:
            doc: dict[str, Any] = {"name": detail.get("name"), "shape": [int(d) for d in detail["shape"]],
                                   "type": np.dtype(detail["dtype"]).name}
            if quant is not None:
                doc["scale"] = [float(s) for s in quant[0]]
                doc["zero_point"] = [int(z) for z in quant[1]]
            return doc

        return {
            "runtime": self.name,
            "provider": self.provider,
            "version": self.version,
            "path": str(self.path),
            "format": "tflite",
            "precision": self.precision,
            "threads": self.threads,
            "input": tensor(self._in, self._in_quant),
            "output": tensor(self._out, self._out_quant),
        }
