#!/usr/bin/env bash
# Usage: [TPU_NAME=..] [ZONE=..] tpu_scripts/teardown.sh [--dry-run]
#
# Deletes the queued resource and its slice (the runs stay in GCS). gcloud asks for confirmation.
# Settings: tpu_scripts/env.sh; --dry-run (or DRY_RUN=1) prints the command instead.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh
delete_slice
