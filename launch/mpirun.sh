#!/usr/bin/env bash
# MPI: every rank is an MPI process; DeepSpeed discovers rank, world size and the master address
# through mpi4py (deepspeed.init_distributed(auto_mpi_discovery=True)).
#   launch/mpirun.sh NPROCS CONFIG [--set key=value ...]              # one node
#   HOSTS=node001,node002 launch/mpirun.sh 16 CONFIG ...              # several nodes (mpirun -hosts)
set -euo pipefail
nprocs=${1:?usage: launch/mpirun.sh NPROCS CONFIG [--set key=value ...]}
config=${2:?usage: launch/mpirun.sh NPROCS CONFIG [--set key=value ...]}
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python)}
hosts=()
[[ -n "${HOSTS:-}" ]] && hosts=(-hosts "$HOSTS")
exec mpirun -n "$nprocs" "${hosts[@]}" "$python" launch/train.py --config "$config" "$@"
