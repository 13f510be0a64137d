# Shared settings for the tpu_scripts; override any of them in the environment before running.
# Sourced by the other scripts, not run on its own.
: "${TPU_NAME:=es-jax-pretrain}"
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR:=v4-32}"              # a pod slice: 4 hosts of 4 chips
: "${RUNTIME:=tpu-ubuntu2204-base}"
: "${BUCKET:?set BUCKET to a GCS bucket name (without gs://) that holds the runs}"
: "${MOUNT:=/gcs/${BUCKET}}"           # where every host mounts the bucket (gcsfuse)
: "${REPO_DIR:=es_jax}"                # the checkout on each host, relative to the home directory
: "${PROJECT_FLAG:=${PROJECT:+--project=${PROJECT}}}"

# Runs one command on every host of the slice, in parallel.
on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" ${PROJECT_FLAG} \
    --worker=all --command="$1"
}
