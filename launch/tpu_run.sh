#!/usr/bin/env bash
# Runs on every host of a TPU VM slice: set up a venv once, then run a mlgraph module with
# jax.distributed initialised (MLGRAPH_DISTRIBUTED=1). Called by tpu_pod.sh through
# `gcloud ... ssh --worker=all`, so every host runs the same command.
#   bash launch/tpu_run.sh mlgraph.main --config configs/salgl_coco.py --workdir gs://BUCKET/run
#   bash launch/tpu_run.sh --dry_run mlgraph.main ...   # print this host's command, run nothing
# The venv gets the gcs extra (gcsfs), which gs:// workdirs and weights need.
# `exec` makes Python this process, so a preemption's SIGTERM reaches it directly: the run saves
# a checkpoint at a step all hosts agree on and exits 0; the same command resumes it.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [ "${1:-}" = "--dry_run" ]; then
  dry_run=1
  shift
fi
VENV=${MLGRAPH_VENV:-$HOME/mlgraph_venv}
if [ "$dry_run" = 1 ]; then
  # The exact command of the exec below, with its environment, for this worker.
  printf 'worker %s (%s): cd %q && env MLGRAPH_DISTRIBUTED=1 MLGRAPH_DATA=%q %q -m' \
    "${TPU_WORKER_ID:-0}" "$(hostname)" "$PWD" "${MLGRAPH_DATA:-}" "$VENV/bin/python"
  printf ' %q' "$@"
  printf '\n'
  [ -d "$VENV" ] || echo "worker ${TPU_WORKER_ID:-0}: would first create $VENV with pip install -e '.[tpu,gcs]'"
  exit 0
fi
if [ ! -d "$VENV" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[tpu,gcs]'
fi
exec env MLGRAPH_DISTRIBUTED=1 MLGRAPH_DATA="${MLGRAPH_DATA:-}" "$VENV/bin/python" -m "$@"
