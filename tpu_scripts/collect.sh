#!/usr/bin/env bash
# Usage: BUCKET=my-bucket tpu_scripts/collect.sh [LOCAL_DIR]
#
# Copies the results (emergence.json, plots, config/results/log files; not the checkpoints)
# from gs://$BUCKET/runs to LOCAL_DIR (default runs/tpu), and the hosts' logs next to them.
set -euo pipefail
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh
local_dir="${1:-runs/tpu}"
mkdir -p "${local_dir}"
gcloud storage rsync --recursive --exclude='.*/checkpoints/.*|.*corrupt_checkpoints/.*' \
  "gs://${BUCKET}/runs" "${local_dir}"
gcloud compute tpus tpu-vm scp "${TPU_NAME}:~/*.log" "${local_dir}/" --zone="${ZONE}" \
  ${PROJECT_FLAG} --worker=0 || echo "no host logs copied"
echo "Results in ${local_dir}"
