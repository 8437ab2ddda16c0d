#!/usr/bin/env bash
# Start one training run on every worker at once, in the background, logging to a file.
set -euo pipefail

USAGE="usage: tpu/launch.sh --name=NAME --zone=ZONE --config=configs/FILE.py --workdir=DIR
                      [--config.KEY=VALUE ...] [--project=PROJECT] [--dry-run]

Runs \`python -m sqlm_jax.main --config=FILE --config.workdir=DIR --config.resume=True ...\` on all
workers together (JAX joins them into one mesh), detached from the ssh session, appending to
~/sqlm_run.log on each worker (follow it with tpu/logs.sh). resume=True is always passed: a run
continues from the latest checkpoint in DIR, so relaunching after a spot preemption (or tpu/stop.sh)
just continues. Refuses to start while a run launched here is still going.
  --workdir       checkpoints, logs and exports; use gs://BUCKET/PATH on pods (every worker must see
                  it) and on spot TPUs (the VM's disk is lost with it)
  --config.K=V    any config override, passed through (after resume=True, so it can override it)
  --dry-run       print the gcloud command instead of running it
NAME, ZONE and PROJECT default to \$TPU_NAME, \$TPU_ZONE and \$TPU_PROJECT."
VALUE_FLAGS=(config workdir)
BOOL_FLAGS=()
REQUIRED=(name zone config workdir)
PASS_THROUGH="--config."
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

TRAIN="$REMOTE_VENV/bin/python -m sqlm_jax.main $(quote_all --config="$CONFIG" \
  --config.workdir="$WORKDIR" --config.resume=True "${EXTRA_ARGS[@]}")"
# set -e: a worker without the code (setup not run) fails loudly instead of logging nothing.
CMD="set -e; cd $REMOTE_DIR"
CMD+="; if [ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null; then"
CMD+=" echo \"\$(hostname): a run is still going (pid \$(cat $REMOTE_PID)); tpu/stop.sh first\" >&2; exit 1; fi"
CMD+="; { echo \"=== \$(date -u +%FT%TZ) launch\"; printf '%s\\n' $(quote "$TRAIN"); } >> $REMOTE_LOG"
# setsid + nohup + all three streams redirected: the run outlives the ssh session that started it.
CMD+="; setsid nohup $TRAIN >> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID"
ssh_workers all "$CMD"
