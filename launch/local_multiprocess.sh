#!/usr/bin/env bash
# Several JAX processes on one machine (CPU devices), talking over localhost: a dress rehearsal of a multi-host
# run.   launch/local_multiprocess.sh NUM_PROCESSES configs/demo.yaml [key=value ...]
set -euo pipefail
N=${1:?number of processes}; CONFIG=${2:?config}; shift 2
PORT=${PORT:-12355}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu JAX_COORDINATOR_ADDRESS=localhost:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    .venv/bin/omnimol train --distributed --no-progress --config "$CONFIG" "$@" > "multiprocess_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "logs: multiprocess_*.log"; exit $status
