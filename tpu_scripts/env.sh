# shellcheck shell=bash
# Settings and helpers shared by the tpu_scripts; sourced by them, not run on its own.
# Override any setting in the environment. Every gcloud, ssh, git or file command goes through
# `run`: with DRY_RUN=1 (or a script's first argument --dry-run) it is printed on stdout, one
# shell-quoted line each, instead of run, and the script exits 0 without touching anything.
# Messages go to stderr, so a dry run's stdout is exactly the list of commands.

: "${TPU_NAME:=es-jax-pretrain}"              # the TPU VM slice (the queued resource's node id)
: "${QUEUED_RESOURCE:=${TPU_NAME}-request}"   # the queued-resource request that holds the slice
: "${ZONE:=us-central2-b}"
: "${ACCELERATOR:=v4-32}"                     # a pod slice: 4 hosts of 4 chips
: "${RUNTIME:=tpu-ubuntu2204-base}"
: "${SPOT:=1}"                                # 1: a spot slice (cheap, preemptible); 0: on demand
: "${REPO_DIR:=es_jax}"                       # the checkout on each host, under the home directory
: "${PYTHON_VERSION:=3.11}"                   # the hosts' Python, from uv (Ubuntu 22.04 has 3.10)
: "${CONFIG:=configs/bert_base_pretrain.py}"  # launch.sh's and run_resilient.sh's config
: "${ANALYSIS_PLATFORM:=cpu}"                 # JAX_PLATFORMS of analysis jobs on worker 0
: "${POLL_SECONDS:=300}"                      # run_resilient.sh: seconds between looks at the slice
: "${MAX_LAUNCHES:=3}"                        # run_resilient.sh: launches per slice, at most
: "${DRY_RUN:=0}"
# A dry run cannot ask for the slice's state: it pretends to see these, one per look (the last one
# repeats), so run_resilient.sh prints a first start, a preemption and the recreation.
: "${DRY_RUN_STATES:=NOT_FOUND ACTIVE SUSPENDED ACTIVE}"

exec 3>&1  # a dry run prints here (the script's stdout), also from inside $(...)

# Stops the script with one line on stderr saying what is wrong.
fail() {
  echo "error: $*" >&2
  exit 1
}

# A message for the user (stderr, so that a dry run's stdout holds only commands).
say() {
  echo "$*" >&2
}

[[ "${DRY_RUN}" =~ ^[01]$ ]] || fail "DRY_RUN=${DRY_RUN}: set it to 1 (print commands) or 0."
[[ "${SPOT}" =~ ^[01]$ ]] || fail "SPOT=${SPOT}: set it to 1 (a spot slice) or 0 (on demand)."
[[ "${ANALYSIS_PLATFORM}" =~ ^(cpu|tpu)$ ]] \
  || fail "ANALYSIS_PLATFORM=${ANALYSIS_PLATFORM}: set it to cpu or tpu."
[[ "${POLL_SECONDS}" =~ ^[0-9]+$ ]] || fail "POLL_SECONDS=${POLL_SECONDS}: give whole seconds."
[[ "${MAX_LAUNCHES}" =~ ^[1-9][0-9]*$ ]] || fail "MAX_LAUNCHES=${MAX_LAUNCHES}: give a count >= 1."
[[ "${DRY_RUN}" == 0 || -n "${DRY_RUN_STATES// /}" ]] \
  || fail "DRY_RUN_STATES is empty: give the states a dry run pretends to see, e.g. 'ACTIVE'."

GCLOUD_PLACE=(--zone="${ZONE}")  # where the slice lives, for every gcloud compute tpus command
if [[ -n "${PROJECT:-}" ]]; then
  GCLOUD_PLACE+=(--project="${PROJECT}")
fi
read -r -a DRY_STATES <<< "${DRY_RUN_STATES}"
DRY_STATES_SEEN=0  # looks at the slice that a dry run has answered

# ------------------------------------------------------------------------------ running commands

# Runs one command, or prints it with DRY_RUN=1 (then succeeds without output). A real run traces
# the command on stderr first, as `set -x` does.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    shell_line "$@" >&3
    return 0
  fi
  say "+ $(shell_line "$@")"
  "$@"
}

# The words as one line that a POSIX shell reads back into the same words (single quotes where
# a word holds anything but letters, digits and _@%+=:,./-).
shell_line() {
  local word line=""
  for word in "$@"; do
    if [[ ! "${word}" =~ ^[[:alnum:]_@%+=:,./-]+$ ]]; then
      word="'${word//\'/\'\\\'\'}'"
    fi
    line+="${line:+ }${word}"
  done
  echo "${line}"
}

# Waits POLL_SECONDS between two looks at the slice (not in a dry run).
pause() {
  if [[ "${DRY_RUN}" == 0 ]]; then
    sleep "${POLL_SECONDS}"
  fi
}

