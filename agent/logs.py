"""Logging for both command lines (`edgecv`, `edgecv-agent`): one stderr handler, edgecv's own level, and the noise of
third-party libraries kept out unless asked for (`--verbose`, `--debug`).

Measured on `edgecv optimize` and `edgecv quantize --onnx` (docs/BENCHMARKS.md has no part in this: it is output
hygiene), the noise comes in three kinds, each silenced at its source here and nowhere else:

- Python loggers at INFO (onnxruntime's quantization "symbolic shape inference", jax's "Unable to initialize backend
  'tpu'", NNCF): only edgecv's loggers pass INFO; everything else passes WARNING and above. NNCF installs its own
  stdout handler at import, so its importer calls `tame_library_logger("nncf")`.
- Python warnings a user cannot act on (JAX's "os.fork() was called" RuntimeWarning): filtered.
- Native banners written straight to file descriptor 2 by C++ code: absl's "All log messages before
  absl::InitializeLog() ...", TensorFlow's "oneDNN custom operations are on" (both when the LiteRT converter loads)
  and LiteRT's "Created TensorFlow Lite XNNPACK delegate for CPU" (first interpreter). `TF_CPP_MIN_LOG_LEVEL` and
  `GLOG_minloglevel` are set for the builds that honour them, but the converter's absl logging and LiteRT's minimal
  logger ignore both, so the code that loads them runs inside `native_banners_hidden()`, which captures descriptor 2
  and passes on everything except those INFO banners.

The daemon (`edgecv-agent run`) configures logging the same way but never captures descriptor 2: a crash report
(faulthandler, a runtime's own fatal message) must reach the journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

OURS = "edgecv"
# Set before the libraries load, for the builds that honour them (1 = no INFO; warnings and errors stay).
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1", "GLOG_minloglevel": "1"}
# INFO banners native code writes to descriptor 2; anything else written there while it is captured is passed on.
NATIVE_BANNERS = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^I\d{4} [\d:.]+\s+\d+ \S+:\d+\] "),  # absl/glog INFO lines (oneDNN, …)
    re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$"),
)
# Python warnings that say nothing a user of edgecv can act on.
IGNORED_WARNINGS = (
    (RuntimeWarning, r"os\.fork\(\) was called"),  # JAX's at-fork hook, when a library forks a worker
)

_quiet = False  # third-party noise is being silenced (set by configure)
_capture_native = False  # native banners may be captured (CLIs other than the daemon)


def configure(*, level: int = logging.INFO, verbose: bool = False, debug: bool = False,
              fmt: str = "%(levelname)s %(name)s: %(message)s", capture_native: bool = True) -> None:
    """Set up logging for a command-line process: edgecv's loggers at `level` (DEBUG with `debug`), other libraries
    at WARNING unless `verbose` or `debug` (then at INFO), plus the warning filters and the native-banner capture
    (`capture_native`: false for the daemon). The handler is installed only when the root logger has none yet (as
    `logging.basicConfig` does), so a host that set up logging itself (pytest) keeps its own."""
    global _quiet, _capture_native
    noisy = verbose or debug
    _quiet = not noisy
    _capture_native = capture_native and not noisy
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
        root.setLevel(logging.INFO if noisy else logging.WARNING)
    logging.getLogger(OURS).setLevel(logging.DEBUG if debug else level)
    if _quiet:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)
        for category, message in IGNORED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)


def quiet() -> bool:
    """Whether third-party noise is being silenced (no --verbose/--debug)."""
    return _quiet


def tame_library_logger(name: str) -> None:
    """For a library that sets its own logger up at import (NNCF: level INFO, a handler on stdout): call right after
    importing it. Its records then go to stderr, at WARNING and above unless verbose."""
    logger = logging.getLogger(name)
    if _quiet:
        logger.setLevel(logging.WARNING)
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)  # stdout is for results (tables, --json)
        if _quiet:
            handler.setLevel(logging.WARNING)


@contextlib.contextmanager
def native_banners_hidden() -> Iterator[None]:
    """Run code that may make native libraries print INFO banners on descriptor 2 (loading the LiteRT converter, the
    first LiteRT interpreter): what they write is captured and, minus those banners, written to stderr afterwards.
    Does nothing unless a command line enabled it (never the daemon; never with --verbose/--debug)."""
    if not _capture_native:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 (embedded interpreters): nothing to capture
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not any(p.match(line.rstrip("\r\n")) for p in NATIVE_BANNERS)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
