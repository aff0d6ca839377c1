"""The workstation's exception tree. Shares the base class with the agent so one handler serves both CLIs."""

from __future__ import annotations

from edgecv.agent.errors import EdgecvError


class ToolsError(EdgecvError):
    """Base of errors raised by the workstation tools."""


class DatasetError(ToolsError):
    """The input images or dataset cannot be used (wrong path, too few classes, nothing readable)."""


class TrainingError(ToolsError):
    """Training, pruning or fine-tuning could not proceed (bad hyper-parameters, shape mismatch)."""


class ExportError(ToolsError):
    """Exporting or quantizing a model failed, or the result did not verify in its runtime."""


class BoundError(ExportError):
    """An artifact agrees with fp32 less than the bound asks; it is not signed unless the user forces it."""


class FleetError(ToolsError):
    """Talking to devices over MQTT failed (broker unreachable, timeouts, devices reporting failure)."""


class NameNotAllowedError(DatasetError):
    """A class name or sample id from a user, a page or a device does not fit the allowed alphabet
    (docs/DATASETS.md), so it must not become a file or folder name."""


class LabelError(ToolsError):
    """A labelling action cannot be carried out as asked (a file in the way, nothing left to undo, a file
    moved by hand since)."""


class UnknownSampleError(LabelError):
    """The sample is not (or no longer) waiting in `_unlabelled`."""


class UsageError(ToolsError):
    """The command line is incomplete or contradictory in a way the argument parser cannot see (exit status 2, like
    the parser's own errors)."""

    exit_code = 2
