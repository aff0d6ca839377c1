#!/usr/bin/env bash
# Set up (if needed), lint, type-check and run the test suite. CI runs exactly this (.ci/run).
# EDGECV_SLOW=1 adds the long soaks and full-size runs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$here/scripts/setup.sh" | tail -n1)"
cd "$here"
echo "== ruff"; "$venv/bin/python" -m ruff check agent tools tests bench scripts
echo "== mypy"; "$venv/bin/python" -m mypy
echo "== pytest"; "$venv/bin/python" -m pytest "$@"
