#!/usr/bin/env bash
# One node, restarted when it fails: torchrun's elastic agent runs NPROCS ranks; when one ends badly (a
# crash, a kill, exit 76 "lost a rank", exit 75 "preempted") it stops the others (SIGTERM, then SIGKILL
# after SHUTDOWN_TIMEOUT_S) and starts them all again, up to MAX_RESTARTS times. Each start resumes from
# the last complete checkpoint (train.resume). A SIGTERM or SIGUSR1 to torchrun itself is a preemption
# of the whole job: it is forwarded to the ranks, which save and exit; torchrun then stops, no restart.
#   launch/restart.sh NPROCS CONFIG [--set key=value ...]
#   MAX_RESTARTS=3 SHUTDOWN_TIMEOUT_S=120 launch/restart.sh 8 configs/webvision2_resnext101.yaml
# Several nodes: launch/slurm.sbatch (the same agent, with a c10d rendezvous). See docs/faults.md.
set -euo pipefail
nprocs=${1:?usage: launch/restart.sh NPROCS CONFIG [--set key=value ...]}
config=${2:?usage: launch/restart.sh NPROCS CONFIG [--set key=value ...]}
shift 2
cd "$(dirname "$0")/.."
# torch 2.14's agent keeps one store across restarts, where the ranks of a restart would find the
# previous attempt's gloo addresses (stale: "Connection refused"); this gives each attempt a fresh one
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --standalone --nproc-per-node "$nprocs" --max-restarts "${MAX_RESTARTS:-3}" \
  --shutdown-timeout "${SHUTDOWN_TIMEOUT_S:-120}" --signals-to-handle SIGTERM,SIGINT,SIGUSR1 \
  "${TRAIN_SCRIPT:-launch/train.py}" --config "$config" "$@"
