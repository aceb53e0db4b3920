#!/usr/bin/env bash
# Run a study file with study.py after setting up .venv: bash scripts/study.sh STUDY [study.py flags]; `--dry-run`
# prints every task and the estimate without setting anything up. COMPAT=original (or another --compat value)
# trains every arm as the original code did, into OUT-compat_original.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ " $* " != *" --dry-run "* ]]; then source scripts/setup.sh; fi
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
extra=()
if [ "${COMPAT:-none}" != none ]; then extra=(--set "compat=\"$COMPAT\""); fi
exec "$PY" study.py "$@" ${extra[@]+"${extra[@]}"}
