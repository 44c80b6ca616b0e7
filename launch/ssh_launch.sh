#!/usr/bin/env bash
# Start one aqhash_jax training process per host over ssh (or as local processes with --local),
# joined by jax.distributed with the first host as coordinator, and wait for all of them.
set -euo pipefail

AQ_SCRIPT_NAME=ssh_launch.sh
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/ssh_launch.sh (--hosts "HOST ..." | --hostfile FILE) --config FILE [OPTIONS]
         [--config.KEY=VALUE ...] [-- TRAIN_ARGS ...]

Start 'python -m aqhash_jax.train' once per host, in the order given: process i runs on host i
with --process_id=i, --num_processes=N and --coordinator_address=FIRST_HOST:PORT. A host may
appear several times (one process per entry). Each process runs in --remote-dir, which must hold
the repository on every host. Output of each process goes to LOG_DIR/process_<i>.log, and the log
of process 0 is also printed here. When one process fails, the others are stopped and the
launcher exits with status 1.

Options (environment variable in brackets):
  --hosts "H1 H2 ..."   hosts, separated by spaces or commas; an entry may be USER@HOST [HOSTS]
  --hostfile FILE       file with one host per line; '#' starts a comment [HOSTFILE]
  --local               run every process on this machine as a background process instead of
                        over ssh; all hosts must be localhost or 127.0.0.1, and the coordinator
                        is 127.0.0.1
  --config FILE         config file, relative to --remote-dir [AQHASH_CONFIG]; required
  --workdir DIR         training workdir, local or gs:// [WORKDIR]; required; with several hosts
                        a local path must be on a shared file system
  --coordinator HOST    coordinator host or IP address that every host can reach
                        [COORDINATOR_HOST]; default: the first host without USER@
  --port N              coordinator port [COORDINATOR_PORT]; default: 12355
  --remote-dir DIR      folder to run in on every host [REMOTE_DIR]; default: the current folder
  --python EXE          Python interpreter on the hosts [PYTHON]; default: python3
  --env NAME=VALUE      environment variable for the training processes; repeatable
  --log-dir DIR         local folder for the process logs [LOG_DIR];
                        default: launch_logs/<date>-<time>
  --ssh-option OPTION   extra option for ssh, e.g. '-p 2222'; repeatable
  --dry-run             print the commands without running them [DRY_RUN=1]
  -h, --help            print this help

Arguments of the form --config.KEY=VALUE and everything after '--' are passed to the training
command unchanged.

Example (two hosts):
  launch/ssh_launch.sh --hosts "gpu01 gpu02" --config configs/dogs.py --workdir gs://bucket/run1
Example (two processes on this machine, for testing):
  launch/ssh_launch.sh --local --hosts "localhost localhost" --config configs/tiny.py \
    --workdir /tmp/aqhash_two_processes --env JAX_PLATFORMS=cpu
EOF
}

parse_args() {
  HOST_TEXT=${HOSTS:-}
  HOSTFILE=${HOSTFILE:-}
  LOCAL_MODE=0
  AQHASH_CONFIG=${AQHASH_CONFIG:-}
  WORKDIR=${WORKDIR:-}
  COORDINATOR_HOST=${COORDINATOR_HOST:-}
  COORDINATOR_PORT=${COORDINATOR_PORT:-12355}
  REMOTE_DIR=${REMOTE_DIR:-$PWD}
  PYTHON=${PYTHON:-python3}
  LOG_DIR=${LOG_DIR:-}
  TRAIN_ENV=()
  TRAIN_ARGS=()
  SSH_OPTIONS=()

  aq_parse_options \
    "--hosts --hostfile --config --workdir --coordinator --port --remote-dir --python --env --log-dir --ssh-option" \
    "--dry-run --local" \
    "$@"
  if ((${#POSITIONAL_ARGS[@]} > 0)); then
    aq_die "unknown argument '${POSITIONAL_ARGS[0]}'; see --help"
  fi
}

set_option() {
  local option=$1
  local value=${2:-}
  case "$option" in
    --dry-run) DRY_RUN=1 ;;
    --local) LOCAL_MODE=1 ;;
    --hosts) HOST_TEXT=$value ;;
    --hostfile) HOSTFILE=$value ;;
    --config) AQHASH_CONFIG=$value ;;
    --workdir) WORKDIR=$value ;;
    --coordinator) COORDINATOR_HOST=$value ;;
    --port) COORDINATOR_PORT=$value ;;
    --remote-dir) REMOTE_DIR=$value ;;
    --python) PYTHON=$value ;;
    --env)
      aq_require_env_assignment "$value"
      TRAIN_ENV+=("$value")
      ;;
    --log-dir) LOG_DIR=$value ;;
    --ssh-option)
      local words
      read -r -a words <<<"$value"
      SSH_OPTIONS+=("${words[@]}")
      ;;
    *) aq_die "internal error: unhandled option $option" ;;
  esac
}

