#!/usr/bin/env bash
# Usage: BUCKET=my-bucket tpu_scripts/emergence.sh
#
# Runs `es-jax emergence` over every run under $MOUNT/runs on host 0 (the analysis streams the
# checkpoints one at a time, so one host suffices); it writes emergence.json and the PNG plots
# into $MOUNT/runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" ${PROJECT_FLAG} --worker=0 \
  --command="cd ~/${REPO_DIR} && .venv/bin/es-jax emergence --workdir ${MOUNT}/runs"
