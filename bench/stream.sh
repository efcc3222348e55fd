#!/usr/bin/env bash
# Memory against stream loading on a generated split: peak RSS (VmHWM) of every rank
# and the loader-bound throughput (a tiny model, so that a step costs little next to
# getting its batch; the log's "data wait" share says how loader-bound it is).
# Usage: [SIZE=32] bash bench/stream.sh [SAMPLES=100000] [RANKS=2] [CACHE_MB=64]
# The split is SAMPLES x 3 x SIZE x SIZE uint8 (SIZE 32: 3 KiB each, 100000 = 307 MB;
# SIZE 64: 12 KiB each) in 8 shards, written with h5py under a temporary directory;
# keep SAMPLES modest on small machines.
source "$(dirname "$0")/common.sh"
SAMPLES=${1:-100000}
RANKS=${2:-2}
CACHE=${3:-64}
SIZE=${SIZE:-32}

"$PY" - "$WORK/split" "$SAMPLES" "$SIZE" <<'PY'
import os, sys
import h5py, numpy as np
d, n, s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(d)
rng = np.random.default_rng(0)
shards, k = [], 8
for i in range(k):
    b, e = n * i // k, n * (i + 1) // k
    name = f"shard-{i:05d}-of-{k:05d}.h5"
    with h5py.File(os.path.join(d, name), "w") as f:
        f.create_dataset("images", data=rng.integers(0, 256, size=(e - b, 3, s, s), dtype=np.uint8),
                         chunks=(max(1, min(e - b, (1 << 20) // (3 * s * s))), 3, s, s))
        f.attrs["global_offset"] = b
    shards.append(f"  - file: {name}\n    offset: {b}\n    num_samples: {e - b}\n")
with open(os.path.join(d, "manifest.yaml"), "w") as f:
    f.write(f"format_version: 1\nsplit: train\nnum_samples: {n}\nshape: [3, {s}, {s}]\ndtype: uint8\n"
            f"has_labels: false\nnum_shards: {k}\nsource: bench/stream.sh\nshards:\n" + "".join(shards))
PY

# Runs elbo under a watcher that samples /proc/PID/status until the rank exits and
# prints its VmHWM (peak resident set) on stderr.
cat > "$WORK/hwm.sh" <<'SH'
#!/usr/bin/env bash
"$@" & pid=$!
hwm=0
while kill -0 $pid 2>/dev/null; do
  v=$(awk '/VmHWM/ {print $2}' /proc/$pid/status 2>/dev/null || true)
  [[ -n $v && $v -gt $hwm ]] && hwm=$v
  sleep 0.1
done
wait $pid; rc=$?
echo "VmHWM rank ${OMPI_COMM_WORLD_RANK:-0}: $((hwm / 1024)) MiB" >&2
exit $rc
SH
chmod +x "$WORK/hwm.sh"

run() {  # loader shuffle
  local out=$WORK/$1-$2
  mpirun -np "$RANKS" "$WORK/hwm.sh" "$ELBO" train "$ROOT/configs/smoke.yaml" --set device=cpu \
    --set data.train="$WORK/split" --set data.test= --set data.shape=[3,$SIZE,$SIZE] --set data.max_samples=0 \
    --set data.loader="$1" --set data.shuffle="$2" --set data.cache_mb="$CACHE" \
    --set model.encoder=[8] --set model.decoder=[8] --set model.latent=2 \
    --set train.batch_size=256 --set train.epochs=1 --set train.log_every=50 --set output.dir="$out" \
    >"$out.log" 2>&1
  local rate wait read
  rate=$(awk -F, 'NR>2 {s+=$10; n++} END {if (n) printf "%.0f", s/n; else print "?"}' "$out/metrics.csv")
  wait=$(grep -o 'data wait [0-9]*%' "$out.log" | tail -1 | awk '{print $3}' || true)
  read=$(grep -o 'read at most [0-9.]*%' "$out.log" | awk '{print $4}' || true)
  printf "%-8s %-8s %10s %8s %10s  %s\n" "$1" "$2" "$rate" "${wait:-?}" "${read:--}" \
    "$(grep -o 'VmHWM rank [0-9]*: [0-9]* MiB' "$out.log" | sort | awk '{print $4}' | paste -sd' ')"
}

echo "split: $SAMPLES samples x 3x${SIZE}x${SIZE} ($(( SAMPLES * 3 * SIZE * SIZE / 1048576 )) MiB), $RANKS ranks, data.cache_mb $CACHE"
printf "%-8s %-8s %10s %8s %10s  %s\n" loader shuffle samples/s "wait" "read/rank" "VmHWM per rank (MiB)"
run memory true
run stream blocks
run stream true
if [[ $SIZE == 64 ]]; then
  # The model this loader feeds: configs/celeba64_conv.yaml (64 x 64 RGB) training on
  # the same split, against the loader-bound rate above.
  out=$WORK/conv
  mpirun -np "$RANKS" "$ELBO" train "$ROOT/configs/celeba64_conv.yaml" --set device=cpu \
    --set data.train="$WORK/split" --set data.test= --set data.loader=stream --set data.shuffle=blocks \
    --set data.cache_mb="$CACHE" --set eval.every=0 --set train.batch_size=64 --set train.max_steps=30 \
    --set train.log_every=10 \
    --set output.dir="$out" >"$out.log" 2>&1
  echo "celeba64_conv training: $(awk -F, 'NR>2 {s+=$10; n++} END {if (n) printf "%.0f", s/n; else print "?"}' \
    "$out/metrics.csv") samples/s (batch 64, steps 11..30)"
fi
