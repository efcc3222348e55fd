#!/usr/bin/env bash
# Quality: configs/fmnist_mlp.yaml trained by elbo on 2 MPI ranks against the same
# model and hyperparameters trained by PyTorch (bench/pytorch_vae.py), both
# evaluated on the Fashion-MNIST test split: negative ELBO per sample (one posterior
# sample) and the IWAE(k=100) NLL bound, in nats. Usage: bash bench/quality.sh
source "$(dirname "$0")/common.sh"

mpirun -np 2 --bind-to core "$ELBO" train "$ROOT/configs/fmnist_mlp.yaml" \
  --set data.train="$DATA/train" --set data.test="$DATA/test" --set eval.iw_samples=100 \
  --set train.threads=1 --set output.dir="$WORK/elbo" | grep -E "^(epoch .* step [0-9]+/[0-9]+ .*eta|test)" | tail -3
OMP_NUM_THREADS=1 "$PY" "$ROOT/bench/pytorch_vae.py" --train "$DATA/train" --test "$DATA/test" --epochs 10 \
  --threads 1 --iw-samples 100 --json "$WORK/torch.json" | tail -1
"$PY" - "$WORK/elbo/eval.yaml" "$WORK/torch.json" <<'PYEOF'
import json, sys
e = dict(l.split(": ", 1) for l in open(sys.argv[1]).read().splitlines())
t = json.load(open(sys.argv[2]))
en, ti = float(e["neg_elbo"]), t["test_neg_elbo"]
print(f"test -ELBO  elbo (2 ranks) {en:.3f}  pytorch {ti:.3f}  difference {en - ti:+.3f} nats")
print(f"IWAE(k=100) elbo {float(e['iwae_nll']):.3f}  pytorch {t['test_iwae']:.3f}  difference "
      f"{float(e['iwae_nll']) - t['test_iwae']:+.3f} nats")
print("within 1.5 nats:", "yes" if abs(en - ti) <= 1.5 else "NO")
PYEOF
