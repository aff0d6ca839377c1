"""The interface every inference runtime adapter implements, and the checks they share.

Kept apart from the package's selection logic (`edgecv.agent.vision.runtimes`), which imports the adapters lazily:
the adapters import this module, never the package, so there is no import cycle between them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgecv.agent.errors import IncompatibleBundleError


@runtime_checkable
class Engine(Protocol):
    """A loaded model: float32 preprocessed batch in, float32 logits (batch, classes) out."""

    name: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class CodesEngine(Engine, Protocol):
    """An engine whose model takes per-tensor quantized integer input: `input_quantizer` maps float input to
    codes (None when the input is float or per-channel), and `run_codes` runs codes directly. The classifier
    folds that mapping into its preprocessing (one table look-up per pixel)."""

    @property
    def input_quantizer(self) -> Callable[[np.ndarray], np.ndarray] | None: ...

    def run_codes(self, codes: np.ndarray) -> np.ndarray: ...


def require_classifier_io(path: Path, inputs: int, outputs: int) -> None:
    """What every adapter checks first: exactly one image input and at least one (logits) output."""
    if inputs != 1 or outputs == 0:
        raise IncompatibleBundleError(
            f"Model {Path(path).name} has {inputs} inputs and {outputs} outputs; edgecv needs one image input "
            "and a logits output")
