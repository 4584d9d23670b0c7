#!/usr/bin/env bash
# Multi-node training with DeepSpeed's launcher.
#
# With ssh (pdsh) from one node:
#   launch/multinode.sh HOSTFILE configs/webvision2_resnext101.yaml [--set key=value ...]
# Without ssh, run the same command on every node with its NODE_RANK (e.g. from a scheduler):
#   NODE_RANK=0 MASTER_ADDR=node001 launch/multinode.sh HOSTFILE CONFIG ...     # on node001
#   NODE_RANK=1 MASTER_ADDR=node001 launch/multinode.sh HOSTFILE CONFIG ...     # on node002
set -uo pipefail
hostfile=${1:?usage: launch/multinode.sh HOSTFILE CONFIG [--set key=value ...]}
config=${2:?usage: launch/multinode.sh HOSTFILE CONFIG [--set key=value ...]}
shift 2
cd "$(dirname "$0")/.."
args=(--hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${NODE_RANK:-}" ]]; then
  args+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}")
elif [[ -n "${MASTER_ADDR:-}" ]]; then
  args+=(--master_addr "$MASTER_ADDR")
fi
deepspeed "${args[@]}" launch/train.py --config "$config" "$@"; rc=$?
# 75: preempted (SIGTERM/SIGUSR1 to a rank); every rank saved the step it reached (docs/faults.md)
(( rc == 75 )) && echo "megaclass: preempted; run the same command again (or let the scheduler requeue it) to resume" >&2
exit "$rc"
