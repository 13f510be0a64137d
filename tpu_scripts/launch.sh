#!/usr/bin/env bash
# Usage: BUCKET=my-bucket tpu_scripts/launch.sh RUN_NAME [extra es-jax pretrain flags...]
#   e.g. BUCKET=my-bucket tpu_scripts/launch.sh data_60 --config.data.fraction=0.6
#
# Starts the same `es-jax pretrain` command on every host of the slice (jax.distributed picks
# the hosts up from the TPU metadata), in the background under nohup, logging to
# ~/RUN_NAME.log on each host. The workdir is $MOUNT/runs/RUN_NAME, shared by all hosts.
# Re-running the same command after a preemption or a crash resumes from the last checkpoint.
# CONFIG defaults to configs/bert_base_pretrain.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh
if [[ $# -lt 1 ]]; then
  sed -n '2,10p' "$0"
  exit 2
fi
run="$1"; shift
config="${CONFIG:-configs/bert_base_pretrain.py}"
flags="$*"
on_all_hosts "cd ~/${REPO_DIR} && nohup .venv/bin/es-jax pretrain --config ${config} \
  --workdir ${MOUNT}/runs/${run} --config.distributed=True ${flags} > ~/${run}.log 2>&1 &"
echo "Started ${run} on every host of ${TPU_NAME}; follow it with:"
echo "  gcloud compute tpus tpu-vm ssh ${TPU_NAME} --zone=${ZONE} --worker=0 --command='tail -f ~/${run}.log'"
