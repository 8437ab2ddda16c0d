# shellcheck shell=bash
# Sourced by every tpu/*.sh script: flag parsing, the worker-side layout, and `run`, which executes a
# command or, with --dry-run, prints it as one pasteable line.
#
# A script declares, before sourcing this file:
#   USAGE          its help text
#   VALUE_FLAGS    its own --flag=VALUE names (on top of --name, --zone, --project); may be empty
#   BOOL_FLAGS     its own switches (each becomes a 0/1 variable); may be empty
#   REQUIRED       flags that must be given (or come from the environment)
#   PASS_THROUGH   optional: arguments starting with this prefix are collected in EXTRA_ARGS
# A flag --accelerator-type lands in the variable ACCELERATOR_TYPE.

# Where things live on each worker. Single-quoted on purpose: $HOME expands on the worker, not here.
# shellcheck disable=SC2016,SC2034  # (SC2034: used by the scripts that source this file)
{
  REMOTE_DIR='$HOME/sqlm_jax'
  REMOTE_VENV='$HOME/sqlm_venv'
  REMOTE_LOG='$HOME/sqlm_run.log'
  REMOTE_PID='$HOME/sqlm_run.pid'
}

# Export these once per shell instead of repeating the flags.
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
EXTRA_ARGS=()
PASS_THROUGH="${PASS_THROUGH:-}"

usage() { printf '%s\n' "$USAGE"; }

die() {
  printf 'error: %s\n\n' "$1" >&2
  usage >&2
  exit 2
}

var_of() {  # --accelerator-type -> ACCELERATOR_TYPE
  local name="${1#--}"
  name="${name//-/_}"
  printf '%s' "${name^^}"
}

contains() {  # contains WORD LIST...
  local word="$1" item
  shift
  for item in "$@"; do [[ "$item" == "$word" ]] && return 0; done
  return 1
}

parse_args() {
  local flag var
  local value_flags=(name zone project "${VALUE_FLAGS[@]}")
  # Only NAME, ZONE and PROJECT have defaults (from TPU_*); a stray $VERSION in the caller's
  # environment must not become a flag.
  for flag in "${VALUE_FLAGS[@]}"; do printf -v "$(var_of "$flag")" '%s' ''; done
  for flag in "${BOOL_FLAGS[@]}"; do printf -v "$(var_of "$flag")" '%s' 0; done

  while (($#)); do
    local arg="$1"
    shift
    case "$arg" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --) EXTRA_ARGS+=("$@"); break ;;
    esac
    if [[ -n "$PASS_THROUGH" && "$arg" == "$PASS_THROUGH"* ]]; then
      EXTRA_ARGS+=("$arg")
      continue
    fi
    flag="${arg%%=*}"
    flag="${flag#--}"
    if [[ "$arg" == --* ]] && contains "$flag" "${BOOL_FLAGS[@]}" && [[ "$arg" != *=* ]]; then
      printf -v "$(var_of "$flag")" '%s' 1
    elif [[ "$arg" == --* ]] && contains "$flag" "${value_flags[@]}"; then
      if [[ "$arg" == *=* ]]; then
        printf -v "$(var_of "$flag")" '%s' "${arg#*=}"
      else
        (($#)) || die "--$flag needs a value"
        printf -v "$(var_of "$flag")" '%s' "$1"
        shift
      fi
    else
      die "unknown argument: $arg"
    fi
  done

  for flag in "${REQUIRED[@]}"; do
    var="$(var_of "$flag")"
    [[ -n "${!var}" ]] || die "missing --$flag"
  done
  # Every gcloud call names the TPU's zone (and project, when given) the same way.
  LOCATION=(--zone="$ZONE")
  [[ -z "$PROJECT" ]] || LOCATION+=(--project="$PROJECT")
}

quote() {  # one word, single-quoted only when the shell needs it; --flag=VALUE quotes just VALUE
  local word="$1" prefix=""
  if [[ "$word" =~ ^(--[A-Za-z0-9._-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    word="${BASH_REMATCH[2]}"
  fi
  if [[ "$word" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s%s' "$prefix" "$word"
  else
    printf "%s'%s'" "$prefix" "${word//\'/\'\\\'\'}"
  fi
}

quote_all() {  # the words as one line a shell reads back as the same words
  local out=() word
  for word in "$@"; do out+=("$(quote "$word")"); done
  printf '%s' "${out[*]}"
}

run() {  # run a command, or with --dry-run print it instead
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

ssh_workers() {  # ssh_workers WORKER COMMAND: one command on one worker (0, 1, ...) or on all of them
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$1" --command="$2"
}
