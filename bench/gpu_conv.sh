#!/usr/bin/env bash
# Conv VAE training throughput on one GPU, side by side in one run: elbo (1 rank,
# cuDNN, NCHW) against configs/fmnist_conv.yaml's model in PyTorch, default (NCHW)
# and channels-last (NHWC), eager and torch.compile, at global batch 128 and 1024,
# FP32 with TF32 off everywhere (cuDNN FMA math in elbo).
# Usage: bash bench/gpu_conv.sh [STEPS=600]   (PY: a python3 whose torch sees the GPU)
source "$(dirname "$0")/common.sh"
STEPS=${1:-600}
PY=${PY:-python3}
WARM=100

elbo_rate() {  # mean samples/s over the metrics rows after the first (warm-up) interval
  local b=$1 out=$WORK/elbo-conv-b$1
  "$ELBO" train "$ROOT/configs/fmnist_conv.yaml" --set device=cuda \
    --set data.train="$DATA/train" --set data.test= --set eval.every=0 --set train.batch_size="$b" \
    --set train.epochs=100000 --set train.max_steps="$STEPS" --set train.log_every="$WARM" \
    --set output.dir="$out" >"$out.log"
  awk -F, 'NR>2 {s+=$10; n++} END {printf "%.0f", s/n}' "$out/metrics.csv"
}
torch_rate() {  # batch, extra flags
  local b=$1; shift
  "$PY" "$ROOT/bench/pytorch_vae.py" --model conv --device cuda --train "$DATA/train" --test "$DATA/test" \
    --batch "$b" --epochs 100000 --max-steps "$STEPS" --warmup-steps "$WARM" --no-eval --json "$WORK/t.json" "$@" \
    >/dev/null
  "$PY" -c "import json; print(round(json.load(open('$WORK/t.json'))['train_samples_per_s']))"
}

echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
echo "date: $(date -u +%F) | configs/fmnist_conv.yaml | steps $STEPS, the first $WARM not timed | TF32 off"
printf "%-34s %6s %12s %s\n" "run" "batch" "samples/s" "elbo vs this"
for b in 128 1024; do
  e=$(elbo_rate "$b")
  printf "%-34s %6d %12d\n" "elbo (cuDNN, NCHW)" "$b" "$e"
  for flags in "" "--channels-last" "--compile" "--channels-last --compile"; do
    # shellcheck disable=SC2086
    t=$(torch_rate "$b" $flags)
    printf "%-34s %6d %12d %.2fx\n" "pytorch ${flags:-eager NCHW}" "$b" "$t" "$(awk "BEGIN{print $e / $t}")"
  done
done
