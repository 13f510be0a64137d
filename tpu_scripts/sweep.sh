#!/usr/bin/env bash
# Usage: BUCKET=my-bucket tpu_scripts/sweep.sh [--dry-run] NAME [es-jax sweep flags...]
#   e.g. BUCKET=my-bucket tpu_scripts/sweep.sh volumes \
#          --config configs/mlm_checkpoints_sweep.py --config.models=...
#
# Runs `es-jax sweep` on worker 0 alone with workdir gs://$BUCKET/sweeps/NAME (or
# $RESULTS/sweeps/NAME) and JAX_PLATFORMS=$ANALYSIS_PLATFORM: cpu by default (beside a
# pre-training run, or on a slice of several hosts); ANALYSIS_PLATFORM=tpu on an idle slice of
# one host. Pre-training checkpoints are models as checkpoint:gs://BUCKET/runs/RUN[@STEP]. Run
# again, the sweep resumes from its stored results. Log: ~/sweep_NAME.log on worker 0.
# Settings: tpu_scripts/env.sh; --dry-run (or DRY_RUN=1) prints the command instead.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh
if (($# < 1)); then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
name="$1"
shift
check_name "${name}"
require_results
analysis_job "sweep_${name}" sweep "${RESULTS}/sweeps/${name}" "$@"
