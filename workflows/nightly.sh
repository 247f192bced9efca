#!/usr/bin/env bash
# Nightly segmentation of a folder of slides: only calls the CLI.
#   workflows/nightly.sh SLIDES_DIR OUT.zarr MODEL [extra `pipeline run` options...]
# Exit status is the run's: 0 all done, 1 some inputs failed (see OUT/report.json),
# 2 a usage or configuration error. Each run keeps a dated copy of the report.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: $0 SLIDES_DIR OUT.zarr MODEL [pipeline run options...]" >&2
  exit 2
fi
slides=$1 out=$2 model=$3
shift 3
status=0
pipeline run "$slides" --out "$out" --model "$model" "$@" || status=$?
if [ -f "$out/report.json" ]; then
  cp "$out/report.json" "$out/report-$(date +%Y%m%d-%H%M%S).json"
fi
exit "$status"
