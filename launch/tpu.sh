#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice, install aqhash_jax on every worker, train on all workers at
# once, follow the logs, copy back exported codes and metrics, and delete the VM.
set -euo pipefail

AQ_SCRIPT_NAME=tpu.sh
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND [OPTIONS] [--config.KEY=VALUE ...] [-- TRAIN_ARGS ...]

Run aqhash_jax on a Cloud TPU VM or pod slice with gcloud. Every command prints the gcloud
commands it runs; with --dry-run (or DRY_RUN=1) it only prints them and does not need gcloud.

Commands:
  create    create the TPU VM (gcloud compute tpus tpu-vm create)
  install   install JAX for TPU and aqhash_jax on every worker, from a git URL or a wheel/sdist
  train     start the training command on every worker in the background (nohup); with
            --distributed=auto each process calls jax.distributed.initialize(), which finds the
            other workers of the TPU VM by itself
  wait      wait until training has ended on every worker, printing the last log line every
            --poll-seconds; exits with the training exit status
  logs      follow the training log of one worker (--worker, default 0); Ctrl-C stops following,
            not training
  stop      stop the training processes started by 'train' on every worker
  fetch     copy WORKDIR/export/, WORKDIR/metrics.json and worker 0's training log to --dest
  delete    delete the TPU VM
  run       create, install, train, wait, fetch and delete in order; when a step fails after the
            VM exists, copy worker 0's log back and delete the VM (unless --keep-vm)

Options (environment variable in brackets):
  --project ID            Google Cloud project [PROJECT, CLOUDSDK_CORE_PROJECT]; required
  --zone ZONE             zone of the TPU VM, e.g. us-central2-b [ZONE, CLOUDSDK_COMPUTE_ZONE];
                          required
  --name NAME             TPU VM name [TPU_NAME]; default: aqhash-tpu
  --accelerator-type TYPE accelerator type, e.g. v4-8, v5litepod-8, v4-32 (a pod slice)
                          [ACCELERATOR_TYPE]; required by create and run
  --version VERSION       TPU software (runtime) version [TPU_RUNTIME_VERSION]; default by
                          accelerator family: v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5,
                          v5e/v5litepod: v2-alpha-tpuv5-lite, v2 to v4: tpu-ubuntu2204-base
  --spot                  create a Spot TPU VM (preemptible, cheaper) [TPU_SPOT=1]
  --bucket BUCKET         Cloud Storage bucket, with or without gs:// [BUCKET]; the default
                          workdir is gs://BUCKET/aqhash_jax/RUN_NAME
  --workdir DIR           training workdir [WORKDIR]; a gs:// path, an absolute path on the
                          workers, or a path relative to the workers' home directory; default:
                          on the bucket when one is set, else aqhash_workdirs/RUN_NAME
  --run-name NAME         name of the run, used in the default workdir and the log file names
                          [RUN_NAME]; default: the TPU VM name
  --source URL_OR_FILE    what 'install' installs [AQHASH_SOURCE]: a local .whl or .tar.gz file
                          (copied to every worker together with --configs-dir) or a git URL
                          (cloned on every worker)
  --git-ref REF           branch or tag to clone for a git source [AQHASH_GIT_REF]; default: the
                          repository's default branch
  --configs-dir DIR       local folder of config files copied with a wheel/sdist source;
                          default: the configs/ folder next to launch/
  --jax-spec SPEC         pip requirement for JAX on TPU [JAX_SPEC]; default: jax[tpu]
  --extra-packages REQS   further pip requirements, separated by spaces [EXTRA_PACKAGES];
                          default: etils[epath-gcs], which gives etils.epath (used for the
                          workdir and checkpoints) gcsfs for gs:// paths when TensorFlow is absent
  --python EXE            Python interpreter on the workers [REMOTE_PYTHON]; default: python3
  --remote-dir DIR        project folder on the workers, relative to the home directory
                          [REMOTE_DIR]; default: aqhash_jax
  --config FILE           config file, relative to --remote-dir [AQHASH_CONFIG]; required by
                          train and run, e.g. configs/dogs.py
  --env NAME=VALUE        environment variable for the training processes; repeatable
  --worker N              worker whose log 'logs' follows; default: 0
  --poll-seconds N        seconds between checks in 'wait'; default: 60
  --dest DIR              local folder for 'fetch' [DEST]; default: results/RUN_NAME
  --keep-vm               'run' leaves the VM in place at the end and after a failure
  --dry-run               print the commands without running them [DRY_RUN=1]
  -h, --help              print this help

