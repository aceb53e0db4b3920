#!/usr/bin/env bash
# The digits studies on a CPU (studies/digits.toml: study 2's five arms; studies/digits_study3.toml: study 3,
# the original's baseline): bash scripts/digits_experiment.sh [STUDY] [study.py flags]; --dry-run prints the tasks.
if [[ "${1:-}" == *.toml ]]; then study=$1; shift; else study=studies/digits.toml; fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/study.sh" "$study" "$@"
