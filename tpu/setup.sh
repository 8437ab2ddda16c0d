#!/usr/bin/env bash
# Install the project with the TPU build of JAX on every worker of a TPU VM or pod slice.
set -euo pipefail
# The jax this project was tested with (setup.py's lower bound; tests/test_tpu_scripts.py checks both).
JAX_VERSION="0.10.2"

USAGE="usage: tpu/setup.sh --name=NAME --zone=ZONE [--repo=URL [--ref=REF]] [--python=3.11]
                     [--project=PROJECT] [--dry-run]

On every worker: puts the code in ~/sqlm_jax, makes a Python virtualenv ~/sqlm_venv (with uv: the
TPU images ship an older Python than the project needs), then pip installs the project (-e) and
the TPU build of the tested jax (\"jax[tpu]==$JAX_VERSION\"). Run it again after changing the code;
the virtualenv is kept.
  (default)  copy this working tree (tracked and untracked files git does not ignore) to the workers
  --repo     git clone URL on each worker instead (and fetch + check out REF on later runs)
  --ref      commit, tag or origin/BRANCH to check out with --repo (default origin/HEAD)
  --python   Python version for the virtualenv (default 3.11)
  --dry-run  print the commands instead of running them
NAME, ZONE and PROJECT default to \$TPU_NAME, \$TPU_ZONE and \$TPU_PROJECT."
VALUE_FLAGS=(repo ref python)
BOOL_FLAGS=()
REQUIRED=(name zone)
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
REF="${REF:-origin/HEAD}"
PYTHON="${PYTHON:-3.11}"

# uv installs into ~/.local/bin, which a non-interactive ssh shell does not have on its PATH.
INSTALL="export PATH=\$HOME/.local/bin:\$PATH"
INSTALL+=" && (command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)"
INSTALL+=" && ([ -x $REMOTE_VENV/bin/python ] || uv venv --seed --python $(quote "$PYTHON") $REMOTE_VENV)"
INSTALL+=" && $REMOTE_VENV/bin/pip install -q -e $REMOTE_DIR"
# The TPU build of the tested jax, never the newest (which may break flax). gcsfs: gs:// workdirs.
INSTALL+=" && $REMOTE_VENV/bin/pip install -q 'jax[tpu]==$JAX_VERSION' gcsfs"
# Local devices only: a global device count would wait for every other worker's runtime.
INSTALL+=" && $REMOTE_VENV/bin/python -c 'import jax; print(jax.local_devices())'"

if [[ -n "$REPO" ]]; then
  FETCH="([ -d $REMOTE_DIR/.git ] || git clone -q $(quote "$REPO") $REMOTE_DIR)"
  FETCH+=" && git -C $REMOTE_DIR fetch -q origin && git -C $REMOTE_DIR checkout -q $(quote "$REF")"
else
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  ARCHIVE="${TMPDIR:-/tmp}/sqlm_jax-$NAME.tgz"
  ((DRY_RUN)) || trap 'rm -f "$ARCHIVE"' EXIT
  run bash -c "$(quote_all git -C "$ROOT" ls-files -z --cached --others --exclude-standard) | $(
    quote_all tar -czf "$ARCHIVE" -C "$ROOT" --null --ignore-failed-read -T -)"
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:sqlm_jax.tgz" "${LOCATION[@]}" --worker=all
  FETCH="mkdir -p $REMOTE_DIR && tar -xzf \$HOME/sqlm_jax.tgz -C $REMOTE_DIR"
fi
ssh_workers all "$FETCH && $INSTALL"
