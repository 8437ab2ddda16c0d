#!/usr/bin/env bash
# Delete a TPU VM or pod slice (and its queued-resource request, with --queued).
set -euo pipefail

USAGE="usage: tpu/delete.sh --name=NAME --zone=ZONE [--queued] [--yes] [--project=PROJECT] [--dry-run]

Deletes the TPU NAME. Its local disks go with it: checkpoints survive only in a gs:// workdir.
  --queued   it was made with tpu/create.sh --queued: delete the request and its TPU together
  --yes      do not ask for confirmation
  --dry-run  print the gcloud command instead of running it
NAME, ZONE and PROJECT default to \$TPU_NAME, \$TPU_ZONE and \$TPU_PROJECT."
VALUE_FLAGS=()
BOOL_FLAGS=(queued yes)
REQUIRED=(name zone)
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

CONFIRM=()
((YES)) && CONFIRM=(--quiet)
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force "${CONFIRM[@]}"
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" "${CONFIRM[@]}"
fi