Arguments of the form --config.KEY=VALUE and everything after '--' are passed to
'python -m aqhash_jax.train' unchanged.

Example:
  launch/tpu.sh run --project my-project --zone us-central2-b --accelerator-type v4-8 \
    --bucket my-bucket --source https://example.com/aqhash_jax.git --config configs/dogs.py
EOF
}

# Print the TPU software version recommended for an accelerator type, or nothing if unknown.
default_runtime_version() {
  local accelerator_type=$1
  case "$accelerator_type" in
    v6e-*) printf 'v2-alpha-tpuv6e\n' ;;
    v5p-*) printf 'v2-alpha-tpuv5\n' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite\n' ;;
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base\n' ;;
    *) ;;
  esac
}

# Print a worker path as shell text: gs:// and absolute paths quoted as they are, relative paths
# prefixed with the worker's $HOME so that they do not depend on the current directory.
remote_path_text() {
  local path=$1
  if [[ $path == gs://* || $path == /* ]]; then
    aq_quote "$path"
  else
    # shellcheck disable=SC2016  # $HOME must expand on the worker, not here.
    printf '"$HOME"/%s' "$(aq_quote "$path")"
  fi
}

parse_args() {
  COMMAND=""
  PROJECT=${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
  ZONE=${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
  TPU_NAME=${TPU_NAME:-aqhash-tpu}
  ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
  TPU_RUNTIME_VERSION=${TPU_RUNTIME_VERSION:-}
  TPU_SPOT=${TPU_SPOT:-0}
  BUCKET=${BUCKET:-}
  WORKDIR=${WORKDIR:-}
  RUN_NAME=${RUN_NAME:-}
  AQHASH_SOURCE=${AQHASH_SOURCE:-}
  AQHASH_GIT_REF=${AQHASH_GIT_REF:-}
  CONFIGS_DIR="$LAUNCH_DIR/../configs"
  JAX_SPEC=${JAX_SPEC:-jax[tpu]}
  EXTRA_PACKAGES=${EXTRA_PACKAGES-etils[epath-gcs]}
  REMOTE_PYTHON=${REMOTE_PYTHON:-python3}
  REMOTE_DIR=${REMOTE_DIR:-aqhash_jax}
  AQHASH_CONFIG=${AQHASH_CONFIG:-}
  LOG_WORKER=0
  POLL_SECONDS=60
  DEST=${DEST:-}
  KEEP_VM=0
  TRAIN_ENV=()
  TRAIN_ARGS=()

  aq_parse_options \
    "--project --zone --name --accelerator-type --version --bucket --workdir --run-name --source --git-ref --configs-dir --jax-spec --extra-packages --python --remote-dir --config --env --worker --poll-seconds --dest" \
    "--dry-run --spot --keep-vm" \
    "$@"
  if ((${#POSITIONAL_ARGS[@]} > 1)); then
    aq_die "unexpected argument '${POSITIONAL_ARGS[1]}' after command '${POSITIONAL_ARGS[0]}'; see --help"
  fi
  COMMAND=${POSITIONAL_ARGS[0]:-}
}

set_option() {
  local option=$1
  local value=${2:-}
  case "$option" in
    --dry-run) DRY_RUN=1 ;;
    --spot) TPU_SPOT=1 ;;
    --keep-vm) KEEP_VM=1 ;;
    --project) PROJECT=$value ;;
    --zone) ZONE=$value ;;
    --name) TPU_NAME=$value ;;
    --accelerator-type) ACCELERATOR_TYPE=$value ;;
    --version) TPU_RUNTIME_VERSION=$value ;;
    --bucket) BUCKET=$value ;;
    --workdir) WORKDIR=$value ;;
    --run-name) RUN_NAME=$value ;;
    --source) AQHASH_SOURCE=$value ;;
    --git-ref) AQHASH_GIT_REF=$value ;;
    --configs-dir) CONFIGS_DIR=$value ;;
    --jax-spec) JAX_SPEC=$value ;;
    --extra-packages) EXTRA_PACKAGES=$value ;;
    --python) REMOTE_PYTHON=$value ;;
    --remote-dir) REMOTE_DIR=$value ;;
    --config) AQHASH_CONFIG=$value ;;
    --env)
      aq_require_env_assignment "$value"
      TRAIN_ENV+=("$value")
      ;;
    --worker) LOG_WORKER=$value ;;
    --poll-seconds) POLL_SECONDS=$value ;;
    --dest) DEST=$value ;;
    *) aq_die "internal error: unhandled option $option" ;;
  esac
}

