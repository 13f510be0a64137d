#!/usr/bin/env bash
# Usage: BUCKET=my-bucket [TPU_NAME=..] [ZONE=..] [ACCELERATOR=v4-32] [SPOT=1] tpu_scripts/create.sh
#
# Creates a Cloud TPU VM slice, copies this checkout to every host, installs es_jax with
# jax[tpu] in a virtual environment there, and mounts gs://$BUCKET at $MOUNT on every host with
# gcsfuse (Orbax needs one directory that all hosts share; the run's --workdir lives under it).
set -euo pipefail
cd "$(dirname "$0")/.."
source tpu_scripts/env.sh

gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" ${PROJECT_FLAG} \
  --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}" ${SPOT:+--spot}

archive="$(mktemp -d)/es_jax.tar.gz"
git archive --format=tar.gz -o "${archive}" HEAD
gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:~/es_jax.tar.gz" --zone="${ZONE}" \
  ${PROJECT_FLAG} --worker=all

on_all_hosts "set -e
  mkdir -p ~/${REPO_DIR} && tar -xzf ~/es_jax.tar.gz -C ~/${REPO_DIR}
  cd ~/${REPO_DIR} && python3 -m venv .venv
  .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]' datasets
  if ! command -v gcsfuse >/dev/null; then
    export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
    echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" |
      sudo tee /etc/apt/sources.list.d/gcsfuse.list
    curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
    sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
  fi
  sudo mkdir -p ${MOUNT} && sudo chown \$USER ${MOUNT}
  mountpoint -q ${MOUNT} || gcsfuse --implicit-dirs --rename-dir-limit=100000 ${BUCKET} ${MOUNT}"
echo "Ready: ${TPU_NAME} (${ACCELERATOR}) with gs://${BUCKET} at ${MOUNT} on every host."
