#!/usr/bin/env bash
# stl10: the paper's comparison as a study (studies/stl10.toml: arms, seeds, evaluation, declared endpoints). Here:
# one run per visible GPU at a time, then the report; --dry-run prints every task and its estimated cost; other
# study.py flags pass through (--submit True: a SLURM job array). COMPAT=original: the original code's behaviour.
exec bash "$(dirname "${BASH_SOURCE[0]}")/study.sh" studies/stl10.toml "$@"