# Runs a shell command line on the slice's hosts: WORKER is all, or a worker index (0 is the host
# of JAX process 0).
on_hosts() {
  local worker="$1" command="$2"
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_PLACE[@]}" --worker="${worker}" \
    --command="${command}"
}

# ------------------------------------------------------------------------------ results in GCS

# Sets RESULTS, the gs:// folder that holds runs/ (pre-training workdirs, checkpoints included)
# and sweeps/ (analysis workdirs): gs://$BUCKET unless RESULTS is given. Every host reads and
# writes it directly (Orbax and es_jax through etils.epath); nothing is mounted.
require_results() {
  if [[ -z "${RESULTS:-}" ]]; then
    [[ -n "${BUCKET:-}" ]] || fail "set BUCKET to a GCS bucket name (or RESULTS to a gs:// folder)."
    [[ "${BUCKET}" != gs://* && "${BUCKET}" != */* ]] \
      || fail "BUCKET=${BUCKET}: give the bucket's name alone (RESULTS=gs://... for a folder)."
    RESULTS="gs://${BUCKET}"
  fi
  [[ "${RESULTS}" == gs://?* ]] || fail "RESULTS=${RESULTS}: give a gs:// URL."
  RESULTS="${RESULTS%/}"
}

# Checks that NAME can name a run's workdir and its log and pid files on the hosts.
check_name() {
  [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
    || fail "name '$1': use letters, digits, '.', '_' and '-' (it names a workdir and a log)."
}

# ------------------------------------------------------------------------------ the slice

# Asks for the slice as a queued resource (a spot slice unless SPOT=0). Returns at once: the
# request waits in the queue until the slice is ACTIVE (read_slice_state).
create_slice() {
  local spot=()
  if [[ "${SPOT}" == 1 ]]; then
    spot=(--spot)
  fi
  run gcloud compute tpus queued-resources create "${QUEUED_RESOURCE}" --node-id="${TPU_NAME}" \
    "${GCLOUD_PLACE[@]}" --accelerator-type="${ACCELERATOR}" --runtime-version="${RUNTIME}" \
    ${spot[@]+"${spot[@]}"}
}

# Deletes the queued resource and its slice (--force: running nodes too). Extra arguments go to
# gcloud (--quiet: no confirmation).
delete_slice() {
  run gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE}" "${GCLOUD_PLACE[@]}" \
    --force "$@"
}

# Sets SLICE_STATE to the queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE,
# SUSPENDING, SUSPENDED, FAILED, ...) or NOT_FOUND where there is none. A dry run takes the next
# of DRY_RUN_STATES instead.
read_slice_state() {
  local answer errors message status=0
  local describe=(gcloud compute tpus queued-resources describe "${QUEUED_RESOURCE}"
    "${GCLOUD_PLACE[@]}" --format='value(state.state)')
  if [[ "${DRY_RUN}" == 1 ]]; then
    run "${describe[@]}"
    local last=$((${#DRY_STATES[@]} - 1))
    SLICE_STATE="${DRY_STATES[$((DRY_STATES_SEEN < last ? DRY_STATES_SEEN : last))]}"
    DRY_STATES_SEEN=$((DRY_STATES_SEEN + 1))
    return 0
  fi
  errors="$(mktemp)"  # not traced: asked every POLL_SECONDS
  answer="$("${describe[@]}" 2>"${errors}")" || status=$?
  message="$(<"${errors}")"
  rm -f "${errors}"
  if ((status == 0)); then
    SLICE_STATE="${answer}"
  elif [[ "${message}" == *NOT_FOUND* ]]; then
    SLICE_STATE=NOT_FOUND
  else
    fail "cannot read queued resource ${QUEUED_RESOURCE} in ${ZONE}: ${message}"
  fi
}

# Whether a dry run has looked at the slice more often than DRY_RUN_STATES has states: its
# pretend run is then over.
dry_states_used_up() {
  ((DRY_STATES_SEEN > ${#DRY_STATES[@]}))
}

# Waits until the queued resource is ACTIVE (its slice is up); fails where it cannot become so.
wait_until_active() {
  while true; do
    read_slice_state
    case "${SLICE_STATE}" in
      ACTIVE) return 0 ;;
      CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING)
        say "queued resource ${QUEUED_RESOURCE}: ${SLICE_STATE}" ;;
      *) fail "queued resource ${QUEUED_RESOURCE} is ${SLICE_STATE}: see gcloud compute tpus" \
        "queued-resources describe ${QUEUED_RESOURCE} --zone=${ZONE};" \
        "tpu_scripts/teardown.sh deletes it." ;;
    esac
    pause
  done
}

# Copies ARCHIVE (this checkout, from git archive) to every host, unpacks it into ~/$REPO_DIR and
# installs es_jax with jax[tpu], GCS support for etils.epath and `datasets` (Hugging Face corpora)
# into ~/$REPO_DIR/.venv, a Python $PYTHON_VERSION environment made by uv (installed first where
# missing). Safe to repeat on hosts that have it.
set_up_hosts() {
  local archive="$1"
  run gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:~/es_jax.tar.gz" \
    "${GCLOUD_PLACE[@]}" --worker=all \
    && on_hosts all "mkdir -p ~/${REPO_DIR} && tar -xzf ~/es_jax.tar.gz -C ~/${REPO_DIR} \
&& cd ~/${REPO_DIR} && export PATH=\$HOME/.local/bin:\$PATH \
&& { command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; } \
&& { test -x .venv/bin/python || uv venv -q --python ${PYTHON_VERSION} .venv; } \
&& uv pip install -q --python .venv/bin/python -e '.[gcs]' 'jax[tpu]' datasets"
}

# Packs the committed checkout (HEAD) into ARCHIVE.
pack_checkout() {
  run git archive --format=tar.gz -o "$1" HEAD
}

# ------------------------------------------------------------------------------ pre-training runs

# The shell line that starts `es-jax pretrain` for run NAME in the background on one host:
# workdir $RESULTS/runs/NAME, JAX_PLATFORMS=tpu (so a broken TPU runtime stops the run instead
# of training on the CPU), output to ~/NAME.log, its pid in ~/NAME.pid. Further arguments are
# es-jax flags, passed on quoted.
pretrain_line() {
  local name="$1"
  shift
  local command
  command="$(shell_line .venv/bin/es-jax pretrain --config "${CONFIG}" \
    --workdir "${RESULTS}/runs/${name}" --config.distributed=True "$@")"
  echo "cd ~/${REPO_DIR} && { JAX_PLATFORMS=tpu nohup ${command} > ~/${name}.log 2>&1 \
< /dev/null & echo \$! > ~/${name}.pid; }"
}

# Starts run NAME (pretrain_line) on every host of the slice.
launch_run() {
  on_hosts all "$(pretrain_line "$@")"
}

# Whether run NAME's process is alive on worker 0 (JAX process 0, which stops too when another
# host's process dies). A dry run answers no.
run_alive() {
  on_hosts 0 "kill -0 \"\$(cat ~/$1.pid 2>/dev/null)\" 2>/dev/null" >/dev/null 2>&1 \
    && [[ "${DRY_RUN}" == 0 ]]
}

# Stops what is left of run NAME on every host (its pid file's process): SIGTERM, then SIGKILL
# after 60 s (a TPU runtime may catch SIGTERM as a preemption notice), and waits for it to end, so
# that a new launch finds the TPU chips free.
stop_run() {
  on_hosts all "pid=\$(cat ~/$1.pid 2>/dev/null) || exit 0; kill \$pid 2>/dev/null; \
for second in \$(seq 60); do kill -0 \$pid 2>/dev/null || exit 0; sleep 1; done; \
kill -9 \$pid 2>/dev/null; true"
}

# Whether run NAME has finished: process 0 writes results.json into its workdir at the end.
# A dry run answers yes once its pretend states are used up.
run_finished() {
  run gcloud storage ls "${RESULTS}/runs/$1/results.json" >/dev/null 2>&1 \
    && { [[ "${DRY_RUN}" == 0 ]] || dry_states_used_up; }
}

# ------------------------------------------------------------------------------ analysis jobs

# Runs `es-jax COMMAND --workdir WORKDIR [flags...]` in the foreground on worker 0 alone, with
# JAX_PLATFORMS=$ANALYSIS_PLATFORM, output also in ~/LOG_NAME.log there.
#
# cpu (the default) because the job runs on one host: on a slice of several hosts the TPU
# runtime of one host waits for all the others, and while a pre-training run holds the chips no
# other process may open them. The emergence analysis reads one checkpoint at a time and counts,
# which the host's CPUs do well. tpu is for a slice of one host (ACCELERATOR v4-8, v5litepod-8,
# v6e-8, ...) with nothing else running on it: a sweep that fine-tunes there uses its chips.
analysis_job() {
  local log_name="$1" command="$2" workdir="$3"
  shift 3
  if [[ "${ANALYSIS_PLATFORM}" == tpu ]] && ! one_host_slice; then
    fail "ANALYSIS_PLATFORM=tpu needs a slice of one host; ${ACCELERATOR} has several, whose" \
      "TPU runtime waits for every host: use ANALYSIS_PLATFORM=cpu."
  fi
  local job
  job="$(shell_line .venv/bin/es-jax "${command}" --workdir "${workdir}" "$@")"
  on_hosts 0 "set -o pipefail && cd ~/${REPO_DIR} && JAX_PLATFORMS=${ANALYSIS_PLATFORM} ${job} \
2>&1 | tee ~/${log_name}.log"
}

# Whether ACCELERATOR is a slice of one host: its size (TensorCores for v2-v4 and v5p, chips for
# v5e and v6e) is at most 8, as v2-8, v3-8, v4-8, v5p-8, v5litepod-8 and v6e-8 are.
one_host_slice() {
  local size="${ACCELERATOR##*-}"
  [[ "${size}" =~ ^[0-9]+$ ]] && ((size <= 8))
}
