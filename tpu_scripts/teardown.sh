#!/usr/bin/env bash
# Usage: BUCKET=my-bucket tpu_scripts/teardown.sh
#
# Deletes the TPU slice (the runs stay in gs://$BUCKET/runs). Asks for confirmation.
set -euo pipefail
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh
gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" ${PROJECT_FLAG}
