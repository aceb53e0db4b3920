#!/usr/bin/env bash
# Set up .venv if needed, then run the whole CPU test suite (offline, about 10 minutes on 2 cores). Two workers, one
# torch thread each, a test file per worker at a time (the multi-process and compile tests of a file stay together).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
# Fashion-MNIST's tests read the real files: Debian's dataset-fashion-mnist, installed where apt and root (or
# password-less sudo) are here; elsewhere that one test is skipped with a line saying how to get them
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then as_root=(); elif sudo -n true 2>/dev/null; then as_root=(sudo -n); else as_root=(false); fi
  { "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 ||
    echo "note: could not install dataset-fashion-mnist; its real-file test is skipped" >&2
fi
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"
