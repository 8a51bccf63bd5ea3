#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every worker; jax.distributed auto-detects the pod.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/omnimol_1b.yaml [key=value ...]
# The repository must be at the same path on every worker (e.g. cloned by a startup script), with
# `make install` run once per worker. Model/data paths in the config must be readable on every worker
# (a mounted bucket or a copy per worker); the run's output_dir should be a shared path (GCS FUSE or NFS).
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?config}; shift 3
REPO=${REPO:-\$HOME/omnimol-jax}
OVERRIDES="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO && \
  .venv/bin/omnimol train --distributed --no-progress --config $CONFIG $OVERRIDES 2>&1 | tee -a train_\$(hostname).log"
