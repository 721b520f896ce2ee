#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, the end-to-end tests on the real model included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
