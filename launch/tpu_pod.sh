#!/usr/bin/env bash
# Copy the repository to every worker of an existing TPU VM slice and start the same command on
# all of them. --workdir must be on GCS (gs://...) so every host sees it; the data dir must be a
# folder every host reads: a Cloud Storage FUSE mount (array_record reads local files only).
#   TPU=my-v5e-16 ZONE=us-west4-a bash launch/tpu_pod.sh mlgraph.main \
#       --config configs/salgl_coco.py --workdir gs://BUCKET/salgl_coco
# --dry_run (first argument) prints the copy and the ssh commands, and each worker's command
# and environment (tpu_run.sh --dry_run on every worker), and starts nothing. WORKERS=N prints
# N workers without asking gcloud (no TPU needed).
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry_run" ]; then
  dry_run=1
  shift
fi
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
cd "$(dirname "$0")/.."
remote="cd ~/mlgraph && MLGRAPH_DATA='${MLGRAPH_DATA:-}' bash launch/tpu_run.sh $*"
if [ "$dry_run" = 1 ]; then
  echo "copy: gcloud compute tpus tpu-vm scp --recurse --zone=$ZONE --worker=all . $TPU:~/mlgraph"
  echo "run:  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command \"$remote\""
  if [ -z "${WORKERS:-}" ]; then
    # Every worker prints its own line (its hostname and venv), as the real run would start.
    gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
      --command "cd ~/mlgraph && MLGRAPH_DATA='${MLGRAPH_DATA:-}' bash launch/tpu_run.sh --dry_run $*"
    exit 0
  fi
  for ((i = 0; i < WORKERS; i++)); do
    printf 'worker %s: cd ~/mlgraph && env MLGRAPH_DISTRIBUTED=1 MLGRAPH_DATA=%q ~/mlgraph_venv/bin/python -m' \
      "$i" "${MLGRAPH_DATA:-}"
    printf ' %q' "$@"
    printf '\n'
  done
  exit 0
fi
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU":~/mlgraph
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command "$remote"
