#!/usr/bin/env bash
# Train with mpirun on one or more nodes. Copy and edit: NP ranks, HOSTFILE (one
# line per node: "node01 slots=8"), the spec and overrides.
# Usage: NP=4 HOSTFILE=hosts.txt bash launch/mpirun.sh configs/fmnist_mlp.yaml [--set k=v ...]
set -euo pipefail
NP=${NP:-2}
ELBO=${ELBO:-build/src/elbo}
spec=${1:?usage: launch/mpirun.sh SPEC.yaml [--set key=value ...]}
shift

args=(-np "$NP" --bind-to core --map-by slot)
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
if [[ $(id -u) -eq 0 ]]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Add `--resume auto` to continue an interrupted run. To stop a run cleanly, send
# SIGUSR1 to mpirun (it forwards it): the ranks checkpoint and exit with 75. mpirun
# reports 1 rather than 75 when it was signalled itself (SIGTERM); with
# ELBO_STOP_FILE=PATH exported (-x), rank 0 also writes PATH whenever the run stops
# resumably, which a wrapper can test instead of the exit status.
# One BLAS thread per rank unless the spec says otherwise: ranks already fill the cores.
[[ -n "${ELBO_STOP_FILE:-}" ]] && args+=(-x ELBO_STOP_FILE)
exec mpirun "${args[@]}" -x OPENBLAS_NUM_THREADS=1 "$ELBO" train "$spec" "$@"
