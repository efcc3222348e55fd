#!/usr/bin/env bash
# elbo-shard's image decoding throughput against PIL on the same files: a generated
# folder of CelebA-sized (178 x 218) RGB photos-like images, as JPEG and as PNG,
# turned into 64 x 64 shards (--center-crop 140 --size 64 64) by elbo-shard with
# 1 thread and with all cores, and decoded + cropped + resized by PIL in one Python
# process (one core). Figures are images/s and images/s per core.
# Usage: bash bench/shard_speed.sh [IMAGES=4000]
source "$(dirname "$0")/common.sh"
N=${1:-4000}
SHARD=${ELBO_SHARD:-$(dirname "$ELBO")/../data_tools/elbo-shard}
[[ -x $SHARD ]] || SHARD=$BUILD/data_tools/elbo-shard
CORES=$(nproc)

"$PY" - "$WORK" "$N" <<'PY'
import os, sys
import numpy as np
from PIL import Image
work, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:218, 0:178]
for fmt in ("jpeg", "png"):
    d = os.path.join(work, fmt, "faces")
    os.makedirs(d)
    for i in range(n):
        # Smooth fields with a little noise: compresses like a photo, not like noise.
        a, b, c = rng.uniform(0.01, 0.05, 3)
        img = np.stack([128 + 100 * np.sin(a * xx + b * yy + c * k) for k in range(3)], -1)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        im = Image.fromarray(img)
        if fmt == "jpeg":
            im.save(os.path.join(d, f"{i:06d}.jpg"), quality=90)
        else:
            im.save(os.path.join(d, f"{i:06d}.png"))
PY

pil_rate() {  # folder -> images/s, one process
  "$PY" - "$1" <<'PY'
import os, sys, time
from PIL import Image
d = os.path.join(sys.argv[1], "faces")
files = sorted(os.listdir(d))
t = time.perf_counter()
for f in files:
    im = Image.open(os.path.join(d, f)).convert("RGB")
    w, h = im.size
    l, u = (w - 140) // 2, (h - 140) // 2
    im.crop((l, u, l + 140, u + 140)).resize((64, 64), Image.BILINEAR).tobytes()
print(f"{len(files) / (time.perf_counter() - t):.0f}")
PY
}
shard_rate() {  # folder threads -> images/s
  local t0 t1
  t0=$(date +%s.%N)
  ELBO_PROGRESS=off "$SHARD" --image-dir "$1" --center-crop 140 --size 64 64 --threads "$2" \
    --out "$WORK/out-$(basename "$1")-$2" --overwrite >/dev/null
  t1=$(date +%s.%N)
  awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }'
}

echo "images: $N of 178x218 RGB -> --center-crop 140 --size 64 64 | $CORES cores | $(date -u +%F)"
printf "%-6s %18s %22s %18s %s\n" format "PIL 1 core img/s" "elbo-shard 1 thread" "elbo-shard $CORES thr" "per core vs PIL"
for fmt in jpeg png; do
  p=$(pil_rate "$WORK/$fmt"); e1=$(shard_rate "$WORK/$fmt" 1); en=$(shard_rate "$WORK/$fmt" "$CORES")
  printf "%-6s %18d %22d %18d %.2fx (1 thread), %.2fx (%d threads, per core)\n" "$fmt" "$p" "$e1" "$en" \
    "$(awk "BEGIN{print $e1/$p}")" "$(awk "BEGIN{print $en/$CORES/$p}")" "$CORES"
done
