#!/usr/bin/env bash
# Everything a lent GPU window should prove, in one device call, stage by stage:
#   smoke     the GPU and driver, where every CUDA library of every binary resolves,
#             `elbo info` with 1 and 2 ranks, torch, compute-sanitizer
#   parity    every CUDA op and whole VAEs against the CPU reference (the error each
#             reached is printed), the graph-after-scratch-growth check, conv ops
#   train     tests/dist/test_gpu_train.py: GPU vs CPU, NCCL vs MPI with 1 rank, 2 ranks
#             sharing the GPU, graph replay vs eager
#   graphs    the conv VAE with CUDA graphs on and off and evaluations and image grids
#             between (larger shapes that grow the scratch memory): bit for bit; and
#             `elbo eval` of the result on the GPU against the CPU
#   nccl      with several GPUs: NCCL across them against one GPU (skipped with one)
#   stream    the streaming loader feeding a GPU rank: the memory loader's bits
#   memcheck  compute-sanitizer memcheck over the parity tests
#   bench     bench/gpu.sh (MLP) and bench/gpu_conv.sh (conv) against PyTorch, eager
#             first, torch.compile while time remains; the all-reduce self-test
#   profile   Nsight Compute's per-kernel time for a few conv steps at batch 1024,
#             elbo and PyTorch (the one configuration where elbo trailed)
# Each stage has its own time limit; $OUT gets stages.log (every stage's output, in
# order), summary.txt (ends with a table) and bench-runs.tar.gz (the benchmark runs'
# logs, metrics and profiles).
# The whole run stays inside BUDGET seconds (default 420), so a second try fits in a
# 15-minute window. Prepare first, on a CPU machine: bash bench/gpu_kit.sh; then call
# the device tool with carry [".gpukit.tar.xz"] and `bash bench/gpu_session.sh`.
# STAGES="parity train" runs a subset.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export ROOT
export OUT=${OUT:-/tmp/elbo-gpu-out}
mkdir -p "$OUT"
STAGES=${STAGES:-smoke parity train graphs nccl stream memcheck bench profile}
BUDGET=${BUDGET:-420}
T0=$SECONDS
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# --- the kit and the data ---
kitdir=/tmp/elbo-gpukit
if [[ ! -f $kitdir/gpukit/env.sh ]]; then
  mkdir -p "$kitdir"
  [[ -f $ROOT/.gpukit.tar.xz ]] || { note "no .gpukit.tar.xz carried: run bench/gpu_kit.sh and carry it"; exit 2; }
  if command -v xz >/dev/null; then
    tar -C "$kitdir" -xJf "$ROOT/.gpukit.tar.xz"
  else  # no xz on the machine: Python's lzma reads it
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
      "$ROOT/.gpukit.tar.xz" "$kitdir"
  fi || { note "cannot unpack .gpukit.tar.xz"; exit 2; }
fi
# shellcheck disable=SC1091
source "$kitdir/gpukit/env.sh"
export KIT=$kitdir/gpukit DATA=/tmp/elbo-gpu-data W=/tmp/elbo-gpu-work
mkdir -p "$W"
if [[ ! -f $DATA/test/manifest.yaml ]]; then
  # Only the 10 000 test images travel: they are the training split of the throughput
  # runs and the GPU tests, and the test split.
  for split in train test; do
    n=$([[ $split == train ]] && echo 2 || echo 1)
    elbo-shard --images "$KIT/data/t10k-images-idx3-ubyte.gz" --labels "$KIT/data/t10k-labels-idx1-ubyte.gz" \
      --split "$split" --num-shards "$n" --out "$DATA/$split" >/dev/null || { note "elbo-shard failed"; exit 2; }
  done
fi
note "elbo GPU session $(date -u +%FT%TZ) on $(hostname); python $ELBO_PY; kit and data ready after $((SECONDS - T0)) s"

