#!/usr/bin/env bash
# Usage: BUCKET=my-bucket tpu_scripts/launch.sh [--dry-run] RUN_NAME [es-jax pretrain flags...]
#   e.g. BUCKET=my-bucket tpu_scripts/launch.sh data_60 --config.data.fraction=0.6
#
# Starts the same `es-jax pretrain --config $CONFIG` on every host of the slice (made by
# create.sh), in the background, logging to ~/RUN_NAME.log on each host. The workdir is
# gs://$BUCKET/runs/RUN_NAME (or $RESULTS/runs/RUN_NAME): checkpoints go straight to GCS, and the
# same command run again (after a preemption or a crash) resumes from the last one there.
# jax.distributed finds the hosts from the TPU metadata; --config.mesh.data=N
# --config.mesh.fsdp=M shape the mesh. run_resilient.sh does this and recreates the slice
# after a preemption. Settings: tpu_scripts/env.sh; --dry-run prints the commands instead.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh
if (($# < 1)); then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
run_name="$1"
shift
check_name "${run_name}"
require_results

if run_alive "${run_name}"; then
  fail "run ${run_name} is already running on ${TPU_NAME} (~/${run_name}.pid on worker 0)."
fi
launch_run "${run_name}" "$@"
say "Started ${run_name} on every host of ${TPU_NAME}, workdir ${RESULTS}/runs/${run_name};" \
  "follow it with:"
say "  gcloud compute tpus tpu-vm ssh ${TPU_NAME} ${GCLOUD_PLACE[*]} --worker=0" \
  "--command='tail -f ~/${run_name}.log'"
