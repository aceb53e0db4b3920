#!/usr/bin/env bash
# Publish a study's raw records: each run's metrics.jsonl and config.json (a few kB; no checkpoints, no images) from
# OUT/runs/ into DEST/runs/, so that `python study.py STUDY --set out=DEST --task report` rebuilds its report anywhere.
#   bash scripts/publish_study.sh results/digits_study3 docs/results/digits_study3
set -euo pipefail
if [ $# -ne 2 ] || [ ! -d "$1/runs" ]; then
  echo "error: usage: bash scripts/publish_study.sh OUT DEST (OUT: a study's folder, holding runs/)" >&2
  exit 2
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for run in "$1"/runs/*/; do
  name=$(basename "$run")
  mkdir -p "$2/runs/$name"
  for f in metrics.jsonl config.json; do  # paths inside this checkout become relative to it; the report reads none
    sed "s|$root/||g" "$run/$f" > "$2/runs/$name/$f"
  done
done
echo "$(ls "$2/runs" | wc -l) runs' metrics.jsonl and config.json -> $2/runs/"