resolve_settings() {
  HOST_LIST=()
  if [[ -n $HOSTFILE ]]; then
    if [[ ! -f $HOSTFILE ]]; then
      aq_die "host file '$HOSTFILE' not found"
    fi
    local line
    while IFS= read -r line || [[ -n $line ]]; do
      line=${line%%#*}
      local words
      read -r -a words <<<"$line"
      HOST_LIST+=("${words[@]}")
    done <"$HOSTFILE"
  fi
  if [[ -n $HOST_TEXT ]]; then
    local words
    read -r -a words <<<"${HOST_TEXT//,/ }"
    HOST_LIST+=("${words[@]}")
  fi
  if ((${#HOST_LIST[@]} == 0)); then
    aq_die "missing hosts; pass --hosts \"HOST ...\" or --hostfile FILE (or set HOSTS)"
  fi
  NUM_PROCESSES=${#HOST_LIST[@]}

  local host
  if [[ $LOCAL_MODE == 1 ]]; then
    for host in "${HOST_LIST[@]}"; do
      if [[ $host != localhost && $host != 127.0.0.1 ]]; then
        aq_die "--local runs every process on this machine, but host '$host' is not localhost or 127.0.0.1"
      fi
    done
    COORDINATOR_HOST=${COORDINATOR_HOST:-127.0.0.1}
  else
    COORDINATOR_HOST=${COORDINATOR_HOST:-${HOST_LIST[0]#*@}}
  fi

  aq_require_value "$AQHASH_CONFIG" --config AQHASH_CONFIG
  aq_require_value "$WORKDIR" --workdir WORKDIR
  aq_require_positive_int "$COORDINATOR_PORT" --port
  if ((COORDINATOR_PORT > 65535)); then
    aq_die "invalid --port '$COORDINATOR_PORT'; expected at most 65535"
  fi
  COORDINATOR_ADDRESS="$COORDINATOR_HOST:$COORDINATOR_PORT"
  LOG_DIR=${LOG_DIR:-launch_logs/$(date +%Y%m%d-%H%M%S)}
}

# Print the shell text that process PROCESS_ID runs on its host.
process_command_text() {
  local process_id=$1
  local text
  text="cd $(aq_quote "$REMOTE_DIR") && exec env JAX_COORDINATOR_ADDRESS=$(aq_quote "$COORDINATOR_ADDRESS")"
  if ((${#TRAIN_ENV[@]} > 0)); then
    text+=" $(aq_join_quoted "${TRAIN_ENV[@]}")"
  fi
  text+=" $(aq_quote "$PYTHON") -m aqhash_jax.train --config=$(aq_quote "$AQHASH_CONFIG")"
  text+=" --workdir=$(aq_quote "$WORKDIR")"
  text+=" --coordinator_address=$(aq_quote "$COORDINATOR_ADDRESS")"
  text+=" --num_processes=$NUM_PROCESSES --process_id=$process_id"
  if ((${#TRAIN_ARGS[@]} > 0)); then
    text+=" $(aq_join_quoted "${TRAIN_ARGS[@]}")"
  fi
  printf '%s' "$text"
}

# Stop every started process that is still running. Used on failure and on Ctrl-C.
stop_processes() {
  local pid
  for pid in "${PROCESS_PIDS[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    if [[ $LOCAL_MODE == 1 ]]; then
      # A local process leads its own process group (setsid), so signal the whole group.
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    else
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
}

stop_log_follower() {
  if [[ -n ${TAIL_PID:-} ]]; then
    kill "$TAIL_PID" 2>/dev/null || true
  fi
}

on_interrupt() {
  aq_log "interrupted; stopping ${#PROCESS_PIDS[@]} process(es)"
  stop_processes
  stop_log_follower
  exit 130
}

# Print the command that starts process PROCESS_ID, then start it in the background unless this is
# a dry run, recording its pid in PROCESS_PIDS.
start_process() {
  local process_id=$1
  local host=${HOST_LIST[process_id]}
  local log_file="$LOG_DIR/process_$process_id.log"
  local command_text
  command_text=$(process_command_text "$process_id")
  aq_log "process $process_id on $host, log $log_file"

  local -a command
  if [[ $LOCAL_MODE == 1 ]]; then
    # setsid gives each process its own session, so a Ctrl-C here reaches it only through
    # stop_processes.
    command=(setsid bash -c "$command_text")
  else
    # -tt gives the remote command a terminal, so that it is hung up when ssh is stopped.
    command=(ssh -tt -o BatchMode=yes "${SSH_OPTIONS[@]}" "$host" "bash -c $(aq_quote "$command_text")")
  fi
  aq_print_command "${command[@]}"
  if aq_is_dry_run; then
    return 0
  fi
  "${command[@]}" >"$log_file" 2>&1 </dev/null &
  PROCESS_PIDS+=("$!")
}

# Wait for every process. On the first failure stop the others, print the failed logs and exit 1.
wait_for_processes() {
  local remaining=$NUM_PROCESSES
  local -a finished=()
  local process_id pid status
  while ((remaining > 0)); do
    for ((process_id = 0; process_id < NUM_PROCESSES; process_id++)); do
      if [[ ${finished[process_id]:-0} == 1 ]]; then
        continue
      fi
      pid=${PROCESS_PIDS[process_id]}
      if kill -0 "$pid" 2>/dev/null; then
        continue
      fi
      status=0
      wait "$pid" || status=$?
      finished[process_id]=1
      remaining=$((remaining - 1))
      if ((status != 0)); then
        aq_log "process $process_id on ${HOST_LIST[process_id]} failed with status $status; stopping the others"
        stop_processes
        stop_log_follower
        aq_log "last lines of $LOG_DIR/process_$process_id.log:"
        tail -n 40 "$LOG_DIR/process_$process_id.log" >&2 || true
        exit 1
      fi
      aq_log "process $process_id on ${HOST_LIST[process_id]} finished"
    done
    sleep 1
  done
}

main() {
  parse_args "$@"
  resolve_settings

  if [[ $LOCAL_MODE == 1 ]]; then
    aq_log "starting $NUM_PROCESSES local process(es) in $REMOTE_DIR"
  else
    aq_log "starting $NUM_PROCESSES process(es) over ssh on: ${HOST_LIST[*]}"
  fi
  aq_log "coordinator: $COORDINATOR_ADDRESS, workdir: $WORKDIR, logs: $LOG_DIR"
  if aq_is_dry_run; then
    aq_log "dry run: printing the commands without running them"
  fi
  if [[ $LOCAL_MODE == 1 ]]; then
    aq_require_command setsid "install util-linux"
  else
    aq_require_command ssh "install an OpenSSH client"
  fi

  PROCESS_PIDS=()
  TAIL_PID=""
  trap on_interrupt INT TERM
  trap stop_processes EXIT
  aq_run mkdir -p "$LOG_DIR"
  local process_id
  for ((process_id = 0; process_id < NUM_PROCESSES; process_id++)); do
    start_process "$process_id"
  done
  if aq_is_dry_run; then
    return 0
  fi

  # Show process 0's output here while it runs; tail stops by itself when the process ends.
  tail -n +1 -F --pid="${PROCESS_PIDS[0]}" "$LOG_DIR/process_0.log" 2>/dev/null &
  TAIL_PID=$!
  wait_for_processes
  wait "$TAIL_PID" 2>/dev/null || true
  aq_log "all $NUM_PROCESSES process(es) finished"
}

main "$@"
