#!/usr/bin/env bash
# cifar10: the full ProtoDiffusion pipeline (see scripts/pipeline.sh for every setting); --dry-run prints it.
export DATASET=cifar10 IMAGE_SIZE=${IMAGE_SIZE:-32}
exec bash "$(dirname "${BASH_SOURCE[0]}")/pipeline.sh" "$@"
