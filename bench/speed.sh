#!/usr/bin/env bash
# Training throughput on this machine, in one run: elbo with 1 rank x 1 thread and
# 2 ranks x 1 thread, the PyTorch reference with 1 and 2 threads, and the ratios.
# Same model (784-400-20 Bernoulli VAE), batch 128, Adam; the first 100 steps are
# warm-up and not timed. Usage: bash bench/speed.sh [STEPS=600]
source "$(dirname "$0")/common.sh"
STEPS=${1:-600}

elbo_rate() {  # mean samples/s over the metrics rows after the warm-up row
  local np=$1 out=$WORK/elbo-np$1
  mpirun -np "$np" --bind-to core "$ELBO" train "$ROOT/configs/fmnist_mlp.yaml" \
    --set data.train="$DATA/train" --set data.test= --set train.max_steps="$STEPS" \
    --set train.threads=1 --set train.log_every=100 --set output.dir="$out" >/dev/null
  awk -F, 'NR>2 {s+=$10; n++} END {printf "%.0f", s/n}' "$out/metrics.csv"
}
torch_rate() {
  OMP_NUM_THREADS=$1 "$PY" "$ROOT/bench/pytorch_vae.py" --train "$DATA/train" --test "$DATA/test" \
    --threads "$1" --max-steps "$STEPS" --warmup-steps 100 --json "$WORK/torch$1.json" >/dev/null
  "$PY" -c "import json; print(round(json.load(open('$WORK/torch$1.json'))['train_samples_per_s']))"
}

e1=$(elbo_rate 1); e2=$(elbo_rate 2); t1=$(torch_rate 1); t2=$(torch_rate 2)
best=$(( t1 > t2 ? t1 : t2 ))
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf "%-28s %10s %s\n" "run" "samples/s" "vs PyTorch best"
printf "%-28s %10d %.2fx\n" "elbo 1 rank x 1 thread" "$e1" "$(awk "BEGIN{print $e1/$best}")"
printf "%-28s %10d %.2fx\n" "elbo 2 ranks x 1 thread" "$e2" "$(awk "BEGIN{print $e2/$best}")"
printf "%-28s %10d %.2fx\n" "pytorch 1 thread" "$t1" "$(awk "BEGIN{print $t1/$best}")"
printf "%-28s %10d %.2fx\n" "pytorch 2 threads" "$t2" "$(awk "BEGIN{print $t2/$best}")"
printf "elbo 2 ranks / elbo 1 rank: %.2fx\n" "$(awk "BEGIN{print $e2/$e1}")"
