#!/usr/bin/env bash
# fashion_mnist: the paper's question on real images, offline (studies/fashion_mnist.toml: arms, seeds, evaluation,
# declared endpoints; the images from Debian's dataset-fashion-mnist). Here: two runs side by side on a CPU, then
# the report; --dry-run prints every task and its estimated cost (CPU hours from measured rates, GPU-hours for the
# paper-scale variant); other study.py flags pass through. COMPAT=original: the original code's behaviour.
exec bash "$(dirname "${BASH_SOURCE[0]}")/study.sh" studies/fashion_mnist.toml "$@"
