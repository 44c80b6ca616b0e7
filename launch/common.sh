# shellcheck shell=bash
# Helpers shared by the launch scripts: logging, shell quoting, dry-run aware command execution and
# checks for required tools. Source this file from a script that has run `set -euo pipefail`.

# Parse a launcher's command line: aq_parse_options "VALUE_OPTIONS" "FLAG_OPTIONS" ARG...
# VALUE_OPTIONS and FLAG_OPTIONS are space-separated option names. For each option the calling
# script's `set_option NAME [VALUE]` runs: a value option takes "--name VALUE" or "--name=VALUE",
# and a flag takes nothing. -h and --help call the script's `usage` and exit. Arguments of the form
# --config.* and everything after "--" go to TRAIN_ARGS, other words to POSITIONAL_ARGS.
aq_parse_options() {
  local value_options=" $1 "
  local flag_options=" $2 "
  shift 2
  POSITIONAL_ARGS=()
  while (($# > 0)); do
    case "$1" in
      -h | --help)
        usage
        exit 0
        ;;
      --config.*) TRAIN_ARGS+=("$1") ;;
      --)
        shift
        TRAIN_ARGS+=("$@")
        break
        ;;
      --*=*)
        if [[ $value_options != *" ${1%%=*} "* ]]; then
          aq_die "unknown option '${1%%=*}'; see --help"
        fi
        set_option "${1%%=*}" "${1#*=}"
        ;;
      -*)
        if [[ $flag_options == *" $1 "* ]]; then
          set_option "$1"
        elif [[ $value_options == *" $1 "* ]]; then
          if (($# < 2)); then
            aq_die "option $1 requires a value; see --help"
          fi
          set_option "$1" "$2"
          shift
        else
          aq_die "unknown option '$1'; see --help"
        fi
        ;;
      *) POSITIONAL_ARGS+=("$1") ;;
    esac
    shift
  done
}

# Print a message to stderr with the calling script's name.
aq_log() {
  printf '[%s] %s\n' "${AQ_SCRIPT_NAME:-launch}" "$*" >&2
}

# Print an error to stderr and exit with status 1.
aq_die() {
  printf '[%s] error: %s\n' "${AQ_SCRIPT_NAME:-launch}" "$*" >&2
  exit 1
}

# Return success when DRY_RUN is set to 1, true or yes.
aq_is_dry_run() {
  case "${DRY_RUN:-0}" in
    1 | true | TRUE | yes | YES) return 0 ;;
    *) return 1 ;;
  esac
}

# Print one argument quoted for a POSIX shell. Arguments made only of characters that no shell
# treats specially are printed as they are, and in an option of the form --name=value only the
# value is quoted, so dry-run output stays readable and copy-pastable.
aq_quote() {
  local arg=$1
  local safe_pattern='^[A-Za-z0-9_./:=@%+,-]+$'
  local option_pattern='^--[A-Za-z0-9_.-]+='
  if [[ $arg =~ $safe_pattern ]]; then
    printf '%s' "$arg"
  elif [[ $arg =~ $option_pattern ]]; then
    printf '%s' "${BASH_REMATCH[0]}"
    aq_quote "${arg#"${BASH_REMATCH[0]}"}"
  else
    printf "'%s'" "${arg//\'/\'\\\'\'}"
  fi
}

# Print all arguments quoted and joined by single spaces.
aq_join_quoted() {
  local first=1
  local arg
  for arg in "$@"; do
    if ((first)); then
      first=0
    else
      printf ' '
    fi
    aq_quote "$arg"
  done
}

# Print a command to stdout, quoted and prefixed by "+ ".
aq_print_command() {
  printf '+ %s\n' "$(aq_join_quoted "$@")"
}

# Print a command to stdout prefixed by "+ ", then run it unless this is a dry run.
aq_run() {
  aq_print_command "$@"
  if aq_is_dry_run; then
    return 0
  fi
  "$@"
}

# Exit with an error naming the tool and how to get it when a command is not on PATH. Dry runs
# skip the check because they only print commands.
aq_require_command() {
  local name=$1
  local hint=$2
  if aq_is_dry_run; then
    return 0
  fi
  if ! command -v "$name" >/dev/null 2>&1; then
    aq_die "'$name' not found on PATH; $hint (or pass --dry-run to only print the commands)"
  fi
}

# Exit with an error when a required setting is empty. Arguments: value, option name, variable name.
aq_require_value() {
  local value=$1
  local option=$2
  local variable=$3
  if [[ -z $value ]]; then
    aq_die "missing $option; pass it or set the environment variable $variable"
  fi
}

# Exit with an error unless the value is a positive integer. Arguments: value, option name.
aq_require_positive_int() {
  local value=$1
  local option=$2
  if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
    aq_die "invalid $option '$value'; expected a positive integer"
  fi
}

# Exit with an error unless the value has the form NAME=VALUE with a valid variable name.
aq_require_env_assignment() {
  local assignment=$1
  if ! [[ $assignment =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
    aq_die "invalid --env '$assignment'; expected NAME=VALUE"
  fi
}

# Print the first host name of a Slurm node list such as "gpu[07-08,12],cpu01" (prints gpu07).
# Every bracketed range in the first entry is replaced by its first number, keeping leading zeros.
aq_first_host_of_nodelist() {
  local nodelist=$1
  local first_entry=""
  local depth=0
  local i char
  for ((i = 0; i < ${#nodelist}; i++)); do
    char=${nodelist:i:1}
    if [[ $char == "[" ]]; then
      depth=$((depth + 1))
    elif [[ $char == "]" ]]; then
      depth=$((depth - 1))
    elif [[ $char == "," && $depth -eq 0 ]]; then
      break
    fi
    first_entry+=$char
  done

  local host=""
  local rest=$first_entry
  local range_text first_range
  while [[ $rest == *"["* ]]; do
    host+=${rest%%\[*}
    range_text=${rest#*\[}
    range_text=${range_text%%\]*}
    first_range=${range_text%%,*}
    host+=${first_range%%-*}
    rest=${rest#*\]}
  done
  host+=$rest

  if [[ -z $host ]]; then
    aq_die "invalid Slurm node list '$nodelist'; expected host names such as 'gpu[01-04]'"
  fi
  printf '%s\n' "$host"
}
