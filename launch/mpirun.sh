#!/usr/bin/env bash
# MPI: every rank is an MPI process; DeepSpeed discovers rank, world size and the master address
# through mpi4py (deepspeed.init_distributed(auto_mpi_discovery=True)).
#   launch/mpirun.sh NPROCS CONFIG [--set key=value ...]              # one node
#   HOSTS=node001,node002 launch/mpirun.sh 16 CONFIG ...              # several nodes (mpirun -hosts)
set -uo pipefail
nprocs=${1:?usage: launch/mpirun.sh NPROCS CONFIG [--set key=value ...]}
config=${2:?usage: launch/mpirun.sh NPROCS CONFIG [--set key=value ...]}
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python)}
hosts=()
[[ -n "${HOSTS:-}" ]] && hosts=(-hosts "$HOSTS")
mpirun -n "$nprocs" "${hosts[@]}" "$python" launch/train.py --config "$config" "$@"; rc=$?
# 75: preempted (SIGTERM/SIGUSR1 to a rank); every rank saved the step it reached (docs/faults.md)
(( rc == 75 )) && echo "megaclass: preempted; run the same command again (or let the scheduler requeue it) to resume" >&2
exit "$rc"
