#!/usr/bin/env bash
# One-shot set-up on a fresh Debian machine: system packages, then a venv with edgecv and every extra.
# Idempotent: a second run only checks. Venv location: $EDGECV_VENV (default ~/.local/share/edgecv/venv).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${EDGECV_VENV:-$HOME/.local/share/edgecv/venv}"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}" >&2
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating venv $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
fi
# torch comes from the CPU wheel pinned in constraints.txt (a local file on these machines when present).
wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1 && [ -n "$wheel" ]; then
  "$venv/bin/pip" install -q -c "$here/constraints.txt" "$wheel"
fi
# Strict editable mode: the package-dir mapping (agent/ → edgecv.agent, tools/ → edgecv.tools) becomes a tree of
# links that mypy can read too; a new module file needs this line again (every run of this script does it).
"$venv/bin/pip" install -q -c "$here/constraints.txt" --config-settings editable_mode=strict -e "$here[tools,litert,openvino,dev]"
echo "$venv"
