#!/usr/bin/env bash
# Runs on every host of a TPU VM slice: set up a venv once, then run a mlgraph module with
# jax.distributed initialised (MLGRAPH_DISTRIBUTED=1). Called by tpu_pod.sh through
# `gcloud ... ssh --worker=all`, so every host runs the same command.
#   bash launch/tpu_run.sh mlgraph.main --config configs/salgl_coco.py --workdir gs://BUCKET/run
# `exec` makes Python this process, so a preemption's SIGTERM reaches it directly: the run saves
# a checkpoint at a step all hosts agree on and exits 0; the same command resumes it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MLGRAPH_VENV:-$HOME/mlgraph_venv}
if [ ! -d "$VENV" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[tpu]'
fi
exec env MLGRAPH_DISTRIBUTED=1 MLGRAPH_DATA="${MLGRAPH_DATA:-}" "$VENV/bin/python" -m "$@"
