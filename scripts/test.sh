#!/usr/bin/env bash
# Set up .venv if needed, then run the whole CPU test suite (offline, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
