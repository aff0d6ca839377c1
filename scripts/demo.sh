#!/usr/bin/env bash
# The README's main demo: set up the device side only (idempotent; mosquitto + edgecv[litert], no training stack),
# then run the agent on synthetic Fashion-MNIST frames with the shipped, signed default bundle and watch the
# predictions arrive through an MQTT broker.
# Uses the machine's Mosquitto on 127.0.0.1:1883 when it answers, else starts a private one on a free port.
# Extra arguments go to `edgecv-agent demo` (e.g. --frames 500, --runtime onnxruntime, --broker HOST:PORT).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$here/scripts/setup.sh" --device | tail -n1)"  # device side only: mosquitto + edgecv[litert]
cd "$here"
exec "$venv/bin/edgecv-agent" demo "$@"
