#!/usr/bin/env bash
# The hierarchical VAE against the conv VAE on Fashion-MNIST (issue 15):
# configs/fmnist_hvae.yaml and configs/fmnist_conv.yaml each trained on 2 MPI ranks x 1
# thread (wall time of `elbo train` reported, its final evaluation included), then both
# evaluated on the same first EVAL_N test images with the IWAE bound at k = EVAL_K and
# the same eval seed (paired: the difference is the models', not the images'), in nats.
# Usage: bash bench/hvae_quality.sh [EVAL_K=1000 EVAL_N=1000 RUNS="hvae conv"]
# [MODEL_hvae=model.h5 MODEL_conv=model.h5: evaluate these instead of training]
# (k = 1000 costs 1000 full passes per image: ~15 min for the hierarchical model on
# 1000 images here, a few hours on all 10 000.)
source "$(dirname "$0")/common.sh"
EVAL_K=${EVAL_K:-1000}
EVAL_N=${EVAL_N:-1000}
RUNS=${RUNS:-hvae conv}

for run in $RUNS; do
  model_var=MODEL_$run model=${!model_var:-}
  if [[ -z $model ]]; then
    start=$(date +%s)
    mpirun -np 2 --bind-to core "$ELBO" train "$ROOT/configs/fmnist_$run.yaml" \
      --set data.train="$DATA/train" --set data.test="$DATA/test" --set train.threads=1 \
      --set output.dir="$WORK/$run" >"$WORK/$run.train.log"
    echo "$run: trained in $(( $(date +%s) - start )) s; $(grep -E '^test -ELBO' "$WORK/$run.train.log" | tail -1)"
    model=$WORK/$run/model.h5
  fi
  start=$(date +%s)
  mpirun -np 2 --bind-to core "$ELBO" eval "$model" --data "$DATA/test" --iw-samples "$EVAL_K" \
    --max-samples "$EVAL_N" --seed 1 --threads 1 --output "$WORK/$run.eval.yaml" >"$WORK/$run.eval.log"
  echo "$run: evaluated in $(( $(date +%s) - start )) s; $(grep -E '^test' "$WORK/$run.eval.log" | tail -1)"
done

"$PY" - "$WORK" "$EVAL_K" "$EVAL_N" $RUNS <<'PYEOF'
import sys
work, k, n, runs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
res = {}
for r in runs:
    e = dict(l.split(": ", 1) for l in open(f"{work}/{r}.eval.yaml").read().splitlines() if ": " in l)
    res[r] = (float(e["neg_elbo"]), float(e["iwae_nll"]))
print(f"| model | test -ELBO (nats, first {n}) | IWAE(k={k}) NLL (nats) |")
print("|---|---|---|")
for r in runs:
    print(f"| fmnist_{r} | {res[r][0]:.3f} | {res[r][1]:.3f} |")
if "hvae" in res and "conv" in res:
    print(f"| hvae - conv | {res['hvae'][0] - res['conv'][0]:+.3f} | {res['hvae'][1] - res['conv'][1]:+.3f} |")
PYEOF
