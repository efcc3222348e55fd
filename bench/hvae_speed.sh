#!/usr/bin/env bash
# Speed of a hierarchical VAE (model.type: hierarchical): training samples/s of elbo on
# 2 MPI ranks x 1 thread against bench/pytorch_hvae.py (the same model: the golden
# test's) with 1 and 2 threads in one process and as 2 DDP processes x 1 thread, on the
# same machine, in one script run, and the ratio to PyTorch's best. The first log interval (elbo) and the first 20 steps (PyTorch) are
# warm-up and not timed. Usage: bash bench/hvae_speed.sh SPEC.yaml [STEPS=300]
source "$(dirname "$0")/common.sh"
SPEC=${1:?usage: bench/hvae_speed.sh SPEC.yaml [STEPS]}
STEPS=${2:-300}
LOG_EVERY=$(( STEPS / 5 ))

mpirun -np 2 --bind-to core "$ELBO" train "$SPEC" --set data.train="$DATA/train" --set data.test= \
  --set train.max_steps="$STEPS" --set train.log_every="$LOG_EVERY" --set train.threads=1 \
  --set eval.every=0 --set eval.iw_samples=0 --set eval.images=false --set output.tensorboard=false \
  --set output.dir="$WORK/elbo" >"$WORK/elbo.log"
# samples/s of the intervals after the first (the progress lines' "N samples/s")
elbo_rate=$(grep -E '^epoch .* step [0-9]+/' "$WORK/elbo.log" | tail -n +2 |
  sed -E 's/.* ([0-9.]+) samples\/s.*/\1/' | awk '{ s += $1; n++ } END { if (n) printf "%.1f", s / n }')
best=0
# PyTorch: one process with 1 and 2 threads, and 2 DDP processes x 1 thread (elbo's layout).
for rt in 1x1 1x2 2x1; do
  r=${rt%x*} t=${rt#*x}
  OMP_NUM_THREADS=$t "$PY" "$ROOT/bench/pytorch_hvae.py" "$SPEC" --train "$DATA/train" --test "$DATA/test" \
    --max-steps $(( STEPS / 2 + 20 )) --warmup-steps 20 --ranks "$r" --threads "$t" --eval-samples 64 \
    --json "$WORK/torch$rt.json" >"$WORK/torch$rt.log"
  rate=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['train_samples_per_s'])" "$WORK/torch$rt.json")
  echo "pytorch, $r process(es) x $t thread(s): $rate samples/s"
  best=$("$PY" -c "print(max($best, $rate))")
done
echo "elbo, 2 ranks x 1 thread: $elbo_rate samples/s"
"$PY" -c "print(f'elbo / best PyTorch: {$elbo_rate / $best:.2f}x')"
