#!/usr/bin/env bash
# Usage: BUCKET=my-bucket tpu_scripts/collect.sh [--dry-run] [LOCAL_DIR]
#
# Copies the results under gs://$BUCKET (or $RESULTS): runs/ and sweeps/ with their JSON, CSV,
# logs and plots, but not the checkpoints, to LOCAL_DIR (default runs/tpu) with gcloud storage,
# and worker 0's host logs (~/*.log) next to them while the slice is up.
# Settings: tpu_scripts/env.sh; --dry-run (or DRY_RUN=1) prints the commands instead.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh
require_results
local_dir="${1:-runs/tpu}"
run mkdir -p "${local_dir}"
run gcloud storage rsync --recursive --exclude='(.*/)?(corrupt_)?checkpoints/.*' \
  "${RESULTS}" "${local_dir}"
run gcloud compute tpus tpu-vm scp "${TPU_NAME}:~/*.log" "${local_dir}/" "${GCLOUD_PLACE[@]}" \
  --worker=0 || say "No host logs copied (is ${TPU_NAME} up?)."
say "Results in ${local_dir}"
