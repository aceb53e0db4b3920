#!/usr/bin/env bash
# Create .venv (if missing) and install the requirements; sourced by the other scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, sklearn, pytorch_fid, matplotlib, tensorboard, pytest, xdist" 2>/dev/null; then
  # the pinned pair installs from local wheels where they exist; any torch >= 2.7 works elsewhere
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 2>/dev/null || .venv/bin/pip install -q torch torchvision
  .venv/bin/pip install -q -r requirements.txt
fi
