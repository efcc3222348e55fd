#!/usr/bin/env bash
# MLP VAE training throughput on one GPU, side by side in one run: elbo (1 rank, the
# CUDA backend) against the same VAE in PyTorch (eager; torch.compile with
# COMPILE_ONLY=1, a second call that adds those rows), at global batch 128 and 4096,
# FP32 everywhere (TF32 off in both), plus the GPU's measured FP32 GEMM rate and each
# run's achieved TFLOP/s as a fraction of it.
# Usage: bash bench/gpu.sh [STEPS=600]   (PY: a python3 whose torch sees the GPU;
# ELBO, DATA, BENCH_KEEP: see common.sh). A run that fails is reported and skipped.
# The model is configs/fmnist_mlp.yaml (784-400-20-400-784); FLOPs per sample are
# counted as 6 x (weights in GEMMs): forward, grad-input and grad-weight GEMMs.
source "$(dirname "$0")/common.sh"
set +e  # one failed run must not cost the others' numbers
STEPS=${1:-600}
WARM=100
RATES=$WORK/rates-mlp.txt  # "name batch samples/s", accumulated over calls

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
  local b=$1 out=$WORK/elbo-mlp-b$1
  "$ELBO" train "$ROOT/configs/fmnist_mlp.yaml" --set device=cuda \
    --set data.train="$DATA/train" --set data.test= --set eval.every=0 --set train.batch_size="$b" \
    --set train.drop_last=true --set train.epochs=100000 --set train.max_steps="$STEPS" \
    --set train.log_every="$WARM" --set output.dir="$out" --set output.overwrite=true >"$out.log" 2>&1 || return 1
  awk -F, 'NR>2 {s+=$10; n++} END {printf "%.0f", s/n}' "$out/metrics.csv"
}
torch_rate() {  # batch, extra flags
  local b=$1; shift
  "$PY" "$ROOT/bench/pytorch_vae.py" --device cuda --train "$DATA/train" --test "$DATA/test" --batch "$b" \
    --drop-last --epochs 100000 --max-steps "$STEPS" --warmup-steps "$WARM" --no-eval --json "$WORK/t.json" "$@" \
    >"$WORK/torch.log" 2>&1 || { tail -5 "$WORK/torch.log" >&2; return 1; }
  "$PY" -c "import json; print(round(json.load(open('$WORK/t.json'))['train_samples_per_s']))"
}
record() {  # name batch command...
  local name=$1 b=$2 r; shift 2
  if r=$("$@") && [[ -n $r ]]; then echo "$name $b $r" >>"$RATES"; else echo "$name at batch $b: run failed" >&2; fi
}

FLOPS_PER_SAMPLE=$(( 6 * (784*400 + 400*40 + 20*400 + 400*784) ))
if [[ -z ${COMPILE_ONLY:-} ]]; then
  : >"$RATES"
  gemm_tflops >"$WORK/gemm.txt"
  for b in 128 4096; do
    record elbo "$b" elbo_rate "$b"
    record "pytorch-eager" "$b" torch_rate "$b"
  done
else
  for b in 128 4096; do record "pytorch-compile" "$b" torch_rate "$b" --compile; done
fi

peak=$(cat "$WORK/gemm.txt" 2>/dev/null)
peak=${peak:-0}
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) | FP32 GEMM (8192^3, TF32 off): $peak TFLOP/s"
echo "date: $(date -u +%F) | configs/fmnist_mlp.yaml | steps $STEPS, the first $WARM not timed | TF32 off everywhere"
printf "%-18s %6s %12s %9s %8s %10s %9s\n" "run" "batch" "samples/s" "TFLOP/s" "of GEMM" "vs eager" "vs best"
for b in 128 4096; do
  eager=$(awk -v b="$b" '$1 == "pytorch-eager" && $2 == b {print $3}' "$RATES")
  best=$(awk -v b="$b" '$1 ~ /^pytorch/ && $2 == b && $3 > m {m = $3} END {print m + 0}' "$RATES")
  while read -r name bb rate; do
    [[ $bb == "$b" ]] || continue
    awk -v n="$name" -v b="$b" -v r="$rate" -v f="$FLOPS_PER_SAMPLE" -v p="$peak" -v e="${eager:-0}" -v best="$best" \
      'BEGIN { tf = r * f / 1e12; printf "%-18s %6d %12d %9.2f %7.1f%% %9.2fx %8.2fx\n", n, b, r, tf,
               (p > 0 ? 100 * tf / p : 0), (e > 0 ? r / e : 0), (best > 0 ? r / best : 0) }'
  done <"$RATES"
  elbo=$(awk -v b="$b" '$1 == "elbo" && $2 == b {print $3}' "$RATES")
  [[ -n $elbo && -n $eager ]] && echo "summary: mlp b$b elbo/eager $(awk "BEGIN{printf \"%.2f\", $elbo/$eager}")x elbo/best $(awk "BEGIN{printf \"%.2f\", $elbo/$best}")x"
done
grep -h "step graph\|gradients:" "$WORK"/elbo-mlp-b128.log 2>/dev/null
exit 0
