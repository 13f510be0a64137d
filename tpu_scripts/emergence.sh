#!/usr/bin/env bash
# Usage: BUCKET=my-bucket tpu_scripts/emergence.sh [--dry-run] [es-jax emergence flags...]
#
# Runs `es-jax emergence` over every run under gs://$BUCKET/runs (or $RESULTS/runs) on worker 0
# alone, with JAX_PLATFORMS=$ANALYSIS_PLATFORM (cpu by default: see analysis_job in env.sh; it
# can run beside a pre-training run). It streams the checkpoints one at a time from GCS and
# writes emergence.json and the PNG plots into the runs' folders; run again, it reuses the
# analyses of unchanged runs. Settings: tpu_scripts/env.sh; --dry-run prints the command instead.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh
require_results
analysis_job emergence emergence "${RESULTS}/runs" "$@"
