#!/usr/bin/env bash
# Usage: BUCKET=my-bucket tpu_scripts/run_resilient.sh [--dry-run] RUN_NAME \
#          [es-jax pretrain flags...]
#   e.g. BUCKET=my-bucket tpu_scripts/run_resilient.sh data_60 --config.data.fraction=0.6
#
# Runs one pre-training run to its end on a spot slice, whatever preemptions come: it looks at
# the queued resource every POLL_SECONDS and
#   NOT_FOUND              asks for the slice (create.sh's request);
#   ACTIVE                 stops if the run has finished (gs://.../runs/RUN_NAME/results.json);
#                          if its process is not alive on worker 0, sets the hosts up and launches
#                          it as launch.sh does, at most MAX_LAUNCHES times on one slice;
#   SUSPENDED              (preempted: the slice is gone) deletes the request and asks again;
#   FAILED                 the same after the slice was ACTIVE here; before, the request itself
#                          failed: stops with an error;
#   any other state        waits (WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDING, DELETING...).
# Each launch resumes from the last checkpoint in GCS. Leave it running (in tmux, say); stopping
# it leaves the slice and the run as they are. Settings: tpu_scripts/env.sh; --dry-run prints the
# commands of a pretend first start, preemption and recreation (DRY_RUN_STATES) instead.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh
if (($# < 1)); then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
run_name="$1"
shift
check_name "${run_name}"
require_results

archive="${TMPDIR:-/tmp}/${TPU_NAME}-es_jax.tar.gz"
pack_checkout "${archive}"  # once: every slice gets the same code
launches=0                  # launches on the current slice
was_active=0                # whether the current slice has been ACTIVE
previous_state=""
while true; do
  read_slice_state
  if [[ "${SLICE_STATE}" != "${previous_state}" ]]; then
    say "$(date -u +%FT%TZ) queued resource ${QUEUED_RESOURCE}: ${SLICE_STATE}"
    previous_state="${SLICE_STATE}"
  fi
  case "${SLICE_STATE}" in
    NOT_FOUND)
      create_slice
      launches=0
      was_active=0 ;;
    ACTIVE)
      was_active=1
      if run_finished "${run_name}"; then
        say "Run ${run_name} finished: ${RESULTS}/runs/${run_name}/results.json."
        exit 0
      fi
      if ! run_alive "${run_name}"; then
        ((launches < MAX_LAUNCHES)) || fail "run ${run_name} stopped ${launches} times on an" \
          "ACTIVE slice without finishing: read ~/${run_name}.log on worker 0 of ${TPU_NAME}."
        launches=$((launches + 1))
        say "Launching ${run_name} (launch ${launches} of at most ${MAX_LAUNCHES} on this slice)."
        if ! { set_up_hosts "${archive}" && stop_run "${run_name}" \
          && launch_run "${run_name}" "$@"; }; then
          say "Launch ${launches} failed; trying again at the next look."
        fi
      fi ;;
    SUSPENDED | FAILED)
      [[ "${SLICE_STATE}" == SUSPENDED ]] || ((was_active)) || fail "queued resource" \
        "${QUEUED_RESOURCE} FAILED before its slice came up: see gcloud compute tpus" \
        "queued-resources describe ${QUEUED_RESOURCE} --zone=${ZONE}"
      delete_slice --quiet  # the slice is gone: ask for a new one
      create_slice
      launches=0
      was_active=0 ;;
  esac
  pause
done
