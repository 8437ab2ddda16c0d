#!/usr/bin/env bash
# Create a TPU VM or pod slice, on demand or spot, directly or through the queued-resources API.
set -euo pipefail

USAGE="usage: tpu/create.sh --name=NAME --zone=ZONE --accelerator-type=TYPE [--version=VERSION]
                      [--spot] [--queued] [--project=PROJECT] [--dry-run]

Creates the TPU NAME (a single host such as v5litepod-8, or a pod slice such as v5p-32).
  --accelerator-type  v4-8, v5litepod-8, v5p-32, v6e-8, ...
  --version           TPU software version; default by family: v4 tpu-ubuntu2204-base,
                      v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot              spot capacity: much cheaper, taken back at any time (relaunch resumes)
  --queued            request through queued resources: waits in line for capacity instead of
                      failing when none is free (the recommended way to get spot v5e/v5p/v6e);
                      delete it with tpu/delete.sh --queued
  --dry-run           print the gcloud command instead of running it
NAME, ZONE and PROJECT default to \$TPU_NAME, \$TPU_ZONE and \$TPU_PROJECT."
VALUE_FLAGS=(accelerator-type version)
BOOL_FLAGS=(spot queued)
REQUIRED=(name zone accelerator-type)
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

default_version() {  # the TPU software version JAX's TPU install guide uses for each family
  case "$1" in
    v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) die "no default --version for $1; pass one (gcloud compute tpus tpu-vm versions list)" ;;
  esac
}
VERSION="${VERSION:-$(default_version "$ACCELERATOR_TYPE")}"

TIER=()
((SPOT)) && TIER=(--spot)
if ((QUEUED)); then
  run gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}" --node-id="$NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION" "${TIER[@]}"
else
  run gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" "${TIER[@]}"
fi
