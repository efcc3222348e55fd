#!/usr/bin/env bash
# dist.shard_optimizer (ZeRO stage 1) against the replicated optimizer, in one run:
#   1. on this machine, 2 ranks (shared memory): optimizer memory per rank (the log's
#      "optimizer:" line) and samples/s, replicated and sharded alternately, REPEAT times;
#   2. across 2 nodes (network namespaces, tests/launch/netns_nodes.py; needs root),
#      1 rank per node over a veth link throttled to 1 Gbit/s inside each node
#      (tc tbf rate 1gbit burst 256kb latency 50ms): replicated and sharded, with the
#      default 1 MB buckets (communication overlapped with backward) and with
#      dist.bucket_mb 0 (one collective after backward: no overlap); REPEAT times, alternating.
# Model: configs/fmnist_mlp.yaml (784-400-20, 652 824 parameters = 2.6 MB), batch 128;
# samples/s is the mean of the metrics rows after the first (warm-up) row.
# Usage: [REPEAT=2] bash bench/zero.sh [STEPS=600] [LINK_STEPS=300]
source "$(dirname "$0")/common.sh"
STEPS=${1:-600}
LINK_STEPS=${2:-300}
REPEAT=${REPEAT:-2}
SPEC=$ROOT/configs/fmnist_mlp.yaml
LOG_EVERY=50

common_sets() {  # output dir, steps
  echo --set data.train="$DATA/train" --set data.test= --set eval.every=0 --set train.max_steps="$2" --set train.threads=1 \
    --set train.log_every=$LOG_EVERY --set dist.self_test=false --set output.dir="$1"
}
rate() { awk -F, 'NR>2 {s+=$10; n++} END {if (n) printf "%.0f", s/n; else print "?"}' "$1/metrics.csv"; }
moments() { grep '^optimizer: ' "$1" | sed 's/^optimizer: //'; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u '+%F %H:%M') UTC"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine slows both modes alike)"
echo "== 2 ranks on this machine, $STEPS steps (first $LOG_EVERY untimed) =="
printf "%-6s %-11s %10s  %s\n" try optimizer samples/s "optimizer memory (log)"
declare -A sum=([replicated]=0 [sharded]=0)
for try in $(seq "$REPEAT"); do
  for mode in replicated sharded; do
    out=$WORK/local-$mode-$try
    shard=$([[ $mode == sharded ]] && echo true || echo false)
    # shellcheck disable=SC2046
    mpirun -np 2 --bind-to core "$ELBO" train "$SPEC" $(common_sets "$out" "$STEPS") \
      --set dist.shard_optimizer=$shard >"$out.log" 2>&1
    r=$(rate "$out")
    sum[$mode]=$(( ${sum[$mode]} + r ))
    printf "%-6s %-11s %10s  %s\n" "$try" "$mode" "$r" "$(moments "$out.log")"
  done
done
printf "sharded / replicated samples/s (means of %d): %.3fx\n" "$REPEAT" \
  "$(awk "BEGIN{print ${sum[sharded]}/${sum[replicated]}}")"

echo "== 2 nodes x 1 rank over a veth link throttled to 1 Gbit/s, $LINK_STEPS steps =="
if [[ $(id -u) -ne 0 ]]; then
  echo "skipped: network namespaces need root"
  exit 0
fi
"$PY" - "$ROOT" "$ELBO" "$SPEC" "$WORK" "$LINK_STEPS" "$LOG_EVERY" "$DATA" "$REPEAT" <<'PY'
import os, re, subprocess, sys
root, elbo, spec, work, steps, log_every, data, repeat = sys.argv[1:]
repeat = int(repeat)
sys.path.insert(0, os.path.join(root, "tests", "launch"))
from netns_nodes import Nodes, NodesUnavailable

def rate(out):
    rows = open(os.path.join(out, "metrics.csv")).read().splitlines()[2:]
    v = [float(r.split(",")[9]) for r in rows]
    return sum(v) / len(v) if v else float("nan")

try:
    with Nodes(2, os.path.join(work, "nodes"), slots=1) as nodes:
        for n in nodes.names:
            subprocess.run(["ip", "netns", "exec", f"{nodes.prefix}-{n}", "tc", "qdisc", "add", "dev", "eth0", "root",
                            "tbf", "rate", "1gbit", "burst", "256kb", "latency", "50ms"], check=True)
        qdisc = subprocess.run(["ip", "netns", "exec", f"{nodes.prefix}-n1", "tc", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout.strip()
        print(f"link: n1 eth0 <-> n2 eth0 (veth over a bridge), each side: {qdisc}")
        print(f"{'try':<4} {'optimizer':<11} {'buckets':<24} {'samples/s':>10}  gradients (log)")
        res = {}
        for attempt in range(1, repeat + 1):
            for mode in ("replicated", "sharded"):
                for buckets, mb in (("1 MB (overlap)", "1"), ("one, after backward", "0")):
                    out = os.path.join(work, f"link-{mode}-{mb}-{attempt}")
                    # launch/mpirun.sh's arguments, but unbound: each "node" would pin its one
                    # rank to core 0, and both nodes are this machine's cores.
                    r = nodes.run(["mpirun", "--hostfile", nodes.hostfile, "--mca", "plm_rsh_agent", nodes.agent,
                                   "--mca", "btl_tcp_if_include", "eth0", "--mca", "oob_tcp_if_include", "eth0",
                                   "-np", "2", "--bind-to", "none", "-x", "OPENBLAS_NUM_THREADS=1", elbo, "train", spec,
                                   "--set", f"data.train={data}/train", "--set", "data.test=", "--set", "eval.every=0",
                                   "--set", f"train.max_steps={steps}", "--set", "train.threads=1",
                                   "--set", f"train.log_every={log_every}", "--set", "dist.self_test=false",
                                   "--set", f"dist.bucket_mb={mb}",
                                   "--set", f"dist.shard_optimizer={'true' if mode == 'sharded' else 'false'}",
                                   "--set", f"output.dir={out}"], capture_output=True, text=True, timeout=900)
                    if r.returncode != 0:
                        sys.exit(f"{mode}, {buckets}: failed ({r.returncode})\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
                    res.setdefault((mode, mb), []).append(rate(out))
                    grads = re.search(r"gradients: (.*)", r.stdout).group(1)
                    print(f"{attempt:<4} {mode:<11} {buckets:<24} {res[mode, mb][-1]:>10.0f}  {grads}", flush=True)
        mean = {k: sum(v) / len(v) for k, v in res.items()}
        print(f"means of {repeat}: " + ", ".join(f"{m} bucket_mb={b}: {mean[m, b]:.0f}" for m, b in mean))
        for mb, what in (("1", "1 MB buckets"), ("0", "one bucket")):
            print(f"sharded / replicated, {what}: {mean['sharded', mb] / mean['replicated', mb]:.3f}x")
        for mode in ("replicated", "sharded"):
            print(f"{mode}: overlapped (1 MB buckets) / one bucket: {mean[mode, '1'] / mean[mode, '0']:.3f}x")
except NodesUnavailable as e:
    print(f"skipped: cannot make network namespaces: {e}")
PY
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
