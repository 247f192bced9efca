#!/usr/bin/env bash
# Nightly segmentation of a folder of slides on this machine: only calls the CLI.
#   workflows/nightly.sh SLIDES_DIR OUT.zarr MODEL [extra `pipeline run` options...]
# From cron, every night at 02:00 (the same command every time):
#   0 2 * * * /opt/pipeline/workflows/nightly.sh /data/slides /data/masks.zarr /data/unet.onnx >>/data/nightly.log 2>&1
# Only new or changed slides are computed (the ledger in OUT/.pipeline); a night that was
# killed is continued block by block. OUT/report.json lists every slide OUT holds, and each
# run keeps its own report in OUT/.pipeline/runs/. Exit status is the run's: 0 all done or up
# to date, 1 some inputs failed, 2 a usage error, an unwritable output, or OUT locked by a
# run still going (a night that overran).
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: $0 SLIDES_DIR OUT.zarr MODEL [pipeline run options...]" >&2
  exit 2
fi
slides=$1 out=$2 model=$3
shift 3
exec pipeline run "$slides" --out "$out" --model "$model" "$@"
