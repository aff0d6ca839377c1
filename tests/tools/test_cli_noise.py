"""Third-party noise stays out of the command lines' output unless --verbose (edgecv.agent.logs), measured in real
processes: native banners written to file descriptor 2 by the LiteRT converter and LiteRT itself, Python loggers of
other libraries at INFO, warnings a user cannot act on. The long form runs the `edgecv optimize` command the issue
measured the noise with."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BANNERS = ("absl::InitializeLog", "oneDNN custom operations", "XNNPACK delegate", "Unable to initialize backend",
           "os.fork() was called", "symbolic shape inference")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel")}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)


NATIVE = """
import logging, sys, warnings
from edgecv.agent import logs
logs.configure(verbose="--verbose" in sys.argv)
with logs.native_banners_hidden():
    import litert_converter.converter_api_ext  # prints absl and oneDNN banners as it loads
    print("ours, written while captured", file=sys.stderr)
from ai_edge_litert.interpreter import Interpreter
with logs.native_banners_hidden():
    Interpreter(model_path=sys.argv[1]).allocate_tensors()  # the XNNPACK banner
logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
logging.getLogger("edgecv.tools.pipeline").info("ours at INFO")
warnings.warn("os.fork() was called. os.fork() is incompatible with multithreaded code", RuntimeWarning)
"""


def test_banners_third_party_info_and_warnings_are_hidden_and_ours_kept() -> None:
    tflite = REPO / "models" / "fashion-mnist" / "model.int8.tflite"
    quiet = run_python(NATIVE, str(tflite))
    assert quiet.returncode == 0, quiet.stderr
    assert not [b for b in BANNERS if b in quiet.stderr], quiet.stderr
    assert "ours, written while captured" in quiet.stderr  # replayed, not swallowed
    assert "INFO edgecv.tools.pipeline: ours at INFO" in quiet.stderr


RAW = """
import sys
import litert_converter.converter_api_ext
from ai_edge_litert.interpreter import Interpreter
Interpreter(model_path=sys.argv[1]).allocate_tensors()
"""


def test_verbose_brings_them_back() -> None:
    """Every native banner the libraries print on their own (which ones depends on the CPU: TensorFlow's oneDNN
    note appears on some x86 CPUs, not on an AVX2-only EPYC) comes back with --verbose, and so do the others."""
    tflite = REPO / "models" / "fashion-mnist" / "model.int8.tflite"
    raw = run_python(RAW, str(tflite))
    assert raw.returncode == 0, raw.stderr
    native = [b for b in ("oneDNN custom operations", "XNNPACK delegate") if b in raw.stderr]
    assert "XNNPACK delegate" in native, raw.stderr
    loud = run_python(NATIVE, str(tflite), "--verbose")
    assert loud.returncode == 0, loud.stderr
    for banner in (*native, "Unable to initialize backend", "os.fork() was called"):
        assert banner in loud.stderr, (banner, loud.stderr)


def test_agent_bench_prints_no_litert_banner_unless_verbose() -> None:
    bundle = str(REPO / "models" / "fashion-mnist")
    base = [sys.executable, "-m", "edgecv.agent.cli", "bench", "--bundle", bundle, "--runtime", "litert", "--runs",
            "5"]
    quiet = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "litert" in quiet.stdout, quiet.stderr
    assert "XNNPACK" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([*base, "--verbose"], capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "XNNPACK" in loud.stderr, loud.stderr


@pytest.mark.slow
def test_optimize_output_has_no_third_party_noise(tmp_path: Path) -> None:
    """The command issue 13 measured: its stderr held absl, oneDNN, jax "tpu", onnxruntime INFO and LiteRT lines
    (62 lines in all, here). Now every stderr line is edgecv's: a stage line, a stage note (epoch rows with their
    header), or an edgecv log line; stdout is the result."""
    proc = subprocess.run([sys.executable, "-m", "edgecv.tools.cli", "optimize", "--data", "fashion-mnist", "--limit",
                           "2000", "--epochs", "1", "--finetune-epochs", "0", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    ours = re.compile(r"^(\[\d/9\] |      \S[^:]*: |(INFO|WARNING) edgecv\.)")
    foreign = [line for line in proc.stderr.splitlines() if line.strip() and not ours.match(line)]
    assert foreign == [], foreign
    assert "train: epoch      loss  train acc  val acc" in proc.stderr  # the epoch rows have a header
    assert proc.stdout.startswith("# fashion-mnist")
