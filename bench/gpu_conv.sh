#!/usr/bin/env bash
# Conv VAE training throughput on one GPU, side by side in one run: elbo (1 rank,
# cuDNN, NCHW) against configs/fmnist_conv.yaml's model in PyTorch, default (NCHW)
# and channels-last (NHWC), eager (torch.compile with COMPILE_ONLY=1, a second call
# that adds those rows at batch 128), at global batch 128 and 1024, FP32 with TF32
# off everywhere (cuDNN FMA math in elbo). elbo runs twice: with its default
# train.deterministic (deterministic cuDNN algorithms only) and with
# train.deterministic=false (cuDNN's first-ranked ones, as PyTorch's default allows).
# Usage: bash bench/gpu_conv.sh [STEPS=600]   (PY, ELBO, DATA, BENCH_KEEP: see gpu.sh)
# FLOPs per sample: 6 x the multiply-adds of the convolutions, transposed
# convolutions and linear layers of the forward pass (5.03 M), as for the MLP.
source "$(dirname "$0")/common.sh"
set +e  # one failed run must not cost the others' numbers
STEPS=${1:-600}
WARM=100
RATES=$WORK/rates-conv.txt
FLOPS_PER_SAMPLE=$(( 6 * (32*16*196 + 64*32*16*49 + 3136*256 + 256*40 + 20*256 + 256*3136 + 64*32*16*49 + 32*16*196) ))

elbo_rate() {  # batch, extra --set flags: mean samples/s over the metrics rows after the first (warm-up) interval
  local b=$1 out=$WORK/elbo-conv-b$1${2:+-any}; shift
  "$ELBO" train "$ROOT/configs/fmnist_conv.yaml" --set device=cuda "$@" \
    --set data.train="$DATA/train" --set data.test= --set eval.every=0 --set train.batch_size="$b" \
    --set train.drop_last=true --set train.epochs=100000 --set train.max_steps="$STEPS" \
    --set train.log_every="$WARM" --set output.dir="$out" --set output.overwrite=true >"$out.log" 2>&1 || return 1
  awk -F, 'NR>2 {s+=$10; n++} END {printf "%.0f", s/n}' "$out/metrics.csv"
}
torch_rate() {  # batch, extra flags
  local b=$1; shift
  "$PY" "$ROOT/bench/pytorch_vae.py" --model conv --device cuda --train "$DATA/train" --test "$DATA/test" \
    --batch "$b" --drop-last --epochs 100000 --max-steps "$STEPS" --warmup-steps "$WARM" --no-eval \
    --json "$WORK/t.json" "$@" >"$WORK/torch.log" 2>&1 || { tail -5 "$WORK/torch.log" >&2; return 1; }
  "$PY" -c "import json; print(round(json.load(open('$WORK/t.json'))['train_samples_per_s']))"
}
record() {  # name batch command...
  local name=$1 b=$2 r; shift 2
  if r=$("$@") && [[ -n $r ]]; then echo "$name $b $r" >>"$RATES"; else echo "$name at batch $b: run failed" >&2; fi
}

if [[ -z ${COMPILE_ONLY:-} ]]; then
  : >"$RATES"
  for b in 128 1024; do
    record "elbo-cudnn-nchw" "$b" elbo_rate "$b"
    # cuDNN's first-ranked algorithms, deterministic or not (PyTorch's default allows both)
    record "elbo-cudnn-any-algo" "$b" elbo_rate "$b" --set train.deterministic=false
    record "pytorch-eager" "$b" torch_rate "$b"
    record "pytorch-eager-nhwc" "$b" torch_rate "$b" --channels-last
  done
else
  record "pytorch-compile" 128 torch_rate 128 --compile
  record "pytorch-compile-nhwc" 128 torch_rate 128 --channels-last --compile
fi

peak=$(cat "$WORK/gemm.txt" 2>/dev/null)
peak=${peak:-0}
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) | FP32 GEMM (8192^3, TF32 off): $peak TFLOP/s"
echo "date: $(date -u +%F) | configs/fmnist_conv.yaml | steps $STEPS, the first $WARM not timed | TF32 off"
printf "%-22s %6s %12s %9s %8s %10s\n" "run" "batch" "samples/s" "TFLOP/s" "of GEMM" "elbo/this"
for b in 128 1024; do
  elbo=$(awk -v b="$b" '$1 == "elbo-cudnn-nchw" && $2 == b {print $3}' "$RATES")
  best=$(awk -v b="$b" '$1 ~ /^pytorch/ && $2 == b && $3 > m {m = $3} END {print m + 0}' "$RATES")
  while read -r name bb rate; do
    [[ $bb == "$b" ]] || continue
    awk -v n="$name" -v b="$b" -v r="$rate" -v f="$FLOPS_PER_SAMPLE" -v p="$peak" -v e="${elbo:-0}" \
      'BEGIN { tf = r * f / 1e12; printf "%-22s %6d %12d %9.2f %7.1f%% %9.2fx\n", n, b, r, tf,
               (p > 0 ? 100 * tf / p : 0), (r > 0 ? e / r : 0) }'
  done <"$RATES"
  [[ -n $elbo && $best != 0 ]] && echo "summary: conv b$b elbo/best-pytorch $(awk "BEGIN{printf \"%.2f\", $elbo/$best}")x"
done
grep -h "step graph\|gradients:" "$WORK"/elbo-conv-b128.log 2>/dev/null
exit 0
