#!/usr/bin/env bash
# Train with mpirun on one or more nodes. Copy and edit: NP ranks, HOSTFILE (one
# line per node: "node01 slots=8"), the spec and overrides.
# Usage: NP=4 HOSTFILE=hosts.txt bash launch/mpirun.sh configs/fmnist_mlp.yaml [--set k=v ...]
#
# Across nodes, mpirun starts its daemon on each node through ssh (or RSH_AGENT, any
# command that runs "AGENT HOST COMMAND..." on HOST), and ssh forwards no environment:
#   RSH_AGENT  the remote shell instead of ssh (e.g. a site wrapper, or the tests'
#              network-namespace agent)
#   IFACE      the network interface(s) between the nodes, e.g. eth0 or ib0 (TCP for
#              MPI and for mpirun's own traffic); unset = Open MPI picks
#   FORWARD    more environment variables for the ranks, space-separated
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are forwarded when set: nodes that pick other
# OpenBLAS kernels give results that differ in the last bits.
set -euo pipefail
NP=${NP:-2}
ELBO=${ELBO:-build/src/elbo}
spec=${1:?usage: launch/mpirun.sh SPEC.yaml [--set key=value ...]}
shift

args=(-np "$NP" --bind-to core --map-by slot)
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ -n "${RSH_AGENT:-}" ]] && args+=(--mca plm_rsh_agent "$RSH_AGENT")
[[ -n "${IFACE:-}" ]] && args+=(--mca btl_tcp_if_include "$IFACE" --mca oob_tcp_if_include "$IFACE")
# A node that drops off the network (link down, power loss) leaves mpirun's TCP link to
# its daemon silent; Open MPI's default keepalive (300 s + 9 x 20 s) and the kernel's
# retransmissions (~15 min) keep the job hanging. Probe an idle link after 10 s, every
# 5 s, give up after 4 misses: a lost node ends the job in about 30 s. KEEPALIVE=off
# keeps Open MPI's defaults.
if [[ "${KEEPALIVE:-on}" != off ]]; then
  args+=(--mca oob_tcp_keepalive_time 10 --mca oob_tcp_keepalive_intvl 5 --mca oob_tcp_keepalive_probes 4)
fi
for v in OPENBLAS_CORETYPE OPENBLAS_L2_SIZE ${FORWARD:-}; do
  [[ -n "${!v:-}" ]] && args+=(-x "$v")
done
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
