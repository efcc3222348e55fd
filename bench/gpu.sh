#!/usr/bin/env bash
# GPU training throughput, side by side in one run on one GPU: elbo (1 rank, the
# CUDA backend) against the same VAE in PyTorch, eager and torch.compile, at global
# batch 128 and 4096, FP32 everywhere (TF32 off in both), plus the GPU's measured
# FP32 GEMM rate and each run's achieved TFLOP/s as a fraction of it.
# Usage: bash bench/gpu.sh [STEPS=600]   (PY: a python3 whose torch sees the GPU)
# The model is configs/fmnist_mlp.yaml (784-400-20-400-784); FLOPs per sample are
# counted as 6 x (weights in GEMMs): forward, grad-input and grad-weight GEMMs.
source "$(dirname "$0")/common.sh"
STEPS=${1:-600}
PY=${PY:-python3}
WARM=100

gemm_tflops() {
  "$PY" - <<'PYEOF'
import torch, time
torch.backends.cuda.matmul.allow_tf32 = False
n = 8192
a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize()
print(f"{2 * n**3 * 10 / (time.perf_counter() - t) / 1e12:.1f}")
PYEOF
}
elbo_rate() {  # mean samples/s over the metrics rows after the first (warm-up) interval
  local b=$1 out=$WORK/elbo-b$1
  "$ELBO" train "$ROOT/configs/fmnist_mlp.yaml" --set device=cuda \
    --set data.train="$DATA/train" --set data.test= --set train.batch_size="$b" --set train.epochs=100000 \
    --set train.max_steps="$STEPS" --set train.log_every="$WARM" --set output.dir="$out" >"$out.log"
  awk -F, 'NR>2 {s+=$10; n++} END {printf "%.0f", s/n}' "$out/metrics.csv"
}
torch_rate() {  # batch, extra flags
  local b=$1; shift
  "$PY" "$ROOT/bench/pytorch_vae.py" --device cuda --train "$DATA/train" --test "$DATA/test" --batch "$b" \
    --epochs 100000 --max-steps "$STEPS" --warmup-steps "$WARM" --no-eval --json "$WORK/t.json" "$@" >/dev/null
  "$PY" -c "import json; print(round(json.load(open('$WORK/t.json'))['train_samples_per_s']))"
}

FLOPS_PER_SAMPLE=$(( 6 * (784*400 + 400*40 + 20*400 + 400*784) ))
peak=$(gemm_tflops)
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) | FP32 GEMM (8192^3, TF32 off): $peak TFLOP/s"
echo "date: $(date -u +%F) | steps $STEPS, the first $WARM not timed | TF32 off everywhere"
printf "%-26s %6s %12s %10s %9s %s\n" "run" "batch" "samples/s" "TFLOP/s" "of GEMM" "vs PyTorch"
for b in 128 4096; do
  e=$(elbo_rate "$b"); te=$(torch_rate "$b"); tc=$(torch_rate "$b" --compile)
  best=$(( te > tc ? te : tc ))
  for row in "elbo:$e" "pytorch eager:$te" "pytorch torch.compile:$tc"; do
    name=${row%%:*}; rate=${row##*:}
    tf=$(awk "BEGIN{printf \"%.2f\", $rate * $FLOPS_PER_SAMPLE / 1e12}")
    printf "%-26s %6d %12d %10s %8.1f%% eager %.2fx, best %.2fx\n" "$name" "$b" "$rate" "$tf" \
      "$(awk "BEGIN{print 100 * $tf / $peak}")" "$(awk "BEGIN{print $rate / $te}")" "$(awk "BEGIN{print $rate / $best}")"
  done
done
grep -h "self-test\|gradients:" "$WORK"/elbo-b128.log || true
