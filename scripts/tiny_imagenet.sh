#!/usr/bin/env bash
# tiny-imagenet: the full ProtoDiffusion pipeline (see scripts/pipeline.sh for every setting); --dry-run prints it.
export DATASET=tiny-imagenet IMAGE_SIZE=${IMAGE_SIZE:-64}
exec bash "$(dirname "${BASH_SOURCE[0]}")/pipeline.sh" "$@"
