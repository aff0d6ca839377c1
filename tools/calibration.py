"""Feeds calibration images (float32, already preprocessed by the InputSpec) to onnxruntime's calibrator.

The batch size follows the model: a fixed batch dimension (often 1 in models brought by users) is honoured,
a dynamic one gets batches of `batch` images so calibration stays fast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from edgecv.tools.errors import ExportError

log = logging.getLogger(__name__)


class ArrayCalibrationReader(CalibrationDataReader):  # type: ignore[misc]
    """A CalibrationDataReader over a float32 array (N, ...) for a single-input ONNX model."""

    def __init__(self, model_path: Path, data: np.ndarray, batch: int = 32) -> None:
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
        initializers = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        if len(inputs) != 1:
            raise ExportError(f"Model {Path(model_path).name} has {len(inputs)} inputs; edgecv quantizes "
                              "single-input image classifiers only")
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
        self.fixed_batch = fixed > 0
        self.batch = fixed if fixed > 0 else _even_batch(len(data), batch)
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        expected = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        got = list(self.data.shape[1:])
        if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got, strict=True)):
            from edgecv.tools.byom import format_dims

            raise ExportError(f"Calibration data has per-image shape {format_dims(got)} but the model input "
                              f"'{self.input_name}' expects {format_dims(expected)}; check the input size, "
                              "channels and layout")
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        # Every batch has the same size: a fixed batch dimension needs it, and onnxruntime's histogram
        # calibrators (entropy, percentile) stack per-batch outputs, which fails on a short last batch.
        n = len(self.data) - len(self.data) % self.batch
        if n < len(self.data):
            log.debug("Calibrating on %d of %d images (batches of %d)", n, len(self.data), self.batch)
        if n == 0:
            raise ExportError(f"Need at least {self.batch} calibration images for this model (its batch "
                              f"dimension is fixed), got {len(self.data)}")
        for i in range(0, n, self.batch):
            yield {self.input_name: self.data[i:i + self.batch]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def _even_batch(n: int, batch: int) -> int:
    """A batch size near `batch` that divides n (so no image is dropped), else `batch` itself."""
    batch = max(1, min(batch, n))
    for b in range(batch, max(1, batch // 2) - 1, -1):
        if n % b == 0:
            return b
    return batch
