#!/usr/bin/env bash
# A real multi-process run on this machine: NPROC processes, each with
# DEVICES_PER_PROC simulated CPU devices, joined through jax.distributed (gloo).
#   launch/local.sh 2 4 -- --config configs/quickstart.yaml --workdir runs/mp
# TTT_JAX_MODULE picks the entry point (default ttt_jax.train); TTT_JAX_PORT the port.
set -euo pipefail
if [ $# -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: launch/local.sh NPROC DEVICES_PER_PROC -- <train args>" >&2
  exit 2
fi
nproc=$1; per_proc=$2; shift 3
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "launch/local.sh: NPROC must be a positive integer, got '$nproc'" >&2; exit 2; }
[[ "$per_proc" =~ ^[1-9][0-9]*$ ]] || { echo "launch/local.sh: DEVICES_PER_PROC must be a positive integer, got '$per_proc'" >&2; exit 2; }
python=${PYTHON:-python}
module=${TTT_JAX_MODULE:-ttt_jax.train}
port=${TTT_JAX_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
cleanup() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap cleanup INT TERM
for ((i = 0; i < nproc; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$per_proc" JAX_PLATFORMS=cpu \
  TTT_JAX_COORDINATOR="127.0.0.1:$port" TTT_JAX_NUM_PROCESSES="$nproc" TTT_JAX_PROCESS_ID="$i" \
    "$python" -m "$module" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