# Fill in defaults that depend on other settings and reject invalid combinations.
resolve_settings() {
  case "$COMMAND" in
    create | install | train | wait | logs | stop | fetch | delete | run) ;;
    "") aq_die "missing command; expected one of create, install, train, wait, logs, stop, fetch, delete, run" ;;
    *) aq_die "unknown command '$COMMAND'; expected one of create, install, train, wait, logs, stop, fetch, delete, run" ;;
  esac

  aq_require_value "$PROJECT" --project PROJECT
  aq_require_value "$ZONE" --zone ZONE
  if ! [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    aq_die "invalid --name '$TPU_NAME'; use lowercase letters, digits and hyphens, starting with a letter"
  fi

  if [[ $COMMAND == create || $COMMAND == run ]]; then
    aq_require_value "$ACCELERATOR_TYPE" --accelerator-type ACCELERATOR_TYPE
    if [[ -z $TPU_RUNTIME_VERSION ]]; then
      TPU_RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE")
      if [[ -z $TPU_RUNTIME_VERSION ]]; then
        aq_die "no default TPU software version for accelerator type '$ACCELERATOR_TYPE'; pass --version (list them with 'gcloud compute tpus tpu-vm versions list --zone=$ZONE')"
      fi
    fi
  fi

  if [[ $COMMAND == install || $COMMAND == run ]]; then
    aq_require_value "$AQHASH_SOURCE" --source AQHASH_SOURCE
  fi
  if [[ $COMMAND == train || $COMMAND == run ]]; then
    aq_require_value "$AQHASH_CONFIG" --config AQHASH_CONFIG
  fi
  aq_require_positive_int "$POLL_SECONDS" --poll-seconds
  if ! [[ $LOG_WORKER =~ ^[0-9]+$ ]]; then
    aq_die "invalid --worker '$LOG_WORKER'; expected a worker index such as 0"
  fi
  if [[ $REMOTE_DIR == /* || $REMOTE_DIR == *..* || -z $REMOTE_DIR ]]; then
    aq_die "invalid --remote-dir '$REMOTE_DIR'; expected a folder relative to the workers' home directory"
  fi

  RUN_NAME=${RUN_NAME:-$TPU_NAME}
  if ! [[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]]; then
    aq_die "invalid --run-name '$RUN_NAME'; use letters, digits, '.', '_' and '-'"
  fi
  BUCKET=${BUCKET#gs://}
  BUCKET=${BUCKET%/}
  if [[ -z $WORKDIR ]]; then
    if [[ -n $BUCKET ]]; then
      WORKDIR="gs://$BUCKET/aqhash_jax/$RUN_NAME"
    else
      WORKDIR="aqhash_workdirs/$RUN_NAME"
    fi
  fi
  WORKDIR=${WORKDIR%/}
  DEST=${DEST:-results/$RUN_NAME}

  LOG_DIR=aqhash_logs
  LOG_FILE="$LOG_DIR/$RUN_NAME.log"
  PID_FILE="$LOG_DIR/$RUN_NAME.pid"
  EXIT_CODE_FILE="$LOG_DIR/$RUN_NAME.exitcode"
}

print_plan() {
  aq_log "command: $COMMAND"
  aq_log "TPU VM: $TPU_NAME (project $PROJECT, zone $ZONE)"
  if [[ -n $ACCELERATOR_TYPE ]]; then
    aq_log "accelerator type: $ACCELERATOR_TYPE, TPU software version: ${TPU_RUNTIME_VERSION:-not needed}"
  fi
  aq_log "run: $RUN_NAME, workdir: $WORKDIR"
  if aq_is_dry_run; then
    aq_log "dry run: printing the commands without running them"
  fi
}

# Run gcloud compute tpus tpu-vm SUBCOMMAND with the VM name, zone and project.
gcloud_tpu() {
  local subcommand=$1
  shift
  aq_run gcloud compute tpus tpu-vm "$subcommand" "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" "$@"
}

# Copy files with gcloud compute tpus tpu-vm scp. Arguments: the scp options, sources and
# destination, where remote paths have the form TPU_NAME:PATH.
gcloud_scp() {
  aq_run gcloud compute tpus tpu-vm scp "$@" --zone="$ZONE" --project="$PROJECT"
}

# Run a shell command on the given workers ("all" or an index).
ssh_workers() {
  local workers=$1
  local remote_command=$2
  gcloud_tpu ssh --worker="$workers" --command="$remote_command"
}

create_vm() {
  aq_log "creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE, $TPU_RUNTIME_VERSION)"
  local extra=()
  if [[ $TPU_SPOT == 1 ]]; then
    extra+=(--spot)
  fi
  gcloud_tpu create --accelerator-type="$ACCELERATOR_TYPE" --version="$TPU_RUNTIME_VERSION" "${extra[@]}"
}

install_project() {
  # NOTE: packages go into the workers' system Python with pip, as on the Ubuntu 22.04 TPU images.
  # An image whose Python rejects pip installs (PEP 668) needs --python pointing to a venv.
  local remote_dir_q pip_install extra_packages
  remote_dir_q=$(aq_quote "$REMOTE_DIR")
  read -r -a extra_packages <<<"$EXTRA_PACKAGES"
  pip_install="$(aq_quote "$REMOTE_PYTHON") -m pip install --upgrade $(aq_quote "$JAX_SPEC")"
  if ((${#extra_packages[@]} > 0)); then
    pip_install+=" $(aq_join_quoted "${extra_packages[@]}")"
  fi

  if [[ $AQHASH_SOURCE == *.whl || $AQHASH_SOURCE == *.tar.gz ]]; then
    if [[ ! -f $AQHASH_SOURCE ]]; then
      aq_die "package file '$AQHASH_SOURCE' not found; build one with 'python -m build' or pass a git URL"
    fi
    if [[ ! -d $CONFIGS_DIR ]]; then
      aq_die "configs folder '$CONFIGS_DIR' not found; pass --configs-dir"
    fi
    local package_name configs_dir
    package_name=$(basename "$AQHASH_SOURCE")
    configs_dir=$(cd "$CONFIGS_DIR" && pwd)
    aq_log "installing $package_name and the configs from $configs_dir on every worker"
    ssh_workers all "rm -rf $remote_dir_q && mkdir -p $remote_dir_q"
    gcloud_scp --worker=all --recurse "$AQHASH_SOURCE" "$configs_dir" "$TPU_NAME:$REMOTE_DIR/"
    ssh_workers all "$pip_install $remote_dir_q/$(aq_quote "$package_name")"
  else
    local clone_q branch_args=""
    clone_q=$(aq_quote "$REMOTE_DIR.new")
    if [[ -n $AQHASH_GIT_REF ]]; then
      branch_args="--branch $(aq_quote "$AQHASH_GIT_REF") "
    fi
    aq_log "cloning $AQHASH_SOURCE${AQHASH_GIT_REF:+ at $AQHASH_GIT_REF} and installing it on every worker"
    ssh_workers all "set -e; rm -rf $clone_q; git clone --depth 1 ${branch_args}$(aq_quote "$AQHASH_SOURCE") $clone_q; rm -rf $remote_dir_q; mv $clone_q $remote_dir_q; $pip_install ./$remote_dir_q"
  fi
}

# Print the shell text of the training command, run inside --remote-dir on each worker.
train_command_text() {
  local text=""
  if ((${#TRAIN_ENV[@]} > 0)); then
    text+="env $(aq_join_quoted "${TRAIN_ENV[@]}") "
  fi
  text+="$(aq_quote "$REMOTE_PYTHON") -m aqhash_jax.train --config=$(aq_quote "$AQHASH_CONFIG")"
  text+=" --workdir=$(remote_path_text "$WORKDIR")"
  # On a TPU VM, jax.distributed.initialize() finds the coordinator and the process count and id
  # from the VM's metadata; --distributed=auto makes the job call it without arguments.
  text+=" --distributed=auto"
  if ((${#TRAIN_ARGS[@]} > 0)); then
    text+=" $(aq_join_quoted "${TRAIN_ARGS[@]}")"
  fi
  printf '%s' "$text"
}

start_training() {
  local train_text job_text
  train_text=$(train_command_text)
  aq_log "training command on every worker: $train_text"

  # The job runs in its own session (setsid) so that 'stop' can signal the whole process group,
  # and records its exit status for 'wait'.
  job_text="cd $(aq_quote "$REMOTE_DIR") && $train_text; status=\$?; echo \"\$status\" > \"\$HOME\"/$EXIT_CODE_FILE; exit \"\$status\""
  ssh_workers all "set -e; mkdir -p $LOG_DIR; if [ -f $PID_FILE ] && kill -0 \"\$(cat $PID_FILE)\" 2>/dev/null; then echo \"\$(hostname): run $RUN_NAME is still running; stop it with 'tpu.sh stop'\" >&2; exit 1; fi; rm -f $EXIT_CODE_FILE; nohup setsid bash -c $(aq_quote "$job_text") > $LOG_FILE 2>&1 < /dev/null & echo \$! > $PID_FILE; echo \"\$(hostname): started run $RUN_NAME, log ~/$LOG_FILE\""
}

wait_for_training() {
  aq_log "waiting for run $RUN_NAME to end on every worker"
  ssh_workers all "if [ ! -f $PID_FILE ]; then echo \"\$(hostname): run $RUN_NAME was not started\" >&2; exit 1; fi; while [ ! -f $EXIT_CODE_FILE ]; do if ! kill -0 \"\$(cat $PID_FILE)\" 2>/dev/null; then sleep 5; if [ ! -f $EXIT_CODE_FILE ]; then echo \"\$(hostname): training process ended without an exit status; see ~/$LOG_FILE\" >&2; exit 1; fi; break; fi; sleep $POLL_SECONDS; echo \"\$(hostname): \$(tail -n 1 $LOG_FILE)\"; done; status=\$(cat $EXIT_CODE_FILE); echo \"\$(hostname): training exited with status \$status\"; exit \"\$status\""
}

follow_logs() {
  aq_log "following ~/$LOG_FILE on worker $LOG_WORKER (Ctrl-C stops following, training goes on)"
  ssh_workers "$LOG_WORKER" "tail -n +1 -F $LOG_FILE"
}

stop_training() {
  aq_log "stopping run $RUN_NAME on every worker"
  ssh_workers all "if [ -f $PID_FILE ] && kill -TERM -- -\"\$(cat $PID_FILE)\" 2>/dev/null; then echo \"\$(hostname): stopped run $RUN_NAME\"; else echo \"\$(hostname): run $RUN_NAME is not running\"; fi"
}

# Copy worker 0's training log to DEST.
fetch_log() {
  gcloud_scp --worker=0 "$TPU_NAME:$LOG_FILE" "$DEST/train_worker0.log"
}

fetch_results() {
  aq_log "copying $WORKDIR/export/ and $WORKDIR/metrics.json to $DEST/"
  aq_run mkdir -p "$DEST"
  if [[ $WORKDIR == gs://* ]]; then
    aq_run gcloud storage cp --recursive "$WORKDIR/export" "$DEST/"
    aq_run gcloud storage cp "$WORKDIR/metrics.json" "$DEST/metrics.json"
  else
    # Process 0 writes the exported codes and metrics, and it runs on worker 0.
    gcloud_scp --worker=0 --recurse "$TPU_NAME:$WORKDIR/export" "$DEST/"
    gcloud_scp --worker=0 "$TPU_NAME:$WORKDIR/metrics.json" "$DEST/metrics.json"
  fi
  fetch_log
}

delete_vm() {
  aq_log "deleting TPU VM $TPU_NAME"
  gcloud_tpu delete --quiet
}

# On a failed 'run' after the VM was created: keep the log, then delete the VM unless --keep-vm.
cleanup_failed_run() {
  local status=$?
  if ((status == 0)) || [[ ${VM_CREATED:-0} != 1 ]]; then
    return
  fi
  aq_log "a step failed with status $status"
  aq_run mkdir -p "$DEST" || true
  fetch_log || aq_log "could not copy worker 0's log"
  if [[ $KEEP_VM == 1 ]]; then
    aq_log "keeping TPU VM $TPU_NAME (--keep-vm); delete it with 'launch/tpu.sh delete' to stop charges"
  else
    delete_vm || aq_log "deleting TPU VM $TPU_NAME failed; delete it by hand to stop charges"
  fi
  exit "$status"
}

run_all() {
  VM_CREATED=0
  trap cleanup_failed_run EXIT
  create_vm
  VM_CREATED=1
  install_project
  start_training
  wait_for_training
  fetch_results
  VM_CREATED=0
  trap - EXIT
  if [[ $KEEP_VM == 1 ]]; then
    aq_log "keeping TPU VM $TPU_NAME (--keep-vm); delete it with 'launch/tpu.sh delete' to stop charges"
  else
    delete_vm
  fi
  aq_log "results are in $DEST/"
}

main() {
  parse_args "$@"
  resolve_settings
  print_plan
  aq_require_command gcloud "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"

  case "$COMMAND" in
    create) create_vm ;;
    install) install_project ;;
    train) start_training ;;
    wait) wait_for_training ;;
    logs) follow_logs ;;
    stop) stop_training ;;
    fetch) fetch_results ;;
    delete) delete_vm ;;
    run) run_all ;;
  esac
}

main "$@"
