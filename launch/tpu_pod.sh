#!/usr/bin/env bash
# Copy the repository to every worker of an existing TPU VM slice and start the same command on
# all of them. Data (--config.data.data_dir) and --workdir must be on GCS so every host sees them.
#   TPU=my-v5e-16 ZONE=us-west4-a bash launch/tpu_pod.sh mlgraph.main \
#       --config configs/salgl_coco.py --workdir gs://BUCKET/salgl_coco
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
cd "$(dirname "$0")/.."
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU":~/mlgraph
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
  --command "cd ~/mlgraph && MLGRAPH_DATA='${MLGRAPH_DATA:-}' bash launch/tpu_run.sh $*"
