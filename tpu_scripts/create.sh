#!/usr/bin/env bash
# Usage: [PROJECT=..] [TPU_NAME=..] [ZONE=..] [ACCELERATOR=v4-32] [SPOT=0] \
#          tpu_scripts/create.sh [--dry-run]
#
# Asks for a Cloud TPU VM slice as a queued resource (spot unless SPOT=0), waits until it is
# ACTIVE, copies this checkout's HEAD to every host and installs es_jax with jax[tpu] in a
# virtual environment there. Runs read and write gs:// directly: nothing is mounted. Safe to run
# again: an existing request is not asked for twice, and the hosts are set up again.
# Settings: tpu_scripts/env.sh. --dry-run (or DRY_RUN=1) prints the commands instead.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh

read_slice_state
if [[ "${SLICE_STATE}" == NOT_FOUND ]]; then
  create_slice
else
  say "queued resource ${QUEUED_RESOURCE} exists (${SLICE_STATE}): not asking again."
fi
wait_until_active
archive="${TMPDIR:-/tmp}/${TPU_NAME}-es_jax.tar.gz"
pack_checkout "${archive}"
set_up_hosts "${archive}"
say "Ready: ${TPU_NAME} (${ACCELERATOR}), its checkout in ~/${REPO_DIR} on every host."
