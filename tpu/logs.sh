#!/usr/bin/env bash
# Follow the training log of one worker (worker 0, which does the logging, by default).
set -euo pipefail

USAGE="usage: tpu/logs.sh --name=NAME --zone=ZONE [--worker=N] [--tail=N] [--project=PROJECT] [--dry-run]

Follows the log that tpu/launch.sh writes on each worker; Ctrl-C stops following, not the run.
  --worker   which worker (default 0: the process that writes metrics and samples)
  --tail     lines of history to show first (default 100)
  --dry-run  print the gcloud command instead of running it
NAME, ZONE and PROJECT default to \$TPU_NAME, \$TPU_ZONE and \$TPU_PROJECT."
VALUE_FLAGS=(worker tail)
BOOL_FLAGS=()
REQUIRED=(name zone)
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

[[ "${WORKER:=0}" =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got $WORKER"
[[ "${TAIL:=100}" =~ ^[0-9]+$ ]] || die "--tail must be a number, got $TAIL"
ssh_workers "$WORKER" "tail -n $TAIL -F $REMOTE_LOG"
