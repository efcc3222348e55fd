#!/usr/bin/env bash
# What a session with a lent GPU runs there, in phases that each fit one device call
# (10 minutes). Prepare here first: bash bench/gpu_kit.sh, then call the device tool
# with carry [".gpukit.tar.xz"] and the command `bash bench/gpu_session.sh PHASE`.
#   check   the machine: GPU, driver, every library of the binaries resolved, elbo info
#   tests   CUDA op parity, the conv ops, the GPU training tests (GPU vs CPU, NCCL,
#           shared GPU, graph replay vs eager)
#   bench   bench/gpu.sh (MLP) and bench/gpu_conv.sh (conv) against PyTorch
# Logs go to $OUT (the device tool brings them back).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/elbo-gpu-out}
mkdir -p "$OUT"
phase=${1:?usage: bench/gpu_session.sh check|tests|bench}
kitdir=/tmp/elbo-gpukit
if [[ ! -f $kitdir/gpukit/env.sh ]]; then
  mkdir -p "$kitdir" && tar -C "$kitdir" -xJf "$ROOT/.gpukit.tar.xz" || { echo "no .gpukit.tar.xz carried"; exit 2; }
fi
# shellcheck disable=SC1091
source "$kitdir/gpukit/env.sh"
DATA=/tmp/elbo-gpu-data
if [[ ! -f $DATA/train/manifest.yaml ]]; then
  # Only the 10 000 test images travel: they serve as the training split for the
  # throughput runs and the GPU tests, and as the test split.
  elbo-shard --images "$kit/data/t10k-images-idx3-ubyte.gz" --labels "$kit/data/t10k-labels-idx1-ubyte.gz" \
    --split train --num-shards 2 --out "$DATA/train" >/dev/null &&
  elbo-shard --images "$kit/data/t10k-images-idx3-ubyte.gz" --labels "$kit/data/t10k-labels-idx1-ubyte.gz" \
    --split test --num-shards 1 --out "$DATA/test" >/dev/null
fi

case "$phase" in
  check)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    for b in "$kit"/bin/*; do ldd "$b" | grep "not found" | sed "s|^|$(basename "$b"): |"; done
    elbo info
    python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
    ;;
  tests)
    test_probe 2>&1 | tee "$OUT/test_probe.log" | tail -3
    test_cuda_parity 2>&1 | tee "$OUT/test_cuda_parity.log" | grep -E "OK|FAILED|Failure|Expected|actual|PASSED"
    test_conv_ops 2>&1 | tail -1
    PYTHONUNBUFFERED=1 python3 "$ROOT/tests/dist/test_gpu_train.py" --elbo "$(command -v elbo)" --data "$DATA" \
      --spec "$ROOT/configs/smoke.yaml" --work /tmp/elbo-gpu-train 2>&1 | tee "$OUT/test_gpu_train.log"
    ;;
  bench)
    export ELBO=$kit/bin/elbo DATA PY=python3
    bash "$ROOT/bench/gpu.sh" 600 2>&1 | tee "$OUT/gpu_mlp.txt"
    bash "$ROOT/bench/gpu_conv.sh" 400 2>&1 | tee "$OUT/gpu_conv.txt"
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
