#!/usr/bin/env bash
# Set up .venv if needed, then run the whole CPU test suite (offline, about 10 minutes on 2 cores). Two workers, one
# torch thread each, a test file per worker at a time (the multi-process and compile tests of a file stay together).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"
