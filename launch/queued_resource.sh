#!/usr/bin/env bash
# Provision a TPU slice through a queued resource, wait until it is ACTIVE, run a command on it
# with tpu_pod.sh, and delete it afterwards (also on failure).
#   QR=salgl-qr TPU=salgl ZONE=us-west4-a ACCEL=v5litepod-16 RUNTIME=v2-alpha-tpuv5-lite \
#     bash launch/queued_resource.sh mlgraph.main --config configs/salgl_coco.py --workdir gs://B/r
set -euo pipefail
: "${QR:?}" "${TPU:?}" "${ZONE:?}" "${ACCEL:?}" "${RUNTIME:?}"
gcloud alpha compute tpus queued-resources create "$QR" --zone="$ZONE" --node-id="$TPU" \
  --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" ${SPOT:+--spot}
trap 'gcloud alpha compute tpus queued-resources delete "$QR" --zone="$ZONE" --force --async --quiet' EXIT
until [ "$(gcloud alpha compute tpus queued-resources describe "$QR" --zone="$ZONE" \
          --format='value(state.state)')" = "ACTIVE" ]; do
  echo "waiting for $QR ..."; sleep 30
done
TPU="$TPU" ZONE="$ZONE" bash "$(dirname "$0")/tpu_pod.sh" "$@"