# --- the stages (each runs under `timeout` in its own bash, output to its log) ---
stage_smoke() {
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  echo "--- where each binary's libraries resolve (CUDA ones and any not found)"
  for b in "$KIT"/libexec/*; do
    echo "$(basename "$b"):"
    LD_LIBRARY_PATH=$ELBO_KIT_LD ldd "$b" | grep -E "not found|cuda|cublas|cudnn|nccl|nvrtc|libstdc|libmpi|hdf5"
  done
  local missing
  missing=$(for b in "$KIT"/libexec/*; do LD_LIBRARY_PATH=$ELBO_KIT_LD ldd "$b"; done | grep -c "not found")
  echo "--- elbo info"
  elbo info || return 1
  echo "--- mpirun -np 2 elbo info"
  mpirun -np 2 elbo info || return 1
  echo "--- torch"
  "$ELBO_PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU seen by torch")'
  compute-sanitizer --version | tail -1
  local cuda
  cuda=$(elbo info | grep -m1 '^cuda:')
  echo "RESULT: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); $missing libraries not found; $cuda"
  [[ $missing == 0 && $cuda != "cuda: 0 device"* ]]
}

gtest_result() {  # log -> "N passed, M failed, K skipped"
  local p f s
  p=$(grep -c '^\[       OK \]' "$1"); f=$(grep -c '^\[  FAILED  \] [A-Za-z]*\.' "$1"); s=$(grep -c '^\[  SKIPPED \]' "$1")
  echo "$p passed, $f failed, $s skipped"
  [[ $f == 0 && $s == 0 ]]  # a skipped GPU test means the GPU was not seen: not a pass
}

stage_parity() {
  local rc=0
  for t in test_probe test_cuda_parity test_conv_ops; do
    echo "=== $t"
    "$t" --gtest_color=no 2>&1 | tee "$W/$t.log" || rc=1
    gtest_result "$W/$t.log" >/dev/null || rc=1
  done
  cat "$W"/test_*.log >"$W/parity_all.log"
  echo "RESULT: $(gtest_result "$W/parity_all.log"); closest to its tolerance: $(awk '/^parity / {
      for (i = 1; i <= NF; i++) { if ($i == "err") e = $(i + 1); if ($i == "(tol") t = $(i + 1) + 0 }
      if (e / t > m) { m = e / t; line = $0 } } END { print line }' "$W/parity_all.log")"
  return $rc
}

stage_train() {
  PYTHONUNBUFFERED=1 "$ELBO_PY" "$ROOT/tests/dist/test_gpu_train.py" --elbo "$KIT/bin/elbo" --data "$DATA" \
    --spec "$ROOT/configs/smoke.yaml" --work "$W/train"
  local rc=$?
  echo "RESULT: exit $rc$([[ $rc == 77 ]] && echo ' (skipped: the GPU was not seen)'); $(grep -c '^FAIL\|failed' "$STAGE_LOG" 2>/dev/null || true) failure lines"
  return $rc
}

stage_graphs() {
  # fmnist_conv at batch 128 for 200 steps; every 50 steps an evaluation (batches of
  # 500, IWAE 5) and image grids (64 samples, reconstructions): shapes larger than the
  # training step's, between the recorded graph's replays.
  local common=(train "$ROOT/configs/fmnist_conv.yaml" --set device=cuda --set data.train="$DATA/train"
    --set data.test="$DATA/test" --set train.max_steps=200 --set train.log_every=50 --set eval.every=50
    --set eval.max_samples=1000 --set eval.iw_samples=5 --set eval.images=true --set output.overwrite=true)
  elbo "${common[@]}" --set train.cuda_graph=on --set output.dir="$W/graph_on" || return 1
  elbo "${common[@]}" --set train.cuda_graph=off --set output.dir="$W/graph_off" || return 1
  "$ELBO_PY" - "$W" <<'PY' || return 1
import csv, sys, h5py, numpy as np
w = sys.argv[1]
def load(tag):
    with h5py.File(f"{w}/{tag}/model.h5") as f:
        p = {k: f["params"][k][...] for k in f["params"]}
    rows = list(csv.DictReader(open(f"{w}/{tag}/metrics.csv")))
    return p, rows
on, mon = load("graph_on")
off, moff = load("graph_off")
same = all(np.array_equal(on[k], off[k]) for k in off)
tests = [(r["step"], r["test_neg_elbo"]) for r in mon if r.get("test_neg_elbo")]
same_m = [(r["neg_elbo"], r.get("test_neg_elbo")) for r in mon] == [(r["neg_elbo"], r.get("test_neg_elbo")) for r in moff]
print(f"graph on vs off, 200 conv steps with {len(tests)} evaluations between: parameters bit-identical = {same}, "
      f"metrics identical = {same_m}; test -ELBO by step {tests}")
sys.exit(0 if same and same_m else 1)
PY
  local r_on=$? e_gpu e_cpu
  elbo eval "$W/graph_on/model.h5" --data "$DATA/test" --iw-samples 20 --max-samples 2000 --device cuda \
    --output "$W/eval_gpu.yaml" || return 1
  elbo eval "$W/graph_on/model.h5" --data "$DATA/test" --iw-samples 20 --max-samples 2000 --device cpu \
    --output "$W/eval_cpu.yaml" || return 1
  echo "--- eval.yaml, GPU then CPU"; cat "$W/eval_gpu.yaml" "$W/eval_cpu.yaml"
  "$ELBO_PY" - "$W" <<'PY'
import sys, yaml
w = sys.argv[1]
g, c = yaml.safe_load(open(f"{w}/eval_gpu.yaml")), yaml.safe_load(open(f"{w}/eval_cpu.yaml"))
keys = [k for k in g if isinstance(g[k], float) and k in c]
worst = max(abs(g[k] - c[k]) / max(abs(c[k]), 1e-9) for k in keys)
print(f"RESULT: graphs on/off bit-identical through evaluations; elbo eval GPU vs CPU worst relative gap {worst:.2e} over {keys}")
sys.exit(0 if worst < 1e-4 else 1)
PY
}

stage_nccl() {
  # NCCL between GPUs (a machine with several): G ranks, one per GPU, against 1 rank at
  # the same global batch, and the all-reduce self-test's busbw.
  local g
  g=$(nvidia-smi -L | grep -c '^GPU')
  if (( g < 2 )); then echo "RESULT: $g GPU: NCCL between GPUs needs a machine with several (skipped)"; return 0; fi
  local common=(train "$ROOT/configs/smoke.yaml" --set device=cuda --set data.train="$DATA/train" --set data.test=
    --set train.batch_size=96 --set train.max_steps=50 --set output.overwrite=true)
  elbo "${common[@]}" --set output.dir="$W/nccl_np1" || return 1
  mpirun -np "$g" elbo "${common[@]}" --set dist.communicator=nccl --set output.dir="$W/nccl_np$g" || return 1
  "$ELBO_PY" - "$W" "$g" <<'PY'
import sys, h5py, numpy as np
w, g = sys.argv[1], sys.argv[2]
load = lambda d: {k: f["params"][k][...] for f in [h5py.File(f"{w}/{d}/model.h5")] for k in f["params"]}
a, b = load("nccl_np1"), load(f"nccl_np{g}")
err = max(float(np.linalg.norm(b[k] - a[k]) / max(np.linalg.norm(a[k]), 1e-30)) for k in a)
print(f"RESULT: NCCL {g} GPUs vs 1 GPU, 50 steps: parameters within {err:.2e}")
sys.exit(0 if err < 1e-5 else 1)
PY
}

stage_stream() {
  # The streaming loader feeding a GPU rank (pinned buffers, the reader thread) gives
  # the bits of the memory loader, with data.shuffle: blocks on both.
  local common=(train "$ROOT/configs/fmnist_mlp.yaml" --set device=cuda --set data.train="$DATA/train"
    --set data.test= --set eval.every=0 --set data.shuffle=blocks --set train.max_steps=200 --set output.overwrite=true)
  elbo "${common[@]}" --set data.loader=memory --set output.dir="$W/loader_memory" || return 1
  elbo "${common[@]}" --set data.loader=stream --set data.cache_mb=4 --set output.dir="$W/loader_stream" || return 1
  grep -h "data wait\|read at most" "$STAGE_LOG" | tail -3
  "$ELBO_PY" - "$W" <<'PY'
import sys, h5py, numpy as np
w = sys.argv[1]
load = lambda d: {k: f["params"][k][...] for f in [h5py.File(f"{w}/{d}/model.h5")] for k in f["params"]}
a, b = load("loader_memory"), load("loader_stream")
same = all(np.array_equal(a[k], b[k]) for k in a)
print(f"RESULT: GPU training, data.loader stream (cache 4 MB) vs memory, 200 steps: bit-identical = {same}")
sys.exit(0 if same else 1)
PY
}

stage_memcheck() {
  compute-sanitizer --tool memcheck --target-processes all --leak-check no --error-exitcode 9 \
    "$KIT/bin/test_cuda_parity" --gtest_color=no
  local rc=$?
  echo "RESULT: exit $rc; $(grep -m1 'ERROR SUMMARY' "$STAGE_LOG" || echo 'no ERROR SUMMARY line')"
  return $rc
}

stage_bench() {
  export ELBO=$KIT/bin/elbo PY=$ELBO_PY BENCH_KEEP=$W/bench
  bash "$ROOT/bench/gpu.sh" 600 || return 1
  bash "$ROOT/bench/gpu_conv.sh" 600 || return 1
  echo "--- all-reduce self-test: 2 ranks sharing the GPU (MPI through pinned host memory)"
  mpirun -np 2 elbo train "$ROOT/configs/fmnist_mlp.yaml" --set device=cuda --set dist.communicator=mpi \
    --set data.train="$DATA/train" --set data.test= --set eval.every=0 --set train.max_steps=20 \
    --set output.dir="$W/selftest" | grep -E "self-test|gradients:"
  if (( $(date +%s) + 150 < STAGE_DEADLINE )); then
    echo "--- torch.compile, while time remains"
    COMPILE_ONLY=1 bash "$ROOT/bench/gpu.sh" 600
    (( $(date +%s) + 90 < STAGE_DEADLINE )) && COMPILE_ONLY=1 bash "$ROOT/bench/gpu_conv.sh" 600
  fi
  # The runs' own logs and metrics, for a look afterwards (not the models).
  tar -C "$W" -czf "$OUT/bench-runs.tar.gz" --exclude='*.h5' --exclude='*.png' bench 2>/dev/null
  echo "RESULT: $(grep -h '^summary:' "$STAGE_LOG" | tr '\n' ' ')"
}

stage_profile() {
  # Per-kernel GPU time of a few steps of the conv VAE at batch 1024, elbo (graphs off,
  # so each kernel is its own launch) and PyTorch eager, with Nsight Compute's
  # duration metric only (one replay per kernel; clocks left alone).
  command -v ncu >/dev/null || { echo "RESULT: no ncu on this machine"; return 0; }
  mkdir -p "$W/bench"
  # application-only: elbo started without mpirun forks Open MPI's singleton daemon, which
  # ncu would otherwise follow too (two windows timed out on this).
  local ncu=(ncu --target-processes application-only --clock-control none --metrics gpu__time_duration.sum
             --launch-skip 1000 --launch-count 80
             --print-units base --csv)  # one row per launch: "Kernel Name", "Metric Name", "Metric Value" (ns)
  "${ncu[@]}" --log-file "$W/bench/ncu-elbo.csv" elbo train "$ROOT/configs/fmnist_conv.yaml" --set device=cuda \
    --set data.train="$DATA/train" --set data.test= --set eval.every=0 --set train.batch_size=1024 \
    --set train.drop_last=true --set train.epochs=1000 --set train.max_steps=40 --set train.cuda_graph=off \
    --set output.dir="$W/profile-elbo" --set output.overwrite=true 2>&1 | grep -E "^==(PROF|ERROR|WARNING)==" | head -5
  "${ncu[@]}" --log-file "$W/bench/ncu-torch.csv" "$ELBO_PY" "$ROOT/bench/pytorch_vae.py" --model conv --device cuda \
    --train "$DATA/train" --test "$DATA/test" --batch 1024 --drop-last --epochs 1000 --max-steps 40 --warmup-steps 10 --no-eval \
    2>&1 | grep -E "^==(PROF|ERROR|WARNING)==" | head -5
  "$ELBO_PY" - "$W/bench" <<'PY'
import csv, sys, collections
for tag in ("elbo", "torch"):
    path = f"{sys.argv[1]}/ncu-{tag}.csv"
    try:
        lines = [l for l in open(path) if l.startswith('"')]
    except OSError:
        print(f"{tag}: no profile ({path} missing)"); continue
    rows = list(csv.DictReader(lines))
    t = collections.defaultdict(float); n = collections.Counter()
    for r in rows:
        name = r.get("Kernel Name") or r.get("Function Name") or "?"
        if "duration" not in (r.get("Metric Name") or ""):
            continue
        v = float((r.get("Average") or r.get("Metric Value") or "0").replace(",", ""))
        c = int(float((r.get("Invocations") or "1").replace(",", "")))
        t[name[:90]] += v * c; n[name[:90]] += c
    total = sum(t.values())
    print(f"--- {tag}: {sum(n.values())} kernels profiled, {total / 1e6:.3f} ms in all")
    for k, v in sorted(t.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{100 * v / max(total, 1):5.1f}%  {v / 1e3 / max(n[k], 1):9.1f} us x {n[k]:4d}  {k}")
PY
  tar -C "$W" -czf "$OUT/bench-runs.tar.gz" --exclude='*.h5' --exclude='*.png' bench 2>/dev/null
  echo "RESULT: per-kernel time of the conv VAE at batch 1024 above"
}
export -f stage_smoke stage_parity stage_train stage_graphs stage_nccl stage_stream stage_memcheck stage_bench stage_profile gtest_result

# bench takes what the budget leaves (torch.compile rows only while time remains);
# profile runs last, on what is left after that.
declare -A LIMIT=([smoke]=45 [parity]=60 [train]=120 [graphs]=75 [nccl]=60 [stream]=60 [memcheck]=90 [bench]=330 [profile]=90)
rows=()
for s in $STAGES; do
  left=$((BUDGET - (SECONDS - T0) - 5))
  lim=${LIMIT[$s]:-60}
  (( lim > left )) && lim=$left
  if (( lim < 10 )); then rows+=("$(printf '%-9s %-8s %5s  %s' "$s" "no time" 0 "the budget of $BUDGET s ran out")"); continue; fi
  t=$SECONDS
  # The device tool brings back 8 files at most: each stage logs to current-STAGE.log,
  # which joins stages.log when the stage ends (a run cut short keeps its last log).
  export STAGE_LOG=$OUT/current-$s.log
  STAGE_DEADLINE=$(( $(date +%s) + lim )) timeout -k 5 "$lim" bash -c "stage_$s" >"$STAGE_LOG" 2>&1
  rc=$?
  status=$([[ $rc == 0 ]] && echo pass || { [[ $rc == 124 || $rc == 137 ]] && echo timeout || echo "FAIL($rc)"; })
  result=$(grep -h '^RESULT: ' "$STAGE_LOG" | tail -1 | cut -c9-)
  rows+=("$(printf '%-9s %-8s %5d  %s' "$s" "$status" $((SECONDS - t)) "${result:-see stages.log}")")
  { echo "===== stage $s: $status, $((SECONDS - t)) s"; cat "$STAGE_LOG"; } >>"$OUT/stages.log"
  rm -f "$STAGE_LOG"
  echo "${rows[-1]}"
done
{
  echo
  printf '%-9s %-8s %5s  %s\n' stage status s result
  printf '%s\n' "${rows[@]}"
  echo "total $((SECONDS - T0)) s of a $BUDGET s budget"
} | tee -a "$SUMMARY"
