#!/usr/bin/env bash
# Plain multi-node launcher: run this once per process (one per host, or one per GPU),
# on every host, with the same coordinator and process count and a distinct id.
#
#   COORDINATOR=10.0.0.1:12355 NUM_PROCESSES=4 PROCESS_ID=0 \
#     launch/multinode.sh --config configs/quickstart.yaml --workdir /shared/runs/q
#
# COORDINATOR    host:port of process 0, reachable from every host
# NUM_PROCESSES  total number of processes in the job
# PROCESS_ID     this process's id, 0 .. NUM_PROCESSES-1
# The workdir must be on storage all processes share (checkpoints are written
# collectively). Each process drives its local accelerators; jax.distributed joins them.
set -euo pipefail
for var in COORDINATOR NUM_PROCESSES PROCESS_ID; do
  if [ -z "${!var:-}" ]; then
    echo "launch/multinode.sh: $var is not set (need COORDINATOR, NUM_PROCESSES, PROCESS_ID)" >&2
    exit 2
  fi
done
[[ "$COORDINATOR" == *:* ]] || { echo "launch/multinode.sh: COORDINATOR must be host:port, got '$COORDINATOR'" >&2; exit 2; }
[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ ]] || { echo "launch/multinode.sh: NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'" >&2; exit 2; }
[[ "$PROCESS_ID" =~ ^[0-9]+$ ]] && (( PROCESS_ID < NUM_PROCESSES )) || {
  echo "launch/multinode.sh: PROCESS_ID must be in [0, $NUM_PROCESSES), got '$PROCESS_ID'" >&2; exit 2; }
[ $# -gt 0 ] || { echo "usage: COORDINATOR=host:port NUM_PROCESSES=N PROCESS_ID=i launch/multinode.sh <train args>" >&2; exit 2; }

export TTT_JAX_COORDINATOR="$COORDINATOR" TTT_JAX_NUM_PROCESSES="$NUM_PROCESSES" TTT_JAX_PROCESS_ID="$PROCESS_ID"
exec "${PYTHON:-python}" -m "${TTT_JAX_MODULE:-ttt_jax.train}" "$@"
