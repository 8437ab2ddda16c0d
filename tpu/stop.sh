#!/usr/bin/env bash
# Stop the run on every worker the way a spot preemption does: SIGTERM, so it checkpoints and exits.
set -euo pipefail

USAGE="usage: tpu/stop.sh --name=NAME --zone=ZONE [--project=PROJECT] [--dry-run]

Sends SIGTERM to the run tpu/launch.sh started on each worker. The trainer agrees on a step across
workers, saves a checkpoint and exits; tpu/launch.sh with the same --workdir continues from it.
  --dry-run  print the gcloud command instead of running it
NAME, ZONE and PROJECT default to \$TPU_NAME, \$TPU_ZONE and \$TPU_PROJECT."
VALUE_FLAGS=()
BOOL_FLAGS=()
REQUIRED=(name zone)
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

CMD="if [ -f $REMOTE_PID ] && kill -TERM \"\$(cat $REMOTE_PID)\" 2>/dev/null;"
CMD+=" then echo \"\$(hostname): SIGTERM sent; the run checkpoints and exits\";"
CMD+=" else echo \"\$(hostname): no run going\"; fi"
ssh_workers all "$CMD"
